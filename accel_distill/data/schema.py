"""The project's parquet format: column names, tensor <-> bytes, and a writer.

One row per sample, compatible with FastVideo's preprocessed parquet. Tensors
are stored as raw bytes plus a shape column and a dtype column; readers must
honour the stored dtype (bf16 latents stay bf16) rather than assume float32.
The text-only variant (data-free distillation) simply has no ``vae_latent_*``
columns.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from accel_distill.errors import DataError


def tensor_columns(name: str) -> tuple[str, str, str]:
    """The three columns a tensor ``name`` is stored in: ``{name}_bytes``, ``{name}_shape``, ``{name}_dtype``."""
    return f"{name}_bytes", f"{name}_shape", f"{name}_dtype"


ID = "id"
CAPTION = "caption"
LATENT = "vae_latent"
TEXT = "text_embedding"
LATENT_COLUMNS = LATENT_BYTES, LATENT_SHAPE, LATENT_DTYPE = tensor_columns(LATENT)
TEXT_COLUMNS = TEXT_BYTES, TEXT_SHAPE, TEXT_DTYPE = tensor_columns(TEXT)
REQUIRED_COLUMNS = (ID, *TEXT_COLUMNS, CAPTION)
# Teacher trajectories (written by ``python -m accel_distill.generate``, read by method ``kd``), extra tensors
# of a row whose latent is the teacher's final x0: the samples its saved steps started from, in the model's
# (normalised) latent space, [S, C, T, H, W]; their timesteps [S] (float32); the starting noise [C, T, H, W].
TRAJ_LATENTS, TRAJ_TIMESTEPS, NOISE = "traj_latents", "traj_timesteps", "noise"
# Footer key-value metadata: the latent shape of every row, run-length encoded (JSON [[shape, count], ...]),
# so a reader can bucket the rows without fetching the shape column of every row group (Hub reads).
SHAPES_METADATA_KEY = b"accel_distill.vae_latent_shapes"

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


def write_tensor_columns(row: dict, name: str, tensor: torch.Tensor) -> dict:
    """Store ``tensor`` in ``row`` (a parquet row dict) as the three columns of :func:`tensor_columns`; returns ``row``."""
    b, s, d = tensor_columns(name)
    row[b], row[s], row[d] = tensor_to_bytes(tensor)
    return row


def read_tensor_columns(row: dict, name: str) -> torch.Tensor:
    """The tensor ``name`` of a parquet row dict written by :func:`write_tensor_columns` (its stored dtype)."""
    b, s, d = tensor_columns(name)
    return bytes_to_tensor(row[b], row[s], row[d])


def tensor_fields(name: str) -> list[pa.Field]:
    """Arrow fields of the three columns of tensor ``name``."""
    b, s, d = tensor_columns(name)
    return [pa.field(b, pa.binary()), pa.field(s, pa.list_(pa.int64())), pa.field(d, pa.string())]


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


def _arrow_schema(with_latents: bool, metadata_keys: Sequence[str], tensor_names: Sequence[str] = ()) -> pa.Schema:
    fields = [pa.field(ID, pa.string())]
    if with_latents:
        fields += tensor_fields(LATENT)
    fields += [*tensor_fields(TEXT), pa.field(CAPTION, pa.string())]
    fields += [pa.field(k, METADATA_FIELDS[k]) for k in METADATA_FIELDS if k in metadata_keys]
    for name in tensor_names:
        fields += tensor_fields(name)
    return pa.schema(fields)


# Row groups of about this many bytes when the size is "auto": one Wan-size row (a 4-8 MB latent) per group,
# so ranks that each take a few rows of a global batch read disjoint groups, dozens of image-size rows.
ROW_GROUP_BYTES = 8 << 20
MAX_AUTO_ROW_GROUP = 64


def auto_row_group_size(samples: list[dict]) -> int:
    """Rows per group so that a group holds about ``ROW_GROUP_BYTES`` of tensors (1 to 64), from the first sample."""
    s = samples[0]
    tensors = [s["text_embedding"], *([s["latent"]] if "latent" in s else []), *s.get("tensors", {}).values()]
    row = sum(t.numel() * t.element_size() for t in tensors)
    return max(1, min(MAX_AUTO_ROW_GROUP, ROW_GROUP_BYTES // max(row, 1)))


def write_parquet(path: str | os.PathLike, samples: list[dict], *, row_group_size: int | None = 64) -> None:
    """Write samples to one parquet file, ``row_group_size`` rows per row group (None: :func:`auto_row_group_size`).

    Each sample: ``id`` (str), ``text_embedding`` (Tensor [L, D]), optional
    ``latent`` (Tensor [C, T, H, W]; all samples or none), ``caption`` (str,
    default ""), any of the optional metadata keys (missing ones are null), and
    optional ``tensors``: ``{name: Tensor}`` of extra per-row tensors, stored as
    ``{name}_bytes/_shape/_dtype`` (every sample names the same tensors; read back with
    ``LatentStream(extra_tensor_columns=[name])``).
    Small row groups keep the reader's memory bounded and its shuffle fine-grained.
    """
    if not samples:
        raise ValueError(f"write_parquet({path}): no samples")
    if row_group_size is None:
        row_group_size = auto_row_group_size(samples)
    if row_group_size < 1:
        raise ValueError(f"row_group_size must be >= 1, got {row_group_size}")
    known = {ID, "text_embedding", "latent", CAPTION, "tensors", *METADATA_FIELDS}
    with_latents = "latent" in samples[0]
    tensor_names = sorted(samples[0].get("tensors", {}))
    taken = set(_arrow_schema(True, list(METADATA_FIELDS)).names)
    for name in tensor_names:
        clash = sorted(set(tensor_columns(name)) & taken)
        if clash:
            raise ValueError(f"extra tensor {name!r} would overwrite column {clash[0]!r}")
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
        if sorted(s.get("tensors", {})) != tensor_names:
            raise ValueError(f"sample {i}: tensors {sorted(s.get('tensors', {}))}, sample 0 has {tensor_names}")
        metadata_keys |= set(s) & set(METADATA_FIELDS)
    schema = _arrow_schema(with_latents, sorted(metadata_keys), tensor_names)
    if with_latents:
        schema = schema.with_metadata({SHAPES_METADATA_KEY: json.dumps(_shape_runs(samples))})

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Tensor bytes barely compress and never repeat: storing them plain (no compression, no
    # dictionary) reads ~5x faster than pyarrow's defaults; small columns keep the defaults.
    byte_columns = [c for c in schema.names if c.endswith("_bytes")]
    compression = {c: "none" if c in byte_columns else "snappy" for c in schema.names}
    dictionary = [c for c in schema.names if c not in byte_columns]
    # One row group per write_table call keeps memory (and binary offsets) bounded.
    with pq.ParquetWriter(path, schema, compression=compression, use_dictionary=dictionary) as writer:
        for start in range(0, len(samples), row_group_size):
            rows = [_row(s, with_latents, metadata_keys) for s in samples[start : start + row_group_size]]
            writer.write_table(pa.Table.from_pylist(rows, schema=schema), row_group_size=row_group_size)


def _shape_runs(samples: list[dict]) -> list[list]:
    runs: list[list] = []
    for s in samples:
        shape = list(s["latent"].shape)
        if runs and runs[-1][0] == shape:
            runs[-1][1] += 1
        else:
            runs.append([shape, 1])
    return runs


def shapes_from_footer(schema: pa.Schema, num_rows: int) -> np.ndarray | None:
    """Latent shapes recorded by ``write_parquet`` in the footer (run-length), or None if absent / inconsistent."""
    raw = (schema.metadata or {}).get(SHAPES_METADATA_KEY)
    if raw is None:
        return None
    try:
        runs = json.loads(raw)
        shapes = np.concatenate([np.tile(np.asarray(s, dtype=np.int64), (int(n), 1)) for s, n in runs])
    except (ValueError, TypeError):
        return None
    return shapes if shapes.shape == (num_rows, 4) else None


def _row(sample: dict, with_latents: bool, metadata_keys: set[str]) -> dict:
    row: dict[str, Any] = {ID: str(sample[ID])}
    write_tensor_columns(row, TEXT, sample["text_embedding"])
    row[CAPTION] = str(sample.get(CAPTION, ""))
    if with_latents:
        write_tensor_columns(row, LATENT, sample["latent"])
    for key in metadata_keys:
        row[key] = sample.get(key)
    for name, tensor in sample.get("tensors", {}).items():
        write_tensor_columns(row, name, tensor)
    return row


def shapes_from_column(file: Any, column: pa.ChunkedArray) -> np.ndarray:
    """The ``vae_latent_shape`` column as ``[rows, 4]``; DataError naming the first row that is not 4-D."""
    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if len(arr) == 0:
        return np.zeros((0, 4), dtype=np.int64)
    lengths = pc.fill_null(pc.list_value_length(arr), -1).to_numpy(zero_copy_only=False)
    if (lengths != 4).any():
        row = int(np.flatnonzero(lengths != 4)[0])
        raise DataError(f"{file} row {row}: latent shape {arr[row].as_py()} is not 4-D")
    return np.asarray(pc.list_flatten(arr).to_numpy(zero_copy_only=False), dtype=np.int64).reshape(-1, 4)
