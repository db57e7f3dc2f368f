"""Quality of the moving-digits video teacher and its students: digit and motion accuracy, Fréchet distance, time.

    python benchmarks/quality.py --teacher models/digits-video-wan --student outputs/demo/run/export --split test

Prompts cycle through the 40 captions "the digit N moves DIRECTION" (sample i: digit
i % 10, direction (i // 10) % 4, seed i); every sampler runs through stock ``WanPipeline``.
Per sampler it reports

- ``accuracy``: per-frame digit accuracy -- a small MLP classifier, trained on frames of clips
  of the *training* digits only, reads each frame cut around its ink centroid;
- ``motion_accuracy``: the direction the ink centroid moved from the first to the last frame,
  against the caption;
- ``fd``: Fréchet distance between clip features of the samples and of real clips of the
  ``--split`` digits (validation: for choosing settings; test: for reporting) with the same
  prompt mix. A clip's features: the classifier's hidden features averaged over frames, plus the
  motion (the centroid of every frame relative to the first, and the first); each of the two blocks
  scaled by the real clips' mean spread in it, so that appearance and motion both count;
- ``sec_per_sample``: wall time per clip.

Rows: the teacher at 50 / 8 / 4 / 2 / 1 steps (at the CFG scale the first student was distilled
against, from its ``accel_distill_export.json``); each ``--student`` export at its trained step
count and at 2 and 1 (no CFG); the undistilled sampler (the teacher's weights with that student's
scheduler, no CFG); references: real clips of the training digits and one clip per prompt
repeated (no diversity).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accel_distill.digits.data import load_split  # noqa: E402
from accel_distill.digits.sample import (  # noqa: E402
    clip_shape,
    distillation_guidance,
    load_pipeline,
    sample_frames,
    teacher_guidance,
)
from accel_distill.digits.video import (  # noqa: E402
    DIRECTIONS,
    centroids,
    crops,
    make_clips,
    motion_direction,
    to_gray_clips,
    video_caption,
)

TEACHER_STEPS = (50, 8, 4, 2, 1)


class Classifier:
    """sklearn MLP on [0, 1] pixels; features = its hidden layer activations."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, seed: int = 0):
        from sklearn.neural_network import MLPClassifier

        self.mlp = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=300, random_state=seed)
        self.mlp.fit(self._x(images), labels)

    @staticmethod
    def _x(images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1).astype(np.float64) / 255.0

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.mlp.predict(self._x(images))

    def features(self, images: np.ndarray) -> np.ndarray:
        return np.maximum(self._x(images) @ self.mlp.coefs_[0] + self.mlp.intercepts_[0], 0)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    import warnings

    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # few samples (the tests): singular covariances, still a finite distance
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
    covmean = (covmean[0] if isinstance(covmean, tuple) else covmean).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


class ClipMetrics:
    """Digit / motion accuracy and clip features, fitted on training clips, scaled on the reference clips."""

    def __init__(self, train_clips, reference: np.ndarray, seed: int = 0):
        frames = train_clips.frames  # one random frame per clip: every position and phase of the motion
        pick = np.random.default_rng(seed).integers(frames.shape[1], size=len(frames))
        self.clf = Classifier(crops(frames[np.arange(len(frames)), pick]), train_clips.labels, seed)
        raw = self._raw(reference)
        self.mean, self.scale = raw.mean(0), np.ones(raw.shape[1])
        look = self.clf.mlp.coefs_[0].shape[1]  # appearance dims first, then motion: each block to unit spread
        for block in (slice(0, look), slice(look, None)):
            self.scale[block] = max(float(raw[:, block].std(0).mean()), 1e-6)
        self.reference = self.features(reference)

    def _raw(self, clips: np.ndarray) -> np.ndarray:
        n, f = clips.shape[:2]
        look = self.clf.features(crops(clips).reshape(n * f, -1)).reshape(n, f, -1).mean(1)
        c = centroids(clips)
        motion = np.concatenate([(c[:, 1:] - c[:, :1]).reshape(n, -1), c[:, 0]], 1)
        return np.concatenate([look, motion], 1)

    def features(self, clips: np.ndarray) -> np.ndarray:
        return (self._raw(clips) - self.mean) / self.scale

    def score(self, clips: np.ndarray, labels: np.ndarray, directions: np.ndarray) -> dict[str, float]:
        n, f = clips.shape[:2]
        per_frame = self.clf.predict(crops(clips).reshape(n * f, -1)).reshape(n, f)
        return dict(
            accuracy=float((per_frame == labels[:, None]).mean()),
            motion_accuracy=float((motion_direction(clips) == directions).mean()),
            fd=frechet_distance(self.features(clips), self.reference),
        )


def prompt_mix(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample i's digit and direction: every (digit, direction) pair equally often."""
    i = np.arange(n)
    return i % 10, (i // 10) % len(DIRECTIONS)


def export_steps(student: str) -> list[int]:
    """The student's trained step count (its export info's timesteps), then 2 and 1 below it."""
    from accel_distill.model_card import read_export_info

    n = len(read_export_info(student).get("timesteps") or [4])
    return [n] + [s for s in (2, 1) if s < n]


def samplers(teacher: str, students: list[str], guidance: float, teacher_steps=TEACHER_STEPS, names=None):
    """(sampler, pipeline, steps, guidance) for every row of the table; ``names``: one label per student
    (default: its export's method, with its path when there are several)."""
    from accel_distill.model_card import read_export_info

    t = load_pipeline(teacher)
    rows = [(f"teacher (CFG {guidance:g})", t, n, guidance) for n in teacher_steps]
    for k, student in enumerate(students):
        s = load_pipeline(student)
        method = read_export_info(student).get("method") or "student"
        name = f"{method} student" + (f" [{student}]" if len(students) > 1 else "")
        name = f"{names[k]} student" if names else name
        rows += [(name, s, n, 1.0) for n in export_steps(student)]
        if k == 0:
            before = load_pipeline(student)
            before.transformer = t.transformer  # the student's initialisation: the teacher's weights
            rows += [
                ("undistilled (teacher weights, student scheduler, no CFG)", before, n, 1.0)
                for n in export_steps(student)
            ]
        g = distillation_guidance(student)
        if k == 0 and g is not None and g != guidance:
            rows += [(f"teacher (CFG {g:g}, the distillation guidance)", t, n, g) for n in teacher_steps[:1]]
    return rows


def check_targets(results: list[dict], guidance: float) -> list[str]:
    """The issue's targets: the teacher's few-step gap, and the first student against the teacher at
    its most steps (50 by default)."""
    teacher = {r["steps"]: r for r in results if r["sampler"] == f"teacher (CFG {guidance:g})"}
    students = [r for r in results if r["sampler"].split(" [")[0].endswith(" student")]
    if not teacher:
        return []
    most = max(teacher)
    ref, lines = teacher[most], []
    if 4 in teacher and most > 4:
        ratio = teacher[4]["fd"] / ref["fd"]
        lines.append(f"teacher 4 steps FD / {most} steps FD = {ratio:.2f} (target >= 1.5): {_ok(ratio >= 1.5)}")
    if not students:
        return lines
    name = students[0]["sampler"]
    rows = {r["steps"]: r for r in students if r["sampler"] == name}
    top = max(rows)
    ratio = rows[top]["fd"] / ref["fd"]
    lines.append(f"{name} {top} steps FD / teacher {most} FD = {ratio:.2f} (target <= 1.0): {_ok(ratio <= 1.0)}")
    for key, what in (("accuracy", "digit"), ("motion_accuracy", "motion")):
        gap = 100 * (ref[key] - rows[top][key])
        lines.append(f"{what} accuracy gap to the teacher at {most} = {gap:+.1f} points (target <= 3): {_ok(gap <= 3)}")
    if 1 in rows and top > 1:
        ratio = rows[1]["fd"] / ref["fd"]
        lines.append(f"{name} 1 step FD / teacher {most} FD = {ratio:.2f} (target <= 1.3): {_ok(ratio <= 1.3)}")
    return lines


def _ok(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def measure(
    teacher: str,
    students: list[str],
    *,
    split: str,
    num_samples: int,
    guidance: float,
    teacher_steps=TEACHER_STEPS,
    batch_size: int = 200,
    train_clips: int = 4000,
    names: list[str] | None = None,
) -> dict:
    """Every sampler's row (``results``), the reference rows and the classifier's accuracy on real ``split``
    clips: the benchmark's measurements, shared by this script and benchmarks/rank_methods.py."""
    torch.manual_seed(0)
    shape = clip_shape(teacher)
    labels, directions = prompt_mix(num_samples)
    kw = dict(num_frames=shape["num_frames"], size=shape["height"])
    train = load_split("train")
    fit_clips = make_clips(train, train_clips, seed=101, **kw)
    reference = make_clips(load_split(split), num_samples, seed=102, labels=labels, directions=directions, **kw)
    metrics = ClipMetrics(fit_clips, reference.frames)
    real_train = make_clips(train, num_samples, seed=103, labels=labels, directions=directions, **kw).frames
    one_per_prompt = real_train[np.arange(num_samples) % 40]
    references = []
    for name, clips in (
        ("real clips, training digits", real_train),
        ("one clip per prompt, no diversity", one_per_prompt),
    ):
        references.append(dict(sampler=name, steps=None, **metrics.score(clips, labels, directions)))
    ref_acc = metrics.score(reference.frames, labels, directions)["accuracy"]
    print(f"classifier: per-frame accuracy on real {split} clips {ref_acc:.3f}")
    prompts = [video_caption(y, d) for y, d in zip(labels, directions)]
    rows = samplers(teacher, students, guidance, teacher_steps, names)
    results = sample_rows(rows, prompts, shape, batch_size, lambda clips: metrics.score(clips, labels, directions))
    return dict(results=results, references=references, real_clip_accuracy=ref_acc)


def sample_rows(rows, prompts: list[str], shape: dict, batch_size: int, score) -> list[dict]:
    """Each (sampler, pipeline, steps, guidance) row sampled on ``prompts`` (seed i for prompt i), scored by
    ``score(gray clips) -> dict``, with its seconds per clip."""
    results = []
    for name, pipe, steps, g in rows:
        # WanPipeline passes no generator to scheduler.step: a few-step (LCM) sampler re-noises from the global
        # RNG. Seeded per row, a row's clips do not depend on which rows ran before it (4-step FD moved ~0.4)
        torch.manual_seed(0)
        start = time.perf_counter()
        frames = sample_frames(
            pipe, prompts, range(len(prompts)), steps=steps, guidance_scale=g, batch_size=batch_size, **shape
        )
        sec = (time.perf_counter() - start) / len(prompts)
        row = dict(sampler=name, steps=steps, **score(to_gray_clips(frames)))
        results.append(dict(row, sec_per_sample=sec))
        print(
            f"{name}, {steps} step{'s' if steps > 1 else ''}: {row_summary(row)}  {sec * 1000:.1f} ms/clip", flush=True
        )
    return results


def markdown_table(rows: list[dict]) -> list[str]:
    """The benchmark's table lines (HEADER, then one line per result or reference row)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return lines + ["| " + " | ".join(row_cells(r)) + " |" for r in rows]


def row_cells(r: dict) -> list[str]:
    """A result or reference row's table cells: sampler, steps, digit / motion accuracy, FD, s / clip."""
    sec = f"{r['sec_per_sample']:.4f}" if "sec_per_sample" in r else "-"
    acc, motion = f"{100 * r['accuracy']:.1f}%", f"{100 * r['motion_accuracy']:.1f}%"
    return [r["sampler"], str(r["steps"] or "-"), acc, motion, f"{r['fd']:.2f}", sec]


HEADER = ["sampler", "steps", "digit acc.", "motion acc.", "FD", "s / clip"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="models/digits-video-wan")
    p.add_argument("--student", action="append", help="a student export (repeatable); default outputs/demo/run/export")
    p.add_argument("--split", choices=["validation", "test"], default="test", help="the real clips FD compares with")
    p.add_argument("--teacher-guidance", type=float, default=None, help="default: the first student's DMD guidance")
    p.add_argument("--teacher-steps", type=int, nargs="+", default=list(TEACHER_STEPS))
    p.add_argument("--num-samples", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--train-clips", type=int, default=4000, help="training-digit clips the classifier learns from")
    p.add_argument("--json", default="outputs/benchmarks/quality.json")
    a = p.parse_args(argv)
    students = [s for s in (a.student or ["outputs/demo/run/export"]) if Path(s, "model_index.json").exists()]
    if a.teacher_guidance is None:  # compare like with like: the teacher at the guidance the student learned
        a.teacher_guidance = teacher_guidance(students[0] if students else None)
    measured = measure(
        a.teacher,
        students,
        split=a.split,
        num_samples=a.num_samples,
        guidance=a.teacher_guidance,
        teacher_steps=a.teacher_steps,
        batch_size=a.batch_size,
        train_clips=a.train_clips,
    )
    results, references = measured["results"], measured["references"]
    targets = check_targets(results, a.teacher_guidance)
    print("\n".join(markdown_table(results + references) + [""] + targets))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    report = dict(
        teacher=a.teacher,
        students=students,
        split=a.split,
        num_samples=a.num_samples,
        teacher_guidance=a.teacher_guidance,
        real_clip_accuracy=measured["real_clip_accuracy"],
        results=results,
        references=references,
        targets=targets,
    )
    Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def row_summary(row: dict) -> str:
    return f"acc {row['accuracy']:.3f}  motion {row['motion_accuracy']:.3f}  FD {row['fd']:8.3f}"


if __name__ == "__main__":
    sys.exit(main())
