"""Data checks: ``preprocess check`` reports every problem per file and row; training stops with one
line on non-finite inputs and on width / channel mismatches before any optimizer step."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import base_config, run_cli, write_config

from accel_distill.config import load_config
from accel_distill.data import LatentStream, write_parquet
from accel_distill.errors import DataError
from accel_distill.preprocess.cli import main as preprocess_main
from accel_distill.testing.datasets import mixed_shape_samples, write_synthetic_dataset


def set_column(table: pa.Table, name: str, values: list) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))


@pytest.fixture
def bad_data(tmp_path):
    """A folder with one clean file, one file with a problem in rows 1-7, a file without a column, and junk."""
    folder = tmp_path / "data"
    write_parquet(folder / "a-clean.parquet", mixed_shape_samples({(16, 1, 2, 2): 4}, text_dim=32), row_group_size=2)
    samples = mixed_shape_samples({(16, 1, 2, 2): 8}, text_dim=32, seed=1)
    samples[1]["latent"][0, 0, 0, 1] = float("nan")
    samples[2]["text_embedding"][0, 3] = float("inf")
    samples[5]["text_embedding"] = torch.zeros(9, 32, dtype=torch.bfloat16)  # longer than text_max_length=8
    samples[6]["text_embedding"] = torch.zeros(2, 24, dtype=torch.bfloat16)  # the model's width is 32
    samples[7]["latent"] = torch.zeros(8, 1, 2, 2, dtype=torch.bfloat16)  # the VAE has 16 channels
    write_parquet(folder / "b-bad.parquet", samples, row_group_size=3)
    table = pq.read_table(folder / "b-bad.parquet")
    shapes = table.column("vae_latent_shape").to_pylist()
    dtypes = table.column("text_embedding_dtype").to_pylist()
    shapes[3], shapes[4], dtypes[0] = [16, 1, 2, 3], [16, 2, 2], "float8"  # bytes mismatch, 3-D, unknown dtype
    table = set_column(set_column(table, "vae_latent_shape", shapes), "text_embedding_dtype", dtypes)
    pq.write_table(table.replace_schema_metadata(None), folder / "b-bad.parquet", row_group_size=3)
    pq.write_table(pq.read_table(folder / "a-clean.parquet").drop_columns(["caption"]), folder / "c-nocaption.parquet")
    (folder / "d-junk.parquet").write_bytes(b"not parquet at all")
    return folder


def test_check_reports_every_problem_by_file_and_row(bad_data, tiny_wan, tmp_path, capsys):
    code = preprocess_main(
        ["check", str(bad_data), "--model", str(tiny_wan), "--text-max-length", "8", "--json", str(tmp_path / "r.json")]
    )
    out = capsys.readouterr().out.splitlines()
    bad = str(bad_data / "b-bad.parquet")
    expected = [
        f"{bad} row 0 (id ",
        "text embedding: unknown tensor dtype 'float8' (known: float32, float16, bfloat16, float64, int64, int32, int16, int8, uint8, bool)",
        f"{bad} row 1 (id ",
        "latent has 1 non-finite values (NaN or inf)",
        f"{bad} row 2 (id ",
        "text embedding has 1 non-finite values (NaN or inf)",
        f"{bad} row 3 (id ",
        "latent has 128 bytes, shape [16, 1, 2, 3] of torch.bfloat16 needs 192",
        f"{bad} row 4 (id ",
        "latent shape [16, 2, 2] is not 4-D",
        f"{bad} row 5 (id ",
        "text embedding has 9 tokens, more than text_max_length=8",
        f"{bad} row 6 (id ",
        "text embedding width 24, the model expects 32",
        f"{bad} row 7 (id ",
        "latent has 8 channels, the model's VAE has 16",
    ]
    lines = [line for line in out if line.startswith(bad)]
    assert len(lines) == 8, out
    for line, (start, end) in zip(lines, zip(expected[::2], expected[1::2])):
        assert line.startswith(start) and line.endswith(end), (line, start, end)
    assert f"{bad_data / 'c-nocaption.parquet'}: missing column(s) 'caption'" in out
    assert any(line.startswith(f"{bad_data / 'd-junk.parquet'}: cannot read parquet file") for line in out)
    assert not any("a-clean" in line for line in out)
    assert out[-1] == (
        "check: 12 rows in 4 file(s) (latent shapes 16x1x2x2: 9, 16x1x2x3: 1, 16x2x2: 1, 8x1x2x2: 1): "
        f"10 problem(s) in 10 row(s) / file(s) against {tiny_wan} (text width 32, latent channels 16)"
    )
    assert code == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["problems"]) == 10 and report["problems"][0]["row"] == 0


def test_check_of_clean_data_exits_0_and_limits_output(bad_data, capsys):
    assert preprocess_main(["check", str(bad_data / "a-clean.parquet")]) == 0
    assert capsys.readouterr().out.strip() == "check: 4 rows in 1 file(s) (latent shapes 16x1x2x2: 4): no problems"
    assert preprocess_main(["check", str(bad_data), "--max-problems", "2"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and out[2] == "... and 5 more (--max-problems 0 prints all)"


def test_check_names_a_stale_footer_and_a_missing_source(tmp_path, capsys):
    path = tmp_path / "d.parquet"
    write_parquet(path, mixed_shape_samples({(16, 1, 2, 2): 3}))
    table = pq.read_table(path)  # keeps the footer's shape record
    pq.write_table(set_column(table, "vae_latent_shape", [[16, 1, 2, 2], [16, 1, 1, 4], [16, 1, 2, 2]]), path)
    assert preprocess_main(["check", str(path)]) == 1
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(f"{path} row 1 (id ")
    assert line.endswith("latent shape [16, 1, 1, 4] but the footer records [16, 1, 2, 2]")
    assert preprocess_main(["check", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.strip() == f"error: no parquet files found at {tmp_path / 'nothing'}"


# -- training -------------------------------------------------------------------------------------


def test_training_stops_on_nan_text_embeddings_naming_file_and_row(tmp_path, tiny_wan):
    data = write_synthetic_dataset(tmp_path / "nan.parquet", dtype=torch.bfloat16)
    table = pq.read_table(data)
    nan = torch.full((8, 32), float("nan"), dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    bytes_ = table.column("text_embedding_bytes").to_pylist()
    shapes = table.column("text_embedding_shape").to_pylist()
    bytes_, shapes = [nan] * len(bytes_), [[8, 32]] * len(shapes)
    pq.write_table(set_column(set_column(table, "text_embedding_bytes", bytes_), "text_embedding_shape", shapes), data)
    cfg = base_config("finetune", tiny_wan, tiny_wan, data, tmp_path / "out")
    cfg["training"].update(dataloader_num_workers=2)  # the error crosses the prefetch thread
    proc = run_cli("--config", str(write_config(tmp_path / "run.yaml", cfg)))
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {data} row ") and last.endswith(
        "text embedding has 256 non-finite values (NaN or inf)"
    ), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "export").exists() and not (tmp_path / "out" / "checkpoints").exists()


def test_a_nan_one_rank_reads_stops_every_rank_with_its_file_and_row(tmp_path, tiny_wan):
    """The device check's flag is reduced with the iteration's other flags; the rank holding the bad sample
    names it and every rank (the other one too, through one gather) stops with that line, no hang."""
    from launching import TRAIN, launch

    samples = mixed_shape_samples({(16, 2, 4, 4): 4}, text_dim=32)
    samples[2]["latent"][3, 1, 0, 0] = float("nan")
    data = tmp_path / "d.parquet"
    write_parquet(data, samples)
    cfg = base_config("finetune", tiny_wan, tiny_wan, data, tmp_path / "out")
    cfg["training"].update(max_train_steps=2, train_batch_size=1, gradient_accumulation_steps=1)
    proc = launch(
        "accelerate_configs/ddp8.yaml", TRAIN, "--config", str(write_config(tmp_path / "r.yaml", cfg)), check=False
    )
    assert proc.returncode != 0
    line = f"error: {data} row 2 (id {samples[2]['id']!r}): latent has 1 non-finite values (NaN or inf)"
    assert proc.stderr.count(line) == 2, proc.stderr[-3000:]  # one per rank
    # the launcher's own ChildFailedError report follows; no frame of ours (our error is the one line)
    assert not re.search(r'File "[^"]*accel_distill/', proc.stderr), proc.stderr[-4000:]
    assert not (tmp_path / "out" / "export").exists() and not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("case", ["channels", "width"])
def test_model_mismatch_is_caught_before_any_step(tmp_path, tiny_wan, monkeypatch, case):
    from accel_distill import builder

    shape = (8, 2, 4, 4) if case == "channels" else (16, 2, 4, 4)
    # "width": embeddings of another text encoder (64 wide) for a transformer taking text_dim 32
    data = write_synthetic_dataset(tmp_path / "d.parquet", latent_shape=shape, text_dim=64 if case == "width" else 32)
    cfg = load_config(
        str(write_config(tmp_path / "run.yaml", base_config("finetune", tiny_wan, tiny_wan, data, tmp_path / "o")))
    )
    loaded = []
    monkeypatch.setattr(builder, "load_bundle", lambda *a, **k: loaded.append(1))
    with pytest.raises(DataError) as e:
        builder.build_runtime(cfg)
    message = str(e.value)
    if case == "channels":
        assert message == f"{data} row 0: latent has 8 channels, expected 16 (shape [8, 2, 4, 4])"
    else:
        assert message.startswith(f"{data} row 0 (id 'sample-00000'): text embedding width 64, the model expects 32")
    assert not loaded  # before any model weights load, so before any optimizer step


def test_nonfinite_check_costs_one_reduction_and_can_be_off(tmp_path):
    samples = mixed_shape_samples({(16, 1, 2, 2): 4})
    samples[3]["latent"][0, 0, 0, 0] = float("inf")
    write_parquet(tmp_path / "d.parquet", samples)
    s = LatentStream(str(tmp_path / "d.parquet"), batch_size=4, seed=0, text_max_length=4, prefetch=0)
    with pytest.raises(DataError, match=r"row 3 \(id .*\): latent has 1 non-finite values"):
        next(iter(s))
    off = LatentStream(str(tmp_path / "d.parquet"), batch_size=4, seed=0, text_max_length=4, check_finite=False)
    assert not torch.isfinite(next(iter(off))["latents"]).all()
