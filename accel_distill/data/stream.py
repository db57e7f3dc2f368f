"""LatentStream: an endless, exactly resumable stream of one-shape training batches from parquet.

Why not ``datasets``' iterable datasets: a shuffle buffer cannot resume exactly and
reads ~3x slower than plain pyarrow (README, Data). ``datasets`` resolves the files
(:mod:`.sources`); this module owns the order. Every epoch has a deterministic
global order of all rows (row groups permuted, then rows within each group), cut
into one-bucket global batches of ``batch_size x world_size`` (:mod:`.order`);
rank r takes the r-th share of each. The sample sequence is therefore the same for
any world size with the same global batch (2 ranks x b see what 1 rank x 2b sees),
and the position is ``(epoch, global sample index, carried rows)``: resuming is O(1),
re-reads nothing, and also works after changing the number of ranks. Reading goes
one row group at a time (:mod:`.reader`); every rank reads the groups its shares
touch, so keep row groups small.

The stream splits by rank itself: do not let accelerate shard it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from accel_distill.errors import DataError

from .order import Epoch, epoch_batches, group_order
from .prefetch import prefetched
from .reader import Reader
from .schema import (
    CAPTION,
    ID,
    LATENT_BYTES,
    LATENT_COLUMNS,
    LATENT_SHAPE,
    REQUIRED_COLUMNS,
    TEXT_COLUMNS,
    shapes_from_column,
    shapes_from_footer,
    tensor_columns,
)
from .sources import DataFile, resolve_data_files

logger = logging.getLogger(__name__)

# Keys of state_dict() that must match on load: otherwise the saved index means different samples.
_FINGERPRINT = ("num_samples", "seed", "shuffle")
# Keys of a batch that an extra tensor column must not shadow.
BATCH_KEYS = ("latents", "text_embeds", "ids", "captions", "sample_keys", "row_sources")
SCAN_THREADS = 16  # Hub files: footers and shape columns are fetched this many at a time


def find_parquet_files(data_path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Parquet files (local paths or pinned Hub URIs) of ``data_path``; see :mod:`.sources`."""
    return [f.uri for f in resolve_data_files(data_path)]


@dataclass(frozen=True)
class _Group:
    """One parquet row group and where its rows sit in the file and in the global numbering."""

    file: int  # index into the stream's files
    index: int  # row group index within the file
    file_row: int  # first row of the group within the file (for error messages)
    start: int  # first row of the group in the global numbering
    num_rows: int


@dataclass
class _FileScan:
    metadata: pq.FileMetaData
    names: list[str]
    shapes: np.ndarray | None  # int64 [rows, 4] latent shapes, None for text-only files


def shape_name(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


class LatentStream:
    """Endless iterator of collated batches with an exactly resumable position.

    Yields ``{"latents": [B,C,T,H,W], "text_embeds": [B, text_max_length, D],
    "ids": [...], "captions": [...], "sample_keys": [(epoch, row), ...], "row_sources": [...]}`` with
    tensors in their stored dtype (``sample_keys`` is each sample's (epoch, global row), unique over a
    run; ``row_sources`` its file and row, for error messages);
    ``latents`` is absent for text-only data. Each name of ``extra_tensor_columns`` (a
    tensor stored FastVideo-style in ``{name}_bytes/_shape/_dtype`` columns, written with
    ``write_tensor_columns`` or ``write_parquet(samples with "tensors")``) is one more key,
    its tensors stacked along a new batch dimension in their stored dtype. Text embeddings
    are zero-padded at the end, as diffusers' WanPipeline pads prompt embeds.

    Every batch holds one latent shape (a bucket, see :mod:`.order`); rows left over in a
    bucket at the end of an epoch open its first batch of the next epoch. Checks: the
    latent channels (``expected_latent_channels``) and text width (``expected_text_dim``)
    of every row against the model, text length, byte sizes, and (``check_finite``) NaN/inf
    in every tensor (training turns it off and checks the batch on the device instead, see
    :mod:`.finite`), each failing with one line naming the file and row. Keep one live
    iterator at a time: each one advances the shared position. A batch's tensors may reuse
    the memory of an earlier batch that nothing references any more (:mod:`.buffers`).
    """

    def __init__(
        self,
        data_path: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        text_max_length: int,
        require_latents: bool = True,
        expected_latent_channels: int | None = None,
        expected_text_dim: int | None = None,
        extra_tensor_columns: Sequence[str] | Mapping[str, str] = (),
        check_finite: bool = True,
        prefetch: int = 2,
        pin_memory: bool = False,
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size=} {rank=} {world_size=}"
            )
        if seed < 0 or text_max_length < 1 or prefetch < 0:
            raise ValueError(
                f"need seed >= 0, text_max_length >= 1, prefetch >= 0, got {seed=} {text_max_length=} {prefetch=}"
            )
        # a mapping says why each column is read (for the missing-column error); a sequence: the caller asks
        self._extra_readers = dict(extra_tensor_columns) if isinstance(extra_tensor_columns, Mapping) else {}
        self.extra_tensor_columns = _check_extra_names(extra_tensor_columns)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.text_max_length = text_max_length
        self.expected_latent_channels = expected_latent_channels
        self.expected_text_dim = expected_text_dim
        self.check_finite = check_finite
        self.prefetch = prefetch
        # Page-locked batches, so the trainer's non_blocking copy to an accelerator overlaps compute.
        self.pin_memory = pin_memory

        self.data_path = data_path
        self._files: list[DataFile] = resolve_data_files(data_path)
        self._metadata: list[pq.FileMetaData] = []
        self._groups: list[_Group] = []
        shapes = self._scan(require_latents)
        self._starts = np.array([g.start for g in self._groups], dtype=np.int64)
        self._sizes = np.array([g.num_rows for g in self._groups], dtype=np.int64)
        self.num_samples = int(self._sizes.sum())  # all ranks together
        where = str(self._files[0]) if len(self._files) == 1 else f"{len(self._files)} files under {data_path}"
        if self.num_samples == 0:
            raise DataError(f"empty dataset: {where} holds 0 rows")
        self.global_batch = batch_size * world_size
        if self.num_samples < self.global_batch:
            raise DataError(
                f"{where}: {self.num_samples} samples are fewer than one global batch of {batch_size} per rank x "
                f"{world_size} rank(s)"
            )
        self._make_buckets(shapes)
        self._columns = [ID, CAPTION, *TEXT_COLUMNS, *(LATENT_COLUMNS if self.has_latents else ())]
        self._columns += [c for name in self.extra_tensor_columns for c in tensor_columns(name)]
        self._check_first_group()
        if rank == 0:
            self._report_buckets()

        self._epoch = 0
        self._index = 0
        self._carry = np.zeros((0, 2), dtype=np.int64)  # rows carried into the current epoch
        self._generation = 0  # bumped by load_state_dict so live iterators restart there
        self._plan_cache: tuple[tuple, Epoch] | None = None

    # -- metadata ------------------------------------------------------------------

    def _scan(self, require_latents: bool) -> np.ndarray | None:
        """Every file's footer (and latent shapes): row groups, row counts, columns. Returns all latent shapes."""
        remote = any(f.remote for f in self._files)
        if remote and len(self._files) > 1:
            with ThreadPoolExecutor(min(SCAN_THREADS, len(self._files)), thread_name_prefix="scan") as pool:
                scans = list(pool.map(self._scan_file, self._files))
        else:
            scans = [self._scan_file(f) for f in self._files]
        with_latents = [f for f, s in zip(self._files, scans) if s.shapes is not None]
        without = [f for f, s in zip(self._files, scans) if s.shapes is None]
        if without and require_latents:
            raise DataError(
                f"{without[0]}: required column {LATENT_BYTES!r} is missing (text-only data; "
                "latents are required unless the method is data-free)"
            )
        if with_latents and without:
            raise DataError(
                f"{without[0]} has no {LATENT_BYTES!r} column but {with_latents[0]} has: "
                "do not mix text-only and latent data"
            )
        start = 0
        for fi, scan in enumerate(scans):
            self._metadata.append(scan.metadata)
            file_row = 0
            for i in range(scan.metadata.num_row_groups):
                n = scan.metadata.row_group(i).num_rows
                if n:
                    self._groups.append(_Group(fi, i, file_row, start, n))
                    start += n
                file_row += n
        self.has_latents = bool(with_latents)
        return np.concatenate([s.shapes for s in scans]) if self.has_latents else None

    def _scan_file(self, file: DataFile) -> _FileScan:
        try:
            with file.parquet() as pf:
                meta, schema = pf.metadata, pf.schema_arrow
                names = schema.names
                self._check_columns(file, names)
                if LATENT_BYTES not in names:
                    return _FileScan(meta, names, None)
                shapes = shapes_from_footer(schema, meta.num_rows)
                if shapes is None:
                    shapes = shapes_from_column(file, pf.read(columns=[LATENT_SHAPE]).column(0))
        except DataError:
            raise
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"cannot read parquet file {file}: {e}") from e
        except Exception as e:  # Hub reads fail with huggingface_hub / httpx errors
            raise DataError(f"cannot read parquet file {file}: {type(e).__name__}: {e}") from e
        channels = self.expected_latent_channels
        if channels is not None and len(shapes) and (shapes[:, 0] != channels).any():
            row = int(np.flatnonzero(shapes[:, 0] != channels)[0])
            raise DataError(
                f"{file} row {row}: latent has {shapes[row, 0]} channels, expected {channels} "
                f"(shape {shapes[row].tolist()})"
            )
        return _FileScan(meta, names, shapes)

    def _check_columns(self, file: DataFile, names: list[str]) -> None:
        for column in REQUIRED_COLUMNS:
            if column not in names:
                raise DataError(f"{file}: required column {column!r} is missing")
        if LATENT_BYTES in names:
            for column in LATENT_COLUMNS:
                if column not in names:
                    raise DataError(f"{file}: required column {column!r} is missing")
        for name in self.extra_tensor_columns:
            for column in tensor_columns(name):
                if column not in names:
                    why = self._extra_readers.get(name, f"extra_tensor_columns asks for {name!r}")
                    raise DataError(f"{file}: column {column!r} is missing ({why})")

    def _make_buckets(self, shapes: np.ndarray | None) -> None:
        """One bucket per latent shape (sorted); text-only data is one bucket."""
        if shapes is None:
            self.buckets: list[tuple[int, ...] | None] = [None]
            self._bucket_of = np.zeros(self.num_samples, dtype=np.int64)
        else:
            keys, inverse = np.unique(shapes, axis=0, return_inverse=True)
            self.buckets = [tuple(int(v) for v in k) for k in keys]
            self._bucket_of = inverse.reshape(-1).astype(np.int64)
        self.bucket_sizes = np.bincount(self._bucket_of, minlength=len(self.buckets)).tolist()

    def bucket_shape_of(self, row: int) -> tuple[int, ...] | None:
        """The latent shape of global ``row`` as scanned (None for text-only data)."""
        return self.buckets[int(self._bucket_of[row])]

    def describe_buckets(self) -> list[str]:
        """One line per bucket: its shape, samples, batches per epoch and what happens to its remainder."""
        gb, lines = self.global_batch, []
        for key, n in zip(self.buckets, self.bucket_sizes):
            name = "text-only" if key is None else shape_name(key)
            if n < gb:
                lines.append(
                    f"bucket {name}: {n} samples, fewer than a global batch of {gb}: it fills a batch every "
                    f"{-(-gb // n)} epochs from rows carried over (the same sample may appear twice in it)"
                )
            else:
                lines.append(
                    f"bucket {name}: {n} samples, {n // gb} batches of {gb} per epoch"
                    + (f", {n % gb} left over carried into the next epoch" if n % gb else "")
                )
        return lines

    def _report_buckets(self) -> None:
        small = [n < self.global_batch for n in self.bucket_sizes]
        if len(self.buckets) > 1 or any(small):
            msg = f"data: {len(self.buckets)} latent shape bucket(s): " + "; ".join(self.describe_buckets())
            (logger.warning if any(small) else logger.info)(msg)

    def _check_first_group(self) -> None:
        """Fail at start-up, not hours in, if the first rows do not fit (shape/dtype columns only)."""
        reader = Reader(self, columns=[c for c in self._columns if not c.endswith("_bytes")])
        g = self._groups[0]
        try:
            for i in range(g.num_rows):
                reader.row(g.start + i, with_bytes=False)
        finally:
            reader.close()

    # -- order and position ------------------------------------------------------------

    @property
    def batches_per_epoch(self) -> int:
        """Global batches of an epoch without carried rows (the same on every rank)."""
        return sum(n // self.global_batch for n in self.bucket_sizes)

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank sees in an epoch without carried rows."""
        return self.batches_per_epoch * self.batch_size

    @property
    def epoch(self) -> int:
        """Epoch of the next batch the consumer will receive."""
        return self._epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global row numbers of all samples in the order of ``epoch`` (the same on every rank/machine)."""
        return group_order(self.seed, epoch, self._sizes, self._starts, self.shuffle)

    def epoch_plan(self, epoch: int, carry: np.ndarray | None = None) -> Epoch:
        """The global batches of ``epoch`` after the rows ``carry`` ((epoch, row) pairs) carried into it."""
        carry = np.zeros((0, 2), dtype=np.int64) if carry is None else np.asarray(carry, dtype=np.int64).reshape(-1, 2)
        key = (epoch, carry.tobytes())
        if self._plan_cache is None or self._plan_cache[0] != key:
            plan = epoch_batches(
                self.epoch_order(epoch), epoch, self._bucket_of, len(self.buckets), self.global_batch, carry
            )
            self._plan_cache = (key, plan)
        return self._plan_cache[1]

    def _buckets_digest(self) -> str:
        text = json.dumps([[list(k) if k else None, n] for k, n in zip(self.buckets, self.bucket_sizes)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        """Position after the last batch the consumer received (the same on every rank)."""
        return {
            "epoch": self._epoch,
            "index": self._index,
            "carry": self._carry.tolist(),
            "num_samples": self.num_samples,
            "world_size": self.world_size,
            "global_batch": self.global_batch,
            "buckets": self._buckets_digest(),
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly at ``state``'s position (also for an iterator that is already running)."""
        mismatched = [
            f"{k}: saved {state.get(k)!r}, now {getattr(self, k)!r}"
            for k in _FINGERPRINT
            if state.get(k) != getattr(self, k)
        ]
        if state.get("buckets", self._buckets_digest()) != self._buckets_digest():  # older states have none
            mismatched.append("latent shapes: the dataset's buckets differ from the saved run's")
        if mismatched:
            raise DataError(
                "data position in the checkpoint does not fit this dataset/run (" + "; ".join(mismatched) + ")"
            )
        epoch, index = int(state["epoch"]), int(state["index"])
        saved_gb = int(state.get("global_batch", self.global_batch))
        if saved_gb != self.global_batch and (len(self.buckets) > 1 or index % self.global_batch):
            raise DataError(
                f"the checkpoint's global batch was {saved_gb} (train_batch_size x processes), now "
                f"{self.global_batch}: resume with the same global batch"
                + ("" if len(self.buckets) > 1 else ", or from a checkpoint at a multiple of the new one")
            )
        self._epoch, self._index = epoch, index
        self._carry = np.asarray(state.get("carry", []), dtype=np.int64).reshape(-1, 2)
        self._generation += 1

    # -- iteration --------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        while True:
            generation = self._generation
            source = self._batches(self._epoch, self._index, self._carry)
            if self.prefetch > 0:
                source = prefetched(source, self.prefetch)
            try:
                for (epoch, index, carry), batch in source:
                    if generation != self._generation:
                        break  # load_state_dict moved the position: restart from there
                    self._epoch, self._index, self._carry = epoch, index, carry
                    yield batch
            finally:
                source.close()

    def _batches(self, epoch: int, index: int, carry: np.ndarray) -> Iterator[tuple[tuple, dict]]:
        """Batches from a position on, each with the position just after it."""
        # One decoded row group per bucket stays cached, so interleaved buckets do not re-read groups.
        reader = Reader(self, columns=self._columns, cache_groups=min(len(self.buckets), 8) + 1)
        bs, gb = self.batch_size, self.global_batch
        mine = slice(self.rank * bs, (self.rank + 1) * bs)  # this rank's share of each global batch
        try:
            while True:
                plan = self.epoch_plan(epoch, carry)
                k = index // gb
                while k < len(plan):
                    rows = plan.rows[k, mine]
                    batch = reader.batch(rows)  # pinned when pin_memory: allocated so, in the prefetch thread
                    # (epoch, global row) per sample: keys per-sample random streams downstream
                    # a plain list: it stays on the host when the batch moves to the device (no sync to read it)
                    batch["sample_keys"] = [(int(e), int(r)) for e, r in zip(plan.epochs[k, mine], rows)]
                    k += 1
                    after = (epoch, k * gb, carry) if k < len(plan) else (epoch + 1, 0, plan.carry_out)
                    yield after, batch
                epoch, index, carry = epoch + 1, 0, plan.carry_out
        finally:
            reader.close()


def _check_extra_names(names: Sequence[str] | Mapping[str, str]) -> tuple[str, ...]:
    names = (names,) if isinstance(names, str) else tuple(names)
    for name in names:
        if not isinstance(name, str) or not name or name in (*BATCH_KEYS, "vae_latent", "text_embedding"):
            raise ValueError(f"extra_tensor_columns: {name!r} is not a usable name (taken: {', '.join(BATCH_KEYS)})")
    if len(set(names)) != len(names):
        raise ValueError(f"extra_tensor_columns: duplicate names in {list(names)}")
    return names
