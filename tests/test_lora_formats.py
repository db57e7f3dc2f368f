"""LoRA for every user's loader: the original-Wan / ComfyUI key layout next to diffusers' file.

No ComfyUI here: diffusers' ``WanPipeline.load_lora_weights`` converts a ``diffusion_model.``
file back to its own layout itself, so loading our file with the stock pipeline and getting
the trained student back proves the key mapping and the alpha handling (folded into lora_B).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import base_config, write_config
from safetensors import safe_open
from test_lora_ema import stock_sample

from accel_distill.cli import main
from accel_distill.export import lora_adapters
from accel_distill.families.wan_lora import to_original_wan
from accel_distill.testing.tiny_wan import build_tiny_wan, tiny_transformer_config

# every layer family a LoRA can target on a T2V WanTransformer3DModel (patch_embedding excepted)
T2V_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
T2V_TARGETS += ["time_proj", "linear_1", "linear_2", "proj_out"]
LORA = {"rank": 4, "alpha": 8, "init": "gaussian", "target_modules": T2V_TARGETS, "export_merged": True}


def lora_finetune(tmp: Path, model: Path, data: Path) -> Path:
    """A 2-step LoRA finetune of ``model`` (in process); returns its export folder."""
    cfg = base_config("finetune", model, model, data, tmp / "out")
    cfg["roles"]["student"].update(lora=LORA, learning_rate=1e-2)  # the adapter moves visibly
    cfg["training"].update(max_train_steps=2, checkpointing_steps=2)
    assert main(["--config", str(write_config(tmp / "run.yaml", cfg))]) == 0
    return tmp / "out" / "export"


def pipeline(path: Path, *loras: tuple[Path, str, bool]):
    """Stock WanPipeline from ``path`` with LoRA files ``(folder, file name, into transformer_2)`` loaded."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    for i, (folder, name, second) in enumerate(loras):
        pipe.load_lora_weights(folder, weight_name=name, adapter_name=f"a{i}", load_into_transformer_2=second)
    return pipe


def test_keys_are_the_original_wan_layout_for_every_layer_and_convert_back(tmp_path):
    """An I2V-shaped transformer with a LoRA on every layer that has an original-Wan name (k_img / v_img,
    the CLIP projection included): the exact names, no peft ``.default``, no ``.alpha``; diffusers'
    loader converts the file back and the model's output equals the trained adapter's."""
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig
    from safetensors.torch import save_file

    from accel_distill.families.wan_lora import lora_layers, original_layer

    i2v = {**tiny_transformer_config(), "image_dim": 16, "added_kv_proj_dim": 24}
    torch.manual_seed(0)
    trained = WanTransformer3DModel(**i2v)
    base = {k: v.clone() for k, v in trained.state_dict().items()}
    targets = T2V_TARGETS + ["add_k_proj", "add_v_proj", "ff.net.0.proj", "ff.net.2"]
    trained.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    state, config = lora_adapters(trained)["transformer"]
    wan = to_original_wan(state, config)

    block = ["self_attn." + n for n in "qkvo"] + ["cross_attn." + n for n in ("q", "k", "v", "o", "k_img", "v_img")]
    layers = [f"blocks.{i}.{n}" for i in (0, 1) for n in block + ["ffn.0", "ffn.2"]]
    layers += ["time_embedding.0", "time_embedding.2", "time_projection.1", "text_embedding.0", "text_embedding.2"]
    layers += ["img_emb.proj.1", "img_emb.proj.3", "head.head"]
    assert set(wan) == {f"diffusion_model.{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    # ... which is every layer with an original-Wan name (lora_layers: one block, every optional part)
    assert {original_layer(n) for n, _ in lora_layers()} - {None} == {n for n in layers if not n.startswith("blocks.1")}
    # alpha 8 / rank 4 is folded into lora_B: scale 2, lora_A unchanged
    a, b = "blocks.1.cross_attn.k_img.lora_A.weight", "blocks.1.cross_attn.k_img.lora_B.weight"
    assert torch.equal(wan[f"diffusion_model.{a}"], state[a.replace("cross_attn.k_img", "attn2.add_k_proj")])
    assert torch.equal(wan[f"diffusion_model.{b}"], 2 * state[b.replace("cross_attn.k_img", "attn2.add_k_proj")])

    save_file(wan, tmp_path / "wan_lora.safetensors")
    from diffusers import WanPipeline

    loaded = WanTransformer3DModel(**i2v)
    loaded.load_state_dict(base)
    untouched = forward(loaded)
    loaded.load_lora_adapter(WanPipeline.lora_state_dict(tmp_path / "wan_lora.safetensors"), prefix="transformer")
    ours, theirs = forward(trained), forward(loaded)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert (theirs - untouched).abs().max() > 1e-2


def forward(model, t: float = 500.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x, text = torch.randn(1, 16, 2, 4, 4, generator=gen), torch.randn(1, 8, 32, generator=gen)
    image = torch.randn(1, 4, 16, generator=gen) if model.config.image_dim else None
    with torch.no_grad():
        return model(x, torch.tensor([t]), text, encoder_hidden_states_image=image, return_dict=False)[0]


def test_single_transformer_export_loads_in_stock_wan_pipeline(tmp_path, tiny_wan, latent_data):
    """Trained LoRA on every T2V layer family: ``wan_lora.safetensors`` in stock ``load_lora_weights``
    samples as the trained (fused) student and as diffusers' own file, not as the base."""
    export = lora_finetune(tmp_path, tiny_wan, latent_data)
    info = json.loads((export / "accel_distill_export.json").read_text())
    assert info["extra_lora_files"] == {"wan_lora.safetensors": {"module": "transformer", "layout": "original-wan"}}
    with safe_open(export / "wan_lora.safetensors", "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["layout"] == "original-wan"
    assert keys and all(k.startswith("diffusion_model.") and ".default" not in k and "alpha" not in k for k in keys)

    embeds = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(3))
    student = stock_sample(pipeline(export), embeds)  # the adapter fused into a full pipeline (export_merged)
    wan = stock_sample(pipeline(tiny_wan, (export, "wan_lora.safetensors", False)), embeds)
    diffusers_file = stock_sample(pipeline(tiny_wan, (export, "pytorch_lora_weights.safetensors", False)), embeds)
    torch.testing.assert_close(wan, diffusers_file, rtol=0, atol=1e-5)
    torch.testing.assert_close(wan, student, rtol=0, atol=1e-4)
    assert (wan - stock_sample(pipeline(tiny_wan), embeds)).abs().max() > 1e-3


def test_two_experts_export_a_high_and_a_low_noise_file(tmp_path, latent_data):
    """Wan2.2 A14B-style: ``wan_lora_high_noise`` loads into ``transformer``, ``wan_lora_low_noise`` with
    ``load_into_transformer_2=True``; each expert then computes what the trained expert computes."""
    moe = build_tiny_wan(tmp_path / "tiny-moe", boundary_ratio=0.875)
    export = lora_finetune(tmp_path, moe, latent_data)
    info = json.loads((export / "accel_distill_export.json").read_text())
    assert info["extra_lora_files"] == {
        "wan_lora_high_noise.safetensors": {"module": "transformer", "layout": "original-wan"},
        "wan_lora_low_noise.safetensors": {"module": "transformer_2", "layout": "original-wan"},
    }
    student, base = pipeline(export), pipeline(moe)
    wan = pipeline(
        moe, (export, "wan_lora_high_noise.safetensors", False), (export, "wan_lora_low_noise.safetensors", True)
    )
    for key, t in (("transformer", 990.0), ("transformer_2", 100.0)):
        ours, theirs = forward(getattr(student, key), t), forward(getattr(wan, key), t)
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
        assert (theirs - forward(getattr(base, key), t)).abs().max() > 1e-3, key
    embeds = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(stock_sample(wan, embeds), stock_sample(student, embeds), rtol=0, atol=1e-4)


def test_a_target_without_an_original_wan_name_is_refused_at_config_time(tmp_path, tiny_wan, latent_data, capsys):
    cfg = base_config("finetune", tiny_wan, tiny_wan, latent_data, tmp_path / "out")
    cfg["roles"]["student"]["lora"] = {"rank": 2, "target_modules": ["to_q", "patch_embedding"]}
    assert main(["--config", str(write_config(tmp_path / "run.yaml", cfg))]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "roles.student.lora.target_modules:" in line and "patch_embedding (Conv3d)" in line, line
    assert "original-Wan" in line and not (tmp_path / "out").exists()
