"""Preprocessing throughput with the tiny Wan VAE / text encoder, and reading speed of what it writes.

    PYTHONPATH=. .venv/bin/python benchmarks/preprocess_throughput.py [--videos 32] [--height 64] [--width 64]
        [--num-frames 9] [--rows-per-shard 16] [--decode-workers 2] [--read-batch 4] [--read-passes 5]

1. Encoding: generated mp4s (PyAV, 96x80 at 16 fps, ``num_frames + 4`` frames each, with
   captions) go through ``preprocess_media`` twice, models loaded and warmed
   beforehand: once with no decode threads, which splits the time cleanly into
   decoding media (PyAV + resize/crop) vs encoding (VAE, text encoder) vs writing
   parquet, and once with ``--decode-workers`` threads decoding ahead of the encoder.
2. Reading: the written shards through the training reader (``LatentStream``,
   shuffled, prefetching) vs plain pyarrow ``iter_batches`` over the same files
   producing the same batch tensors (stacked latents, zero-padded text), warm
   page cache, samples/s over several passes (and pyarrow without touching the
   bytes, an upper bound). Target: reader >= 0.5x pyarrow.

Videos only: one latent shape, so the reader's rate is not split over buckets.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import av  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from accel_distill.data import LatentStream, find_parquet_files  # noqa: E402
from accel_distill.data.schema import LATENT_BYTES, LATENT_SHAPE, TEXT_BYTES, TEXT_SHAPE  # noqa: E402
from accel_distill.preprocess.encode import make_encoder  # noqa: E402
from accel_distill.preprocess.jobs import MediaJob, preprocess_media  # noqa: E402
from accel_distill.preprocess.manifest import discover  # noqa: E402
from accel_distill.preprocess.shards import ShardStore  # noqa: E402
from accel_distill.testing.tiny_wan import build_tiny_wan  # noqa: E402

TEXT_MAX_LENGTH = 16
WORDS = "a an the of cat dog video photo red blue green one two three".split()


def write_videos(root: Path, count: int, frames: int) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(count):
        with av.open(str(root / f"v{i:04d}.mp4"), "w") as container:
            stream = container.add_stream("mpeg4", rate=16)
            stream.width, stream.height, stream.pix_fmt = 96, 80, "yuv420p"
            for _ in range(frames):
                rgb = rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
            container.mux(stream.encode())
        (root / f"v{i:04d}.txt").write_text(" ".join(rng.choice(WORDS, size=int(rng.integers(3, 10)))))


def encode(items, encoder, args, out: Path, workers: int) -> tuple[float, dict]:
    job = MediaJob(
        output=str(out),
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        rows_per_shard=args.rows_per_shard,
        row_group_size=args.rows_per_shard,
        text_max_length=TEXT_MAX_LENGTH,
        vae_batch_size=args.vae_batch_size,
        decode_workers=workers,
    )
    start = time.perf_counter()
    report = preprocess_media(items, encoder, job, ShardStore(out, {"benchmark": workers}))
    wall = time.perf_counter() - start
    assert report.totals["rows"] == len(items), report.totals
    return wall, report.seconds


def read_stream(data: Path, batch: int, passes: int) -> float:
    stream = LatentStream(str(data), batch_size=batch, seed=0, text_max_length=TEXT_MAX_LENGTH)
    n = stream.batches_per_epoch * passes
    it = iter(stream)
    next(it)  # start-up (footers, first group, prefetch thread) not timed
    start = time.perf_counter()
    for _ in range(n):
        b = next(it)
    elapsed = time.perf_counter() - start
    assert b["latents"].shape[0] == batch
    return n * batch / elapsed


def read_pyarrow(data: Path, batch: int, passes: int, *, tensors: bool = True) -> float:
    """Plain pyarrow: ``iter_batches`` over every file; ``tensors``: also build the batch tensors from the bytes."""
    files = find_parquet_files(str(data))
    columns = [LATENT_BYTES, LATENT_SHAPE, TEXT_BYTES, TEXT_SHAPE]
    samples = 0
    start = time.perf_counter()
    for _ in range(passes):
        for f in files:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=batch, columns=columns):
                samples += rb.num_rows
                if not tensors:
                    continue
                lat_bytes, lat_shapes = rb.column(0).to_pylist(), rb.column(1).to_pylist()
                text_bytes, text_shapes = rb.column(2).to_pylist(), rb.column(3).to_pylist()
                latents = torch.stack(
                    [torch.frombuffer(bytearray(b), dtype=torch.float32).view(s) for b, s in zip(lat_bytes, lat_shapes)]
                )
                text = torch.zeros((rb.num_rows, TEXT_MAX_LENGTH, text_shapes[0][1]), dtype=torch.float32)
                for i, (b, s) in enumerate(zip(text_bytes, text_shapes)):
                    text[i, : s[0]] = torch.frombuffer(bytearray(b), dtype=torch.float32).view(s)
                assert latents.shape[0] == text.shape[0]
    return samples / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=32)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--num-frames", type=int, default=9)
    p.add_argument("--rows-per-shard", type=int, default=16)
    p.add_argument("--vae-batch-size", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=2)
    p.add_argument("--read-batch", type=int, default=4)
    p.add_argument("--read-passes", type=int, default=5)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_wan(tmp / "tiny-wan")
        write_videos(tmp / "media", args.videos, args.num_frames + 4)
        items = discover(tmp / "media")
        encoder = make_encoder("wan", str(model), dtype=torch.float32, device=torch.device("cpu"))
        encoder.check_video_size(args.height, args.width, args.num_frames)
        # load and warm both models outside the timings
        encoder.encode_video(torch.zeros(1, 3, args.num_frames, args.height, args.width))
        encoder.encode_text(["warm up"], TEXT_MAX_LENGTH)

        print(
            f"torch threads {torch.get_num_threads()}, {args.videos} videos 96x80 -> {args.height}x{args.width}, "
            f"{args.num_frames} frames, {args.rows_per_shard} rows/shard, tiny Wan VAE (fp32, CPU)"
        )
        wall, sec = encode(items, encoder, args, tmp / "seq", workers=0)
        busy = sum(sec.values())
        print(f"encode, no decode threads : {args.videos / wall:7.2f} samples/s ({wall:.2f} s)")
        print(
            "  time shares            : "
            + ", ".join(f"{k} {v / busy:5.1%}" for k, v in sec.items())
            + f"  (decode = PyAV + resize/crop; encode = vae + text {(sec['vae'] + sec['text']) / busy:.1%})"
        )
        wall, sec = encode(items, encoder, args, tmp / "par", workers=args.decode_workers)
        busy = sum(sec.values())
        print(f"encode, {args.decode_workers} decode threads  : {args.videos / wall:7.2f} samples/s ({wall:.2f} s)")
        print(
            "  busy-time shares       : "
            + ", ".join(f"{k} {v / busy:5.1%}" for k, v in sec.items())
            + "  (decode runs in the threads, overlapped with encoding)"
        )

        data = tmp / "par"
        size = sum(f.stat().st_size for f in data.glob("*.parquet"))
        shape = pq.read_table(next(data.glob("*.parquet")), columns=[LATENT_SHAPE]).column(0)[0].as_py()
        print(f"read {len(list(data.glob('*.parquet')))} shards, {size / 1e6:.1f} MB, latent {shape} float32")
        read_pyarrow(data, args.read_batch, 1)  # warm the page cache
        ours = read_stream(data, args.read_batch, args.read_passes)
        plain = read_pyarrow(data, args.read_batch, args.read_passes)
        raw = read_pyarrow(data, args.read_batch, args.read_passes, tensors=False)
        print(f"  LatentStream (training reader)     : {ours:9.1f} samples/s")
        print(
            f"  pyarrow iter_batches + tensors     : {plain:9.1f} samples/s -> ratio {ours / plain:.2f}x (target >= 0.5x)"
        )
        print(f"  pyarrow iter_batches, bytes untouched: {raw:7.1f} samples/s -> ratio {ours / raw:.2f}x")


if __name__ == "__main__":
    main()
