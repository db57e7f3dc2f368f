"""Teacher data generation (``python -m accel_distill.generate``) and knowledge distillation (``kd``).

* the kd loss on hand-built tensors: its gradient, what is detached; the trajectory interpolation and
  the ``next`` target against a hand-made Euler trajectory;
* generate: the schema (latent = final x0, the trajectory columns), per-row seeds, a resumed run
  that re-makes only its unfinished shard, bad arguments as one line;
* generate -> kd -> export -> stock WanPipeline samples the trained timesteps; kd resumed bitwise;
  kd on data without trajectories names the file and the column.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import base_config, write_config
from launching import launch
from safetensors.torch import load_file
from stock_sampling import assert_stock_wan_samples
from test_host_syncs import HOST_ONLY, run_counting
from test_mixed_precision import fresh_accelerate  # noqa: F401  (a fixture)

import accel_distill.run
from accel_distill.config import load_config
from accel_distill.data import read_tensor_columns
from accel_distill.generate.cli import main as generate_main
from accel_distill.generate.teacher import teacher_adapter, teacher_config
from accel_distill.methods.kd import kd_loss
from accel_distill.noise import RectifiedFlow
from accel_distill.schedule import fit_few_step_schedule
from accel_distill.trajectory import path_coefficients, path_x0, trajectory_point

PROMPTS = ["a red cat", "the blue dog", "one green cat", "two red dog", "a photo", "the digit"]
SIZE = ["--height", "32", "--width", "32", "--num-frames", "5", "--text-max-length", "16"]
STEPS = [1000, 757, 522]


# --- the loss and the trajectory, by hand -----------------------------------------------------


def test_kd_loss_gradient_is_through_the_prediction_only():
    flow = RectifiedFlow(shift=1.0)
    g = torch.Generator().manual_seed(0)
    x_t, target = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g).requires_grad_()
    t = torch.tensor([800.0, 400.0])
    sigma = (t / 1000).view(-1, 1, 1)
    for space in ("native", "x0"):
        pred = torch.randn(2, 3, 4, generator=g).requires_grad_()
        loss = kd_loss(pred, x_t, t, target, flow, space)
        loss.backward()
        if space == "native":  # 0.5 mean (v - (x_t - x0) / sigma)^2
            residual = pred.detach() - (x_t - target.detach()) / sigma
            grad = residual / residual.numel()
        else:  # 0.5 mean (x_t - sigma v - x0)^2
            residual = x_t - sigma * pred.detach() - target.detach()
            grad = -sigma * residual / residual.numel()
        torch.testing.assert_close(loss.detach(), 0.5 * residual.pow(2).mean())
        torch.testing.assert_close(pred.grad, grad)
        assert target.grad is None  # the teacher's side is a constant


def euler_trajectory(flow, x, timesteps, flows):
    """A teacher's Euler path: the sample each step starts from, and the end."""
    points = []
    for t, t_next, v in zip(timesteps, [*timesteps[1:], 0.0], flows):
        points.append(x)
        x = flow.step(x, v, torch.tensor([t]), torch.tensor([t_next]), None, "ode")
    return torch.stack(points, dim=1), x


def test_trajectory_points_follow_the_teachers_euler_steps():
    flow = RectifiedFlow(shift=1.0)
    g = torch.Generator().manual_seed(1)
    times = [1000.0, 800.0, 500.0, 200.0]
    flows = [torch.randn(1, 2, 3, generator=g) for _ in times]  # a different flow every step: a bent path
    points, x0 = euler_trajectory(flow, torch.randn(1, 2, 3, generator=g), times, flows)
    stored = torch.tensor([times])

    def at(t: float) -> torch.Tensor:
        return trajectory_point(flow, points, stored, x0, torch.tensor([t]))

    assert torch.equal(at(800.0), points[:, 1]) and torch.equal(at(1000.0), points[:, 0])  # stored: exact
    # between two stored steps: where the teacher's Euler step from the upper one passes at that time
    torch.testing.assert_close(at(650.0), points[:, 1] + (0.65 - 0.8) * flows[1])
    torch.testing.assert_close(at(100.0), points[:, 3] + (0.1 - 0.2) * flows[3])  # to the clean end
    assert torch.equal(at(0.0), x0)
    # a saved subset (steps 0 and 2): the path through the stored neighbours
    sub = trajectory_point(flow, points[:, [0, 2]], stored[:, [0, 2]], x0, torch.tensor([650.0]))
    torch.testing.assert_close(sub, points[:, 0] + (0.65 - 1.0) / (0.5 - 1.0) * (points[:, 2] - points[:, 0]))

    # target "next" at a stored step: the x0 whose Euler step lands on the next point, i.e. the teacher's flow
    t, t_next = torch.tensor([800.0]), torch.tensor([500.0])
    ca, cb = path_coefficients(flow, t, x0), path_coefficients(flow, t_next, x0)
    implied, _ = path_x0(points[:, 1], ca, points[:, 2], cb)
    torch.testing.assert_close(flow.from_x0(implied, points[:, 1], t), flows[1])


# --- generate ---------------------------------------------------------------------------------


def run_generate(capsys, *args) -> tuple[int, str, str]:
    code = generate_main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rows_of(out: Path) -> dict[str, dict]:
    return {r["id"]: r for f in sorted(out.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("".join(f"{p}\n" for p in PROMPTS))
    return path


def generate_args(teacher: Path, prompts: Path, out: Path) -> list:
    args = ["--model", teacher, "--prompts", prompts, "--output", out, *SIZE, "--steps", "6"]
    return [*args, "--guidance-scale", "3", "--rows-per-shard", "2", "--seed", "5"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory, tiny_teacher, prompts) -> Path:
    out = tmp_path_factory.mktemp("generated") / "gen"
    assert generate_main([str(a) for a in generate_args(tiny_teacher, prompts, out)]) == 0
    return out


def test_generate_writes_x0_and_the_trajectory_and_resumes(capsys, tmp_path, generated, tiny_teacher, prompts):
    rows = rows_of(generated)
    assert sorted(rows) == [f"prompt-{i:07d}" for i in range(6)]
    row = rows["prompt-0000002"]
    assert row["caption"] == "one green cat" and (row["width"], row["height"], row["num_frames"]) == (32, 32, 5)
    latent, traj = read_tensor_columns(row, "vae_latent"), read_tensor_columns(row, "traj_latents")
    times, noise = read_tensor_columns(row, "traj_timesteps"), read_tensor_columns(row, "noise")
    assert latent.shape == (16, 2, 4, 4) and traj.shape == (6, 16, 2, 4, 4) and times.dtype == torch.float32
    assert times[0] == 1000 and bool((times[1:] < times[:-1]).all())  # the teacher's 6 Euler steps
    assert torch.equal(traj[0], noise)  # step 0 starts from the row's noise
    assert rows["prompt-0000001"]["noise_bytes"] != row["noise_bytes"]  # a seed per row

    # a copy whose shard 1 was killed: only that shard is made again, bitwise as before
    out = shutil.copytree(generated, tmp_path / "gen")
    (out / "part-00001.parquet").unlink()
    (out / ".preprocess" / "part-00001.json").unlink()
    (out / ".part-00001.parquet.tmp-999").write_bytes(b"half a shard")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    code, stdout, _ = run_generate(capsys, *generate_args(tiny_teacher, prompts, out))
    assert code == 0 and "1 encoded now, 2 already done" in stdout, stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name in before} == before
    assert rows_of(out) == rows and not list(out.glob(".part-*"))
    # other settings into the same folder: refused, naming what differs
    code, _, err = run_generate(capsys, *generate_args(tiny_teacher, prompts, out), "--steps", "4")
    assert code == 2 and "different settings" in err and "steps" in err


def test_generate_at_the_student_steps_stores_the_teachers_path_there(
    capsys, tmp_path, generated, tiny_teacher, prompts
):
    """--student-steps: the samples at exactly kd's fitted timesteps, where the teacher's Euler steps pass."""
    out = tmp_path / "at"
    code, _, _ = run_generate(capsys, *generate_args(tiny_teacher, prompts, out), "--student-steps", "1000,757,522")
    assert code == 0
    cfg = teacher_config(
        "wan", str(tiny_teacher), revision=None, dtype=torch.float32, flow_shift=None, text_max_length=16, output=out
    )
    adapter, steps = teacher_adapter(cfg), torch.tensor(fit_few_step_schedule(STEPS).timesteps)
    full, at = rows_of(generated), rows_of(out)
    for rid, row in at.items():
        assert row["vae_latent_bytes"] == full[rid]["vae_latent_bytes"]  # the same teacher samples
        assert torch.equal(read_tensor_columns(row, "traj_timesteps"), steps)
        points, times = read_tensor_columns(full[rid], "traj_latents"), read_tensor_columns(full[rid], "traj_timesteps")
        x0 = adapter.normalize_latents(read_tensor_columns(full[rid], "vae_latent")[None])
        want = trajectory_point(
            adapter.noise, points.expand(3, *points.shape), times.expand(3, -1), x0.expand(3, -1, -1, -1, -1), steps
        )
        torch.testing.assert_close(read_tensor_columns(row, "traj_latents"), want, atol=1e-5, rtol=1e-5)


def test_generate_from_embedded_prompts_keeps_ids_captions_and_embeddings(capsys, tmp_path, tiny_teacher, text_data):
    out = tmp_path / "from-data"
    args = ["--model", tiny_teacher, "--data", text_data, "--output", out, *SIZE, "--steps", "2", "--save-steps", "1"]
    code, stdout, _ = run_generate(capsys, *args, "--guidance-scale", "1", "--rows-per-shard", "8")
    assert code == 0 and "16 rows in 2 shard(s)" in stdout, stdout
    source = {r["id"]: r for r in pq.read_table(text_data).to_pylist()}
    rows = rows_of(out)
    assert rows.keys() == source.keys()
    for rid, row in rows.items():
        assert row["caption"] == source[rid]["caption"]
        assert row["text_embedding_bytes"] == source[rid]["text_embedding_bytes"]  # as stored, unpadded
        assert read_tensor_columns(row, "traj_latents").shape == (1, 16, 2, 4, 4)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--save-steps", "0,9"], "--save-steps 9: step indices must lie in 0 .. 5"),
        (["--guidance-scale", "0.5"], "--guidance-scale 0.5: must be >= 1"),
        (["--height", "30"], "--height 30: must be a positive multiple of 16"),
    ],
)
def test_generate_bad_arguments_are_one_line(capsys, tmp_path, tiny_teacher, prompts, extra, words):
    code, _, err = run_generate(capsys, *generate_args(tiny_teacher, prompts, tmp_path / "o"), *extra)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"error: {words}"), err
    assert not (tmp_path / "o").exists()


def test_generate_on_two_processes_equals_one(tmp_path, generated, tiny_teacher, prompts):
    """Each rank makes the shards k % 2 == rank; the rows are the one-process run's, bitwise."""
    out = tmp_path / "gen2"
    args = [str(a) for a in generate_args(tiny_teacher, prompts, out)]
    proc = launch("accelerate_configs/ddp8.yaml", "-m", "accel_distill.generate", *args)
    assert "6 rows in 3 shard(s)" in proc.stdout and "3 encoded now" in proc.stdout, proc.stdout
    ranks = {k: json.loads((out / ".preprocess" / f"part-{k:05d}.json").read_text())["rank"] for k in range(3)}
    assert ranks == {0: 0, 1: 1, 2: 0}
    assert rows_of(out) == rows_of(generated)


# --- kd ---------------------------------------------------------------------------------------


def kd_config(student: Path, data: Path, out: Path) -> dict:
    cfg = base_config("finetune", student, student, data, out)
    cfg["recipe"]["method"] = "kd"
    cfg["method_config"] = {"kd_denoising_steps": STEPS}
    return cfg


@pytest.mark.usefixtures("fresh_accelerate")
def test_kd_trains_on_generated_data_and_stock_diffusers_samples_the_export(tmp_path, tiny_wan, generated):
    out = tmp_path / "out"
    export = accel_distill.run.train(
        load_config(str(write_config(tmp_path / "kd.yaml", kd_config(tiny_wan, generated, out))))
    )
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4] and all(r["kd_loss"] > 0 for r in rows)
    info = json.loads((export / "accel_distill_export.json").read_text())
    assert info["method"] == "kd" and info["scheduler"]["class"] == "FlowMatchLCMScheduler"

    assert_stock_wan_samples(export, fit_few_step_schedule(STEPS))


@pytest.mark.usefixtures("fresh_accelerate")
def test_kd_resume_is_bitwise(tmp_path, tiny_wan, generated):
    """4 iterations straight == 2 + resume + 2 (shuffle on, target next with ode steps)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cfg = kd_config(tiny_wan, generated, straight)
    cfg["method_config"].update(target="next", loss_space="x0")
    cfg["pipeline_config"]["sampler_kind"] = "ode"
    path = str(write_config(tmp_path / "kd.yaml", cfg))
    accel_distill.run.train(load_config(path))
    ckpt = straight / "checkpoints" / "checkpoint-2"
    accel_distill.run.train(
        load_config(path, [f"training.output_dir={resumed}", f"training.resume_from_checkpoint={ckpt}"])
    )

    def losses(out: Path) -> dict:
        lines = (out / "logs" / "metrics.jsonl").read_text().splitlines()
        return {r["iteration"]: (r["kd_loss"], r["grad_norm/student"]) for r in map(json.loads, lines)}

    a, b = losses(straight), losses(resumed)
    assert sorted(b) == [3, 4] and {i: a[i] for i in b} == b
    wa = load_file(straight / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
    wb = load_file(resumed / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_kd_on_two_ddp_processes_equals_one(tmp_path, tiny_wan, generated):
    """DDP on 2 CPU processes x batch 1 == 1 process x batch 2: each rank reads its share of the stored
    trajectories (extra tensor columns) and the step's losses and gradient norms match."""
    from launching import backend_launch

    runs = {}
    for name, batch in (("two", 1), ("one", 2)):
        cfg = kd_config(tiny_wan, generated, tmp_path / name)
        cfg["training"].update(max_train_steps=3, checkpointing_steps=3, train_batch_size=batch)
        path = write_config(tmp_path / f"{name}.yaml", cfg)
        if name == "two":
            launch(*backend_launch("ddp"), "--config", str(path))
        else:
            accel_distill.run.train(load_config(str(path)))
        lines = (tmp_path / name / "logs" / "metrics.jsonl").read_text().splitlines()
        runs[name] = {r["iteration"]: (r["kd_loss"], r["grad_norm/student"]) for r in map(json.loads, lines)}
    assert sorted(runs["two"]) == [1, 2, 3]
    for i, (loss, norm) in runs["one"].items():
        assert runs["two"][i] == pytest.approx((loss, norm), rel=1e-5), i


def test_kd_on_data_without_trajectories_names_the_file_and_column(capsys, tmp_path, tiny_wan, latent_data):
    from accel_distill.cli import main

    path = write_config(tmp_path / "kd.yaml", kd_config(tiny_wan, latent_data, tmp_path / "out"))
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {latent_data}: column 'traj_latents_bytes' is missing (method 'kd' reads 'traj_latents': "
        "teacher trajectories, written by `python -m accel_distill.generate`)"
    ]
    assert not (tmp_path / "out" / "checkpoints").exists()  # stopped before any step


def test_kd_makes_one_host_sync_per_iteration_after_its_first(tmp_path, tiny_wan, generated):
    """The trainer's finiteness check only; the first iteration also checks the trajectories' shapes and range."""
    counts = run_counting(tmp_path, tiny_wan, tiny_wan, generated, "kd", kd_denoising_steps=STEPS)
    first = {site: n for site, n in counts[0].items() if site not in HOST_ONLY}
    assert first == {"/trainer/loop.py:_finite": 1, "/methods/kd.py:check_trajectories": 1}, dict(counts[0])
    for sites in counts[1:]:
        assert {site: n for site, n in sites.items() if site not in HOST_ONLY} == {"/trainer/loop.py:_finite": 1}
