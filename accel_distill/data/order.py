"""The order samples are read in: a seeded global order per epoch, cut into one-shape global batches.

Rows are numbered globally (file after file, row group after row group). Epoch e's
order permutes the row groups and then the rows inside each group, seeded by
``(seed, e)`` only: every rank and every machine computes the same order without
talking to the others, and reading stays one row group at a time.

Buckets: every row belongs to the bucket of its latent shape (all rows are one bucket
for text-only data). Walking the epoch's order, each row joins its bucket's open
batch; a batch is emitted when it holds ``global_batch`` rows, so batches come out in
the order they complete (a random interleaving of the buckets, each bucket in
proportion to its size) and every batch has one shape. The rows of a bucket's open
batch when the epoch ends are *carried*: they open that bucket's first batch of the
next epoch (keeping their own epoch in ``sample_keys``), so no sample is ever dropped.
A bucket with fewer rows than a global batch fills one over several epochs (and may
then hold the same sample twice, from two epochs). With a single bucket the batches
are consecutive slices of ``carry + order``: without carry exactly the old reader's.

A position is ``(epoch, index, carry)``: ``index`` global samples of epoch ``epoch``'s
batch list consumed, ``carry`` the rows carried into that epoch. It depends on the
global batch (``batch_size x world_size``) but not on how it is split into ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Epoch:
    """One epoch's global batches: ``rows[k]`` / ``epochs[k]`` are batch k's global rows and their epochs."""

    rows: np.ndarray  # int64 [num_batches, global_batch]
    epochs: np.ndarray  # int64 [num_batches, global_batch]
    carry_out: np.ndarray  # int64 [n, 2] of (epoch, row): the open batches at the end, in bucket order

    def __len__(self) -> int:
        return len(self.rows)


def group_order(seed: int, epoch: int, group_sizes: np.ndarray, group_starts: np.ndarray, shuffle: bool) -> np.ndarray:
    """Global rows in the order of ``epoch``: row groups permuted, then the rows inside each one."""
    total = int(group_sizes.sum())
    if not shuffle:
        return np.arange(total, dtype=np.int64)
    groups = np.random.default_rng([seed, epoch]).permutation(len(group_sizes))
    parts = [
        group_starts[gi] + np.random.default_rng([seed, epoch, int(gi)]).permutation(int(group_sizes[gi]))
        for gi in groups
    ]
    return np.concatenate(parts).astype(np.int64)


def epoch_batches(
    order: np.ndarray, epoch: int, bucket_of: np.ndarray, num_buckets: int, global_batch: int, carry: np.ndarray
) -> Epoch:
    """Cut ``order`` (global rows of ``epoch``) into one-bucket batches of ``global_batch``, after ``carry``.

    ``bucket_of[row]`` is each global row's bucket; ``carry`` is ``[n, 2]`` (epoch, row) pairs carried in.
    """
    gb = global_batch
    buckets_in_order = bucket_of[order]
    carry = np.asarray(carry, dtype=np.int64).reshape(-1, 2)
    carry_bucket = bucket_of[carry[:, 1]] if len(carry) else np.zeros(0, dtype=np.int64)
    rows, epochs, done_at, carry_out = [], [], [], []
    for b in range(num_buckets):
        at = np.flatnonzero(buckets_in_order == b)
        mine = carry[carry_bucket == b]
        seq_rows = np.concatenate([mine[:, 1], order[at]])
        seq_epochs = np.concatenate([mine[:, 0], np.full(len(at), epoch, dtype=np.int64)])
        seq_at = np.concatenate([np.full(len(mine), -1, dtype=np.int64), at])  # carried rows "arrive" first
        k = len(seq_rows) // gb
        rows.append(seq_rows[: k * gb].reshape(k, gb))
        epochs.append(seq_epochs[: k * gb].reshape(k, gb))
        done_at.append(seq_at[gb - 1 : k * gb : gb])  # a batch is complete at the arrival of its last row
        carry_out.append(np.stack([seq_epochs[k * gb :], seq_rows[k * gb :]], axis=1))
    done = np.concatenate(done_at)
    by_completion = np.argsort(done, kind="stable")  # ties (carried-only batches) keep bucket order
    return Epoch(
        rows=np.concatenate(rows).reshape(-1, gb)[by_completion],
        epochs=np.concatenate(epochs).reshape(-1, gb)[by_completion],
        carry_out=np.concatenate(carry_out).reshape(-1, 2),
    )
