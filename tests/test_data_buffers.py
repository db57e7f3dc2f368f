"""Batch memory reuse (accel_distill.data.buffers): a storage is handed out again only when the consumer holds
nothing of it, and a reused batch is indistinguishable from a fresh one."""

from __future__ import annotations

import itertools

import pytest
import torch

from accel_distill.data import LatentStream, write_parquet
from accel_distill.data.buffers import BufferPool

TEXT_DIM = 8


def test_pool_reuses_a_storage_only_when_nothing_references_it():
    pool = BufferPool(4)
    a = pool.empty((2, 3), torch.bfloat16)
    ptr = a.data_ptr()
    assert a.shape == (2, 3) and a.dtype == torch.bfloat16 and a.is_contiguous()
    assert pool.empty((2, 3), torch.bfloat16).data_ptr() != ptr  # a is alive
    # a view, a numpy array, a reinterpretation, an autograd graph that saved it: each keeps the storage busy
    for hold in (
        lambda t: t[1],
        lambda t: t.numpy(),
        lambda t: t.view(torch.int32),
        lambda t: t.requires_grad_().pow(2),
    ):
        t = pool.empty((2, 3), torch.float32)
        held, p = hold(t), t.data_ptr()
        del t
        assert pool.empty((2, 3), torch.float32).data_ptr() != p
        del held
    del a
    b = pool.empty((2, 3), torch.bfloat16)
    assert b.data_ptr() == ptr and pool.reused >= 1
    c = pool.empty((3, 2), torch.bfloat16)  # same size, other shape: the storage fits
    assert c.shape == (3, 2)


def test_pool_is_bounded_and_evicts_free_storages_of_other_sizes():
    pool = BufferPool(2)
    held = [pool.empty((4,), torch.float32) for _ in range(5)]  # all alive: only 2 are pooled
    assert len({t.data_ptr() for t in held}) == 5 and len(pool._storages) == 2
    del held
    x = pool.empty((7,), torch.float32)  # another size: replaces a free one, the pool stays at 2
    assert len(pool._storages) == 2
    y = pool.empty((4,), torch.float32)
    assert pool.reused == 1 and x.data_ptr() != y.data_ptr() and len(pool._storages) == 2


@pytest.mark.parametrize("prefetch", [0, 2])
def test_held_batches_are_never_overwritten_and_dropped_ones_are_reused(tmp_path, prefetch):
    g = torch.Generator().manual_seed(0)
    samples = [
        {
            "id": f"s{i:03d}",
            "latent": torch.randn(4, 2, 3, 3, generator=g).to(torch.bfloat16),
            "text_embedding": torch.randn(1 + (i * 5) % 7, TEXT_DIM, generator=g).to(torch.bfloat16),
        }
        for i in range(24)
    ]
    by_id = {s["id"]: s for s in samples}
    write_parquet(tmp_path / "d.parquet", samples, row_group_size=2)
    s = LatentStream(str(tmp_path), batch_size=3, seed=0, text_max_length=8, prefetch=prefetch)
    kept, views, ptrs = [], [], []
    for k, batch in enumerate(itertools.islice(iter(s), 40)):  # 5 epochs
        ptrs.append(batch["latents"].data_ptr())
        for i, sid in enumerate(batch["ids"]):  # a reused buffer holds this batch's rows, padding zeroed
            L = by_id[sid]["text_embedding"].shape[0]
            assert torch.equal(batch["latents"][i], by_id[sid]["latent"])
            assert torch.equal(batch["text_embeds"][i, :L], by_id[sid]["text_embedding"])
            assert not batch["text_embeds"][i, L:].any()
        if k % 7 == 0:
            kept.append((batch, [t.clone() for t in (batch["latents"], batch["text_embeds"])]))
        elif k % 7 == 3:
            views.append((batch["latents"][1:], batch["latents"][1:].clone()))
        del batch
    assert len(set(ptrs)) < len(ptrs)  # dropped batches' memory came back
    for batch, (latents, text) in kept:
        assert torch.equal(batch["latents"], latents) and torch.equal(batch["text_embeds"], text)
    for view, copy in views:
        assert torch.equal(view, copy)
    assert len({b["latents"].data_ptr() for b, _ in kept}) == len(kept)
