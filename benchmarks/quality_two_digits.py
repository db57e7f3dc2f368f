"""Quality of a two-digit moving-digits teacher (issue 12, plan B): does few-step sampling fall behind?

    python benchmarks/quality_two_digits.py --teacher outputs/exp/two_digits/teacher_run/export --split validation

Clips of ``make_clips(..., digits_per_clip=2)``: two digits across the motion, which one sits on top
/ left not captioned ("the digits A and B move DIRECTION", A <= B). Prompts cycle through the 220
captions (sample i: pair i % 55, direction (i // 55) % 4, seed i). The metrics are
benchmarks/quality.py's in a two-digit form (its ``Classifier``, ``frechet_distance``, samplers):

- ``accuracy``: per frame, each half across the motion (``halves``: top / bottom for left / right
  motion, left / right for up / down -- the motion read from the clip) is cut around its own ink
  centroid and classified; a frame is right when the unordered pair of predictions is the caption's;
- ``motion_accuracy``: the whole-frame ink centroid's direction, as in quality.py;
- ``fd``: Fréchet distance on clip features: both halves' classifier features averaged over frames
  (first half first), plus the centroid track; appearance and motion blocks each scaled to unit spread
  on the real ``--split`` clips.

Reference rows: real clips of the training digits, one clip per prompt (no diversity) and the
teacher's VAE reconstruction of other real ``--split`` clips (the ceiling a sampler's decode allows).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accel_distill.digits.data import load_split  # noqa: E402
from accel_distill.digits.sample import clip_shape  # noqa: E402
from accel_distill.digits.video import (  # noqa: E402
    DIRECTIONS,
    centroids,
    crops,
    halves,
    make_clips,
    motion_direction,
    to_gray_clips,
    two_digit_caption,
)
from benchmarks.quality import (  # noqa: E402
    Classifier,
    ClipMetrics,
    check_targets,
    frechet_distance,
    markdown_table,
    row_summary,
    sample_rows,
    samplers,
)

PAIRS = np.array([(a, b) for a in range(10) for b in range(a, 10)])  # the 55 captioned pairs, A <= B
TEACHER_STEPS = (50, 8, 4, 2)


def prompt_mix(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample i's digit pair [n, 2] and direction [n]: every (pair, direction) equally often."""
    i = np.arange(n)
    return PAIRS[i % len(PAIRS)], (i // len(PAIRS)) % len(DIRECTIONS)


class TwoDigitMetrics(ClipMetrics):
    """Pair / motion accuracy and clip features: classifier fitted on the halves of training clips.

    quality.py's ``ClipMetrics`` with its classifier, features and score in two-digit form (its
    ``features``, the scaled ``_raw``, is inherited).
    """

    def __init__(self, train_clips, reference: np.ndarray, seed: int = 0):
        # not ClipMetrics.__init__: that fits the one-digit classifier on whole frames
        h = halves(train_clips.frames, train_clips.directions)  # [N, 2, F, H, W]
        n, _, f = h.shape[:3]
        pick = np.random.default_rng(seed).integers(f, size=n)  # one random frame per clip, both halves
        one = h[np.arange(n), :, pick]  # [N, 2, H, W]
        self.clf = Classifier(crops(one).reshape(2 * n, -1), np.asarray(train_clips.labels).reshape(-1), seed)
        raw = self._raw(reference)
        self.mean, self.scale = raw.mean(0), np.ones(raw.shape[1])
        look = 2 * self.clf.mlp.coefs_[0].shape[1]  # both halves' appearance, then motion: each to unit spread
        for block in (slice(0, look), slice(look, None)):
            self.scale[block] = max(float(raw[:, block].std(0).mean()), 1e-6)
        self.reference = self.features(reference)

    def _half_crops(self, clips: np.ndarray) -> np.ndarray:
        """[N, F, H, W] -> [N * 2 * F, 64]: each frame's halves across its own motion, cut around their centroids."""
        return crops(halves(clips, motion_direction(clips))).reshape(-1, 64)

    def _raw(self, clips: np.ndarray) -> np.ndarray:
        n, f = clips.shape[:2]
        look = self.clf.features(self._half_crops(clips)).reshape(n, 2, f, -1).mean(2).reshape(n, -1)
        c = centroids(clips)
        motion = np.concatenate([(c[:, 1:] - c[:, :1]).reshape(n, -1), c[:, 0]], 1)
        return np.concatenate([look, motion], 1)

    def score(self, clips: np.ndarray, pairs: np.ndarray, directions: np.ndarray) -> dict[str, float]:
        n, f = clips.shape[:2]
        pred = np.sort(self.clf.predict(self._half_crops(clips)).reshape(n, 2, f), axis=1)  # unordered pair
        right = (pred == np.sort(pairs, axis=1)[:, :, None]).all(1)
        return dict(
            accuracy=float(right.mean()),
            motion_accuracy=float((motion_direction(clips) == directions).mean()),
            fd=frechet_distance(self.features(clips), self.reference),
        )


@torch.no_grad()
def vae_roundtrip(teacher: str, clips) -> np.ndarray:
    """[N, F, H, W] uint8: ``clips`` encoded (posterior mean) and decoded by the teacher's VAE."""
    from diffusers import AutoencoderKLWan

    from accel_distill.digits.vae import decode, encode_mean

    vae = AutoencoderKLWan.from_pretrained(Path(teacher) / "vae")
    rec = decode(vae, encode_mean(vae, clips.pixels()))  # [N, 3, F, H, W] in [-1, 1]
    return to_gray_clips((rec.permute(0, 2, 3, 4, 1).numpy() + 1) / 2)


def measure(teacher: str, *, split: str, num_samples: int, guidance: float, steps, batch_size: int, train_clips: int):
    """The teacher's rows at ``steps`` and the reference rows."""
    torch.manual_seed(0)
    shape = clip_shape(teacher)
    pairs, directions = prompt_mix(num_samples)
    kw = dict(num_frames=shape["num_frames"], digits_per_clip=2)
    train = load_split("train")
    fit = make_clips(train, train_clips, seed=101, **kw)
    reference = make_clips(load_split(split), num_samples, seed=102, labels=pairs, directions=directions, **kw)
    metrics = TwoDigitMetrics(fit, reference.frames)
    real_train = make_clips(train, num_samples, seed=103, labels=pairs, directions=directions, **kw)
    other = make_clips(load_split(split), num_samples, seed=104, labels=pairs, directions=directions, **kw)
    references = []
    for name, clips in (
        ("real clips, training digits", real_train.frames),
        ("one clip per prompt, no diversity", real_train.frames[np.arange(num_samples) % (len(PAIRS) * 4)]),
        (f"teacher VAE reconstruction of other real {split} clips", vae_roundtrip(teacher, other)),
    ):
        references.append(dict(sampler=name, steps=None, **metrics.score(clips, pairs, directions)))
        print(f"{name}: {row_summary(references[-1])}", flush=True)
    ref_acc = metrics.score(reference.frames, pairs, directions)["accuracy"]
    print(f"classifier: per-frame pair accuracy on real {split} clips {ref_acc:.3f}", flush=True)
    prompts = [two_digit_caption(p, d) for p, d in zip(pairs, directions)]
    rows = samplers(teacher, [], guidance, steps)
    results = sample_rows(rows, prompts, shape, batch_size, lambda clips: metrics.score(clips, pairs, directions))
    return dict(results=results, references=references, real_clip_accuracy=ref_acc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="outputs/exp/two_digits/teacher_run/export")
    p.add_argument("--split", choices=["validation", "test"], default="validation")
    p.add_argument("--teacher-guidance", type=float, default=2.0)
    p.add_argument("--teacher-steps", type=int, nargs="+", default=list(TEACHER_STEPS))
    p.add_argument("--num-samples", type=int, default=440, help="two of each of the 220 prompts")
    p.add_argument("--batch-size", type=int, default=220)
    p.add_argument("--train-clips", type=int, default=4000, help="training-digit clips the classifier learns from")
    p.add_argument("--json", default="outputs/benchmarks/quality_two_digits.json")
    a = p.parse_args(argv)
    measured = measure(
        a.teacher,
        split=a.split,
        num_samples=a.num_samples,
        guidance=a.teacher_guidance,
        steps=a.teacher_steps,
        batch_size=a.batch_size,
        train_clips=a.train_clips,
    )
    rows = measured["results"] + measured["references"]
    targets = check_targets(measured["results"], a.teacher_guidance)
    print("\n".join(markdown_table(rows) + [""] + targets))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    report = dict(vars(a), **measured, targets=targets)
    Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
