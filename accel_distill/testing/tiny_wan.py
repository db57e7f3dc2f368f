"""Tiny, offline Wan pipelines saved as ordinary diffusers folders.

Tests, the demo and the benchmarks load them through the same
``from_pretrained`` path a Hub id takes, so no code path is special-cased for
them. Sizes follow diffusers' own tiny test configs.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Transformer sizes: "tiny" (~26k params) for tests, "20m" for benchmarks,
# "1.3b" is the real Wan2.1-T2V-1.3B shape (random weights, GPU only).
TRANSFORMER_SIZES: dict[str, dict] = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=12, text_dim=32, ffn_dim=64, num_layers=2),
    "20m": dict(num_attention_heads=6, attention_head_dim=64, text_dim=32, ffn_dim=1536, num_layers=8),
    "1.3b": dict(num_attention_heads=12, attention_head_dim=128, text_dim=4096, ffn_dim=8960, num_layers=30),
}


def tiny_transformer_config(size: str = "tiny") -> dict:
    """Keyword arguments for ``WanTransformer3DModel`` of the named size."""
    base = dict(
        patch_size=(1, 2, 2),
        in_channels=16,
        out_channels=16,
        freq_dim=32 if size != "1.3b" else 256,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32 if size != "1.3b" else 1024,
    )
    base.update(TRANSFORMER_SIZES[size])
    return base


def word_tokenizer(words: list[str]):
    """A WordLevel tokenizer over ``words`` (after the special tokens), loadable by AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "</s>", "<unk>"] + [w for w in dict.fromkeys(words) if w not in ("<pad>", "</s>", "<unk>")]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_text_encoder(vocab_size: int, d_model: int):
    """A random 2-layer UMT5 encoder: different prompts give different embeddings."""
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(
        UMT5Config(
            vocab_size=vocab_size,
            d_model=d_model,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def save_pipeline(
    path: str | Path,
    *,
    transformer,
    vae,
    tokenizer,
    text_encoder,
    flow_shift: float,
    transformer_2=None,
    boundary_ratio: float | None = None,
    pipeline_class: str = "WanPipeline",
    **components,
) -> Path:
    """Save a Wan pipeline folder (``pipeline_class``) with Wan's own scheduler (UniPC, flow prediction);
    two experts with ``transformer_2`` and ``boundary_ratio`` (Wan2.2 A14B's layout); ``components``: the
    pipeline's other arguments (``image_encoder``, ``image_processor``, ``expand_timesteps``)."""
    import diffusers
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift, num_train_timesteps=1000
    )
    pipe = getattr(diffusers, pipeline_class)(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=boundary_ratio,
        **components,
    )
    pipe.save_pretrained(path)
    return Path(path)


# Image-to-video variants of the tiny model ("t2v": WanPipeline, Wan2.1 T2V's layout):
# "i2v": Wan2.1 I2V -- 36 input channels (latent 16 + mask 4 + image latent 16), CLIP image embeddings
#        (a tiny CLIPVisionModel + CLIPImageProcessor), WanImageToVideoPipeline;
# "ti2v": Wan2.2 TI2V-5B -- the Wan2.2 VAE (48 channels, spatial factor 16), WanPipeline(expand_timesteps=True).
VARIANTS = ("t2v", "i2v", "ti2v")
CLIP_SIZE = 32  # tiny image encoder: 32x32 images, patches of 4 -> 65 image tokens of width 4


def tiny_image_encoder():
    """(CLIPVisionModel, CLIPImageProcessor), tiny and random."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=4,
        projection_dim=4,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=CLIP_SIZE,
        intermediate_size=16,
        patch_size=4,
    )
    return CLIPVisionModel(config), CLIPImageProcessor(crop_size=CLIP_SIZE, size=CLIP_SIZE)


def variant_transformer_config(variant: str, size: str = "tiny") -> dict:
    """``WanTransformer3DModel`` keyword arguments of the named size for a variant (see :data:`VARIANTS`)."""
    cfg = tiny_transformer_config(size)
    if variant == "i2v":  # image embeds of the tiny CLIP (width 4) through add_k_proj, as Wan2.1 I2V-14B
        cfg.update(
            in_channels=36, image_dim=4, added_kv_proj_dim=cfg["num_attention_heads"] * cfg["attention_head_dim"]
        )
    elif variant == "ti2v":
        cfg.update(in_channels=48, out_channels=48)
    elif variant != "t2v":
        raise ValueError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
    return cfg


def tiny_vae(variant: str = "t2v"):
    """A random tiny ``AutoencoderKLWan``: Wan2.1's layout (16 channels), or Wan2.2's for "ti2v" (48 channels,
    2x2 patches, spatial factor 16; seeded non-trivial latents_mean / latents_std)."""
    from diffusers import AutoencoderKLWan

    common = dict(base_dim=3, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    if variant != "ti2v":
        return AutoencoderKLWan(z_dim=16, **common)
    gen = torch.Generator().manual_seed(11)
    return AutoencoderKLWan(
        z_dim=48,
        in_channels=12,
        out_channels=12,
        is_residual=True,
        patch_size=2,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        latents_mean=(torch.randn(48, generator=gen) * 0.5).tolist(),
        latents_std=(0.5 + torch.rand(48, generator=gen) * 2).tolist(),
        **common,
    )


WORDS = [
    f"w{i}" for i in range(40)
] + "a an the of handwritten digit cat dog video photo red blue green one two three".split()


def build_tiny_wan(
    path: str | Path,
    *,
    size: str = "tiny",
    seed: int = 0,
    flow_shift: float = 3.0,
    transformer_config: dict | None = None,
    boundary_ratio: float | None = None,
    variant: str = "t2v",
) -> Path:
    """Write a complete random-weight Wan pipeline folder at ``path`` and return it.

    ``transformer_config`` (``WanTransformer3DModel`` keyword arguments) replaces the
    named ``size``; the VAE stays tiny and the text encoder matches its ``text_dim``.
    ``boundary_ratio``: a two-expert (Wan2.2 A14B-style) pipeline with a second, differently
    initialised ``transformer_2`` for timesteps below ``boundary_ratio * 1000``.
    ``variant``: "t2v" (``WanPipeline``), "i2v" (Wan2.1 I2V, ``WanImageToVideoPipeline``) or "ti2v"
    (Wan2.2 TI2V-5B, ``WanPipeline`` with ``expand_timesteps``), see :data:`VARIANTS`.
    """
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    cfg = dict(transformer_config) if transformer_config is not None else variant_transformer_config(variant, size)
    transformer = WanTransformer3DModel(**cfg)
    transformer_2 = WanTransformer3DModel(**cfg) if boundary_ratio is not None else None
    vae = tiny_vae(variant)
    tokenizer = word_tokenizer(WORDS)
    extra: dict = {}
    if variant == "i2v":
        image_encoder, image_processor = tiny_image_encoder()
        extra = dict(
            pipeline_class="WanImageToVideoPipeline", image_encoder=image_encoder, image_processor=image_processor
        )
    elif variant == "ti2v":
        extra = dict(expand_timesteps=True)
    return save_pipeline(
        path,
        transformer=transformer,
        vae=vae,
        tokenizer=tokenizer,
        text_encoder=tiny_text_encoder(64, cfg["text_dim"]),
        flow_shift=flow_shift,
        transformer_2=transformer_2,
        boundary_ratio=boundary_ratio,
        **extra,
    )


def perturb_transformer(
    path: str | Path, *, scale: float = 0.05, seed: int = 1, subfolder: str = "transformer"
) -> None:
    """Add seeded noise to a saved transformer so teacher and student differ (tests)."""
    from diffusers import WanTransformer3DModel

    path = Path(path)
    model = WanTransformer3DModel.from_pretrained(path, subfolder=subfolder)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path / subfolder)
