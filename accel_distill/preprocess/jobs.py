"""The preprocessing jobs: media -> latent shards, prompts -> text-only shards, single embedding files.

Each job is a plain function of its settings and of this process's rank; the CLI
supplies rank / world size / device (``accelerate.PartialState`` under
``accelerate launch``) and a barrier.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import torch
from tqdm import tqdm

from accel_distill.data.stream import shape_name
from accel_distill.errors import DataError
from accel_distill.families.base import MediaEncoder

from .buckets import Targets
from .manifest import Item
from .media import MISSING_CAPTION, UNSUPPORTED, Clip, MediaError, load_clip, to_model_input
from .shards import SKIPPED_FILE, ShardStore, num_shards, rank_shards


@dataclass
class MediaJob:
    """Settings of ``preprocess videos`` (see the CLI for their meaning).

    One output size (``height``, ``width``, ``num_frames``), or several: ``sizes`` (height, width)
    and ``frame_counts``, each input going to the one that fits it best (:mod:`.buckets`).
    """

    output: str
    height: int | None = None
    width: int | None = None
    num_frames: int = 81
    fps: float | None = None
    sizes: Sequence[tuple[int, int]] = ()
    frame_counts: Sequence[int] = ()
    rows_per_shard: int = 64
    row_group_size: int | None = None  # None: ~8 MB of tensors per group (write_parquet's auto)
    text_max_length: int = 512
    store_dtype: torch.dtype = torch.float32
    strict: bool = False
    vae_batch_size: int = 1
    decode_workers: int = 2

    def targets(self) -> Targets:
        sizes = self.sizes or [(self.height, self.width)]
        if any(h is None or w is None for h, w in sizes):
            raise ValueError("MediaJob needs height and width, or sizes")
        return Targets.of(sizes, self.frame_counts or [self.num_frames])


@dataclass
class Report:
    """What one process did, plus (on the main process) the totals over all shards."""

    shards_total: int = 0
    shards_done_before: int = 0  # all ranks: finished by an earlier run, skipped by this one
    shards_encoded: int = 0  # by this process, this run
    rows_encoded: int = 0  # by this process, this run
    seconds: dict = field(default_factory=lambda: {"decode": 0.0, "vae": 0.0, "text": 0.0, "write": 0.0})
    totals: dict | None = None  # main process: rows / skipped over every shard
    command: str = "preprocess"  # the summary line's name

    def summary(self, output: str) -> str:
        t = self.totals or {}
        reasons = ", ".join(f"{r} {n}" for r, n in t.get("skipped_by_reason", {}).items())
        unfinished = len(t.get("unfinished_shards", []))
        encoded_now = self.shards_total - self.shards_done_before - unfinished
        line = (
            f"{self.command}: {t.get('rows', 0)} rows in {self.shards_total} shard(s) under {output} "
            f"({encoded_now} encoded now, {self.shards_done_before} already done); "
            f"skipped {t.get('skipped', 0)} input(s)"
        )
        if len(t.get("buckets", {})) > 1:
            line += "; latent shapes " + ", ".join(f"{k}: {n}" for k, n in t["buckets"].items())
        if t.get("skipped"):
            line += f" [{reasons}], listed in {os.path.join(output, SKIPPED_FILE)}"
        if t.get("unfinished_shards"):
            line += f"; UNFINISHED shards {t['unfinished_shards']}: run again to complete them"
        return line


def inputs_digest(items: Iterable[Item | str]) -> str:
    """A short hash of the input list (paths + captions, or prompts), recorded with the shards."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps(asdict(it) if isinstance(it, Item) else it).encode())
    return h.hexdigest()[:16]


def _prefetch(fn: Callable, items: list, workers: int) -> Iterator[tuple]:
    """``(item, fn(item))`` in order, computed up to ``2 * workers`` items ahead by a thread pool."""
    if workers <= 0:
        for item in items:
            yield item, fn(item)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="preprocess-decode") as pool:
        source = iter(items)
        pending = deque((it, pool.submit(fn, it)) for it in islice(source, 2 * workers))
        try:
            while pending:
                item, fut = pending.popleft()
                nxt = next(source, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(fn, nxt)))
                yield item, fut.result()
        finally:
            for _, fut in pending:
                fut.cancel()


def _skip(item: Item, reason: str, detail: str, strict: bool) -> dict:
    if strict:
        raise DataError(f"{item.path}: {reason}" + (f" ({detail})" if detail else "") + " [--strict]")
    return {"file": item.path, "id": item.id, "reason": reason, "detail": detail}


def preprocess_media(
    items: list[Item],
    encoder: MediaEncoder,
    job: MediaJob,
    store: ShardStore,
    *,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> Report:
    """Encode this rank's shards of ``items`` into ``store``; the main process merges the report at the end."""
    if job.strict:  # fail before any model loads
        for item in items:
            if item.caption is None:
                _skip(item, MISSING_CAPTION, "no caption in the manifest / no same-name .txt", True)
    total = num_shards(len(items), job.rows_per_shard)
    done = {k for k in range(total) if store.is_done(k)}
    barrier()  # every rank has looked before any rank writes
    report = Report(shards_total=total, shards_done_before=len(done))
    targets = job.targets()
    todo = [k for k in rank_shards(total, rank, world_size) if k not in done]
    work = [(k, i) for k in todo for i in range(k * job.rows_per_shard, min((k + 1) * job.rows_per_shard, len(items)))]

    def decode(entry: tuple[int, int]) -> tuple[Clip | MediaError, float]:
        item = items[entry[1]]
        start = time.perf_counter()
        if item.caption is None:
            return MediaError(MISSING_CAPTION, "no caption in the manifest / no same-name .txt"), 0.0
        if item.media_type is None:
            return MediaError(UNSUPPORTED, Path(item.path).suffix or "(no extension)"), 0.0
        try:
            clip = load_clip(item.path, targets=targets, fps=job.fps)
        except MediaError as e:
            clip = e
        return clip, time.perf_counter() - start

    bar = tqdm(
        total=len(work),
        desc=f"encoding (rank {rank})" if world_size > 1 else "encoding",
        unit="input",
        position=rank if world_size > 1 else None,
        dynamic_ncols=True,
        disable=None,  # off when stderr is not a terminal
    )
    shard_k, rows, skipped, batch = None, [], [], []
    started = time.perf_counter()

    def flush_batch() -> None:
        if not batch:
            return
        t = time.perf_counter()
        frames = torch.stack([c.frames for _, c in batch])
        latents = encoder.encode_video(to_model_input(frames))
        extra = encoder.encode_conditioning(frames)  # e.g. an image-to-video family's first-frame latent
        report.seconds["vae"] += time.perf_counter() - t
        for i, ((item, clip), latent) in enumerate(zip(batch, latents)):
            rows.append(_row(item, clip, latent.to(job.store_dtype)))
            if extra:
                rows[-1]["tensors"] = {name: v[i].to(job.store_dtype) for name, v in extra.items()}
        batch.clear()

    def finish_shard() -> None:
        nonlocal rows, skipped, started
        flush_batch()
        t = time.perf_counter()
        if rows:
            embeds = encoder.encode_text([r["caption"] for r in rows], job.text_max_length)
            for r, e in zip(rows, embeds):
                r["text_embedding"] = e.to(job.store_dtype)
        report.seconds["text"] += time.perf_counter() - t
        t = time.perf_counter()
        # one bucket after the other: row groups hold one latent shape, so the reader's buckets read each once
        rows.sort(key=lambda r: tuple(r["latent"].shape))
        record = {
            "ids": [r["id"] for r in rows],
            "buckets": dict(Counter(shape_name(r["latent"].shape) for r in rows)),
            "skipped": skipped,
            "rank": rank,
            "seconds": round(time.perf_counter() - started, 3),
        }
        store.write_shard(shard_k, rows, record, row_group_size=job.row_group_size)
        report.seconds["write"] += time.perf_counter() - t
        report.shards_encoded += 1
        report.rows_encoded += len(rows)
        rows, skipped, started = [], [], time.perf_counter()

    try:
        for (k, i), (clip, seconds) in _prefetch(decode, work, job.decode_workers):
            if shard_k is not None and k != shard_k:
                finish_shard()
            shard_k = k
            item = items[i]
            report.seconds["decode"] += seconds
            if isinstance(clip, MediaError):
                skipped.append(_skip(item, clip.reason, clip.detail, job.strict))
            else:
                if batch and (len(batch) >= job.vae_batch_size or batch[0][1].frames.shape != clip.frames.shape):
                    flush_batch()
                batch.append((item, clip))
            bar.update(1)
        if shard_k is not None:
            finish_shard()
    finally:
        bar.close()
    barrier()
    if rank == 0:
        report.totals = store.merge(total)
    return report


def _row(item: Item, clip: Clip, latent: torch.Tensor) -> dict:
    row = {
        "id": item.id,
        "latent": latent,
        "caption": item.caption,
        "file_name": item.name,
        "media_type": clip.media_type,
        "width": clip.width,
        "height": clip.height,
        "num_frames": clip.num_frames,
    }
    if clip.fps is not None:
        row["fps"] = float(clip.fps)
        row["duration_sec"] = float(clip.duration_sec)
    return row


def preprocess_prompts(
    prompts: list[str],
    encoder: MediaEncoder,
    store: ShardStore,
    *,
    rows_per_shard: int,
    text_max_length: int,
    store_dtype: torch.dtype = torch.float32,
    row_group_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> Report:
    """Text-only shards (no latent columns) of ``prompts``, kept in the given order; ids ``prompt-0000000``..."""

    def make_shard(lo: int, hi: int, report: Report, advance: Callable[[int], None]) -> list[dict]:
        start = time.perf_counter()
        embeds = encoder.encode_text(prompts[lo:hi], text_max_length)
        report.seconds["text"] += time.perf_counter() - start
        advance(hi - lo)
        return [
            {"id": prompt_id(i), "caption": p, "text_embedding": e.to(store_dtype)}
            for i, p, e in zip(range(lo, hi), prompts[lo:hi], embeds)
        ]

    return run_shards(
        store,
        len(prompts),
        rows_per_shard,
        make_shard,
        desc="encoding prompts",
        row_group_size=row_group_size,
        rank=rank,
        world_size=world_size,
        barrier=barrier,
    )


def prompt_id(index: int) -> str:
    """The id of the ``index``-th prompt of a prompt list."""
    return f"prompt-{index:07d}"


def run_shards(
    store: ShardStore,
    num_items: int,
    rows_per_shard: int,
    make_shard: Callable[[int, int, Report, Callable[[int], None]], list[dict]],
    *,
    desc: str,
    row_group_size: int | None,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    command: str = "preprocess",
) -> Report:
    """Write this rank's unfinished shards of ``num_items`` inputs; the main process merges the totals at the end.

    ``make_shard(lo, hi, report, advance)`` returns the rows of inputs ``[lo, hi)`` (one each, in order),
    adding its timings to ``report`` and calling ``advance(n)`` as it finishes inputs (the progress bar).
    Finished shards (from an earlier run, any rank) are skipped; each shard is written atomically.
    """
    total = num_shards(num_items, rows_per_shard)
    done = {k for k in range(total) if store.is_done(k)}
    barrier()  # every rank has looked before any rank writes
    report = Report(shards_total=total, shards_done_before=len(done), command=command)
    todo = [k for k in rank_shards(total, rank, world_size) if k not in done]
    bounds = {k: (k * rows_per_shard, min((k + 1) * rows_per_shard, num_items)) for k in todo}
    bar = tqdm(
        total=sum(hi - lo for lo, hi in bounds.values()),
        desc=f"{desc} (rank {rank})" if world_size > 1 else desc,
        unit="input",
        position=rank if world_size > 1 else None,
        dynamic_ncols=True,
        disable=None,  # off when stderr is not a terminal
    )
    try:
        for k, (lo, hi) in bounds.items():
            start = time.perf_counter()
            rows = make_shard(lo, hi, report, bar.update)
            record = {"ids": [r["id"] for r in rows], "skipped": [], "rank": rank}
            store.write_shard(
                k, rows, {**record, "seconds": round(time.perf_counter() - start, 3)}, row_group_size=row_group_size
            )
            report.shards_encoded += 1
            report.rows_encoded += len(rows)
    finally:
        bar.close()
    barrier()
    if rank == 0:
        report.totals = store.merge(total)
    return report


def write_negative(encoder: MediaEncoder, prompt: str, output: str, *, text_max_length: int) -> Path:
    """One ``[L, D]`` float32 tensor ``prompt_embeds`` in a .safetensors file (``pipeline_config.negative_prompt_embeds``)."""
    from safetensors.torch import save_file

    out = Path(os.path.expanduser(output))
    (emb,) = encoder.encode_text([prompt], text_max_length)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"prompt_embeds": emb.float().contiguous()},
        str(out),
        metadata={"prompt": prompt, "source": encoder.source, "max_length": str(text_max_length)},
    )
    return out


def write_validation(
    encoder: MediaEncoder, prompts: list[str], output: str, *, text_max_length: int, batch_size: int = 64
) -> Path:
    """``OUTPUT/validation.json`` (``{"data": [{"caption", "prompt_embeds"}]}``) + ``OUTPUT/embeds/NNNNN.safetensors``.

    Point ``training.validation_dataset_file`` at the JSON; its embedding paths are relative to it.
    """
    from safetensors.torch import save_file

    root = Path(os.path.expanduser(output))
    (root / "embeds").mkdir(parents=True, exist_ok=True)
    entries = []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo : lo + batch_size]
        for i, (prompt, emb) in enumerate(zip(chunk, encoder.encode_text(chunk, text_max_length)), start=lo):
            name = f"embeds/{i:05d}.safetensors"
            save_file({"prompt_embeds": emb.float().contiguous()}, str(root / name), metadata={"prompt": prompt})
            entries.append({"caption": prompt, "prompt_embeds": name})
    path = root / "validation.json"
    path.write_text(json.dumps({"data": entries}, indent=1, ensure_ascii=False), encoding="utf-8")
    return path
