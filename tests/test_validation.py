"""Validation sampling: files and tracker media through the CLI, CFG variants, bad prompt files, fixed seeds."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import base_config, metrics_by_iteration, run_cli, write_config
from PIL import Image

from accel_distill.builder import build_runtime
from accel_distill.config import load_config
from accel_distill.errors import ConfigError
from accel_distill.sampling import few_step_sample
from accel_distill.validation import ValidationCallback, read_prompts

CAPTIONS = ["a red cat", "two blue dog", "a video of a handwritten digit"]


def assert_ok(proc) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def write_prompts(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def dmd2_config(tmp_path: Path, tiny_wan, tiny_teacher, text_data, prompts: Path) -> dict:
    """DMD2, data-free rollouts on text-only data, validation every 2 iterations and at the start."""
    cfg = base_config("dmd2", tiny_wan, tiny_teacher, text_data, tmp_path / "out")
    cfg["method_config"]["rollout_mode"] = "simulate"
    cfg["pipeline_config"].update(num_frames=5, height=32, width=32)
    cfg["training"].update(
        log_validation=True, validation_steps=2, validation_at_start=True, validation_dataset_file=str(prompts)
    )
    return cfg


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_dmd2_run_writes_validation_media_and_logs_them_to_wandb(tmp_path, tiny_wan, tiny_teacher, text_data):
    prompts = write_prompts(tmp_path / "val.json", {"data": [{"caption": c} for c in CAPTIONS]})
    cfg = dmd2_config(tmp_path, tiny_wan, tiny_teacher, text_data, prompts)
    cfg["training"]["trackers"] = ["wandb"]
    wandb_dir = tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}
    assert_ok(run_cli("--config", str(write_config(tmp_path / "run.yaml", cfg)), env=env))
    out = tmp_path / "out"

    # at the start (0) and every 2 iterations; 3 prompts x the student's 3 steps x guidance 1
    root = out / "validation"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-0", "step-2", "step-4"]
    ours = []
    for step in (0, 2, 4):
        names = sorted(p.name for p in (root / f"step-{step}").iterdir())
        assert names == sorted(f"{i}_3steps_g1.{ext}" for i in range(3) for ext in ("png", "gif"))
        for i in range(3):
            png, gif = root / f"step-{step}" / f"{i}_3steps_g1.png", root / f"step-{step}" / f"{i}_3steps_g1.gif"
            first = pixels(png)
            assert first.shape == (32, 32, 3) and first.dtype == np.uint8 and first.std() > 0
            with Image.open(gif) as video:
                assert video.n_frames == 5  # every decoded frame
            ours.append(gif.read_bytes())
    assert not np.array_equal(pixels(root / "step-0" / "0_3steps_g1.png"), pixels(root / "step-0" / "1_3steps_g1.png"))
    assert json.loads((root / "prompts.json").read_text())[2]["caption"] == CAPTIONS[2]

    # the validation time is a logged metric on validation iterations only
    rows = metrics_by_iteration(out)
    assert ["validation_seconds" in rows[i] for i in (1, 2, 3, 4)] == [False, True, False, True]
    assert rows[2]["validation_seconds"] > 0
    # the prompts were encoded once and cached; each checkpoint records the last validation
    assert (out / "validation_prompt_embeds.safetensors").exists()
    for step in (2, 4):
        state = torch.load(out / "checkpoints" / f"checkpoint-{step}" / "rank_state_0.pt", weights_only=False)
        assert state["callbacks"]["validation"] == {"last_step": step}

    # wandb (offline) copies each logged GIF into the run's files/media/videos/validation/ (named after
    # wandb's own counter, not our step) and appends the history rows, each media entry's path and
    # caption as JSON, to the binary run-*.wandb log.
    (run,) = (wandb_dir / "wandb").glob("offline-run-*")
    logged = sorted((run / "files" / "media" / "videos" / "validation").glob("3steps_g1_*.gif"))
    assert sorted(p.read_bytes() for p in logged) == sorted(ours)  # exactly our 9 GIFs
    history = next(run.glob("run-*.wandb")).read_bytes()
    for p in logged:
        assert f'"path":"media/videos/validation/{p.name}"'.encode() in history
    for i, caption in enumerate(CAPTIONS):
        assert history.count(f'"caption":"{i}: {caption}"'.encode()) >= 3  # once per validation


def test_finetune_validates_every_guidance_scale(tmp_path, tiny_wan, tiny_teacher, latent_data):
    """A many-step student, two guidance scales, and one prompt with a precomputed embedding."""
    torch.save(torch.randn(6, 32, generator=torch.Generator().manual_seed(1)), tmp_path / "emb.pt")
    prompts = write_prompts(tmp_path / "val.json", [{"prompt": "a cat"}, {"caption": "x", "prompt_embeds": "emb.pt"}])
    cfg = base_config("finetune", tiny_wan, tiny_teacher, latent_data, tmp_path / "out")
    cfg["pipeline_config"].update(num_frames=5, height=32, width=32)
    cfg["training"].update(
        max_train_steps=2,
        log_validation=True,
        validation_steps=2,
        validation_dataset_file=str(prompts),
        validation_sampling_steps=[2],
        validation_guidance_scale=[1.0, 3.0],
    )
    assert_ok(run_cli("--config", str(write_config(tmp_path / "run.yaml", cfg))))
    root = tmp_path / "out" / "validation"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-2"]  # not at the start
    folder = root / "step-2"
    expected = [f"{i}_2steps_g{g}.{ext}" for i in range(2) for g in ("1", "3") for ext in ("png", "gif")]
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)
    for i in range(2):
        plain, guided = pixels(folder / f"{i}_2steps_g1.png"), pixels(folder / f"{i}_2steps_g3.png")
        assert plain.std() > 0 and not np.array_equal(plain, guided)  # CFG changes the sample
    from safetensors.torch import load_file

    cache = load_file(tmp_path / "out" / "validation_prompt_embeds.safetensors")
    assert cache["prompt_embeds"].shape == (1, 16, 32)  # only the caption was encoded


def test_bad_validation_file_is_one_line_naming_the_key(tmp_path, capsys, tiny_wan, tiny_teacher, text_data):
    """The CLI entry point in-process (train_distill.py is ``sys.exit(main())``): exit 2, one error line."""
    from accel_distill.cli import main

    prompts = tmp_path / "val.json"
    prompts.write_text('{"data": [{"caption": "a cat"},]}')
    cfg = dmd2_config(tmp_path, tiny_wan, tiny_teacher, text_data, prompts)
    assert main(["--config", str(write_config(tmp_path / "run.yaml", cfg))]) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training.validation_dataset_file" in errors[0] and str(prompts) in errors[0]
    assert "not valid JSON" in errors[0] and "Traceback" not in stderr
    assert not (tmp_path / "out" / "validation").exists()  # failed before any training


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("not json", "not valid JSON"),
        ('{"prompts": ["a"]}', '{"data": [...]}'),
        ("[]", "no prompts"),
        ('[{"text": "a"}]', "item 0"),
        ('["a", 3]', "item 1"),
        ('[{"caption": "a", "prompt_embeds": 5}]', "prompt_embeds"),
    ],
)
def test_read_prompts_rejects_bad_files(tmp_path, content, words):
    path = tmp_path / "val.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as e:
        read_prompts(str(path), "run.yaml")
    assert "training.validation_dataset_file" in str(e.value) and str(path) in str(e.value) and words in str(e.value)


def test_read_prompts_accepts_every_form(tmp_path):
    forms = [
        {"data": [{"caption": "a"}, {"caption": "b"}]},
        ["a", "b"],
        [{"prompt": "a"}, {"caption": "b", "prompt_embeds": "e.pt"}],
    ]
    for form in forms:
        prompts = read_prompts(str(write_prompts(tmp_path / "val.json", form)))
        assert [p.caption for p in prompts] == ["a", "b"]
    assert prompts[1].embeds_file == str(tmp_path / "e.pt")  # relative to the JSON file


@pytest.fixture(scope="module")
def runtime(tmp_path_factory, tiny_wan, tiny_teacher, text_data):
    tmp = tmp_path_factory.mktemp("validation_unit")
    prompts = write_prompts(tmp / "val.json", CAPTIONS[:2])
    cfg = dmd2_config(tmp, tiny_wan, tiny_teacher, text_data, prompts)
    cfg["roles"]["student"]["ema"] = {"decay": 0.5}
    cfg = load_config(str(write_config(tmp / "run.yaml", cfg)))
    return cfg, build_runtime(cfg)


def test_fixed_seeds_give_identical_samples_and_leave_training_untouched(runtime):
    cfg, rt = runtime
    cb = ValidationCallback(cfg, rt, None)
    student = rt.bundle["student"]
    rng = torch.random.get_rng_state()
    first, second = cb.generate(), cb.generate()
    assert first.shape == (2, 1, 16, 2, 4, 4)
    assert torch.equal(first, second)  # same prompt, same weights -> same sample
    assert not torch.equal(first[0], first[1])  # each prompt has its own noise
    assert torch.equal(torch.random.get_rng_state(), rng)  # training's random stream is not consumed
    assert student.transformer.training  # train mode restored

    # prompt 0 is exactly what the project's sampler gives from that prompt's seed (= the stock export)
    gen = torch.Generator().manual_seed(cb.prompt_seed(0))
    noise = torch.randn((1, 16, 2, 4, 4), generator=gen)
    with torch.no_grad():
        ref = few_step_sample(
            lambda x, t: rt.adapter.predict(student, x, t, {"text": cb.embeds[:1]}),
            rt.method.export_schedule(),
            noise,
            generator=gen,
        )
    assert torch.equal(first[0, 0], ref[0])


def first_prompt(cb: ValidationCallback) -> torch.Tensor:
    with cb.student_context():
        return cb.sample_prompt(0)


def test_validation_uses_ema_weights_when_asked_and_restores_them(runtime):
    from accel_distill.ema import EMACallback

    cfg, rt = runtime
    ema = EMACallback(rt.bundle, {"student": cfg.roles["student"].ema})
    gen = torch.Generator().manual_seed(0)
    shadow = ema.emas["student"].shadow_params
    ema.emas["student"].shadow_params = [s + 0.05 * torch.randn(s.shape, generator=gen) for s in shadow]
    weights = [p.detach().clone() for p in rt.bundle["student"].transformer.parameters()]
    raw = first_prompt(ValidationCallback(cfg, rt, None))
    averaged = first_prompt(ValidationCallback(cfg, rt, ema))
    assert not torch.equal(raw, averaged)
    assert all(torch.equal(a, b) for a, b in zip(weights, rt.bundle["student"].transformer.parameters()))
    cfg.roles["student"].ema.validate = False  # the spec says: validate with the raw weights
    try:
        assert torch.equal(first_prompt(ValidationCallback(cfg, rt, ema)), raw)
    finally:
        cfg.roles["student"].ema.validate = True


def test_schedule_cadence_resume_and_state(runtime):
    cfg, rt = runtime
    runs = []

    def fake_run(cb, label):
        def run(step):
            runs.append((label, step))
            cb.last_step = step
            return 0.5

        cb.run = run
        return cb

    cb = fake_run(ValidationCallback(cfg, rt, None), "fresh")
    trainer = SimpleNamespace(state=SimpleNamespace(iteration=0))
    cb.on_train_start(trainer)  # validation_at_start
    metrics = []
    for it in range(5):
        trainer.state.iteration = it + 1  # already incremented when on_step_end runs
        metrics.append(cb.on_step_end(trainer, it, []))
    assert runs == [("fresh", 0), ("fresh", 2), ("fresh", 4)]
    assert metrics == [{}, {"validation_seconds": 0.5}, {}, {"validation_seconds": 0.5}, {}]
    assert cb.state_dict() == {"last_step": 4}

    resumed = fake_run(ValidationCallback(cfg, rt, None), "resumed")
    resumed.load_state_dict({"last_step": 2})
    trainer.state.iteration = 2
    resumed.on_train_start(trainer)  # a resumed run does not validate at its start
    trainer.state.iteration = 3
    assert resumed.on_step_end(trainer, 2, []) == {}
    assert runs[3:] == [] and resumed.state_dict() == {"last_step": 2}

    # other step counts: the student's own scheduler with set_timesteps(n), as the exported pipeline does
    sched = rt.method.export_schedule().make_scheduler()
    sched.set_timesteps(5)
    assert cb.schedule_for(5).timesteps == tuple(sched.timesteps.tolist())


def test_missing_video_size_is_a_config_error(runtime):
    cfg, rt = runtime
    shape, rt.method.latent_shape = rt.method.latent_shape, None
    try:
        with pytest.raises(ConfigError, match="pipeline_config.num_frames"):
            ValidationCallback(cfg, rt, None)
    finally:
        rt.method.latent_shape = shape


def test_tensorboard_gets_first_frames_and_captions(runtime, tmp_path):
    cfg, rt = runtime
    cb = ValidationCallback(cfg, rt, None)
    calls = []
    writer = SimpleNamespace(
        add_images=lambda tag, images, step, dataformats: calls.append(
            (tag, images.shape, images.dtype, step, dataformats)
        ),
        add_text=lambda tag, text, step: calls.append((tag, text, step)),
    )
    cb.acc = SimpleNamespace(trackers=[SimpleNamespace(name="tensorboard")], get_tracker=lambda name, unwrap: writer)
    frames = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    from accel_distill.validation import write_media

    media = {"3steps_g1": [(i, *write_media(frames, tmp_path / f"{i}"), 5) for i in range(2)]}
    trackers = cfg.training.trackers
    cfg.training.trackers = ["tensorboard"]
    try:
        cb._log_trackers(7, media)
    finally:
        cfg.training.trackers = trackers
    assert calls[0] == ("validation/3steps_g1", (2, 32, 32, 3), np.uint8, 7, "NHWC")
    assert calls[1] == ("validation/3steps_g1/captions", f"0: {CAPTIONS[0]}\n\n1: {CAPTIONS[1]}", 7)
