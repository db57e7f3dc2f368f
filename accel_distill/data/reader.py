"""Reading rows of the parquet files by global row number: row groups, checks, collation.

One :class:`Reader` per iterator (not shared between threads). It keeps a few row
groups decoded (the last one of every bucket, so interleaved buckets do not re-read
each other's groups) and a few files open; tensor bytes stay zero-copy pyarrow buffers
until they are copied once, into the batch tensor.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from accel_distill.errors import DataError

from .buffers import BufferPool
from .finite import copy_checked
from .schema import (
    CAPTION,
    ID,
    LATENT_BYTES,
    LATENT_DTYPE,
    LATENT_SHAPE,
    TEXT_BYTES,
    TEXT_DTYPE,
    TEXT_SHAPE,
    bytes_to_tensor,
    copy_bytes_into,
    dtype_from_name,
    dtype_name,
    tensor_columns,
)
from .sources import column_ranges

if TYPE_CHECKING:
    from .stream import LatentStream

MAX_OPEN_FILES = 16


@dataclass
class Row:
    """One decoded-enough row: shapes, dtypes and zero-copy byte buffers."""

    file: str
    file_row: int
    id: str
    caption: str
    text: Any = None
    text_shape: list[int] | None = None
    text_dtype: torch.dtype | None = None
    latent: Any = None
    latent_shape: list[int] | None = None
    latent_dtype: torch.dtype | None = None
    extra: dict[str, tuple[Any, list[int], torch.dtype]] | None = None  # name -> (buffer, shape, dtype)

    def where(self) -> str:
        return f"{self.file} row {self.file_row} (id {self.id!r})"


def shape_dtype(where: str, what: str, shape: Any, dtype: Any, ndim: int | None) -> tuple[list[int], torch.dtype]:
    """A stored shape and dtype name, checked (DataError naming ``where``)."""
    if shape is None or (ndim is not None and len(shape) != ndim):
        raise DataError(f"{where}: {what} shape {shape} is not {ndim}-D")
    try:
        return [int(s) for s in shape], dtype_from_name(dtype)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: {what}: {e}") from e


def check_size(where: str, what: str, buf: pa.Buffer, shape: list[int], dtype: torch.dtype) -> pa.Buffer:
    need = math.prod(shape) * dtype.itemsize  # not np.prod: ~15 us a call, 4 calls a row
    if buf.size != need:
        raise DataError(f"{where}: {what} has {buf.size} bytes, shape {shape} of {dtype} needs {need}")
    return buf


def value_buffers(column: pa.ChunkedArray) -> list[pa.Buffer]:
    """Zero-copy buffer of each value of a binary column (indexing arrow scalars copies: ~0.5 ms per 4 MB)."""
    out = []
    for chunk in column.chunks:
        if not (pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type)):
            out += [pa.py_buffer(b"") if v.as_buffer() is None else v.as_buffer() for v in chunk]
            continue
        _, offsets, data = chunk.buffers()
        if data is None:  # every value empty or null
            data = pa.py_buffer(b"")
        offset_type = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        off = np.frombuffer(offsets, dtype=offset_type)[chunk.offset : chunk.offset + len(chunk) + 1]
        out += [data.slice(int(a), int(b - a)) for a, b in zip(off[:-1], off[1:])]
    return out


class Reader:
    """Rows by global number, for one iterator of ``stream``; ``columns`` are the parquet columns to read."""

    def __init__(self, stream: LatentStream, columns: list[str], *, cache_groups: int = 2) -> None:
        self.s = stream
        self.columns = columns
        self.byte_columns = {c for c in columns if c.endswith("_bytes")}
        self.cache_groups = max(1, cache_groups)
        self._files: OrderedDict[int, tuple[pq.ParquetFile, Any]] = OrderedDict()  # (file, its source)
        self._groups: OrderedDict[int, dict[str, Any]] = OrderedDict()
        # Batch memory reused once the consumer drops a batch (fresh pages cost a fault each: :mod:`.buffers`).
        # Live at once: the consumer's batch, ``prefetch`` queued, the one being built; one more is free.
        per_batch = 1 + stream.has_latents + len(stream.extra_tensor_columns)
        self.pool = BufferPool(per_batch * (stream.prefetch + 3), pin_memory=stream.pin_memory)
        self._starts = [g.start for g in stream._groups]  # first global row of each row group, ascending

    def close(self) -> None:
        for f, _ in self._files.values():
            f.close()
        self._files.clear()
        self._groups.clear()
        self.pool.clear()

    def _file(self, fi: int) -> tuple[pq.ParquetFile, Any]:
        if fi in self._files:
            self._files.move_to_end(fi)
            return self._files[fi]
        if len(self._files) >= MAX_OPEN_FILES:
            self._files.popitem(last=False)[1][0].close()
        source = self.s._files[fi].open()  # a Hub file's RangeFile, to prefetch row groups through
        f = (self.s._files[fi].parquet(self.s._metadata[fi], source=source), source)
        self._files[fi] = f
        return f

    def _load(self, gi: int) -> dict[str, Any]:
        if gi in self._groups:
            self._groups.move_to_end(gi)
            return self._groups[gi]
        g = self.s._groups[gi]
        where = self.s._files[g.file]
        try:
            f, source = self._file(g.file)
            if where.remote:  # one coalesced range request for the columns of this group
                source.prefetch(column_ranges(self.s._metadata[g.file].row_group(g.index), self.columns))
            # decoded in this thread: a pool hand-off costs more than it saves per group, and pyarrow pool
            # threads still decoding a Python-file (Hub) group at interpreter exit abort the process
            # ("terminate called without an active exception")
            table = f.read_row_group(g.index, columns=self.columns, use_threads=False)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"cannot read row group {g.index} of {where}: {e}") from e
        except Exception as e:  # a Hub read fails with huggingface_hub / httpx errors
            raise DataError(f"cannot read row group {g.index} of {where}: {type(e).__name__}: {e}") from e
        # Byte columns become zero-copy buffers per row; small ones become lists.
        cols = {
            c: value_buffers(table.column(c)) if c in self.byte_columns else table.column(c).to_pylist()
            for c in self.columns
        }
        if len(self._groups) >= self.cache_groups:
            self._groups.popitem(last=False)
        self._groups[gi] = cols
        return cols

    def row(self, global_row: int, *, with_bytes: bool = True) -> Row:
        """Row ``global_row`` with its shapes/dtypes checked against the model; byte sizes too when ``with_bytes``."""
        s = self.s
        gi = bisect.bisect_right(self._starts, global_row) - 1  # a list: np.searchsorted is ~5 us a call
        c = self._load(gi)
        g = s._groups[gi]
        i = global_row - g.start
        r = Row(file=str(s._files[g.file]), file_row=g.file_row + i, id=str(c[ID][i]), caption=c[CAPTION][i] or "")
        where = r.where()
        r.text_shape, r.text_dtype = shape_dtype(where, "text embedding", c[TEXT_SHAPE][i], c[TEXT_DTYPE][i], ndim=2)
        if r.text_shape[0] > s.text_max_length:
            raise DataError(
                f"{where}: text embedding has {r.text_shape[0]} tokens, more than text_max_length={s.text_max_length}"
            )
        if s.expected_text_dim is not None and r.text_shape[1] != s.expected_text_dim:
            raise DataError(
                f"{where}: text embedding width {r.text_shape[1]}, the model expects {s.expected_text_dim} "
                f"(shape {r.text_shape})"
            )
        if with_bytes:
            r.text = check_size(where, "text embedding", c[TEXT_BYTES][i], r.text_shape, r.text_dtype)
        if s.has_latents:
            r.latent_shape, r.latent_dtype = shape_dtype(where, "latent", c[LATENT_SHAPE][i], c[LATENT_DTYPE][i], 4)
            expected = s.expected_latent_channels
            if expected is not None and r.latent_shape[0] != expected:
                raise DataError(
                    f"{where}: latent has {r.latent_shape[0]} channels, expected {expected} (shape {r.latent_shape})"
                )
            if tuple(r.latent_shape) != s.bucket_shape_of(global_row):
                raise DataError(
                    f"{where}: latent shape {r.latent_shape} differs from {list(s.bucket_shape_of(global_row))} "
                    "recorded in the file's footer (edited after writing?); run `python -m accel_distill.preprocess "
                    "check` on it"
                )
            if with_bytes:
                r.latent = check_size(where, "latent", c[LATENT_BYTES][i], r.latent_shape, r.latent_dtype)
        r.extra = {}
        for name in s.extra_tensor_columns:
            b, sh, dt = tensor_columns(name)
            if c[sh][i] is None or c[dt][i] is None:
                raise DataError(f"{where}: {name!r} is missing (null {sh if c[sh][i] is None else dt})")
            shape, dtype = shape_dtype(where, name, c[sh][i], c[dt][i], ndim=None)
            r.extra[name] = (check_size(where, name, c[b][i], shape, dtype) if with_bytes else None, shape, dtype)
        return r

    def _put(self, dst: torch.Tensor, r: Row, what: str, buf: pa.Buffer) -> None:
        """Copy ``buf`` into ``dst``, checking it for NaN/inf on the way (``check_finite``): piece by piece, so
        the copy reads what the check just brought into the cache."""
        if not self.s.check_finite:
            copy_bytes_into(dst, buf)
        elif not copy_checked(dst, buf):
            values = bytes_to_tensor(buf, [buf.size // dst.dtype.itemsize], dtype_name(dst.dtype))
            n = int((~torch.isfinite(values)).sum())
            raise DataError(f"{r.where()}: {what} has {n} non-finite values (NaN or inf)")

    def batch(self, rows: np.ndarray) -> dict:
        """Collate rows into one batch; shapes/dtypes must agree (text lengths may differ: padded)."""
        recs = [self.row(int(r)) for r in rows]
        first = recs[0]
        for r in recs[1:]:
            if r.text_shape[1] != first.text_shape[1] or r.text_dtype != first.text_dtype:
                raise DataError(
                    f"text embeddings differ within a batch: {first.where()} is {first.text_shape} {first.text_dtype}, "
                    f"{r.where()} is {r.text_shape} {r.text_dtype}"
                )
            if self.s.has_latents and r.latent_dtype != first.latent_dtype:
                raise DataError(
                    f"latent dtypes differ within a batch: {first.where()} is {first.latent_dtype}, "
                    f"{r.where()} is {r.latent_dtype}"
                )
        text = self.pool.empty((len(recs), self.s.text_max_length, first.text_shape[1]), first.text_dtype)
        for i, r in enumerate(recs):
            self._put(text[i, : r.text_shape[0]], r, "text embedding", r.text)
            text[i, r.text_shape[0] :] = 0  # zero padding at the end, as WanPipeline pads
        batch = {"text_embeds": text, "ids": [r.id for r in recs], "captions": [r.caption for r in recs]}
        batch["row_sources"] = [r.where() for r in recs]  # names a bad sample's file and row downstream
        if self.s.has_latents:
            latents = self.pool.empty((len(recs), *first.latent_shape), first.latent_dtype)
            for i, r in enumerate(recs):
                self._put(latents[i], r, "latent", r.latent)
            batch = {"latents": latents, **batch}
        for name in self.s.extra_tensor_columns:
            _, shape, dtype = first.extra[name]
            for r in recs[1:]:
                if r.extra[name][1:] != (shape, dtype):
                    raise DataError(
                        f"{name!r} differs within a batch: {first.where()} is {shape} {dtype}, "
                        f"{r.where()} is {r.extra[name][1]} {r.extra[name][2]}"
                    )
            out = self.pool.empty((len(recs), *shape), dtype)
            for i, r in enumerate(recs):
                self._put(out[i].reshape(-1) if out[i].dim() == 0 else out[i], r, name, r.extra[name][0])
            batch[name] = out
        return batch
