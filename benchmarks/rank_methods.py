"""Rank the distillation methods on the moving-digits video benchmark: one table, one command.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/rank_methods.py --split test

Students of the video teacher (``--teacher``, default models/digits-video-wan), one recipe per
method beside the ``make demo`` one, all from the teacher's weights, batch 16, the same
iterations (``--iterations``, default 800, as the recipes: chosen on the validation split, where DMD2 and
DMD2+GAN were both better at 800 than at 400), learning rate 2e-4 (cosine; chosen for DMD2), 4 trained steps
[1000, 900, 750, 500], teacher CFG 2:

- ``DMD2``: configs/demo/dmd2_digits_video.yaml (data-free: the 40 captions' text-only parquet);
- ``DMD2+GAN``: configs/demo/dmd2_gan_digits_video.yaml (real samples: the real training clips' latents);
- ``KD``: configs/demo/kd_digits_video.yaml (the teacher's trajectories from ``python -m accel_distill.generate``);
- ``consistency``: configs/demo/consistency_digits_video.yaml (x_t from the real training clips' latents).

What it needs is made first and skipped when finished (each piece records the teacher's weights'
hash and its settings; a different teacher or setting redoes it): the prompt parquet, the KD
teacher data (the generate command, which itself resumes finished shards), the real latents
(``--real-data``, default the teacher build's; when missing, ``--real-clips`` training clips are
encoded with the teacher's VAE as the build does), then each method trained by train_distill.py's
entry (``accel_distill.cli.main``) with the run's resolved YAML beside its export (``--retrain``
retrains; ``--set METHOD:section.key=value`` tries a recipe change in a run folder of its own).
Teacher forwards per student update are counted with forward hooks on the teacher's transformer (benchmarks/dmd2_forward_count.py's ``Counter``) over a few iterations of the same
recipe, and checked against each method's known structure. Then benchmarks/quality.py's
``measure`` scores the teacher and every student once, and one markdown table and the targets
print: every student beats the teacher (lower FD) at its step count; the GAN head lowers DMD2's
1-step FD by >= 10%. ``--split validation`` is for choosing settings, ``--split test`` for reporting.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from benchmarks.quality import HEADER, measure, row_cells  # noqa: E402

METHODS = {  # label -> recipe; DMD2 first: the undistilled rows use its scheduler, the GAN target its FD
    "DMD2": "configs/demo/dmd2_digits_video.yaml",
    "DMD2+GAN": "configs/demo/dmd2_gan_digits_video.yaml",
    "KD": "configs/demo/kd_digits_video.yaml",
    "consistency": "configs/demo/consistency_digits_video.yaml",
}
REAL_DATA = "outputs/digits_video_build/data/train"  # the latents the teacher was finetuned on
STAMP = "rank_methods.json"  # beside each finished piece: what made it
GAN_TARGET = 0.10  # the GAN head lowers DMD2's 1-step FD by at least this fraction


def teacher_hash(teacher: Path) -> str:
    """sha256 of the teacher's transformer weights: a retrained teacher invalidates everything made from it."""
    h = hashlib.sha256()
    for f in sorted((teacher / "transformer").glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def finished(folder: Path, settings: dict) -> dict | None:
    """The stamp of ``folder`` when it was made with exactly ``settings``, else None."""
    try:
        stamp = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return stamp if stamp.get("settings") == settings else None


def write_stamp(folder: Path, settings: dict, **measured) -> dict:
    stamp = dict(settings=settings, **measured)
    (folder / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    return stamp


def recipe(label: str, teacher: Path, data: Path, out: Path, seed: int, iterations: int, extra=()) -> dict:
    """The method's YAML with the harness's teacher, data, output folder, seed and iterations (then ``extra``
    overrides, ``section.key=value``)."""
    from accel_distill.config.loader import apply_overrides, read_yaml

    source = str(ROOT / METHODS[label])
    cfg = read_yaml(source)
    roles = [f"roles.{r}.path={teacher}" for r in cfg["roles"]]  # every role starts from / is the teacher
    training = [f"training.{k}={v}" for k, v in (("data_path", data), ("output_dir", out), ("seed", seed))]
    steps = [f"training.max_train_steps={iterations}", f"training.checkpointing_steps={iterations}"]
    apply_overrides(cfg, [*roles, *training, *steps, *extra], source)
    return cfg


def overrides_by_method(items: list[str], parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """``--set METHOD:section.key=value`` items, per method."""
    sets: dict[str, list[str]] = {m: [] for m in METHODS}
    for item in items:
        label, sep, override = item.partition(":")
        if not sep or label not in METHODS or "=" not in override:
            parser.error(f"--set {item!r}: expected METHOD:section.key=value, METHOD one of {', '.join(METHODS)}")
        sets[label].append(override)
    return sets


def run_name(label: str, extra: list[str]) -> str:
    """The method's run folder; overridden recipes get their own (the default run stays reusable)."""
    name = label.lower().replace("+", "_")
    return name + "-" + hashlib.sha256("\n".join(extra).encode()).hexdigest()[:8] if extra else name


def prompt_data(teacher: Path, work: Path, settings: dict) -> Path:
    """The 40 captions' text-only parquet (data-free DMD2), as ``make demo`` writes it."""
    from accel_distill.digits.grid import write_prompt_data

    out = work / "data" / "prompts"
    if not finished(out, settings):
        write_prompt_data(teacher, out)
        write_stamp(out, settings)
    return out


def teacher_data(teacher: Path, work: Path, kd: dict, guidance: float, a, settings: dict) -> tuple[Path, dict]:
    """The teacher's trajectories at KD's timesteps, by ``python -m accel_distill.generate`` (resumes shards)."""
    from accel_distill.digits import TEXT_MAX_LENGTH
    from accel_distill.digits.sample import clip_shape
    from accel_distill.digits.video import DIRECTIONS, video_caption
    from accel_distill.generate.cli import main as generate_main

    out = work / "data" / "teacher"
    steps = ",".join(f"{t:g}" for t in kd["method_config"]["kd_denoising_steps"])
    settings = dict(settings, clips=a.kd_clips, steps=a.kd_teacher_steps, guidance=guidance, student_steps=steps)
    stamp = finished(out, settings)
    if stamp:
        return out, stamp
    shutil.rmtree(out, ignore_errors=True)  # another teacher or setting: generate refuses to mix them
    captions = [video_caption(d, k) for d in range(10) for k in range(len(DIRECTIONS))]
    prompts = work / "data" / "teacher_prompts.txt"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(f"{captions[i % len(captions)]}\n" for i in range(a.kd_clips)))
    shape = clip_shape(teacher)
    args = ["--model", str(teacher), "--prompts", str(prompts), "--output", str(out), "--seed", str(a.seed)]
    args += ["--height", str(shape["height"]), "--width", str(shape["width"]), "--num-frames", str(shape["num_frames"])]
    args += ["--text-max-length", str(TEXT_MAX_LENGTH), "--steps", str(a.kd_teacher_steps)]
    args += ["--guidance-scale", f"{guidance:g}", "--student-steps", steps, "--batch-size", "100"]
    args += ["--rows-per-shard", "200"]
    start = time.perf_counter()
    if generate_main(args) != 0:
        raise SystemExit("python -m accel_distill.generate failed (its error line is above)")
    per_clip = a.kd_teacher_steps * (2 if guidance != 1.0 else 1)  # Euler steps x (cond + negative) per clip
    return out, write_stamp(out, settings, wall_s=time.perf_counter() - start, teacher_forwards_per_clip=per_clip)


def real_data(teacher: Path, work: Path, a) -> Path:
    """``--real-data`` when it holds parquet, else ``--real-clips`` training clips encoded with the teacher's VAE."""
    from accel_distill.digits.build_video import encode_clips

    given = Path(a.real_data)
    if list(given.glob("*.parquet")):
        return given
    print(f"[rank] {given} holds no parquet: encoding {a.real_clips} training clips with {teacher}'s VAE", flush=True)
    return encode_clips(teacher, work / "real", seed=0, limit=a.real_clips)  # preprocess resumes finished shards


def expected_teacher_forwards(cfg: dict) -> tuple[float, float]:
    """(calls, rows / B) of the teacher per student update, from the method's structure (module docstrings)."""
    m, method = cfg.get("method_config", {}), cfg["recipe"]["method"]
    if method == "kd":
        return 0.0, 0.0
    if method == "consistency":  # one CFG ODE step per iteration (both halves in one call), every iteration updates
        return 1.0, 2.0 if m.get("guidance_scale", 4.0) != 1.0 else 1.0
    from benchmarks.dmd2_forward_count import ours_expected

    k = m.get("generator_update_interval", 5)
    calls, rows = ours_expected(k, len(m["dmd_denoising_steps"]), m.get("real_score_guidance_scale", 3.5), "simulate")[
        "teacher"
    ]
    if m.get("gan_feature_blocks"):  # generator term: 1 x B; each critic-only iteration's discriminator: 1 x 2B or 3B
        calls += 1 + (k - 1)
        rows += 1 + (k - 1) * (3 if m.get("gan_r1_weight", 0.0) > 0 else 2)
    return calls, rows


def count_teacher_forwards(cfg: dict, updates: int = 2, batch: int = 2) -> tuple[float, float]:
    """(calls, rows / B) of the teacher per student update, counted by forward hooks over a few iterations."""
    import yaml

    from accel_distill.builder import build_runtime
    from accel_distill.config.loader import load_config
    from accel_distill.run import build_callbacks
    from accel_distill.trainer import Trainer
    from benchmarks.dmd2_forward_count import Counter

    if "teacher" not in cfg["roles"]:
        return 0.0, 0.0
    cfg = json.loads(json.dumps(cfg))
    with tempfile.TemporaryDirectory(prefix="rank-count-") as tmp:
        cfg["training"].update(output_dir=str(Path(tmp) / "out"), train_batch_size=batch, log_every=1_000_000)
        cfg["training"].update(checkpointing_steps=1_000_000, max_train_steps=1_000_000)
        path = Path(tmp) / "run.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        run_cfg = load_config(str(path))
        rt = build_runtime(run_cfg)
        callbacks = build_callbacks(run_cfg, rt)  # the method's own (a consistency target's EMA), as a run's
        trainer = Trainer(rt.accelerator, rt.method, iter(rt.stream), run_cfg.training, callbacks=callbacks)
        for callback in callbacks:
            callback.on_train_start(trainer)
        counter = Counter(rt.bundle, roles=("teacher",))
        counter.new_cycle()
        done = 0
        while done < updates:
            done += "student" in rt.method.updating_roles(trainer.state.iteration)
            trainer.step()
        while "student" not in rt.method.updating_roles(trainer.state.iteration):  # a whole number of cycles
            trainer.step()
        for h in counter.handles:
            h.remove()
    calls, rows, _ = counter.cycles[0]["teacher"]
    return calls / updates, rows / batch / updates


def train(label: str, cfg: dict, run: Path, settings: dict, retrain: bool) -> dict:
    """Train one method through train_distill.py's entry unless its export is finished with these settings."""
    import yaml

    from accel_distill.cli import main as train_main

    stamp = finished(run, settings)
    if stamp and not retrain and (run / "export" / "model_index.json").exists():
        print(f"[rank] {label}: finished export {run / 'export'} ({stamp['wall_s']:.0f} s), skipped", flush=True)
        return stamp
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    config = run / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(f"[rank] {label}: training {METHODS[label]} -> {run}", flush=True)
    start = time.perf_counter()
    if train_main(["--config", str(config)]) != 0:
        raise SystemExit(f"training {label} failed (its error line is above)")
    wall = time.perf_counter() - start
    calls, rows = count_teacher_forwards(cfg)
    expected = expected_teacher_forwards(cfg)
    return write_stamp(run, settings, wall_s=wall, teacher_calls=calls, teacher_forwards=rows, expected=expected)


def targets(results: list[dict], labels: list[str], guidance: float) -> list[str]:
    """Each student against the teacher at its step counts (FD), and the GAN head against DMD2 at 1 step."""
    teacher = {r["steps"]: r for r in results if r["sampler"] == f"teacher (CFG {guidance:g})"}
    rows = {(r["sampler"], r["steps"]): r for r in results}
    lines = []
    for label in labels:
        for steps in sorted({s for name, s in rows if name == f"{label} student"}, reverse=True):
            s, t = rows[(f"{label} student", steps)], teacher.get(steps)
            if t is None:
                continue
            gap = 100 * (s["fd"] / t["fd"] - 1)
            lines.append(
                f"{label} {steps} step{'s' * (steps > 1)}: FD {s['fd']:.2f} vs teacher {t['fd']:.2f} ({gap:+.1f}%), "
                f"digit acc. {100 * s['accuracy']:.1f}% vs {100 * t['accuracy']:.1f}% "
                f"(target: lower FD than the teacher at {steps}): {_ok(s['fd'] < t['fd'])}"
            )
    dmd, gan = rows.get(("DMD2 student", 1)), rows.get(("DMD2+GAN student", 1))
    if dmd and gan:
        gain = 1 - gan["fd"] / dmd["fd"]
        change = f"{100 * gain:.1f}% lower" if gain >= 0 else f"{-100 * gain:.1f}% higher"
        lines.append(
            f"GAN head at 1 step: FD {gan['fd']:.2f} vs DMD2 {dmd['fd']:.2f}, {change} "
            f"(target >= {100 * GAN_TARGET:.0f}%): {_ok(gain >= GAN_TARGET)}"
        )
    return lines


def _ok(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def cost_cells(r: dict, costs: dict[str, dict]) -> list[str]:
    """Teacher forwards (per-sample network evaluations) per student update, and training wall seconds."""
    label = r["sampler"].removesuffix(" student")
    c = costs.get(label)
    if c is None:
        return ["-", "-"]
    fwd, wall = (
        f"{c['teacher_forwards']:g} ({c['teacher_calls']:g} call{'s' * (c['teacher_calls'] != 1)})",
        f"{c['wall_s']:.0f}",
    )
    if "generation" in c:
        g = c["generation"]
        fwd += (
            f" online; offline {g['teacher_forwards_per_clip']:g} per generated clip x {g['clips']} clips = "
            f"{g['amortized_per_sample_update']:.1f} per trained sample"
        )
        wall += f" + {g['wall_s']:.0f} generation"
    return [fwd, wall]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="models/digits-video-wan")
    p.add_argument("--split", choices=["validation", "test"], default="test", help="the real clips FD compares with")
    p.add_argument("--seed", type=int, default=0, help="training seed of every method (and the KD data's noise)")
    p.add_argument(
        "--iterations", type=int, default=800, help="training iterations of every method (the recipes say 800)"
    )
    p.add_argument("--num-samples", type=int, default=400, help="clips per sampler row")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--retrain", action="store_true", help="retrain finished exports")
    p.add_argument("--work", default="outputs/rank_methods", help="data and runs (reused by re-runs)")
    p.add_argument("--real-data", default=REAL_DATA, help="real training latents (GAN, consistency)")
    p.add_argument("--real-clips", type=int, default=2000, help="clips encoded when --real-data is missing")
    p.add_argument("--kd-clips", type=int, default=1000, help="teacher clips generated for KD")
    p.add_argument("--kd-teacher-steps", type=int, default=48, help="teacher Euler steps of the KD data")
    p.add_argument("--teacher-steps", type=int, nargs="+", default=[50, 4, 2, 1], help="teacher rows")
    p.add_argument("--batch-size", type=int, default=200, help="clips sampled together")
    p.add_argument("--train-clips", type=int, default=4000, help="training-digit clips the classifier learns from")
    p.add_argument("--set", action="append", metavar="METHOD:section.key=value", help="a recipe override (tuning)")
    p.add_argument("--json", default=None, help="default: <work>/rank_methods_<split>.json")
    a = p.parse_args(argv)
    import torch

    teacher, work = Path(a.teacher), Path(a.work)
    load_start = os.getloadavg()
    print(f"[rank] load average {load_start}, torch threads {torch.get_num_threads()}", flush=True)
    base = dict(teacher=str(teacher), teacher_hash=teacher_hash(teacher))
    labels = [m for m in METHODS if m in a.methods]
    sets = overrides_by_method(a.set or [], p)
    runs = {m: work / "runs" / run_name(m, sets[m]) for m in labels}
    cfgs = {m: recipe(m, teacher, Path("unset"), Path("unset"), a.seed, a.iterations, sets[m]) for m in labels}
    guidance = float(recipe("DMD2", teacher, Path(), Path(), 0, 1)["method_config"]["real_score_guidance_scale"])
    data: dict[str, Path] = {}
    costs: dict[str, dict] = {}
    for m in labels:
        method = cfgs[m]["recipe"]["method"]
        if method == "kd":
            data[m], generation = teacher_data(teacher, work, cfgs[m], guidance, a, base)
        elif cfgs[m]["method_config"].get("gan_feature_blocks") or method == "consistency":
            data[m] = real_data(teacher, work, a)
        else:
            data[m] = prompt_data(teacher, work, base)
        run = runs[m]
        cfg = recipe(m, teacher, data[m], run, a.seed, a.iterations, sets[m])
        data[m] = Path(cfg["training"]["data_path"])  # a --set may have replaced it
        settings = dict(base, recipe=cfg)
        costs[m] = train(m, cfg, run, settings, a.retrain)
        if method == "kd":
            samples = cfg["training"]["train_batch_size"] * cfg["training"]["max_train_steps"]  # trained on
            clips = generation["settings"]["clips"]
            amortized = generation["teacher_forwards_per_clip"] * clips / samples
            costs[m]["generation"] = dict(generation, clips=clips, amortized_per_sample_update=amortized)
        measured = (costs[m]["teacher_calls"], costs[m]["teacher_forwards"])
        if tuple(measured) != tuple(costs[m]["expected"]):
            print(f"[rank] WARNING {m}: teacher forwards counted {measured}, expected {costs[m]['expected']}")
    exports = [str(runs[m] / "export") for m in labels]
    measured = measure(
        str(teacher),
        exports,
        split=a.split,
        num_samples=a.num_samples,
        guidance=guidance,
        teacher_steps=a.teacher_steps,
        batch_size=a.batch_size,
        train_clips=a.train_clips,
        names=labels,
    )
    results, references = measured["results"], measured["references"]
    header = [*HEADER, "teacher forwards / student update", "training wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row_cells(r) + cost_cells(r, costs)) + " |" for r in results + references]
    lines += ["", *targets(results, labels, guidance)]
    load_end = os.getloadavg()
    load = ", ".join(f"{x:.2f}" for x in load_start), ", ".join(f"{x:.2f}" for x in load_end)
    lines.append(
        f"\nload average (1, 5, 15 min) at start {load[0]}, at end {load[1]}; torch threads {torch.get_num_threads()}"
    )
    print("\n".join(lines), flush=True)
    report = dict(
        teacher=str(teacher),
        teacher_hash=base["teacher_hash"],
        split=a.split,
        seed=a.seed,
        iterations=a.iterations,
        num_samples=a.num_samples,
        teacher_guidance=guidance,
        methods={
            m: dict(config=METHODS[m], overrides=sets[m], data=str(data[m]), export=e, **costs[m])
            for m, e in zip(labels, exports)
        },
        real_clip_accuracy=measured["real_clip_accuracy"],
        results=results,
        references=references,
        table=lines,
        load_average=dict(start=load_start, end=load_end),
    )
    out = Path(a.json or work / f"rank_methods_{a.split}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"[rank] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
