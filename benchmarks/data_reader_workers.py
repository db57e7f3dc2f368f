"""The measured readers of ``benchmarks/data_reader.py``, one per worker process (see its docstring).

Kinds: ``ours`` (the training reader), ``pyarrow-thread`` / ``pyarrow`` (the plain baseline, in the
reader's prefetch thread / in the loop), ``datasets`` (its own streaming), and, for ``--variants``
(one rank, local), what isolates where the reader's time goes: ``ours-fresh`` (a new batch tensor
every batch, as before buffer reuse), ``ours-noshuffle`` (file order), ``ours-inline`` (no prefetch
thread), ``pyarrow-shuffled`` (the baseline reading row groups and rows in the reader's epoch-0
order) and ``pyarrow-reuse`` (the baseline with the reader's buffer reuse).
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

KINDS = ("ours", "ours-fresh", "ours-noshuffle", "ours-inline", "pyarrow-thread", "pyarrow", "pyarrow-shuffled")
KINDS += ("pyarrow-reuse", "datasets")


def worker_ours(source: str, batch: int, rank: int, world: int, text_max_length: int, kind: str, check_finite: bool):
    from accel_distill.data import LatentStream

    if kind == "ours-fresh":  # no storage use counts: the pool hands out fresh tensors, as the reader did before
        import accel_distill.data.buffers as buffers

        buffers._use_count = None
    s = LatentStream(
        source,
        batch_size=batch,
        seed=0,
        shuffle=kind != "ours-noshuffle",
        rank=rank,
        world_size=world,
        text_max_length=text_max_length,
        check_finite=check_finite,
        prefetch=0 if kind == "ours-inline" else 2,
    )
    n = s.batches_per_epoch
    it = iter(s)
    next(it)  # start-up (footers, first group, prefetch thread) not timed
    start, cpu, faults = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(n - 1):
        b = next(it)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert len(b["latents"]) == batch and b["text_embeds"].shape[1] == text_max_length
    return (n - 1) * batch, elapsed, cpu, faults


def pyarrow_batches(
    source: str, batch: int, rank: int, world: int, text_max_length: int, shuffled: bool = False, reuse: bool = False
):
    """Plain pyarrow: this rank's row groups in file order, the same columns and batch fields as the reader
    (ids, captions, tensors in their stored dtype), values zero-copy, one copy into the batch tensors.
    ``shuffled``: row groups and their rows in the reader's epoch-0 order (rank split by group as before);
    ``reuse``: batch tensors from the reader's buffer pool instead of new ones."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from accel_distill.data.buffers import BufferPool
    from accel_distill.data.schema import CAPTION, ID, LATENT_COLUMNS, TEXT_COLUMNS, copy_bytes_into, dtype_from_name

    if source.startswith("hf://"):
        from huggingface_hub import HfFileSystem

        fs = HfFileSystem()
        files = sorted("hf://" + p for p in fs.glob(source.rstrip("/") + "/**/*.parquet"))
        open_ = lambda f: pq.ParquetFile(fs.open(f, "rb", block_size=1 << 20, cache_type="none"))  # noqa: E731
    else:
        files = sorted(str(p) for p in Path(source).rglob("*.parquet"))
        open_ = lambda f: pq.ParquetFile(f, memory_map=True)  # noqa: E731  (as the reader opens local files)

    def values(column: pa.ChunkedArray) -> list:
        chunk = column.chunk(0)
        _, offsets, data = chunk.buffers()
        off = np.frombuffer(offsets, dtype=np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
        return [data.slice(int(a), int(b - a)) for a, b in zip(off[:-1], off[1:])]

    columns = [ID, CAPTION, *LATENT_COLUMNS, *TEXT_COLUMNS]
    groups = []  # (file, row group, rows) of every group, file after file
    for f in files:
        with open_(f) as pf:
            groups += [(f, i, pf.metadata.row_group(i).num_rows) for i in range(pf.metadata.num_row_groups)]
    if shuffled:  # as accel_distill.data.order.group_order(seed=0, epoch=0)
        groups = [groups[int(gi)] for gi in np.random.default_rng([0, 0]).permutation(len(groups))]
    mine = [(f, g, n, i) for i, (f, g, n) in enumerate(groups) if i % world == rank]
    pool = BufferPool(2 * (2 + 3)) if reuse else None  # as the reader sizes it for 2 tensors, 2 ahead
    empty = pool.empty if reuse else lambda shape, dtype: torch.empty(shape, dtype=dtype)

    def tensors(rows: list[dict]) -> dict:
        first = rows[0]
        latents = empty((len(rows), *first["ls"]), dtype_from_name(first["ld"]))
        text = empty((len(rows), text_max_length, first["ts"][1]), dtype_from_name(first["td"]))
        for i, r in enumerate(rows):
            copy_bytes_into(latents[i], r["l"])
            copy_bytes_into(text[i, : r["ts"][0]], r["t"])
            text[i, r["ts"][0] :] = 0  # zero padding at the end
        ids, captions = [r["id"] for r in rows], [r["caption"] for r in rows]
        return {"latents": latents, "text_embeds": text, "ids": ids, "captions": captions}

    pending: list = []  # rows of the batch being filled (row groups may be smaller than a batch)
    open_files: dict = {}
    for f, g, n, gi in mine:
        if f not in open_files:
            if not shuffled:  # file order: done with the previous file
                for pf in open_files.values():
                    pf.close()
                open_files.clear()
            open_files[f] = open_(f)
        table = open_files[f].read_row_group(g, columns=columns).combine_chunks()  # ~1.5x cheaper than iter_batches
        cols = {
            "id": table.column(ID).to_pylist(),
            "caption": table.column(CAPTION).to_pylist(),
            "l": values(table.column(LATENT_COLUMNS[0])),
            "ls": table.column(LATENT_COLUMNS[1]).to_pylist(),
            "ld": table.column(LATENT_COLUMNS[2]).to_pylist(),
            "t": values(table.column(TEXT_COLUMNS[0])),
            "ts": table.column(TEXT_COLUMNS[1]).to_pylist(),
            "td": table.column(TEXT_COLUMNS[2]).to_pylist(),
        }
        rows = np.random.default_rng([0, 0, gi]).permutation(n) if shuffled else range(n)
        for i in rows:
            pending.append({k: v[i] for k, v in cols.items()})
            if len(pending) == batch:
                yield tensors(pending)
                pending = []
    for pf in open_files.values():
        pf.close()


def worker_datasets(source: str, batch: int, rank: int, world: int, text_max_length: int):
    """``datasets``' own streaming: ``load_dataset("parquet", streaming=True)`` split by node, no shuffle buffer
    (its upper bound), rows as Python dicts (bytes values) copied into the same batch tensors."""
    import torch
    from datasets import load_dataset
    from datasets.distributed import split_dataset_by_node

    from accel_distill.data.schema import copy_bytes_into, dtype_from_name

    files = sorted(str(p) for p in Path(source).rglob("*.parquet"))
    ds = split_dataset_by_node(load_dataset("parquet", data_files=files, split="train", streaming=True), rank, world)
    columns = ["id", "caption", "vae_latent_bytes", "vae_latent_shape", "vae_latent_dtype"]
    columns += ["text_embedding_bytes", "text_embedding_shape", "text_embedding_dtype"]
    rows = iter(ds.select_columns(columns))

    def batches():
        pending = []
        for r in rows:
            pending.append(r)
            if len(pending) == batch:
                first = pending[0]
                lat = torch.empty((batch, *first["vae_latent_shape"]), dtype=dtype_from_name(first["vae_latent_dtype"]))
                text = torch.zeros(
                    (batch, text_max_length, first["text_embedding_shape"][1]),
                    dtype=dtype_from_name(first["text_embedding_dtype"]),
                )
                for i, x in enumerate(pending):
                    copy_bytes_into(lat[i], x["vae_latent_bytes"])
                    copy_bytes_into(text[i, : x["text_embedding_shape"][0]], x["text_embedding_bytes"])
                yield lat
                pending = []

    it = batches()
    next(it)
    start, cpu, faults, samples = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF), 0
    for b in it:
        samples += len(b)
    return samples, time.perf_counter() - start, time.process_time() - cpu, faults


def worker_pyarrow(source: str, batch: int, rank: int, world: int, text_max_length: int, kind: str):
    def ended():  # the reader's prefetch helper serves endless sources: mark the end
        shuffled, reuse = kind == "pyarrow-shuffled", kind == "pyarrow-reuse"
        yield from pyarrow_batches(source, batch, rank, world, text_max_length, shuffled, reuse)
        while True:
            yield None

    batches = ended()
    if kind != "pyarrow":  # the reader's own prefetch thread (2 ahead), so both sides have the same concurrency
        from accel_distill.data.prefetch import prefetched

        batches = prefetched(batches, 2)
    samples = 0
    next(batches)  # the same warm-up as ours: timing starts after the first batch
    start, cpu, faults = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
    for b in batches:
        if b is None:
            break
        samples += len(b["latents"])
    return samples, time.perf_counter() - start, time.process_time() - cpu, faults


def run_worker(args) -> None:
    """One measurement: prints samples, wall and CPU seconds, page faults and system CPU seconds as JSON."""
    import torch

    torch.set_num_threads(args.threads)  # memsets/copies in OpenMP regions stall on a busy 2-core host
    os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
    common = (args.source, args.batch, args.rank, args.world, args.text_max_length)
    if args.worker.startswith("ours"):
        samples, elapsed, cpu, r0 = worker_ours(*common, kind=args.worker, check_finite=args.host_finite_check)
    elif args.worker == "datasets":
        samples, elapsed, cpu, r0 = worker_datasets(*common)
    else:
        samples, elapsed, cpu, r0 = worker_pyarrow(*common, kind=args.worker)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    out = {"samples": samples, "elapsed": elapsed, "cpu": cpu}
    out.update(faults=r1.ru_minflt + r1.ru_majflt - r0.ru_minflt - r0.ru_majflt, sys=r1.ru_stime - r0.ru_stime)
    print(json.dumps(out))
