"""What to encode: media files with their captions, and prompt lists.

Three input layouts (``--input``):

* a folder: every video/image below it (hidden files skipped), each captioned by
  the same-name ``.txt`` next to it (``clips/a.mp4`` + ``clips/a.txt``);
* a CSV manifest with a header: a path column (``file_name``, ``path``, ``file``,
  ``video`` or ``image``) and a caption column (``caption``, ``text`` or ``prompt``);
* a JSONL manifest (or a JSON list) of objects with the same keys.

Manifest paths are relative to the manifest's folder. Inputs are sorted by their
name (the path relative to the folder / manifest), which makes the shard split
deterministic; a name listed twice gets ``#2``, ``#3`` ... appended to its id.
A missing or empty caption leaves ``caption`` None (skipped later as "missing caption").
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from accel_distill.errors import ConfigError

from .media import media_type_of

PATH_KEYS = ("file_name", "path", "file", "video", "image", "media")
CAPTION_KEYS = ("caption", "text", "prompt")


@dataclass(frozen=True)
class Item:
    """One input: where it is, its name (relative path), unique id, caption (None: missing) and kind."""

    path: str
    name: str
    id: str
    caption: str | None
    media_type: str | None  # None: unsupported extension (skipped)


def discover(source: str | os.PathLike, *, media: str = "all", allow_empty_captions: bool = False) -> list[Item]:
    """The sorted inputs of a folder or a CSV/JSONL manifest, filtered to ``media`` ("all", "video", "image")."""
    src = Path(os.path.expanduser(str(source)))
    if src.is_dir():
        rows = _scan_folder(src)
    elif src.is_file():
        suffix = src.suffix.lower()
        if suffix == ".csv":
            rows = _read_csv(src)
        elif suffix in (".jsonl", ".json"):
            rows = _read_json(src)
        else:
            raise ConfigError(f"--input {src}: expected a folder, a .csv or a .jsonl manifest")
    else:
        raise ConfigError(f"--input {src}: no such file or folder")

    items: list[Item] = []
    seen: dict[str, int] = {}
    for path, name, caption in sorted(rows, key=lambda r: r[1]):  # stable: duplicates keep manifest order
        kind = media_type_of(path)
        if media != "all" and kind is not None and kind != media:
            continue
        if caption is not None and not allow_empty_captions and not caption.strip():
            caption = None
        seen[name] = seen.get(name, 0) + 1
        item_id = name if seen[name] == 1 else f"{name}#{seen[name]}"
        items.append(Item(path=str(path), name=name, id=item_id, caption=caption, media_type=kind))
    return items


def _scan_folder(root: Path) -> list[tuple[Path, str, str | None]]:
    rows = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or media_type_of(path) is None:
                continue
            text = path.with_suffix(".txt")
            caption = text.read_text(encoding="utf-8", errors="replace").strip() if text.is_file() else None
            rows.append((path, path.relative_to(root).as_posix(), caption))
    return rows


def _pick(keys, wanted: tuple[str, ...], what: str, where: Path) -> str:
    lowered = {k.strip().lower(): k for k in keys if isinstance(k, str)}
    for w in wanted:
        if w in lowered:
            return lowered[w]
    raise ConfigError(
        f"{where}: no {what} column (expected one of {', '.join(wanted)}; found {', '.join(map(str, keys))})"
    )


def _resolve(base: Path, value: str) -> tuple[Path, str]:
    p = Path(os.path.expanduser(value.strip()))
    full = p if p.is_absolute() else base / p
    try:
        name = full.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        name = full.as_posix()
    return full, name


def _read_csv(path: Path) -> list[tuple[Path, str, str | None]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ConfigError(f"{path}: empty CSV (expected a header row)")
        path_key = _pick(reader.fieldnames, PATH_KEYS, "path", path)
        cap_key = _pick(reader.fieldnames, CAPTION_KEYS, "caption", path)
        rows = []
        for line, rec in enumerate(reader, start=2):
            value = rec.get(path_key)
            if not value or not value.strip():
                raise ConfigError(f"{path}: line {line}: empty {path_key!r}")
            full, name = _resolve(path.parent, value)
            rows.append((full, name, rec.get(cap_key)))
    return rows


def _read_json(path: Path) -> list[tuple[Path, str, str | None]]:
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            records = json.loads(text)
            records = records.get("data", records) if isinstance(records, dict) else records
            if not isinstance(records, list):
                raise ConfigError(f"{path}: expected a list of objects")
            numbered = list(enumerate(records, start=1))
        else:
            numbered = [(i, json.loads(s)) for i, s in enumerate(text.splitlines(), start=1) if s.strip()]
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    rows = []
    for line, rec in numbered:
        if not isinstance(rec, dict):
            raise ConfigError(f"{path}: entry {line}: expected an object, got {type(rec).__name__}")
        path_key = _pick(list(rec), PATH_KEYS, "path", Path(f"{path}: entry {line}"))
        value = rec[path_key]
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{path}: entry {line}: {path_key!r} must be a non-empty string")
        caption = next((rec[k] for k in CAPTION_KEYS if k in rec), None)
        if caption is not None and not isinstance(caption, str):
            raise ConfigError(f"{path}: entry {line}: caption must be a string, got {type(caption).__name__}")
        full, name = _resolve(path.parent, value)
        rows.append((full, name, caption))
    return rows


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts of a ``.txt`` (one per line, blank lines skipped), ``.jsonl`` or ``.json`` file.

    JSON may be a list of strings, a list of ``{"caption"|"prompt"|"text": ...}``
    objects, or FastVideo's ``{"data": [...]}`` of those.
    """
    p = Path(os.path.expanduser(str(path)))
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--prompts {p}: cannot read ({e.strerror or e})") from None
    if p.suffix.lower() not in (".json", ".jsonl"):
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        try:
            if p.suffix.lower() == ".json":
                data = json.loads(text)
                data = data.get("data") if isinstance(data, dict) else data
            else:
                data = [json.loads(s) for s in text.splitlines() if s.strip()]
        except json.JSONDecodeError as e:
            raise ConfigError(f"--prompts {p}: not valid JSON ({e})") from None
        if not isinstance(data, list):
            raise ConfigError(f'--prompts {p}: expected a list of prompts or {{"data": [...]}}')
        prompts = []
        for i, entry in enumerate(data):
            if isinstance(entry, dict):
                entry = next((entry[k] for k in CAPTION_KEYS if k in entry), None)
            if not isinstance(entry, str):
                raise ConfigError(f"--prompts {p}: entry {i}: expected a string or an object with a caption")
            prompts.append(entry)
    if not prompts:
        raise ConfigError(f"--prompts {p}: holds no prompts")
    return prompts
