"""Wan LoRAs in the original-Wan / ComfyUI key layout, besides diffusers' own file.

ComfyUI, Wan's own code and most Wan tools name a LoRA after the original ``WanModel``
layers, ``diffusion_model.blocks.0.self_attn.q.lora_A.weight``; diffusers' peft adapter is
``blocks.0.attn1.to_q.lora_A.weight``. :data:`LAYERS` is the exact inverse of diffusers'
``_convert_non_diffusers_wan_lora_to_diffusers`` (what ``WanPipeline.load_lora_weights``
does with a ``diffusion_model.`` file), for every layer a LoRA can target on
``WanTransformer3DModel`` except ``patch_embedding``, which that converter does not map
(a recipe targeting it is refused at config time).

Alpha: no ``.alpha`` tensors. The adapter's scale (peft's ``alpha / rank``, or
``alpha / sqrt(rank)`` with rsLoRA) is folded into ``lora_B``, so the file's delta is
``lora_B @ lora_A`` at strength 1.0 in every loader: ComfyUI and diffusers read a missing
alpha as scale 1, and loaders that ignore alpha tensors get it right too. (diffusers'
converter reads ``.alpha`` only for block layers and fails on one anywhere else.)
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

import torch

from accel_distill.errors import ConfigError

PREFIX = "diffusion_model."
LAYOUT = "original-wan"  # as recorded in accel_distill_export.json and the files' metadata

# diffusers layer inside blocks.N -> original Wan layer inside blocks.N
BLOCK_LAYERS = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img",  # I2V image keys / values
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
# diffusers layer outside the blocks -> original Wan layer
TOP_LAYERS = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",  # I2V CLIP projection
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "proj_out": "head.head",
}
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
SINGLE_FILE = "wan_lora.safetensors"
EXPERT_FILES = {"transformer": "wan_lora_high_noise.safetensors", "transformer_2": "wan_lora_low_noise.safetensors"}


def lora_file_names(keys: list[str]) -> dict[str, str]:
    """Original-Wan LoRA file per module: one file, or Wan2.2 A14B's high-noise / low-noise pair."""
    if keys == ["transformer"]:
        return {"transformer": SINGLE_FILE}
    if set(keys) == set(EXPERT_FILES):
        return {k: EXPERT_FILES[k] for k in keys}
    raise ValueError(f"no original-Wan LoRA file names for modules {keys}")


def original_layer(name: str) -> str | None:
    """The original-Wan name of diffusers layer ``name`` (``blocks.3.attn2.add_k_proj`` ->
    ``blocks.3.cross_attn.k_img``), None when it has none."""
    block = _BLOCK.fullmatch(name)
    if block is None:
        return TOP_LAYERS.get(name)
    inner = BLOCK_LAYERS.get(block.group(2))
    return None if inner is None else f"blocks.{block.group(1)}.{inner}"


def lora_scale(config: dict, layer: str) -> float:
    """peft's scaling of ``layer`` under adapter config ``config`` (``LoraConfig.to_dict()``)."""
    from peft.utils.other import get_pattern_key

    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = ranks.get(get_pattern_key(ranks.keys(), layer), config["r"])
    alpha = alphas.get(get_pattern_key(alphas.keys(), layer), config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def to_original_wan(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A peft adapter state dict of a ``WanTransformer3DModel`` (keys ``<layer>.lora_A.weight``,
    no adapter name) in the original-Wan layout, its scale folded into ``lora_B``."""
    out = {}
    for key, tensor in state.items():
        layer, sep, param = key.rpartition(".lora_")
        name = original_layer(layer) if sep else None
        if param not in ("A.weight", "B.weight") or name is None:
            raise ConfigError(f"LoRA weight {key!r} has no original-Wan / ComfyUI equivalent; cannot export it")
        if param == "B.weight" and (scale := lora_scale(config, layer)) != 1.0:
            tensor = tensor * scale
        out[f"{PREFIX}{name}.lora_{param}"] = tensor.detach().contiguous()
    return out


@lru_cache(maxsize=1)
def lora_layers() -> tuple[tuple[str, str], ...]:
    """(name, class) of every layer peft can put a LoRA on in a ``WanTransformer3DModel`` with every
    optional part (I2V image embedder and image keys/values), on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    dims = dict(num_attention_heads=1, attention_head_dim=8, text_dim=8, ffn_dim=8, num_layers=1, freq_dim=8)
    with init_empty_weights():
        model = WanTransformer3DModel(**dims, image_dim=8, added_kv_proj_dim=8, pos_embed_seq_len=4)
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)
    return tuple((n, type(m).__name__) for n, m in model.named_modules() if isinstance(m, kinds))


def unnamed_targets(target_modules: list[str]) -> list[tuple[str, str]]:
    """(target, layer) for each layer the LoRA targets select that has no original-Wan name."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    bad = []
    for target in target_modules:
        config = LoraConfig(target_modules=[target])
        for name, kind in lora_layers():
            if check_target_module_exists(config, name) and original_layer(name) is None:
                bad.append((target, f"{name} ({kind})"))
    return bad
