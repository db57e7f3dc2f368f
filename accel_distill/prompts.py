"""Prompt embeddings outside the training data: the negative prompt, validation prompts.

Either read from a file the user gives, or encoded once -- by one process, with
one load of the family's text encoder -- and cached in ``output_dir`` so a
resumed run (and every other rank) reads the file instead of the encoder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch
from accelerate import Accelerator


def pad_tokens(emb: torch.Tensor, max_length: int) -> torch.Tensor:
    """Zero-pad ``[L, D]`` to ``[max_length, D]`` float32, as the training data are padded."""
    return torch.nn.functional.pad(emb.float(), (0, 0, 0, max_length - emb.shape[0]))


def load_embedding_file(file: str, max_length: int, bad: Callable[[str], NoReturn]) -> torch.Tensor:
    """One ``[L, D]`` (or ``[1, L, D]``) tensor from a .safetensors / .pt file, padded to ``max_length``.

    ``bad(message)`` raises the caller's error (it names the config key).
    """
    try:
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors = load_file(file)
        else:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
            tensors = loaded if isinstance(loaded, dict) else {"t": loaded}
    except Exception as e:  # missing file, corrupt file, pickle refused
        bad(f"{file}: cannot load ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    if len(tensors) != 1 or not torch.is_tensor(next(iter(tensors.values()))):
        bad(f"{file}: must hold exactly one tensor, has {len(tensors)} entries")
    emb = next(iter(tensors.values()))
    if emb.dim() == 3 and emb.shape[0] == 1:
        emb = emb[0]
    if emb.dim() != 2 or emb.shape[0] > max_length:
        bad(f"{file}: has shape {list(emb.shape)}, expected [L <= {max_length}, D] (pipeline_config.text_max_length)")
    return pad_tokens(emb, max_length)


def _cache_matches(path: Path, meta: dict[str, str]) -> bool:
    from safetensors import safe_open

    if not path.exists():
        return False
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}) == meta


def encode_cached(
    family, source: str, prompts: list[str], max_length: int, acc: Accelerator, cache: Path
) -> torch.Tensor:
    """``[N, max_length, D]`` embeddings of ``prompts``: the main process encodes them once, all read the cache.

    The cache is keyed by the prompts, the length and the text encoder's source.
    """
    from diffusers.training_utils import free_memory
    from safetensors.torch import load_file, save_file

    meta = {"prompts": json.dumps(prompts), "max_length": str(max_length), "source": source}
    if acc.is_main_process and not _cache_matches(cache, meta):
        embeds = family.encode_prompts(source, prompts, max_length, acc.device)
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({"prompt_embeds": embeds.float().contiguous()}, str(cache), metadata=meta)
        free_memory()  # the text encoder is gone: give its memory back on any accelerator
    acc.wait_for_everyone()  # one process encodes; the others read the file
    return load_file(str(cache))["prompt_embeds"]
