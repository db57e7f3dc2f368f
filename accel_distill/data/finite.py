"""NaN/inf checks: on stored bytes (host, for ``preprocess check`` and a stand-alone stream)
and on whole batches (on the device, inside the trainer's one host sync per iteration).

Training checks its inputs on the device: an ``isfinite`` reduction over a batch that is
already there costs microseconds on an accelerator, where the same test on the host is one
more read of every stored byte in the reader (~20% of its time at one process). Only when
the device says a batch is bad is the host copy scanned to name the file and row.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# A float is NaN or inf iff its exponent bits are all ones: as a signed integer of the same width the
# positive ones are >= the first bound, as an unsigned integer the negative ones are >= the second. Two
# integer max reductions (numpy: one thread, no OpenMP stalls on a busy host) test a whole buffer.
_NONFINITE_BITS = {
    torch.bfloat16: (np.int16, 0x7F80, 0xFF80),
    torch.float16: (np.int16, 0x7C00, 0xFC00),
    torch.float32: (np.int32, 0x7F800000, 0xFF800000),
    torch.float64: (np.int64, 0x7FF0000000000000, 0xFFF0000000000000),
}

CHUNK_BYTES = 1 << 18  # checked and copied piece by piece: each piece is read from memory once, then from cache

# What a batch key is called in messages (an extra tensor column keeps its own name).
_WHAT = {"latents": "latent", "text_embeds": "text embedding"}


def has_nonfinite(buf: Any, dtype: torch.dtype) -> bool:
    """True if the raw values in ``buf`` (bytes-like, ``dtype``) hold a NaN or inf; False for non-float dtypes."""
    return _nonfinite_check(dtype)(np.frombuffer(buf, dtype=np.uint8))


def _nonfinite_check(dtype: torch.dtype):
    """A function of a uint8 array (whole values) -> True if it holds a NaN/inf of ``dtype``."""
    spec = _NONFINITE_BITS.get(dtype)
    if spec is None:
        return lambda raw: False
    signed, positive, negative = spec
    unsigned = np.dtype(signed).str.replace("i", "u")

    def check(raw: np.ndarray) -> bool:
        values = raw.view(signed)
        return values.size > 0 and (bool(values.max() >= positive) or bool(values.view(unsigned).max() >= negative))

    return check


def copy_checked(dst: torch.Tensor, buf: Any) -> bool:
    """Copy ``buf`` into contiguous ``dst`` (as ``copy_bytes_into``), testing each piece for NaN/inf just before
    copying it; False (``dst`` partly written) at the first non-finite piece."""
    src = np.frombuffer(buf, dtype=np.uint8)
    flat = dst.view(torch.uint8).reshape(-1)
    if src.size != flat.numel():
        raise ValueError(f"{src.size} bytes stored but shape {list(dst.shape)} of {dst.dtype} needs {flat.numel()}")
    out, check = flat.numpy(), _nonfinite_check(dst.dtype)
    for a in range(0, src.size, CHUNK_BYTES):  # CHUNK_BYTES is a multiple of every item size
        piece = src[a : a + CHUNK_BYTES]
        if check(piece):
            return False
        out[a : a + CHUNK_BYTES] = piece
    return True


def finite_probes(batch: dict) -> list[torch.Tensor]:
    """0-d tensors (on the batch's device) that are all finite iff every floating tensor of ``batch`` is:
    each tensor's minimum and maximum (one ``aminmax`` read; a NaN propagates into both, an inf is one of
    them). No host sync: the trainer tests them in its one ``isfinite`` with the losses and norms."""
    return [
        e
        for v in batch.values()
        if torch.is_tensor(v) and torch.is_floating_point(v) and v.numel()
        for e in torch.aminmax(v)
    ]


def describe_nonfinite(batch: dict) -> str | None:
    """``"<file> row N (id X): latent has K non-finite values (NaN or inf)"`` for the first bad sample of a
    host ``batch`` from :class:`LatentStream` (its ``row_sources`` name each sample), None if all are finite."""
    sources = batch.get("row_sources") or []
    for key, value in batch.items():
        if not (torch.is_tensor(value) and torch.is_floating_point(value)):
            continue
        bad = (~torch.isfinite(value)).reshape(len(value), -1).sum(dim=1)
        for i, n in enumerate(bad.tolist()):
            if n:
                where = sources[i] if i < len(sources) else f"sample {i} of the batch"
                return f"{where}: {_WHAT.get(key, key)} has {n} non-finite values (NaN or inf)"
    return None
