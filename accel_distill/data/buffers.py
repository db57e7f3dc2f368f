"""Batch tensors whose memory is reused once the consumer has let go of them.

Why: a Wan-size batch is ~34 MB of fresh host memory (latents + padded text). glibc
hands much of such blocks back to the kernel when they are freed (munmap, a trimmed
heap), so a new batch page-faults it in again, zeroed by the kernel first: at one
process that was ~680 faults per sample and a quarter of the reader's CPU time, system
time (``benchmarks/data_reader.py --variants``: 106 faults per sample reused). A pool keeps the storages of recent batches and hands
one out again only when nothing else references it (no tensor, view, numpy array or
autograd graph of the consumer's): its storage use count is the pool's own reference.
Every byte of a reused batch is written again (copies, zero padding), so the consumer
cannot tell a reused batch from a fresh one.

Pinned batches (``pin_memory``) come from torch's own caching host allocator instead,
which also waits for asynchronous device copies still reading a block: the pool is
for pageable memory only, whose device copies finish reading before they return.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

try:
    _use_count = torch._C._storage_Use_Count  # references to a StorageImpl (private, present since torch 2.0)
except AttributeError:  # pragma: no cover - another torch: no reuse, fresh tensors as before
    _use_count = None


class BufferPool:
    """Up to ``capacity`` storages of batch tensors, reused when free; fresh tensors beyond that."""

    def __init__(self, capacity: int, *, pin_memory: bool = False) -> None:
        self.capacity = capacity if _use_count is not None and not pin_memory else 0
        self.pin_memory = pin_memory
        self._storages: list[torch.UntypedStorage] = []  # oldest first
        self.reused = 0  # how many tensors came from a free storage (tests, benchmarks)

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` and ``dtype``: a free pooled storage of that size, else a new one."""
        shape = tuple(int(s) for s in shape)
        nbytes = dtype.itemsize
        for s in shape:
            nbytes *= s
        if self.capacity == 0 or nbytes == 0:
            return torch.empty(shape, dtype=dtype, pin_memory=self.pin_memory)
        free = None
        for i, storage in enumerate(self._storages):
            if _use_count(storage._cdata) == 1:  # only the pool holds it
                if storage.nbytes() == nbytes:
                    self._storages.append(self._storages.pop(i))  # most recently used last
                    self.reused += 1
                    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
                free = i if free is None else free
        out = torch.empty(shape, dtype=dtype)
        if len(self._storages) >= self.capacity:
            if free is None:
                return out  # every pooled storage is still in use: this one is not pooled
            del self._storages[free]  # the oldest free storage of another size (another bucket) makes room
        self._storages.append(out.untyped_storage())
        return out

    def clear(self) -> None:
        self._storages.clear()
