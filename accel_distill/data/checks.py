"""Scan a dataset and report, per file and row, everything the training reader would stop on.

``python -m accel_distill.preprocess check DATA...`` prints one line per problem
(``FILE row N (id X): what``) and a summary; the library entry point is
:func:`check_dataset`. Every row group is read whole (tensor bytes included), so a
Hub dataset is downloaded once, in streaming reads, while it is checked.

Checked: readable files and required columns (and the columns of
``extra_tensor_columns``); per row: the id, shapes (``[C,T,H,W]`` latents, ``[L,D]``
text), dtype names, bytes against shape x dtype, NaN/inf, text length against
``text_max_length``, latent channels and text width against a model, the latent shape
the file's footer records; per file: text-only files mixed with latent files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from accel_distill.errors import DataError

from .finite import has_nonfinite
from .reader import check_size, shape_dtype, value_buffers
from .schema import (
    ID,
    LATENT,
    LATENT_BYTES,
    LATENT_COLUMNS,
    REQUIRED_COLUMNS,
    TEXT,
    bytes_to_tensor,
    shapes_from_footer,
    tensor_columns,
)
from .sources import DataFile, resolve_data_files

# Transformer / VAE config keys holding the text width and the latent channels, by family.
TEXT_DIM_KEYS = ("text_dim", "text_embed_dim", "caption_channels", "joint_attention_dim", "cross_attention_dim")
LATENT_CHANNEL_KEYS = ("z_dim", "latent_channels")


@dataclass(frozen=True)
class Problem:
    file: str
    row: int | None  # None: the whole file
    id: str | None
    message: str

    def __str__(self) -> str:
        if self.row is None:
            return f"{self.file}: {self.message}"
        return (
            f"{self.file} row {self.row}" + (f" (id {self.id!r})" if self.id is not None else "") + f": {self.message}"
        )


@dataclass
class Report:
    files: int = 0
    rows: int = 0
    problems: list[Problem] = field(default_factory=list)
    bad_rows: int = 0
    shapes: dict[str, int] = field(default_factory=dict)  # latent shape -> rows

    def summary(self) -> str:
        shapes = ", ".join(f"{k}: {n}" for k, n in sorted(self.shapes.items()))
        head = f"check: {self.rows} rows in {self.files} file(s)" + (f" (latent shapes {shapes})" if shapes else "")
        if not self.problems:
            return head + ": no problems"
        return head + f": {len(self.problems)} problem(s) in {self.bad_rows} row(s) / file(s)"


def model_widths(model: str, *, revision: str | None = None) -> tuple[int | None, int | None]:
    """(text width, latent channels) a diffusers model folder or Hub id expects: its transformer and VAE configs."""

    def config(subfolder: str) -> dict:
        local = Path(model).expanduser() / subfolder / "config.json"
        try:
            if local.parent.parent.is_dir():
                return json.loads(local.read_text()) if local.exists() else {}
            from huggingface_hub import hf_hub_download

            return json.loads(
                Path(hf_hub_download(model, "config.json", subfolder=subfolder, revision=revision)).read_text()
            )
        except (OSError, ValueError) as e:
            raise DataError(f"--model {model}: cannot read {subfolder}/config.json: {e}") from e
        except Exception as e:  # huggingface_hub errors
            raise DataError(f"--model {model}: cannot read {subfolder}/config.json: {type(e).__name__}: {e}") from e

    transformer, vae = config("transformer"), config("vae")
    text_dim = next((int(transformer[k]) for k in TEXT_DIM_KEYS if transformer.get(k)), None)
    channels = next((int(vae[k]) for k in LATENT_CHANNEL_KEYS if vae.get(k)), None)
    if text_dim is None and channels is None:
        raise DataError(f"--model {model}: no transformer/config.json or vae/config.json with the widths to check")
    return text_dim, channels


def check_dataset(
    data_path: str | Sequence[str],
    *,
    text_max_length: int | None = None,
    text_dim: int | None = None,
    latent_channels: int | None = None,
    extra_tensor_columns: Sequence[str] = (),
    report: Report | None = None,
) -> Iterator[Problem]:
    """Yield every problem of the dataset, file by file and row by row; counts go into ``report``."""
    report = report if report is not None else Report()
    files = resolve_data_files(data_path)
    kinds: dict[str, list[str]] = {"latents": [], "text-only": []}
    for file in files:
        report.files += 1
        found = list(_check_file(file, report, kinds, text_max_length, text_dim, latent_channels, extra_tensor_columns))
        report.bad_rows += len({(p.file, p.row) for p in found})
        yield from found
    with_latents, without = kinds["latents"], kinds["text-only"]
    if with_latents and without:
        report.bad_rows += 1
        p = Problem(without[0], None, None, f"text-only file among latent files (e.g. {with_latents[0]})")
        report.problems.append(p)
        yield p


def _check_file(
    file: DataFile,
    report: Report,
    kinds: dict[str, list[str]],
    text_max_length: int | None,
    text_dim: int | None,
    latent_channels: int | None,
    extra: Sequence[str],
) -> Iterator[Problem]:
    where = str(file)

    def problem(row: int | None, rid: str | None, message: str) -> Problem:
        p = Problem(where, row, rid, message)
        report.problems.append(p)
        return p

    try:
        pf = file.parquet()
    except Exception as e:
        yield problem(None, None, f"cannot read parquet file: {type(e).__name__}: {e}")
        return
    with pf:
        names = pf.schema_arrow.names
        has_latents = LATENT_BYTES in names
        kinds["latents" if has_latents else "text-only"].append(where)
        required = [*REQUIRED_COLUMNS, *(LATENT_COLUMNS if has_latents else ())]
        required += [c for name in extra for c in tensor_columns(name)]
        missing = [c for c in required if c not in names]
        if missing:
            yield problem(None, None, f"missing column(s) {', '.join(map(repr, missing))}")
            return
        tensors = [(TEXT, "text embedding", 2), *([(LATENT, "latent", 4)] if has_latents else [])]
        tensors += [(name, name, None) for name in extra]
        footer = shapes_from_footer(pf.schema_arrow, pf.metadata.num_rows)
        file_row = 0
        for g in range(pf.metadata.num_row_groups):
            try:
                table = pf.read_row_group(g, columns=required)
            except Exception as e:
                yield problem(None, None, f"cannot read row group {g}: {type(e).__name__}: {e}")
                file_row += pf.metadata.row_group(g).num_rows
                continue
            cols = {
                c: value_buffers(table.column(c)) if c.endswith("_bytes") else table.column(c).to_pylist()
                for c in required
            }
            for i in range(table.num_rows):
                row = file_row + i
                rid = cols[ID][i]
                if rid is None:
                    yield problem(row, None, "id is null")
                found = _check_row(cols, i, f"{where} row {row}", tensors, text_max_length, text_dim, latent_channels)
                for message in found:
                    yield problem(row, rid, message)
                if has_latents and cols[LATENT_COLUMNS[1]][i] is not None:
                    shape = [int(s) for s in cols[LATENT_COLUMNS[1]][i]]
                    key = "x".join(map(str, shape))
                    report.shapes[key] = report.shapes.get(key, 0) + 1
                    if footer is not None and footer[row].tolist() != shape:
                        yield problem(row, rid, f"latent shape {shape} but the footer records {footer[row].tolist()}")
            report.rows += table.num_rows
            file_row += table.num_rows


def _check_row(
    cols: dict,
    i: int,
    where: str,
    tensors: list[tuple[str, str, int | None]],
    text_max_length: int | None,
    text_dim: int | None,
    latent_channels: int | None,
) -> list[str]:
    """The problems of row ``i``: each tensor's shape, dtype, bytes and values, and the model's widths."""
    out = []
    for name, what, ndim in tensors:
        b, s, d = tensor_columns(name)
        try:
            if cols[s][i] is None or cols[d][i] is None:
                raise DataError(f"{where}: {what} is missing (null {s if cols[s][i] is None else d})")
            shape, dtype = shape_dtype(where, what, cols[s][i], cols[d][i], ndim)
            buf = check_size(where, what, cols[b][i], shape, dtype)
        except DataError as e:
            out.append(str(e).removeprefix(f"{where}: "))
            continue
        if name == TEXT:
            if text_max_length is not None and shape[0] > text_max_length:
                out.append(f"text embedding has {shape[0]} tokens, more than text_max_length={text_max_length}")
            if text_dim is not None and shape[1] != text_dim:
                out.append(f"text embedding width {shape[1]}, the model expects {text_dim}")
        if name == LATENT and latent_channels is not None and shape[0] != latent_channels:
            out.append(f"latent has {shape[0]} channels, the model's VAE has {latent_channels}")
        if has_nonfinite(buf, dtype):
            n = int((~torch.isfinite(bytes_to_tensor(buf, shape, cols[d][i]))).sum())
            out.append(f"{what} has {n} non-finite values (NaN or inf)")
    return out
