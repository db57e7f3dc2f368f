"""Where training data comes from: local parquet files, folders, patterns and Hub dataset repos.

``training.data_path`` is one source or a list of them, each one of

* a local parquet file, or a folder (every ``*.parquet`` below it), or a glob pattern
  (``data/part-0000*.parquet``, ``data/**/*.parquet``);
* a dataset repo on the Hugging Face Hub: ``hf://datasets/OWNER/NAME[@REVISION][/PATH]``
  where PATH is a folder (every parquet file below it), one file or a pattern, as
  ``datasets`` and ``huggingface_hub`` write Hub paths.

Files are resolved with ``datasets.data_files.resolve_pattern`` (the resolver behind
``load_dataset(data_files=...)``: fsspec globbing, hidden files and folders skipped, Hub
paths listed through ``HfFileSystem``). A Hub revision (branch, tag or commit) is pinned
to its commit once, when the stream is made, so every file is read at that commit even if
the branch moves during the run. Hub files are never downloaded whole: the reader opens
them through ``HfFileSystem`` (the file system ``datasets``' own streaming reads through)
and fetches byte ranges -- the footer first, then the columns of each row group it needs.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from accel_distill.errors import DataError

HUB_PREFIX = "hf://"
HUB_DATASETS = "hf://datasets/"
WILDCARDS = "*?["


def is_hub_reference(path: str) -> bool:
    """True for a ``hf://`` path (a Hub reference), False for a local path."""
    return str(path).startswith(HUB_PREFIX)


@dataclass(frozen=True)
class HubRef:
    """A parsed ``hf://datasets/OWNER/NAME[@REVISION][/PATH]``."""

    repo_id: str
    revision: str | None
    path: str  # inside the repo; "" for the whole repo

    def uri(self, revision: str | None = None) -> str:
        rev = revision or self.revision
        at = f"@{quote(rev, safe='')}" if rev else ""
        return f"{HUB_DATASETS}{self.repo_id}{at}" + (f"/{self.path}" if self.path else "")


def parse_hub_reference(ref: str) -> HubRef:
    """Parse a Hub dataset reference; DataError (one line) for anything else under ``hf://``."""
    if not ref.startswith(HUB_DATASETS):
        raise DataError(
            f"{ref}: only Hub dataset repos are data sources; write hf://datasets/OWNER/NAME[@REVISION][/PATH]"
        )
    body = ref[len(HUB_DATASETS) :].strip("/")
    parts = body.split("/")
    if len(parts) < 2 or not parts[0] or not parts[1].split("@")[0]:
        raise DataError(f"{ref}: expected hf://datasets/OWNER/NAME[@REVISION][/PATH]")
    owner, name, rest = parts[0], parts[1], parts[2:]
    revision = None
    if "@" in owner:
        raise DataError(f"{ref}: the revision goes after the dataset name (hf://datasets/OWNER/NAME@REVISION)")
    if "@" in name:
        name, revision = name.split("@", 1)
        revision = unquote(revision)
        # refs/pr/N and refs/convert/X contain slashes: take them whole when written unencoded
        if revision == "refs" and len(rest) >= 2:
            revision, rest = "/".join(["refs", *rest[:2]]), rest[2:]
        if not revision:
            raise DataError(f"{ref}: empty revision after '@'")
    return HubRef(f"{owner}/{name}", revision, "/".join(rest))


@dataclass(frozen=True)
class DataFile:
    """One resolved parquet file: a local path or a pinned Hub URI, and how to open it."""

    uri: str  # local path, or hf://datasets/OWNER/NAME@SHA/PATH
    size: int | None = None  # bytes (Hub files: from the listing, so opening costs no request)

    @property
    def remote(self) -> bool:
        return is_hub_reference(self.uri)

    def open(self) -> Any:
        """A source for ``pyarrow.parquet.ParquetFile``: the path, or a :class:`RangeFile` over the Hub file."""
        if not self.remote:
            return self.uri
        # No read-ahead cache: pyarrow asks for exactly the footer and the column chunks it needs.
        raw = hub_filesystem().open(self.uri, "rb", block_size=1 << 20, cache_type="none", size=self.size)
        return RangeFile(raw, self.size if self.size is not None else raw.size)

    def parquet(self, metadata: Any = None, source: Any = None) -> Any:
        """This file as a ``pyarrow.parquet.ParquetFile``. A local one is memory-mapped (row groups read ~2x
        faster: pyarrow decodes straight from the page cache) without pre-buffering (nothing to coalesce in a
        mapping: ~20% less CPU per row group); a Hub one pre-buffers, so each row group is one coalesced range
        request."""
        import pyarrow.parquet as pq

        # pyarrow's own pre-buffering of a Python file runs reads on its IO threads, which abort the process
        # when they outlive the interpreter ("terminate called without an active exception"): Hub row groups are
        # fetched by RangeFile.prefetch instead, in the reading thread, one coalesced request each.
        source = self.open() if source is None else source
        return pq.ParquetFile(source, metadata=metadata, memory_map=not self.remote, pre_buffer=False)

    def __str__(self) -> str:
        return self.uri


def column_ranges(row_group: Any, columns: Sequence[str], hole: int = 8192) -> list[tuple[int, int]]:
    """Byte ranges ``[start, end)`` holding ``columns`` of a row group (its metadata), merged across gaps <= ``hole``."""
    wanted, spans = set(columns), []
    for j in range(row_group.num_columns):
        c = row_group.column(j)
        if c.path_in_schema.split(".")[0] in wanted:
            start = c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset
            spans.append((start, start + c.total_compressed_size))
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start - merged[-1][1] <= hole:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


class RangeFile(io.RawIOBase):
    """A seekable, read-only view of a remote file: reads inside ranges fetched by :meth:`prefetch` (one request
    each) are served from memory without a copy, any other read is one range request."""

    def __init__(self, raw: Any, size: int) -> None:
        super().__init__()
        self.raw, self.size, self.pos = raw, int(size), 0
        self.cached: list[tuple[int, memoryview]] = []

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: 0, 1: self.pos, 2: self.size}[whence] + offset
        return self.pos

    def prefetch(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Fetch these ``[start, end)`` ranges now (replacing earlier ones)."""
        self.cached = []
        for start, end in ranges:
            self.raw.seek(start)
            self.cached.append((start, memoryview(self.raw.read(end - start))))

    def read(self, n: int = -1) -> bytes | memoryview:
        end = self.size if n is None or n < 0 else min(self.pos + n, self.size)
        for start, data in self.cached:
            if start <= self.pos and end <= start + len(data):
                out = data[self.pos - start : end - start]
                self.pos = end
                return out
        self.raw.seek(self.pos)
        out = self.raw.read(end - self.pos)
        self.pos += len(out)
        return out

    def close(self) -> None:
        self.raw.close()
        self.cached = []
        super().close()


_FS_LOCK = threading.Lock()
_FS: list[Any] = []


def hub_filesystem() -> Any:
    """The process's ``HfFileSystem``: the instance ``datasets`` lists Hub paths with (fsspec caches it by its
    arguments), so the listing made while resolving serves file sizes later; shared by the reader's threads."""
    with _FS_LOCK:
        if not _FS:
            import fsspec
            from datasets import config

            _FS.append(fsspec.filesystem("hf", endpoint=config.HF_ENDPOINT, token=None))
        return _FS[0]


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    return (HfHubHTTPError, OfflineModeIsEnabled, OSError, ValueError)


def pin_revision(ref: HubRef) -> str:
    """The commit sha of ``ref``'s revision (a branch or tag may move during a run; a commit does not)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi(endpoint=hub_filesystem().endpoint).dataset_info(ref.repo_id, revision=ref.revision)
    except RevisionNotFoundError as e:
        raise DataError(f"{ref.uri()}: cannot open the Hub dataset: revision {ref.revision!r} not found") from e
    except RepositoryNotFoundError as e:
        raise DataError(
            f"{ref.uri()}: cannot open the Hub dataset: no dataset repo {ref.repo_id} (a private one needs HF_TOKEN)"
        ) from e
    except _hub_errors() as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{ref.uri()}: cannot open the Hub dataset: {detail}") from e
    return info.sha


def on_rank0(fn: Any) -> Any:
    """``fn()`` computed by rank 0 and given to every rank when a process group is up (else just ``fn()``), so a
    branch that moves while the ranks start cannot give them different commits; rank 0's DataError is raised
    on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except DataError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise DataError(value)
    return value


def _pattern(path: str, is_dir: bool) -> str:
    """A folder's pattern: every parquet file below it."""
    return f"{path.rstrip('/')}/**/*.parquet" if is_dir else path


def resolve_data_files(data_path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[DataFile]:
    """The parquet files of ``data_path`` (one source or a list), in source order, each source's files sorted.

    DataError (one line naming the source) when a source matches nothing or a Hub repo cannot be read.
    """
    sources = [data_path] if isinstance(data_path, (str, os.PathLike)) else list(data_path)
    if not sources:
        raise DataError("data_path is an empty list")
    files: list[DataFile] = []
    for source in sources:
        source = os.fspath(source)
        found = _resolve_hub(source) if is_hub_reference(source) else _resolve_local(source)
        if not found:
            raise DataError(f"no parquet files found at {source}")
        files += found
    return files


def _resolve_local(source: str) -> list[DataFile]:
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        return [DataFile(path)]
    if not os.path.isdir(path) and not any(c in path for c in WILDCARDS):
        return []
    return [DataFile(f) for f in _resolve_pattern(_pattern(os.path.abspath(path), os.path.isdir(path)))]


def _resolve_hub(source: str) -> list[DataFile]:
    ref = parse_hub_reference(source)
    pinned = HubRef(ref.repo_id, on_rank0(lambda: pin_revision(ref)), ref.path)
    fs = hub_filesystem()
    is_dir = not any(c in ref.path for c in WILDCARDS) and not ref.path.endswith(".parquet")
    try:
        uris = _resolve_pattern(_pattern(pinned.uri(), is_dir))
        return [DataFile(u, fs.info(u)["size"]) for u in uris]
    except _hub_errors() as e:
        raise DataError(f"{source}: cannot list the Hub dataset: {str(e).strip().splitlines()[0]}") from e


def _resolve_pattern(pattern: str) -> list[str]:
    """``datasets``' data_files resolution of one pattern (local or ``hf://``), sorted; [] when nothing matches."""
    from datasets.data_files import resolve_pattern

    hub_filesystem()  # first in this thread: the instance resolve_pattern will glob with
    try:
        found = resolve_pattern(pattern, base_path=os.getcwd(), allowed_extensions=[".parquet"])
    except FileNotFoundError:
        return []
    return sorted(found)
