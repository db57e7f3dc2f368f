"""Deterministic shards, atomic writes, resume and the skipped-input report.

Inputs are sorted; shard k holds inputs ``[k * rows, (k + 1) * rows)`` and rank r
of W processes encodes the shards with ``k % W == r``. Layout of ``--output``::

    part-00000.parquet        the rows of shard 0 (absent when all its inputs were skipped)
    skipped.jsonl             every skipped input: {"file", "id", "reason", "detail", "shard"}
    .preprocess/config.json   the settings + input list the shards were made with
    .preprocess/part-00000.json   shard 0's record: rows written, ids, skipped inputs, rank, timings

A shard is written to a hidden temporary name and renamed, then its record is
written the same way: a shard counts as finished only when its record exists
(and its parquet, if it has rows), so a killed run never leaves a half shard
that a re-run would trust. Re-runs skip finished shards. Each rank writes only
its own shards' files; the main process merges the records into
``skipped.jsonl`` after all ranks are done (rebuilt from every record, so it is
complete after a resumed run too).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from accel_distill.data import write_parquet
from accel_distill.errors import ConfigError

META_DIR = ".preprocess"
SKIPPED_FILE = "skipped.jsonl"


def num_shards(num_items: int, rows_per_shard: int) -> int:
    return -(-num_items // rows_per_shard)


def rank_shards(total: int, rank: int, world_size: int) -> list[int]:
    """Shards of ``rank``: every k with ``k % world_size == rank``."""
    return list(range(rank, total, world_size))


def shard_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class ShardStore:
    """The output folder of one preprocessing job."""

    def __init__(self, root: str | os.PathLike, settings: dict):
        self.root = Path(os.path.expanduser(str(root)))
        self.meta = self.root / META_DIR
        self.settings = settings

    # -- settings --------------------------------------------------------------------
    def check_settings(self, *, write: bool) -> None:
        """ConfigError when finished shards here were made with other settings or inputs; ``write``: record ours.

        Settings alone (no finished shard yet, e.g. after a ``--strict`` failure) are simply replaced.
        """
        path = self.meta / "config.json"
        try:
            old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
        except (OSError, json.JSONDecodeError):
            old = {}
        if old == self.settings:
            return
        if old is not None and any(self.meta.glob("part-*.json")):
            diff = [k for k in sorted(set(old) | set(self.settings)) if old.get(k) != self.settings.get(k)]
            raise ConfigError(
                f"--output {self.root}: holds shards made with different settings or inputs "
                f"({', '.join(diff)}); use a new --output folder or delete this one"
            )
        if write:
            self.meta.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(path, json.dumps(self.settings, indent=1, sort_keys=True))

    # -- shards ---------------------------------------------------------------------
    def record_path(self, k: int) -> Path:
        return self.meta / f"part-{k:05d}.json"

    def parquet_path(self, k: int) -> Path:
        return self.root / shard_name(k)

    def read_record(self, k: int) -> dict | None:
        """Shard k's record when the shard is finished, else None."""
        try:
            record = json.loads(self.record_path(k).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        if record.get("rows") and not self.parquet_path(k).exists():
            return None
        return record

    def is_done(self, k: int) -> bool:
        return self.read_record(k) is not None

    def write_shard(self, k: int, samples: list[dict], record: dict, *, row_group_size: int | None) -> None:
        """Write shard k's rows (if any) and then its record, each atomically."""
        self.meta.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f".{shard_name(k)}.tmp-*"):  # left by a killed run
            stale.unlink(missing_ok=True)
        final = self.parquet_path(k)
        if samples:
            tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
            write_parquet(tmp, samples, row_group_size=row_group_size)
            os.replace(tmp, final)
        else:
            final.unlink(missing_ok=True)
        record = {"shard": k, "file": final.name if samples else None, "rows": len(samples), **record}
        _atomic_write_text(self.record_path(k), json.dumps(record))

    # -- report -----------------------------------------------------------------------
    def merge(self, total: int) -> dict:
        """Rebuild ``skipped.jsonl`` from the records of all ``total`` shards; returns the totals."""
        rows, missing, skipped, buckets = 0, [], [], Counter()
        for k in range(total):
            record = self.read_record(k)
            if record is None:
                missing.append(k)
                continue
            rows += record["rows"]
            skipped += [{**s, "shard": k} for s in record.get("skipped", [])]
            buckets.update(record.get("buckets", {}))
        text = "".join(json.dumps(s) + "\n" for s in skipped)
        _atomic_write_text(self.root / SKIPPED_FILE, text)
        return {
            "rows": rows,
            "shards": total,
            "unfinished_shards": missing,
            "skipped": len(skipped),
            "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
            "buckets": dict(sorted(buckets.items())),
        }
