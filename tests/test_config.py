"""The config layer: strict validation before any model loads, one-line errors, overrides, the seed YAML.

Every user mistake in a run config must end the CLI with exit code 2 and exactly one
``error:`` line on stderr that names the file and the dotted key path (with the closest
valid key for a typo), no traceback, and nothing written to ``output_dir``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import base_config, run_cli, write_config

from accel_distill.builder import describe_plan
from accel_distill.cli import main
from accel_distill.config import load_config, resolved_dict
from accel_distill.errors import ConfigError
from accel_distill.methods.dmd2 import DMD2Method

# The yaml block of the project's seed recipe, verbatim (comments included), committed as a
# fixture. Tests substitute only its paths.
SEED_FIXTURE = Path(__file__).parent / "fixtures" / "seed_000_dmd2.yaml"
SEED_YAML = SEED_FIXTURE.read_text(encoding="utf-8")
# sha256 of the seed's yaml block (shared/seeds/000_94012abdfd2d4a91.txt), taken when it was copied
SEED_SHA256 = "65b5d52b518f12d5b6a7988d1de581ca4d59a8a83c6afebc62d8710912923875"
SEED_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "seeds" / "000_94012abdfd2d4a91.txt"


# ---------------------------------------------------------------- helpers


def assert_one_error_line(err: str, *needles: str) -> str:
    """stderr is exactly one ``error:`` line containing every needle, and no traceback."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith("error: ") and line.strip() != "error:", line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def set_key(cfg: dict, dotted: str, value) -> None:
    node = cfg
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def del_key(cfg: dict, dotted: str) -> None:
    node = cfg
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[part]
    del node[parts[-1]]


def setk(dotted: str, value):
    return lambda cfg: set_key(cfg, dotted, value)


def delk(dotted: str):
    return lambda cfg: del_key(cfg, dotted)


@pytest.fixture
def make_config(tmp_path, tiny_wan, tiny_teacher, latent_data):
    """``make_config(method, mutate=None)`` -> (config path, output_dir) of a written, mutated base config."""

    def make(method: str, mutate=None, name: str = "run.yaml") -> tuple[Path, Path]:
        out = tmp_path / "out"
        cfg = base_config(method, tiny_wan, tiny_teacher, latent_data, out)
        if mutate is not None:
            mutate(cfg)
        return write_config(tmp_path / name, cfg), out

    return make


# ---------------------------------------------------------------- every error class: one line, exit 2

NOPE = "/nonexistent/accel_distill_test"

# (method, mutation of the base config, CLI overrides, substrings the error line must contain)
ERROR_CASES = [
    # unknown keys, with the closest valid key suggested
    pytest.param(
        "dmd2",
        setk("training.max_train_step", 3),
        [],
        ["training.max_train_step:", "unknown key", "did you mean 'max_train_steps'"],
        id="unknown-training-key",
    ),
    pytest.param(
        "dmd2", setk("trainig", {"seed": 1}), [], ["trainig", "unknown section", "'training'"], id="unknown-section"
    ),
    pytest.param(
        "dmd2",
        lambda c: c.update(models=c.pop("roles")),
        [],
        ["models", "unknown section", "'roles'"],
        id="renamed-section-models",
    ),
    pytest.param(
        "dmd2",
        setk("roles.critic.learning_rat", 1e-4),
        [],
        ["roles.critic.learning_rat:", "did you mean 'learning_rate'"],
        id="unknown-role-key",
    ),
    pytest.param(
        "dmd2",
        setk("method_config.dmd_denoising_step", [1000, 500]),
        [],
        ["method_config.dmd_denoising_step:", "did you mean 'dmd_denoising_steps'"],
        id="unknown-method-key",
    ),
    pytest.param(
        "finetune",
        setk("method_config.generator_update_interval", 2),
        [],
        ["method_config.generator_update_interval:", "unknown key"],
        id="dmd2-key-under-finetune",
    ),
    pytest.param(
        "dmd2",
        setk("pipeline_config.flow_shfit", 3.0),
        [],
        ["pipeline_config.flow_shfit:", "did you mean 'flow_shift'"],
        id="unknown-pipeline-key",
    ),
    pytest.param(
        "dmd2", setk("recipe.familly", "wan"), [], ["recipe.familly:", "did you mean 'family'"], id="unknown-recipe-key"
    ),
    # wrong types
    pytest.param(
        "dmd2", setk("training.train_batch_size", "abc"), [], ["training.train_batch_size:", "'abc'"], id="type-int-str"
    ),
    pytest.param("dmd2", setk("training.shuffle", "yes"), [], ["training.shuffle:", "'yes'"], id="type-bool-str"),
    pytest.param(
        "dmd2", setk("training.max_train_steps", 2.5), [], ["training.max_train_steps:", "integer"], id="type-int-float"
    ),
    pytest.param(
        "dmd2", setk("training.max_train_steps", float("inf")), [], ["training.max_train_steps:"], id="type-int-inf"
    ),
    pytest.param(
        "dmd2", setk("training.learning_rate", float("nan")), [], ["training.learning_rate:"], id="type-float-nan"
    ),
    pytest.param(
        "dmd2", setk("roles.student.trainable", "true"), [], ["roles.student.trainable:"], id="type-role-bool"
    ),
    pytest.param("dmd2", setk("recipe.family", 3), [], ["recipe.family:", "string"], id="type-str-int"),
    pytest.param("dmd2", setk("training.betas", [0.9]), [], ["training.betas:", "2 values"], id="type-betas-length"),
    pytest.param(
        "dmd2",
        setk("method_config.dmd_denoising_steps", [1000, "x"]),
        [],
        ["method_config.dmd_denoising_steps[1]:"],
        id="type-list-item",
    ),
    pytest.param("dmd2", setk("training", 5), [], ["training:", "mapping"], id="type-section-scalar"),
    pytest.param("dmd2", setk("roles", ["student"]), [], ["roles:", "mapping"], id="type-roles-list"),
    pytest.param(
        "dmd2",
        setk("pipeline_config.sampler_kind", "euler"),
        [],
        ["pipeline_config.sampler_kind:", "'ode'", "'sde'", "'euler'"],
        id="sampler-kind-euler",
    ),
    pytest.param(
        "dmd2",
        setk("method_config.rollout_mode", "simulated"),
        [],
        ["method_config.rollout_mode:", "'simulate'"],
        id="literal-rollout-mode",
    ),
    pytest.param(
        "dmd2", setk("roles.teacher.precision", "fp8"), [], ["roles.teacher.precision:"], id="literal-precision"
    ),
    pytest.param(
        "dmd2",
        setk("training.mixed_precision", "bf32"),
        [],
        ["training.mixed_precision:"],
        id="literal-mixed-precision",
    ),
    # missing pieces
    pytest.param(
        "dmd2", delk("roles.critic"), [], ["roles.critic:", "missing role", "student, teacher, critic"], id="no-critic"
    ),
    pytest.param("dmd2", delk("roles.student.path"), [], ["roles.student.path:", "missing"], id="no-role-path"),
    pytest.param("finetune", delk("training.data_path"), [], ["training.data_path:", "missing"], id="no-data-path"),
    pytest.param("finetune", delk("training"), [], ["training:", "missing required section"], id="no-training"),
    # roles vs. method
    pytest.param(
        "finetune",
        setk("roles.teacher", {"path": "/tmp", "trainable": False}),
        [],
        ["roles.teacher:", "does not use"],
        id="unused-role",
    ),
    pytest.param(
        "dmd2",
        setk("roles.fake_score", {"path": "/tmp", "trainable": True}),
        [],
        ["roles.fake_score:", "does not use"],
        id="extra-role",
    ),
    pytest.param(
        "dmd2",
        setk("roles.critic.trainable", False),
        [],
        ["roles.critic.trainable:", "trainable"],
        id="frozen-critic",
    ),
    pytest.param(
        "finetune",
        setk("roles.student.trainable", False),
        [],
        ["roles.student.trainable:", "trainable"],
        id="frozen-student",
    ),
    pytest.param(
        "dmd2",
        setk("roles.teacher.trainable", True),
        [],
        ["roles.teacher.trainable:", "frozen"],
        id="trainable-teacher",
    ),
    # keys of older versions that did nothing: an error that says what became of them
    pytest.param(
        "dmd2", setk("roles.student.family", "wan"), [], ["roles.student.family:", "removed"], id="removed-role-family"
    ),
    pytest.param(
        "dmd2",
        setk("method_config.attn_kind", "dense"),
        [],
        ["method_config.attn_kind:", "removed", "attention_backend"],
        id="removed-attn-kind",
    ),
    pytest.param(
        "finetune",
        setk("method_config.loss", "flow_matching"),
        [],
        ["method_config.loss:", "removed", "pred_type"],
        id="removed-finetune-loss",
    ),
    # speed switches
    pytest.param(
        "dmd2",
        setk("training.attention_backend", "flahs"),
        [],
        ["training.attention_backend:", "'flahs'", "'flash'"],
        id="unknown-attention-backend",
    ),
    pytest.param(
        "dmd2",
        setk("roles.critic.attention_backend", "sage"),
        [],
        ["roles.critic.attention_backend:", "'sage'", "not usable"],
        id="uninstalled-attention-backend",
    ),
    pytest.param(
        "dmd2",
        setk("training.compile", "yes please"),
        [],
        ["training.compile:", "true or false"],
        id="compile-not-bool",
    ),
    # registries
    pytest.param(
        "dmd2",
        setk("recipe.family", "flux"),
        [],
        ["recipe.family:", "'flux'", "registered: cogvideox, ltx, wan, wan_i2v, wan_ti2v"],
        id="unknown-family",
    ),
    pytest.param(
        "dmd2",
        setk("recipe.method", "dmd3"),
        [],
        ["recipe.method:", "'dmd3'", "registered: consistency, dmd2, finetune", "kd"],
        id="unknown-method",
    ),
    # numeric ranges
    pytest.param(
        "dmd2",
        lambda c: c["method_config"].update(min_timestep_ratio=0.9, max_timestep_ratio=0.5),
        [],
        ["method_config.min_timestep_ratio:", "max_timestep_ratio"],
        id="min-above-max-timestep-ratio",
    ),
    pytest.param(
        "dmd2",
        setk("method_config.max_timestep_ratio", 1.5),
        [],
        ["method_config.max_timestep_ratio:"],
        id="timestep-ratio-above-1",
    ),
    pytest.param(
        "dmd2", setk("training.learning_rate", -1e-4), [], ["training.learning_rate:"], id="negative-learning-rate"
    ),
    pytest.param(
        "dmd2",
        setk("roles.critic.learning_rate", -1.0),
        [],
        ["roles.critic.learning_rate:"],
        id="negative-role-learning-rate",
    ),
    pytest.param("dmd2", setk("training.train_batch_size", 0), [], ["training.train_batch_size:"], id="batch-size-0"),
    pytest.param(
        "dmd2",
        setk("method_config.generator_update_interval", 0),
        [],
        ["method_config.generator_update_interval:"],
        id="generator-update-interval-0",
    ),
    pytest.param("dmd2", setk("training.num_gpus", 0), [], ["training.num_gpus:"], id="num-gpus-0"),
    pytest.param("dmd2", setk("training.betas", [0.9, 1.0]), [], ["training.betas[1]:"], id="beta-1"),
    pytest.param(
        "dmd2",
        setk("training.gradient_accumulation_steps", 0),
        [],
        ["training.gradient_accumulation_steps:"],
        id="accumulation-0",
    ),
    pytest.param("dmd2", setk("pipeline_config.flow_shift", 0), [], ["pipeline_config.flow_shift:"], id="flow-shift-0"),
    pytest.param(
        "finetune",
        setk("method_config.cfg_dropout_rate", 1.5),
        [],
        ["method_config.cfg_dropout_rate:"],
        id="cfg-dropout-above-1",
    ),
    # local paths that do not exist
    pytest.param("dmd2", setk("training.data_path", NOPE + "/data.parquet"), [], ["training.data_path:"], id="no-data"),
    pytest.param(
        "dmd2", setk("roles.teacher.path", "/nonexistent/model"), [], ["roles.teacher.path:"], id="no-role-folder"
    ),
    pytest.param(
        "dmd2",
        setk("training.resume_from_checkpoint", NOPE + "/checkpoint-4"),
        [],
        ["training.resume_from_checkpoint:"],
        id="no-resume-checkpoint",
    ),
    pytest.param(
        "dmd2",
        setk("pipeline_config.negative_prompt_embeds", NOPE + "/neg.safetensors"),
        [],
        ["pipeline_config.negative_prompt_embeds:"],
        id="no-negative-embeds",
    ),
    pytest.param(
        "dmd2",
        lambda c: c["training"].update(log_validation=True, validation_dataset_file=NOPE + "/val.json"),
        [],
        ["training.validation_dataset_file:"],
        id="no-validation-file",
    ),
    pytest.param(
        "dmd2", setk("roles.student.subfolder", "transformer_x"), [], ["roles.student.subfolder:"], id="no-subfolder"
    ),
    # the few-step schedule
    pytest.param(
        "dmd2",
        setk("method_config.dmd_denoising_steps", [1000, 990, 100, 90]),
        [],
        ["method_config.dmd_denoising_steps:", "cannot be produced"],
        id="inexpressible-dmd-steps",
    ),
    pytest.param(
        "dmd2",
        setk("method_config.dmd_denoising_steps", [500, 750]),
        [],
        ["method_config.dmd_denoising_steps:", "decreasing"],
        id="increasing-dmd-steps",
    ),
    # schedulers and trackers
    pytest.param(
        "dmd2",
        setk("training.lr_scheduler", "cosine_annealing"),
        [],
        ["training.lr_scheduler:", "'cosine_annealing'"],
        id="unknown-lr-scheduler",
    ),
    pytest.param(
        "dmd2",
        setk("roles.critic.lr_scheduler", "linearr"),
        [],
        ["roles.critic.lr_scheduler:", "did you mean 'linear'"],
        id="unknown-role-lr-scheduler",
    ),
    pytest.param(
        "dmd2",
        setk("training.lr_scheduler", "piecewise_constant"),
        [],
        ["training.lr_scheduler:", "piecewise_constant"],
        id="lr-scheduler-needing-step-rules",
    ),
    pytest.param("dmd2", setk("training.trackers", ["mlflow"]), [], ["training.trackers:", "'mlflow'"], id="tracker"),
    # dotted overrides
    pytest.param(
        "dmd2",
        None,
        ["training.max_train_step=3"],
        ["training.max_train_step:", "did you mean 'max_train_steps'"],
        id="override-unknown-key",
    ),
    pytest.param("dmd2", None, ["foo"], ["'foo'", "section.key=value"], id="override-without-equals"),
    pytest.param("dmd2", None, ["=3"], ["'=3'", "section.key=value"], id="override-without-key"),
    pytest.param("dmd2", None, ["foo.bar=1"], ["foo:", "unknown section"], id="override-unknown-section"),
    pytest.param(
        "dmd2", None, ["recipe.family.name=wan"], ["recipe.family:", "recipe.family.name"], id="override-into-value"
    ),
    pytest.param(
        "dmd2", None, ["training.max_train_steps=abc"], ["training.max_train_steps:", "'abc'"], id="override-bad-type"
    ),
    pytest.param(
        "dmd2", None, ["training.max_train_steps="], ["training.max_train_steps:", "empty"], id="override-empty-value"
    ),
    pytest.param(
        "dmd2",
        None,
        ["pipeline_config.sampler_kind=euler"],
        ["pipeline_config.sampler_kind:", "'ode'", "'sde'"],
        id="override-sampler-kind",
    ),
]


@pytest.mark.parametrize("method, mutate, overrides, needles", ERROR_CASES)
def test_config_error_is_one_line_exit_2(make_config, capsys, method, mutate, overrides, needles):
    path, out = make_config(method, mutate)
    rc = main(["--config", str(path), *overrides])
    captured = capsys.readouterr()
    assert rc == 2
    assert_one_error_line(captured.err, str(path), *needles)
    assert captured.out == ""
    assert not out.exists(), "a config error must not create output_dir"


@pytest.mark.parametrize("dry_run", [False, True])
def test_dry_run_validates_just_as_strictly(make_config, capsys, dry_run):
    path, out = make_config("dmd2", setk("training.max_train_step", 3))
    rc = main(["--config", str(path), *(["--dry-run"] if dry_run else [])])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert_one_error_line(captured.err, "training.max_train_step:", "did you mean 'max_train_steps'")
    assert not out.exists()


# ---------------------------------------------------------------- the file itself


def test_missing_config_file(tmp_path, capsys):
    path = tmp_path / "does_not_exist.yaml"
    assert main(["--config", str(path)]) == 2
    assert_one_error_line(capsys.readouterr().err, str(path), "cannot read config file")


def test_config_path_is_a_directory(tmp_path, capsys):
    assert main(["--config", str(tmp_path)]) == 2
    assert_one_error_line(capsys.readouterr().err, str(tmp_path), "cannot read config file")


def test_invalid_yaml_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("recipe:\n  family: wan\n  method: dmd2: oops\nroles: {}\n")
    assert main(["--config", str(path)]) == 2
    assert_one_error_line(capsys.readouterr().err, str(path), "line 3", "invalid YAML")


def test_unclosed_bracket_yaml(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("recipe:\n  family: wan\n  method: [dmd2\nroles: {}\n")
    assert main(["--config", str(path)]) == 2
    assert_one_error_line(capsys.readouterr().err, str(path), "invalid YAML", "line ")


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"], ids=["empty", "list", "scalar"])
def test_yaml_that_is_not_a_mapping(tmp_path, capsys, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert main(["--config", str(path)]) == 2
    assert_one_error_line(capsys.readouterr().err, str(path), "mapping")


def test_binary_config_file(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"recipe:\n  family: \xff\xfe\x00wan\n")
    assert main(["--config", str(path)]) == 2
    assert_one_error_line(capsys.readouterr().err, str(path))


# ---------------------------------------------------------------- real processes


def test_cli_process_config_error(make_config):
    path, out = make_config("finetune", setk("training.max_train_step", 3))
    proc = run_cli("--config", str(path), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, str(path), "training.max_train_step:", "did you mean 'max_train_steps'")
    assert proc.stdout == ""
    assert not out.exists()


def test_cli_process_num_gpus_mismatch(make_config):
    """num_gpus is checked against the launched world size at run time, still as a one-line config error."""
    path, out = make_config("finetune")
    proc = run_cli("--config", str(path), "training.num_gpus=4", timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = assert_one_error_line(proc.stderr, str(path), "training.num_gpus:", "4")
    assert "1 processes" in line
    assert not out.exists(), "the mismatch is caught before anything is written"


# ---------------------------------------------------------------- the seed recipe


@pytest.fixture
def seed_config(tmp_path, tiny_wan, tiny_teacher, latent_data) -> tuple[Path, Path]:
    """The seed YAML with its paths replaced by local ones and its removed ``attn_kind`` line dropped."""
    validation = tmp_path / "validation.json"
    validation.write_text(json.dumps({"data": [{"caption": "a cat"}]}))
    out = tmp_path / "out"
    text = SEED_YAML
    for old, new in (
        ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", str(tiny_wan)),
        ("Wan-AI/Wan2.1-T2V-14B-Diffusers", str(tiny_teacher)),
        ("/path/to/out", str(out)),
        ("/path/to/parquet", str(latent_data)),
        ("/path/to/validation.json", str(validation)),
    ):
        assert old in text
        text = text.replace(old, new)
    # FastVideo's attn_kind did nothing here and was removed (test_seed_attn_kind_is_refused_by_name)
    assert SEED_ATTN_KIND_LINE in text
    text = text.replace(SEED_ATTN_KIND_LINE, "")
    path = tmp_path / "seed.yaml"
    path.write_text(text, encoding="utf-8")
    return path, out


SEED_ATTN_KIND_LINE = "  attn_kind: dense\n"


def test_seed_attn_kind_is_refused_by_name(seed_config, capsys):
    """The verbatim seed names a removed key: one line that says what replaced it, not a silent no-op."""
    path, out = seed_config
    path.write_text(path.read_text(encoding="utf-8") + SEED_ATTN_KIND_LINE, encoding="utf-8")
    assert main(["--config", str(path)]) == 2
    assert_one_error_line(capsys.readouterr().err, "method_config.attn_kind:", "removed", "attention_backend")
    assert not out.exists()


def test_seed_yaml_is_copied_verbatim():
    """The fixture is byte for byte the seed's yaml block: its legacy strings and non-ASCII comments included."""
    assert hashlib.sha256(SEED_FIXTURE.read_bytes()).hexdigest() == SEED_SHA256
    assert 'validation_sampling_steps: "8"     # legacy-style string；' in SEED_YAML
    if SEED_SOURCE.exists():  # beside a checkout with the shared folder: the seed itself too
        block = re.search(r"``` ?yaml\n(.*?)```", SEED_SOURCE.read_text(encoding="utf-8"), re.S)
        assert block is not None and block.group(1) == SEED_YAML


def test_seed_yaml_loads_unchanged(seed_config, tiny_wan, tiny_teacher):
    path, out = seed_config
    cfg = load_config(str(path))
    t, p, m = cfg.training, cfg.pipeline_config, cfg.method_config
    # legacy strings are normalised
    assert t.validation_sampling_steps == [8] and isinstance(t.validation_sampling_steps[0], int)
    assert t.validation_guidance_scale == [5.0] and isinstance(t.validation_guidance_scale[0], float)
    assert t.trackers == ["wandb"] and t.num_gpus == 8 and t.max_train_steps == 4000
    assert t.log_validation is True and t.wandb_run_name == "my_run"
    assert p.flow_shift == 3.0 and p.sampler_kind == "ode"
    assert m.rollout_mode == "simulate" and m.generator_update_interval == 1
    assert m.real_score_guidance_scale == 1.0
    assert m.dmd_denoising_steps == [999.0, 750.0, 500.0, 250.0, 0.0]
    assert {r: (rc.path, rc.trainable) for r, rc in cfg.roles.items()} == {
        "student": (str(tiny_wan), True),
        "teacher": (str(tiny_teacher), False),
        "critic": (str(tiny_wan), True),
    }
    schedule = DMD2Method.schedule_from(cfg)
    assert len(schedule.timesteps) == 4 and schedule.kind == "ode"
    for got, want in zip(schedule.timesteps, [1000, 750, 500, 250]):
        assert abs(got - want) <= 1.0
    assert not out.exists()


def test_seed_dry_run_in_process_loads_no_model(seed_config, capsys, monkeypatch):
    import diffusers

    import accel_distill.run

    def forbidden(*args, **kwargs):
        raise AssertionError("--dry-run must not load a model or start training")

    monkeypatch.setattr(diffusers.WanTransformer3DModel, "from_pretrained", forbidden)
    monkeypatch.setattr(accel_distill.run, "train", forbidden)
    path, out = seed_config
    assert main(["--config", str(path), "--dry-run"]) == 0
    stdout = capsys.readouterr().out
    resolved, plan = stdout.split("# plan\n")
    assert yaml.safe_load(resolved) == resolved_dict(load_config(str(path)))
    assert "  student: " in plan and "  teacher: " in plan and "  critic: " in plan
    assert not out.exists()


def test_seed_dry_run_process(seed_config, tiny_wan, tiny_teacher):
    path, out = seed_config
    # that it loads no model is test_seed_dry_run_in_process_loads_no_model's job (no wall-clock limit here)
    proc = run_cli("--config", str(path), "--dry-run", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    resolved_text, plan_text = proc.stdout.split("# plan\n")
    resolved = yaml.safe_load(resolved_text)
    assert list(resolved) == ["recipe", "roles", "training", "pipeline_config", "method_config"]
    assert resolved["training"]["validation_sampling_steps"] == [8]
    assert resolved["training"]["validation_guidance_scale"] == [5.0]
    assert resolved["method_config"]["dmd_denoising_steps"] == [999.0, 750.0, 500.0, 250.0, 0.0]
    plan = plan_text.splitlines()
    roles = {line.split(":")[0].strip(): line for line in plan if line.startswith("  ") and ":" in line}
    assert set(roles) == {"student", "teacher", "critic"}
    assert str(tiny_wan) in roles["student"] and "trainable" in roles["student"]
    assert str(tiny_teacher) in roles["teacher"] and "frozen" in roles["teacher"] and "no optimizer" in roles["teacher"]
    assert str(tiny_wan) in roles["critic"] and "trainable" in roles["critic"]
    assert any(line.startswith("dmd2:") for line in plan)
    assert not out.exists(), "--dry-run must not write anything"


# ---------------------------------------------------------------- overrides and normalisation


def test_dotted_overrides_change_the_loaded_config(make_config):
    path, _ = make_config("dmd2")
    base = load_config(str(path))
    assert base.training.max_train_steps == 4
    cfg = load_config(
        str(path),
        [
            "training.max_train_steps=7",
            "method_config.dmd_denoising_steps=[1000,500]",
            "roles.critic.learning_rate=3e-4",
            "pipeline_config.sampler_kind=ode",
        ],
    )
    assert cfg.training.max_train_steps == 7
    assert cfg.method_config.dmd_denoising_steps == [1000.0, 500.0]
    assert cfg.roles["critic"].learning_rate == 3e-4
    assert cfg.pipeline_config.sampler_kind == "ode"
    assert DMD2Method.schedule_from(cfg).timesteps == pytest.approx((1000.0, 500.0), abs=1e-3)
    # everything else is untouched
    assert cfg.training.train_batch_size == base.training.train_batch_size == 2
    assert cfg.method_config.generator_update_interval == 2


def test_later_override_wins_and_file_is_not_modified(make_config):
    path, _ = make_config("finetune")
    before = path.read_text()
    cfg = load_config(str(path), ["training.max_train_steps=7", "training.max_train_steps=9"])
    assert cfg.training.max_train_steps == 9
    assert path.read_text() == before


def test_override_can_add_a_section(make_config):
    path, _ = make_config("finetune", delk("pipeline_config"))
    cfg = load_config(str(path), ["pipeline_config.flow_shift=5"])
    assert cfg.pipeline_config.flow_shift == 5.0


def test_yaml11_string_numbers_are_floats(make_config):
    assert yaml.safe_load("x: 1e-5")["x"] == "1e-5"  # PyYAML's YAML 1.1 reads this as a string
    path, _ = make_config("dmd2")
    text, n = re.subn(r"(?m)^  learning_rate: .*$", "  learning_rate: 1e-5", path.read_text())
    text, m = re.subn(r"(?m)^    learning_rate: .*$", "    learning_rate: 2e-4", text)
    assert n == 1 and m == 1
    path.write_text(text)
    cfg = load_config(str(path), ["training.weight_decay=1e-2"])
    assert cfg.training.learning_rate == 1e-5 and isinstance(cfg.training.learning_rate, float)
    assert cfg.roles["critic"].learning_rate == 2e-4
    assert cfg.training.weight_decay == 0.01
    assert cfg.role_defaults("critic")["learning_rate"] == 2e-4
    assert cfg.role_defaults("student")["learning_rate"] == 1e-5


def test_string_betas_become_tuples(make_config):
    def mutate(c):
        c["training"]["betas"] = "0.9,0.999"
        c["roles"]["critic"]["betas"] = "0.0, 0.99"

    path, _ = make_config("dmd2", mutate)
    cfg = load_config(str(path))
    assert cfg.training.betas == (0.9, 0.999)
    assert cfg.roles["critic"].betas == (0.0, 0.99)
    assert cfg.role_defaults("student")["betas"] == (0.9, 0.999)
    assert cfg.role_defaults("critic")["betas"] == (0.0, 0.99)
    assert resolved_dict(cfg)["training"]["betas"] == [0.9, 0.999]


def test_list_betas_and_list_strings(make_config):
    def mutate(c):
        c["training"].update(
            betas=[0.8, "0.95"], validation_sampling_steps="4,8", validation_guidance_scale=[1, "3.5"], trackers="wandb"
        )

    path, _ = make_config("finetune", mutate)
    t = load_config(str(path)).training
    assert t.betas == (0.8, 0.95)
    assert t.validation_sampling_steps == [4, 8]
    assert t.validation_guidance_scale == [1.0, 3.5]
    assert t.trackers == ["wandb"]


def test_defaults_and_role_inheritance(make_config):
    cfg = load_config(str(make_config("dmd2")[0]))
    assert cfg.pipeline_config.sampler_kind == "sde"
    assert cfg.training.lr_scheduler == "constant" and cfg.training.shuffle is True
    critic, student = cfg.role_defaults("critic"), cfg.role_defaults("student")
    assert critic["learning_rate"] == 2e-4 and critic["betas"] == (0.0, 0.99)
    assert student["learning_rate"] == 1e-4 and student["betas"] == (0.9, 0.999)
    assert critic["max_grad_norm"] == student["max_grad_norm"] == 1.0


def test_finetune_config_and_plan(make_config):
    cfg = load_config(str(make_config("finetune")[0]))
    assert list(cfg.roles) == ["student"]
    plan = describe_plan(cfg)
    assert any(line.startswith("  student: ") and "trainable" in line for line in plan)
    assert any(line.startswith("finetune:") for line in plan)


def test_hub_ids_are_not_checked_locally(make_config, tmp_path, monkeypatch, capsys, tiny_wan):
    """``org/name`` role paths are Hub ids, not local paths. Only their small model_index.json is read
    before anything loads (it says whether the model has two experts); unreadable, that is one line."""
    import huggingface_hub.constants

    from accel_distill.families.wan import model_index

    repo = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
    path, _ = make_config("dmd2", setk("roles.teacher.path", repo))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    model_index.cache_clear()
    assert main(["--config", str(path), "--dry-run"]) == 2
    assert_one_error_line(capsys.readouterr().err, "roles.teacher.path:", repo, "model_index.json")

    cache = offline_hub_cache(tmp_path / "hub-cache", {repo: tiny_wan})  # its configs in the Hub cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    model_index.cache_clear()
    assert load_config(str(path)).roles["teacher"].path == repo
    model_index.cache_clear()


def test_resume_latest_needs_no_path(make_config):
    path, _ = make_config("finetune", setk("training.resume_from_checkpoint", "latest"))
    assert load_config(str(path)).training.resume_from_checkpoint == "latest"


def test_load_config_raises_config_error(make_config):
    path, _ = make_config("dmd2", setk("training.max_train_step", 3))
    with pytest.raises(ConfigError, match=r"training\.max_train_step: unknown key"):
        load_config(str(path))


def test_base_config_is_not_shared_between_cases(make_config, tiny_wan, tiny_teacher, latent_data, tmp_path):
    """Guard for the parametrized cases above: mutations never leak into the next config."""
    a = base_config("dmd2", tiny_wan, tiny_teacher, latent_data, tmp_path)
    b = copy.deepcopy(a)
    set_key(a, "roles.critic.trainable", False)
    assert base_config("dmd2", tiny_wan, tiny_teacher, latent_data, tmp_path) == b


def test_duplicate_key_is_an_error_not_a_silent_overwrite(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text("recipe:\n  family: wan\n  method: dmd2\n  method: finetune\n")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 4" in err[0] and "duplicate key 'method'" in err[0]


@pytest.mark.parametrize("config", sorted(str(p) for p in (Path(__file__).parents[1] / "configs").rglob("*.yaml")))
def offline_hub_cache(root: Path, repos: dict[str, Path]) -> Path:
    """An offline Hub cache in which each repo id holds the config files (no weights) of a local folder."""
    for repo, folder in repos.items():
        snapshot = root / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
        for f in folder.rglob("*.json"):
            (snapshot / f.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / f.relative_to(folder)).write_bytes(f.read_bytes())
        (snapshot.parent.parent / "refs").mkdir(exist_ok=True)
        (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    return root


def configs_with(model: Path, out: Path, **transformer) -> Path:
    """The config files (no weights) of ``model`` at ``out``, its transformer's config updated."""
    if not out.exists():
        for f in model.rglob("*.json"):
            (out / f.relative_to(model)).parent.mkdir(parents=True, exist_ok=True)
            (out / f.relative_to(model)).write_bytes(f.read_bytes())
        path = out / "transformer" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **transformer}))
    return out


@pytest.mark.parametrize("config", sorted(str(p) for p in (Path(__file__).parents[1] / "configs").rglob("*.yaml")))
def test_shipped_configs_validate(config, tmp_path, capsys, monkeypatch, tiny_wan):
    """Every config in configs/ passes strict validation from the repository root (where its relative
    paths, e.g. the committed models/digits-wan, resolve), its data path pointed at a real folder.
    Role folders a build step creates first (digits: outputs/digits_build/base) stand in as a tiny model;
    Hub ids resolve from an offline Hub cache holding a tiny model's configs of the same layout (two experts
    for A14B, Wan2.1 I2V's 36 channels + image encoder, Wan2.2 TI2V's expand_timesteps)."""
    import huggingface_hub.constants

    from accel_distill.families.wan import component_config, model_index
    from accel_distill.testing.tiny_cogvideox import build_tiny_cogvideox
    from accel_distill.testing.tiny_ltx import build_tiny_ltx
    from accel_distill.testing.tiny_wan import build_tiny_wan

    monkeypatch.chdir(Path(__file__).parents[1])
    (tmp_path / "data").mkdir()
    overrides = [f"training.data_path={tmp_path / 'data'}"]
    hub = {}
    for role, rc in yaml.safe_load(Path(config).read_text())["roles"].items():
        if rc["path"].startswith("outputs/"):
            overrides.append(f"roles.{role}.path={tiny_wan}")
        elif rc["path"].startswith("Wan-AI/") and rc["path"] not in hub:
            two = "A14B" in rc["path"]
            variant = "ti2v" if "TI2V" in rc["path"] else "i2v" if "I2V" in rc["path"] else "t2v"
            if variant == "t2v" and not two and "1.3B" in rc["path"]:  # its real block count (GAN feature taps)
                hub[rc["path"]] = configs_with(tiny_wan, tmp_path / "t2v-1.3b", num_layers=30)
            elif variant == "t2v" and not two:
                hub[rc["path"]] = tiny_wan
            else:  # the model's layout: two experts (A14B), image-to-video (I2V: 36 channels + CLIP; TI2V-5B)
                folder = tmp_path / f"{variant}{'-two-experts' if two else ''}"
                hub[rc["path"]] = build_tiny_wan(folder, variant=variant, boundary_ratio=0.875 if two else None)
        elif rc["path"].startswith("THUDM/"):  # CogVideoX: a tiny one with the real models' 226 text tokens
            folder = tmp_path / "cogvideox"
            hub[rc["path"]] = folder if folder.exists() else build_tiny_cogvideox(folder, text_length=226)
        elif rc["path"].startswith("Lightricks/"):  # LTX-Video: the tiny one's layout
            folder = tmp_path / "ltx"
            hub[rc["path"]] = folder if folder.exists() else build_tiny_ltx(folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(offline_hub_cache(tmp_path / "hub", hub)))
    model_index.cache_clear()
    component_config.cache_clear()
    try:
        assert main(["--config", config, "--dry-run", *overrides]) == 0, capsys.readouterr().err
    finally:
        model_index.cache_clear()
        component_config.cache_clear()


def test_fp16_with_two_trainable_roles_is_refused(tmp_path, tiny_wan, tiny_teacher, latent_data, capsys):
    cfg = base_config("dmd2", tiny_wan, tiny_teacher, latent_data, tmp_path / "out")
    cfg["training"]["mixed_precision"] = "fp16"
    assert main(["--config", str(write_config(tmp_path / "run.yaml", cfg))]) == 2
    assert "training.mixed_precision" in capsys.readouterr().err


def test_a_method_needing_what_the_family_lacks_is_refused_before_any_model_loads(make_config, capsys, monkeypatch):
    """An unsupported method/family pair (here: DMD2's CFG on a family without it) is one config line."""
    from accel_distill.registry import FAMILIES

    monkeypatch.setattr(FAMILIES["wan"], "capabilities", frozenset({"native_prediction", "x0_prediction"}))
    path, out = make_config("dmd2")
    assert main(["--config", str(path)]) == 2
    assert_one_error_line(capsys.readouterr().err, "recipe.method:", "'dmd2'", "cfg", "'wan'")
    assert not out.exists()
    path, _ = make_config("finetune", name="ft.yaml")  # finetune needs only the native prediction
    assert load_config(str(path)).recipe.method == "finetune"
