"""The project's parquet format: column names, tensor <-> bytes, and a writer.

One row per sample, compatible with FastVideo's preprocessed parquet. Tensors
are stored as raw bytes plus a shape column and a dtype column; readers must
honour the stored dtype (bf16 latents stay bf16) rather than assume float32.
The text-only variant (data-free distillation) simply has no ``vae_latent_*``
columns.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ID = "id"
CAPTION = "caption"
LATENT_BYTES = "vae_latent_bytes"
LATENT_SHAPE = "vae_latent_shape"
LATENT_DTYPE = "vae_latent_dtype"
TEXT_BYTES = "text_embedding_bytes"
TEXT_SHAPE = "text_embedding_shape"
TEXT_DTYPE = "text_embedding_dtype"

LATENT_COLUMNS = (LATENT_BYTES, LATENT_SHAPE, LATENT_DTYPE)
TEXT_COLUMNS = (TEXT_BYTES, TEXT_SHAPE, TEXT_DTYPE)
REQUIRED_COLUMNS = (ID, *TEXT_COLUMNS, CAPTION)

# Optional per-sample metadata, with the arrow type FastVideo uses.
METADATA_FIELDS: dict[str, pa.DataType] = {
    "file_name": pa.string(),
    "media_type": pa.string(),
    "width": pa.int64(),
    "height": pa.int64(),
    "num_frames": pa.int64(),
    "duration_sec": pa.float64(),
    "fps": pa.float64(),
}

# Stored dtype name -> torch dtype. Names are numpy-style ("float32"), which is
# what FastVideo writes; "torch."-prefixed names are accepted on read as well.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def dtype_from_name(name: str) -> torch.dtype:
    """Torch dtype for a stored dtype string; ValueError for an unknown one."""
    key = name.removeprefix("torch.") if isinstance(name, str) else name
    if key not in DTYPES:
        raise ValueError(f"unknown tensor dtype {name!r} (known: {', '.join(DTYPES)})")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """Stored dtype string for a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    name = str(dtype).removeprefix("torch.")
    dtype_from_name(name)  # reject dtypes the reader would not understand
    return name


def tensor_to_bytes(t: torch.Tensor) -> tuple[bytes, list[int], str]:
    """Raw bytes, shape and dtype name of ``t`` (bf16 goes through an int16 view: numpy has no bf16)."""
    name = dtype_name(t.dtype)
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes(), list(t.shape), name


def copy_bytes_into(dst: torch.Tensor, buf: Any) -> None:
    """Copy a raw byte buffer (bytes, memoryview, pyarrow Buffer) into contiguous ``dst`` of the same byte size."""
    src = np.frombuffer(buf, dtype=np.uint8)
    flat = dst.view(torch.uint8).reshape(-1)
    if src.size != flat.numel():
        raise ValueError(f"{src.size} bytes stored but shape {list(dst.shape)} of {dst.dtype} needs {flat.numel()}")
    flat.numpy()[:] = src


def bytes_to_tensor(b: Any, shape: Sequence[int], dtype: str) -> torch.Tensor:
    """Tensor of the stored ``shape`` and ``dtype`` from raw bytes; one copy, owns its (writable) memory."""
    torch_dtype = dtype_from_name(dtype)
    shape = [int(s) for s in shape]
    out = torch.empty(shape, dtype=torch_dtype)
    # view(uint8) needs a dimension to widen; a scalar is handled as a 1-element vector.
    copy_bytes_into(out.reshape(-1) if out.dim() == 0 else out, b)
    return out


def _arrow_schema(with_latents: bool, metadata_keys: Sequence[str]) -> pa.Schema:
    fields = [pa.field(ID, pa.string())]
    if with_latents:
        fields += [
            pa.field(LATENT_BYTES, pa.binary()),
            pa.field(LATENT_SHAPE, pa.list_(pa.int64())),
            pa.field(LATENT_DTYPE, pa.string()),
        ]
    fields += [
        pa.field(TEXT_BYTES, pa.binary()),
        pa.field(TEXT_SHAPE, pa.list_(pa.int64())),
        pa.field(TEXT_DTYPE, pa.string()),
        pa.field(CAPTION, pa.string()),
    ]
    fields += [pa.field(k, METADATA_FIELDS[k]) for k in METADATA_FIELDS if k in metadata_keys]
    return pa.schema(fields)


def write_parquet(path: str | os.PathLike, samples: list[dict], *, row_group_size: int = 64) -> None:
    """Write samples to one parquet file, ``row_group_size`` rows per row group.

    Each sample: ``id`` (str), ``text_embedding`` (Tensor [L, D]), optional
    ``latent`` (Tensor [C, T, H, W]; all samples or none), ``caption`` (str,
    default ""), and any of the optional metadata keys (missing ones are null).
    Small row groups keep the reader's memory bounded and its shuffle fine-grained.
    """
    if not samples:
        raise ValueError(f"write_parquet({path}): no samples")
    if row_group_size < 1:
        raise ValueError(f"row_group_size must be >= 1, got {row_group_size}")
    known = {ID, "text_embedding", "latent", CAPTION, *METADATA_FIELDS}
    with_latents = "latent" in samples[0]
    metadata_keys: set[str] = set()
    for i, s in enumerate(samples):
        unknown = set(s) - known
        if unknown:
            raise ValueError(f"sample {i} has unknown keys {sorted(unknown)} (known: {sorted(known)})")
        for key in (ID, "text_embedding"):
            if key not in s:
                raise ValueError(f"sample {i} has no {key!r}")
        if ("latent" in s) != with_latents:
            raise ValueError(f"sample {i}: either every sample has a 'latent' or none does")
        metadata_keys |= set(s) & set(METADATA_FIELDS)
    schema = _arrow_schema(with_latents, sorted(metadata_keys))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Tensor bytes barely compress and never repeat: storing them plain (no compression, no
    # dictionary) reads ~5x faster than pyarrow's defaults; small columns keep the defaults.
    tensor_columns = [c for c in (LATENT_BYTES, TEXT_BYTES) if c in schema.names]
    compression = {c: "none" if c in tensor_columns else "snappy" for c in schema.names}
    dictionary = [c for c in schema.names if c not in tensor_columns]
    # One row group per write_table call keeps memory (and binary offsets) bounded.
    with pq.ParquetWriter(path, schema, compression=compression, use_dictionary=dictionary) as writer:
        for start in range(0, len(samples), row_group_size):
            rows = [_row(s, with_latents, metadata_keys) for s in samples[start : start + row_group_size]]
            writer.write_table(pa.Table.from_pylist(rows, schema=schema), row_group_size=row_group_size)


def _row(sample: dict, with_latents: bool, metadata_keys: set[str]) -> dict:
    text, text_shape, text_dtype = tensor_to_bytes(sample["text_embedding"])
    row: dict[str, Any] = {
        ID: str(sample[ID]),
        TEXT_BYTES: text,
        TEXT_SHAPE: text_shape,
        TEXT_DTYPE: text_dtype,
        CAPTION: str(sample.get(CAPTION, "")),
    }
    if with_latents:
        row[LATENT_BYTES], row[LATENT_SHAPE], row[LATENT_DTYPE] = tensor_to_bytes(sample["latent"])
    for key in metadata_keys:
        row[key] = sample.get(key)
    return row
