"""Quality of the digits teacher and its DMD2 student: accuracy, Fréchet distance, time per image.

    python benchmarks/quality.py --teacher models/digits-wan --student outputs/demo/run/export

A small MLP digit classifier is trained on the *training* split only (the split
the teacher and VAE were trained on). For each sampler -- teacher at 50/8/4/1
steps (with the CFG scale the student was distilled against, read from the
export's ``accel_distill_export.json``), the DMD2 student at 4/2/1 steps and the student before
distillation at 4/2/1 steps (the teacher's weights sampled with the student's
scheduler, no CFG) -- it generates ``--num-samples`` images over the 10 prompts with fixed
seeds (sample i: digit i % 10, seed i) through stock ``WanPipeline`` and reports
(a) the classifier's accuracy on the prompted digit, (b) the Fréchet distance
between the classifier's hidden features of the samples and of the held-out real
digits, (c) sampling time per image relative to the teacher at 50 steps.
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

from accel_distill.digits.data import load_split, to_uint8_gray  # noqa: E402
from accel_distill.digits.sample import (  # noqa: E402
    distillation_guidance,
    generate,
    load_pipeline,
    teacher_guidance,
)


class Classifier:
    """sklearn MLP on [0, 1] pixels; features = its hidden layer activations."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, seed: int = 0):
        from sklearn.neural_network import MLPClassifier

        self.mlp = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=600, random_state=seed)
        self.mlp.fit(self._x(images), labels)

    @staticmethod
    def _x(images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1).astype(np.float64) / 255.0

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.mlp.predict(self._x(images))

    def features(self, images: np.ndarray) -> np.ndarray:
        return np.maximum(self._x(images) @ self.mlp.coefs_[0] + self.mlp.intercepts_[0], 0)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = (covmean[0] if isinstance(covmean, tuple) else covmean).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def samplers(teacher: str, student: str | None, guidance: float):
    """(name, pipeline, steps, guidance) for every sampler of the table."""
    t = load_pipeline(teacher)
    rows = [(f"teacher {n} steps (CFG {guidance:g})", t, n, guidance) for n in (50, 8, 4, 1)]
    if student:
        s = load_pipeline(student)
        rows += [(f"DMD2 student {n} step{'s' if n > 1 else ''}", s, n, 1.0) for n in (4, 2, 1)]
        before = load_pipeline(student)
        before.transformer = t.transformer  # the student's initialisation: the teacher's weights
        rows += [(f"student before distillation, {n} step{'s' if n > 1 else ''}", before, n, 1.0) for n in (4, 2, 1)]
        g = distillation_guidance(student)
        if g is not None and g != guidance:  # the teacher at the guidance the student was distilled with
            rows += [(f"teacher {n} steps (CFG {g:g}, the DMD2 guidance)", t, n, g) for n in (50, 4)]
    return rows


def reference_rows(
    clf: Classifier, imgs: np.ndarray, y: np.ndarray, labels: list[int], held_feats: np.ndarray
) -> list[dict]:
    """The metric's scale: real training digits (its floor: sampling noise) and each prompt's
    class-mean training digit (no diversity at all -- what a mode-collapsed sampler would score)."""
    rng = np.random.default_rng(0)
    real = np.stack([imgs[rng.choice(np.flatnonzero(y == d))] for d in labels])  # same digit mix as the samplers
    means = np.stack([imgs[y == d].mean(0) for d in range(10)]).round().astype(np.uint8)[labels]
    rows = []
    for name, x in (("real training digits (reference)", real), ("class-mean digit, no diversity (reference)", means)):
        acc = float((clf.predict(x) == np.array(labels)).mean())
        rows.append(dict(sampler=name, accuracy=acc, fd=frechet_distance(clf.features(x), held_feats)))
        print(f"{name:40s} acc {acc:.3f}  FD {rows[-1]['fd']:8.3f}", flush=True)
    return rows


def check_targets(results: list[dict], guidance: float) -> list[str]:
    """The issue's targets for the 4-step student, against the teacher sampled at ``guidance``."""
    by_name = {r["sampler"]: r for r in results}
    t50 = by_name.get(f"teacher 50 steps (CFG {guidance:g})")
    t4 = by_name.get(f"teacher 4 steps (CFG {guidance:g})")
    s4 = by_name.get("DMD2 student 4 steps")
    if not (t50 and t4 and s4):
        return []
    ratio = s4["fd"] / t50["fd"]
    gap = 100 * (t50["accuracy"] - s4["accuracy"])
    return [
        f"student 4 steps FD / teacher 50 steps FD = {ratio:.2f} (target <= 1.25): {'PASS' if ratio <= 1.25 else 'FAIL'}",
        f"accuracy gap to the teacher at 50 steps = {gap:+.1f} points (target <= 2): {'PASS' if gap <= 2 else 'FAIL'}",
        f"student 4 steps FD {s4['fd']:.2f} vs teacher 4 steps FD {t4['fd']:.2f}: "
        f"{'PASS' if s4['fd'] < t4['fd'] else 'FAIL'} (target: clearly better)",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="models/digits-wan")
    p.add_argument("--student", default="outputs/demo/run/export")
    p.add_argument(
        "--teacher-guidance",
        type=float,
        default=None,
        help="the teacher's CFG scale (default: the guidance the student was distilled against, else 3)",
    )
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--json", default="outputs/benchmarks/quality.json")
    a = p.parse_args(argv)
    torch.manual_seed(0)

    train, held = load_split("train"), load_split("held_out")
    train_imgs, train_y = to_uint8_gray(train.images), train.labels.numpy()
    clf = Classifier(train_imgs, train_y)
    held_imgs = to_uint8_gray(held.images)
    held_feats = clf.features(held_imgs)
    real_acc = float((clf.predict(held_imgs) == held.labels.numpy()).mean())
    print(f"classifier: held-out accuracy {real_acc:.3f}")

    labels = [i % 10 for i in range(a.num_samples)]
    references = reference_rows(clf, train_imgs, train_y, labels, held_feats)

    seeds = list(range(a.num_samples))
    results = []
    student = a.student if Path(a.student, "model_index.json").exists() else None
    if a.teacher_guidance is None:  # compare like with like: the teacher at the guidance the student learned
        a.teacher_guidance = teacher_guidance(student)
    for name, pipe, steps, g in samplers(a.teacher, student, a.teacher_guidance):
        start = time.perf_counter()
        imgs = generate(pipe, labels, seeds, steps=steps, guidance_scale=g, batch_size=a.batch_size)
        sec = (time.perf_counter() - start) / len(labels)
        acc = float((clf.predict(imgs) == np.array(labels)).mean())
        fd = frechet_distance(clf.features(imgs), held_feats)
        results.append(dict(sampler=name, steps=steps, accuracy=acc, fd=fd, sec_per_image=sec))
        print(f"{name:40s} acc {acc:.3f}  FD {fd:8.3f}  {sec * 1000:.1f} ms/img", flush=True)
    base = results[0]["sec_per_image"]
    lines = ["| sampler | accuracy | FD (held-out) | time / image vs teacher 50 |", "|---|---|---|---|"]
    for r in results:
        r["relative_time"] = r["sec_per_image"] / base
        lines.append(f"| {r['sampler']} | {100 * r['accuracy']:.1f}% | {r['fd']:.2f} | {r['relative_time']:.3f}x |")
    lines += [f"| *{r['sampler']}* | {100 * r['accuracy']:.1f}% | {r['fd']:.2f} | - |" for r in references]
    targets = check_targets(results, a.teacher_guidance)
    print("\n".join(lines + [""] + targets))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(
        json.dumps(
            {
                "num_samples": a.num_samples,
                "real_held_out_accuracy": real_acc,
                "results": results,
                "references": references,
                "targets": targets,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
