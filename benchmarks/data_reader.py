"""Training reader throughput against plain pyarrow, side by side, local files and the loopback Hub.

    PYTHONPATH=. .venv/bin/python benchmarks/data_reader.py [--samples 192] [--row-group-size 8]
        [--batch 4] [--repeats 3] [--ranks 1,2] [--sources local,hub] [--text-tokens 70] [--threads 1]
    PYTHONPATH=. .venv/bin/python benchmarks/data_reader.py --variants --repeats 7   # where the time goes

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
  into the same batch tensors, new ones per batch (stacked latents, text zero-padded to
  ``--text-max-length``: only the padding is zeroed, as the reader does), no shuffle, no checks;
  run in the reader's own prefetch thread (2 ahead, the same concurrency as ours: the headline
  ratio) and in the consuming loop.

Workers run with ``--threads`` torch threads (1: on the shared 2-core hosts every OpenMP memset
otherwise waits for a descheduled thread). With 2 ranks both processes run at once and the rate is all samples over the wall time of the
slower one. Hub: the same files from ``accel_distill.testing.loopback_hub`` (its own process,
serving from disk over HTTP on 127.0.0.1), read by byte range through ``HfFileSystem`` by both.
Runs alternate ours / the baselines; ratios are of the medians (target >= 0.9x locally).
``--with-datasets`` adds ``datasets``' own streaming (local, no shuffle buffer: its upper bound);
``--datasets-resume`` only checks whether its shuffled stream resumes exactly from ``state_dict()``.
``--variants`` (local, 1 rank) times the reader and the baseline each with one thing changed
(:mod:`benchmarks.data_reader_workers`: shuffle, prefetch thread, batch memory reuse) and reports
page faults per sample and the system share of the CPU time, where the reader's time went.
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

from benchmarks.data_reader_workers import KINDS, run_worker

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


# -- driver ----------------------------------------------------------------------------------------


def measure(kind: str, source: str, world: int, args: argparse.Namespace, env: dict) -> tuple[float, ...]:
    """(samples per second of wall time, samples per CPU second, page faults per sample, system CPU share) of
    ``world`` workers of ``kind`` run together."""
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
    samples, cpu = sum(r["samples"] for r in results), sum(r["cpu"] for r in results)
    faults, sys_cpu = sum(r["faults"] for r in results), sum(r["sys"] for r in results)
    return samples / max(r["elapsed"] for r in results), samples / cpu, faults / samples, sys_cpu / cpu


def print_variants(runs: dict[str, list[tuple[float, ...]]]) -> None:
    """One line per variant: medians, and ratios to the baseline in the reader's prefetch thread."""
    med = {k: [statistics.median(r[i] for r in v) for i in range(4)] for k, v in runs.items()}
    base = med["pyarrow-thread"]
    for k, (wall, cpu, faults, sys_share) in med.items():
        print(
            f"VARIANT {k:16s} {wall:6.1f} samples/s ({wall / base[0]:.2f}x), {cpu:6.1f} per CPU s "
            f"({cpu / base[1]:.2f}x), {faults:5.0f} page faults per sample, system CPU {sys_share:.0%}"
        )


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
    p.add_argument("--worker", choices=KINDS)
    p.add_argument("--with-datasets", action="store_true", help="also time datasets' streaming (local, no shuffle)")
    p.add_argument("--datasets-resume", action="store_true", help="only: does datasets' shuffled stream resume?")
    p.add_argument("--variants", action="store_true", help="only: local, 1 rank, the variants of data_reader_workers")
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
    if args.variants:
        args.sources = "local"
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
            for world in (int(w) for w in args.ranks.split(",")) if not args.variants else (1,):
                kinds = ("ours", "pyarrow-thread", "pyarrow", *(("datasets",) if args.with_datasets else ()))
                kinds = tuple(k for k in kinds if k != "datasets" or source == "local")
                kinds = tuple(k for k in KINDS if k != "datasets") if args.variants else kinds
                runs: dict[str, list[tuple[float, ...]]] = {k: [] for k in kinds}
                for _ in range(args.repeats):
                    for kind in kinds:
                        runs[kind].append(measure(kind, path, world, args, env))
                if args.variants:
                    print_variants(runs)
                    continue
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
                    print(f"  runs {k:15s} " + "  ".join(f"{r[0]:6.1f}/s {r[1]:6.1f}/cpu-s" for r in v))
    finally:
        if hub is not None:
            hub.terminate()
            hub.wait(timeout=10)


if __name__ == "__main__":
    main()
