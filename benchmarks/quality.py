"""Quality of the digits teacher and its DMD2 student: accuracy, Fréchet distance, time per image.

    python benchmarks/quality.py --teacher models/digits-wan --student outputs/demo/run/export

A small MLP digit classifier is trained on the *training* split only (the split
the teacher and VAE were trained on). For each sampler -- teacher at 50/8/4/1
steps (CFG 3), the DMD2 student at 4/2/1 steps and the student before
distillation (the teacher's weights sampled with the student's 4-step scheduler,
no CFG) -- it generates ``--num-samples`` images over the 10 prompts with fixed
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
from accel_distill.digits.sample import generate, load_pipeline  # noqa: E402

TEACHER_GUIDANCE = 3.0


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


def samplers(teacher: str, student: str | None):
    """(name, pipeline, steps, guidance) for every sampler of the table."""
    t = load_pipeline(teacher)
    rows = [(f"teacher {n} steps (CFG {TEACHER_GUIDANCE:g})", t, n, TEACHER_GUIDANCE) for n in (50, 8, 4, 1)]
    if student:
        s = load_pipeline(student)
        rows += [(f"DMD2 student {n} step{'s' if n > 1 else ''}", s, n, 1.0) for n in (4, 2, 1)]
        before = load_pipeline(student)
        before.transformer = t.transformer  # the student's initialisation: the teacher's weights
        rows.append(("student before distillation, 4 steps", before, 4, 1.0))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="models/digits-wan")
    p.add_argument("--student", default="outputs/demo/run/export")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--json", default="outputs/benchmarks/quality.json")
    a = p.parse_args(argv)
    torch.manual_seed(0)

    train, held = load_split("train"), load_split("held_out")
    clf = Classifier(to_uint8_gray(train.images), train.labels.numpy())
    held_imgs = to_uint8_gray(held.images)
    held_feats = clf.features(held_imgs)
    real_acc = float((clf.predict(held_imgs) == held.labels.numpy()).mean())
    train_feats = clf.features(to_uint8_gray(train.images))
    print(
        f"classifier: held-out accuracy {real_acc:.3f}; FD(train real, held-out real) "
        f"{frechet_distance(train_feats, held_feats):.3f}"
    )

    labels = [i % 10 for i in range(a.num_samples)]
    seeds = list(range(a.num_samples))
    results = []
    student = a.student if Path(a.student, "model_index.json").exists() else None
    for name, pipe, steps, g in samplers(a.teacher, student):
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
    print("\n".join(lines))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(
        json.dumps({"num_samples": a.num_samples, "real_held_out_accuracy": real_acc, "results": results}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
