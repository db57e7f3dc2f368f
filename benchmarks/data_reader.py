"""Training reader throughput against plain pyarrow, side by side, local files and the loopback Hub.

    PYTHONPATH=. .venv/bin/python benchmarks/data_reader.py [--samples 192] [--row-group-size 8]
        [--batch 4] [--repeats 3] [--ranks 1,2] [--sources local,hub] [--text-tokens 70] [--threads 1]

Data: Wan2.1-1.3B-size rows (latent 16x21x60x104 bf16, 4.2 MB; text ``--text-tokens`` x 4096
bf16), written by ``write_parquet`` into files of ``--rows-per-file`` rows, read with a warm
page cache. Every measurement is a fresh process that reads one epoch (its share of it) after
one warm-up batch:

* ``LatentStream``: the training reader as training uses it -- seeded shuffle of row groups and
  rows, one-bucket global batches, rank r's share of each, prefetch thread, every check training
  runs on the host (shapes, bytes, widths; NaN/inf is tested by the trainer on the device, so the
  reader skips it as in training; ``--host-finite-check`` adds it, as a stand-alone stream runs);
* ``pyarrow``: the fair plain baseline -- ``ParquetFile.read_row_group`` (1.5x cheaper than
  ``iter_batches`` here) of this rank's row groups (group k to rank k % world) in file order, cut
  into batches of ``--batch`` rows, local files memory-mapped
  as the reader opens them, each binary value taken zero-copy (``Array.buffers()``) and copied once
  into the same batch tensors (stacked latents, text zero-padded to ``--text-max-length``), no
  shuffle, no checks; run in the reader's own prefetch thread (2 ahead, the same concurrency as
  ours: the headline ratio) and in the consuming loop.

Workers run with ``--threads`` torch threads (1: on the shared 2-core hosts every OpenMP memset
otherwise waits for a descheduled thread). With 2 ranks both processes run at once and the rate is all samples over the wall time of the
slower one. Hub: the same files from ``accel_distill.testing.loopback_hub`` (its own process,
serving from disk over HTTP on 127.0.0.1), read by byte range through ``HfFileSystem`` by both.
Runs alternate ours / the baselines; ratios are of the medians (target >= 0.9x locally).
``--with-datasets`` adds ``datasets``' own streaming (local, no shuffle buffer: its upper bound);
``--datasets-resume`` only checks whether its shuffled stream resumes exactly from ``state_dict()``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LATENT = (16, 21, 60, 104)  # Wan2.1 T2V 1.3B, 81 frames at 480x832
TEXT_DIM = 4096


def write_data(folder: Path, samples: int, rows_per_file: int, row_group_size: int, text_tokens: int) -> None:
    import torch

    from accel_distill.data import write_parquet

    done = folder / "done.json"
    spec = {"samples": samples, "rows_per_file": rows_per_file, "row_group_size": row_group_size, "text": text_tokens}
    if done.exists() and json.loads(done.read_text()) == spec:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.parquet"):
        old.unlink()
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(LATENT, generator=gen).to(torch.bfloat16)  # one random tensor, shifted per row
    text = torch.randn(text_tokens, TEXT_DIM, generator=gen).to(torch.bfloat16)
    for k in range(0, samples, rows_per_file):
        rows = [
            {"id": f"s{i:06d}", "caption": f"clip {i}", "latent": latent + i, "text_embedding": text - i}
            for i in range(k, min(k + rows_per_file, samples))
        ]
        write_parquet(folder / f"part-{k // rows_per_file:05d}.parquet", rows, row_group_size=row_group_size or None)
    done.write_text(json.dumps(spec))


# -- workers (one process each) -------------------------------------------------------------------


def worker_ours(source: str, batch: int, rank: int, world: int, text_max_length: int, check_finite: bool):
    from accel_distill.data import LatentStream

    s = LatentStream(
        source,
        batch_size=batch,
        seed=0,
        rank=rank,
        world_size=world,
        text_max_length=text_max_length,
        check_finite=check_finite,
    )
    n = s.batches_per_epoch
    it = iter(s)
    next(it)  # start-up (footers, first group, prefetch thread) not timed
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(n - 1):
        b = next(it)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert b["latents"].shape == (batch, *LATENT) and b["text_embeds"].shape[1] == text_max_length
    return (n - 1) * batch, elapsed, cpu


def pyarrow_batches(source: str, batch: int, rank: int, world: int, text_max_length: int):
    """Plain pyarrow: this rank's row groups in file order, the same columns and batch fields as the reader
    (ids, captions, tensors in their stored dtype), values zero-copy, one copy into the batch tensors."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

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
    plan, g = [], 0  # (file, this rank's row groups of it)
    for f in files:
        with open_(f) as pf:
            plan.append((f, [i for i in range(pf.metadata.num_row_groups) if (g + i) % world == rank]))
            g += pf.metadata.num_row_groups

    def tensors(rows: list[dict]) -> dict:
        first = rows[0]
        latents = torch.empty((len(rows), *first["ls"]), dtype=dtype_from_name(first["ld"]))
        text = torch.zeros((len(rows), text_max_length, first["ts"][1]), dtype=dtype_from_name(first["td"]))
        for i, r in enumerate(rows):
            copy_bytes_into(latents[i], r["l"])
            copy_bytes_into(text[i, : r["ts"][0]], r["t"])
        ids, captions = [r["id"] for r in rows], [r["caption"] for r in rows]
        return {"latents": latents, "text_embeds": text, "ids": ids, "captions": captions}

    pending: list = []  # rows of the batch being filled (row groups may be smaller than a batch)
    for f, groups in plan:
        with open_(f) as pf:
            for g in groups:  # read_row_group: ~1.5x cheaper than iter_batches for these rows
                table = pf.read_row_group(g, columns=columns).combine_chunks()
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
                for i in range(table.num_rows):
                    pending.append({k: v[i] for k, v in cols.items()})
                    if len(pending) == batch:
                        yield tensors(pending)
                        pending = []


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
    start, cpu, samples = time.perf_counter(), time.process_time(), 0
    for b in it:
        samples += len(b)
    return samples, time.perf_counter() - start, time.process_time() - cpu


def worker_pyarrow(source: str, batch: int, rank: int, world: int, text_max_length: int, thread: bool):
    def ended():  # the reader's prefetch helper serves endless sources: mark the end
        yield from pyarrow_batches(source, batch, rank, world, text_max_length)
        while True:
            yield None

    batches = ended()
    if thread:  # the reader's own prefetch thread (2 ahead), so both sides have the same concurrency
        from accel_distill.data.prefetch import prefetched

        batches = prefetched(batches, 2)
    samples = 0
    next(batches)  # the same warm-up as ours: timing starts after the first batch
    start, cpu = time.perf_counter(), time.process_time()
    for b in batches:
        if b is None:
            break
        samples += len(b["latents"])
    return samples, time.perf_counter() - start, time.process_time() - cpu


def datasets_resume(folder: Path, buffer: int = 8, first: int = 10, total: int = 24) -> str:
    """Can ``datasets``' shuffled stream resume exactly? ``first`` rows, ``state_dict()``, a new stream resumed from
    it for the rest, against one straight pass over the same rows."""
    import itertools
    import warnings

    from datasets import load_dataset

    files = sorted(str(p) for p in folder.glob("*.parquet"))

    def make():
        ds = load_dataset("parquet", data_files=files, split="train", streaming=True).select_columns(["id"])
        return ds.shuffle(seed=0, buffer_size=buffer)

    straight = [r["id"] for r in itertools.islice(iter(make()), total)]
    ds = make()
    it = iter(ds)
    got = [next(it)["id"] for _ in range(first)]
    resumed = make()
    resumed.load_state_dict(ds.state_dict())
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got += [r["id"] for r in itertools.islice(iter(resumed), total - first)]
    return (
        f"RESULT datasets_resume shuffle(buffer_size={buffer}), state_dict after {first} of {total} rows: "
        f"{'same' if got == straight else 'different'} order as one pass, {len(set(straight) - set(got))} rows "
        f"never came, {len(got) - len(set(got))} repeated, resumed part took {time.perf_counter() - start:.1f} s"
    )


def run_worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)  # memsets/copies in OpenMP regions stall on a busy 2-core host
    os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
    t0 = time.time()
    common = (args.source, args.batch, args.rank, args.world, args.text_max_length)
    if args.worker == "ours":
        samples, elapsed, cpu = worker_ours(*common, check_finite=args.host_finite_check)
    elif args.worker == "datasets":
        samples, elapsed, cpu = worker_datasets(*common)
    else:
        samples, elapsed, cpu = worker_pyarrow(*common, thread=args.worker == "pyarrow-thread")
    print(json.dumps({"samples": samples, "elapsed": elapsed, "cpu": cpu, "t_end": time.time(), "t0": t0}))


# -- driver ----------------------------------------------------------------------------------------


def measure(kind: str, source: str, world: int, args: argparse.Namespace, env: dict) -> tuple[float, float]:
    """(samples per second of wall time, samples per CPU second) of ``world`` workers of ``kind`` run together."""
    cmd = [sys.executable, __file__, "--worker", kind, "--source", source, "--batch", str(args.batch)]
    cmd += ["--host-finite-check"] if args.host_finite_check else []
    cmd += ["--threads", str(args.threads)]
    cmd += ["--world", str(world), "--text-max-length", str(args.text_max_length)]
    procs = [
        subprocess.Popen([*cmd, "--rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for r in range(world)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"{kind} worker failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    samples = sum(r["samples"] for r in results)
    return samples / max(r["elapsed"] for r in results), samples / sum(r["cpu"] for r in results)


def start_hub(folder: Path, env: dict) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "accel_distill.testing.loopback_hub", "--dataset", f"bench/latents={folder}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    return proc, proc.stdout.readline().strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=192)
    p.add_argument("--rows-per-file", type=int, default=64)
    p.add_argument("--row-group-size", type=int, default=0, help="rows per row group (0: write_parquet's auto)")
    p.add_argument("--text-tokens", type=int, default=70)
    p.add_argument("--text-max-length", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="samples per batch per rank")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker process (default 1)")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--sources", default="local,hub")
    p.add_argument(
        "--host-finite-check",
        action="store_true",
        help="LatentStream(check_finite=True): NaN/inf tested in the reader (training tests it on the device)",
    )
    p.add_argument("--data", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "accel_distill_reader_bench"))
    # worker mode
    p.add_argument("--worker", choices=["ours", "pyarrow", "pyarrow-thread", "datasets"])
    p.add_argument("--with-datasets", action="store_true", help="also time datasets' streaming (local, no shuffle)")
    p.add_argument("--datasets-resume", action="store_true", help="only: does datasets' shuffled stream resume?")
    p.add_argument("--source")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world", type=int, default=1)
    args = p.parse_args()
    if args.worker:
        return run_worker(args)

    folder = Path(args.data) / f"rg{args.row_group_size or 'auto'}"
    write_data(folder, args.samples, args.rows_per_file, args.row_group_size, args.text_tokens)
    if args.datasets_resume:
        return print(datasets_resume(folder))
    size = sum(f.stat().st_size for f in folder.glob("*.parquet"))
    import pyarrow.parquet as pq

    groups = pq.ParquetFile(next(folder.glob("*.parquet"))).metadata.row_group(0).num_rows
    for f in folder.glob("*.parquet"):  # warm the page cache
        f.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
    env["HF_HOME"] = str(Path(args.data) / "hf-home")
    print(
        f"{args.samples} rows of latent {'x'.join(map(str, LATENT))} bf16 + text {args.text_tokens}x{TEXT_DIM} bf16 "
        f"(padded to {args.text_max_length}), {size / 1e9:.2f} GB in files of {args.rows_per_file} rows, row groups "
        f"of {groups}; batch {args.batch} per rank; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    )
    hub = None
    try:
        for source in args.sources.split(","):
            if source == "hub":
                hub, url = start_hub(folder, env)
                env["HF_ENDPOINT"] = url
                path = "hf://datasets/bench/latents"
            else:
                path = str(folder)
            for world in (int(w) for w in args.ranks.split(",")):
                kinds = ("ours", "pyarrow-thread", "pyarrow", *(("datasets",) if args.with_datasets else ()))
                kinds = tuple(k for k in kinds if k != "datasets" or source == "local")
                runs: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
                for _ in range(args.repeats):
                    for kind in kinds:
                        runs[kind].append(measure(kind, path, world, args, env))
                wall = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
                cpu = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
                target = " (target >= 0.9x)" if source == "local" else ""
                print(
                    f"RESULT data_reader {source} {world} rank(s), samples/s: LatentStream {wall['ours']:.1f}, "
                    f"pyarrow + prefetch thread {wall['pyarrow-thread']:.1f} (ratio "
                    f"{wall['ours'] / wall['pyarrow-thread']:.2f}x{target}), pyarrow in the loop {wall['pyarrow']:.1f} "
                    f"(ratio {wall['ours'] / wall['pyarrow']:.2f}x); samples per CPU second: LatentStream "
                    f"{cpu['ours']:.1f}, pyarrow + thread {cpu['pyarrow-thread']:.1f} "
                    f"({cpu['ours'] / cpu['pyarrow-thread']:.2f}x), pyarrow {cpu['pyarrow']:.1f} "
                    f"({cpu['ours'] / cpu['pyarrow']:.2f}x)"
                    + (
                        f"; datasets streaming (no shuffle) {wall['datasets']:.1f} samples/s, ratio "
                        f"{wall['ours'] / wall['datasets']:.2f}x"
                        if "datasets" in wall
                        else ""
                    ),
                    flush=True,
                )
                for k, v in runs.items():
                    print(f"  runs {k:15s} " + "  ".join(f"{w:6.1f}/s {c:6.1f}/cpu-s" for w, c in v))
    finally:
        if hub is not None:
            hub.terminate()
            hub.wait(timeout=10)


if __name__ == "__main__":
    main()
