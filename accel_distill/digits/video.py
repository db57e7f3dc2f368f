"""Moving digits: 9-frame clips of one scikit-learn digit crossing a 16x16 frame in a captioned direction.

Each clip takes one 8x8 digit of a split (``data.load_split``: the "train", "validation" and
"test" digits are disjoint, fixed by seed) and moves it left, right, up or down at one
pixel per frame from one edge of the frame to the other; where it sits across the motion
is random and not captioned (with the handwriting: several modes per prompt, so the
flow is not straight). The caption names digit and direction:
"the digit 3 moves left". ``write_clips`` writes GIF + caption files (GIF is lossless
for grey frames and is one of the video formats ``preprocess videos`` decodes with PyAV).

``make_clips(..., digits_per_clip=2)``: two digits per clip (``TwoDigitClips``), placed across the
motion -- stacked (rows 0-7 / 8-15) when moving left or right, side by side (columns 0-7 / 8-15) when
moving up or down -- and moving together from one edge to the other. Which digit takes the first
slot (top / left) is random and not captioned: "the digits A and B move DIRECTION" with A <= B.
Each prompt then has two well-separated modes (issue 12: a few-step sampler must choose one early).

``centroids`` / ``motion_direction`` invert the motion (the benchmark's motion accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from accel_distill.digits.data import DigitSplit
from accel_distill.preprocess.media import resize_center_crop, to_model_input

NUM_FRAMES = 9  # Wan's 4k+1: 3 latent frames with the VAE's temporal factor 4
FRAME_SIZE = 16  # 4x4 latents with the video VAE's spatial factor 4
DIGIT_SIZE = 8  # sklearn's own resolution
FPS = 10
SPEEDS = (1,)  # pixels per frame (a tuple: drawn per clip, not captioned); 8 px of travel in 9 frames
DIRECTIONS = ("left", "right", "up", "down")
STEP = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx) per frame at speed 1
VIDEO_WORDS = ["the", "digit", "moves", *DIRECTIONS]
TWO_DIGIT_WORDS = ["digits", "and", "move"]  # the two-digit captions' words beyond VIDEO_WORDS


def video_caption(label: int, direction: int) -> str:
    """ "the digit N moves DIRECTION" for digit ``label`` and ``DIRECTIONS[direction]``."""
    return f"the digit {int(label)} moves {DIRECTIONS[int(direction)]}"


def two_digit_caption(labels, direction: int) -> str:
    """ "the digits A and B move DIRECTION", A <= B: the pair, not which digit sits where."""
    a, b = sorted(int(y) for y in labels)
    return f"the digits {a} and {b} move {DIRECTIONS[int(direction)]}"


@dataclass
class Clips:
    frames: np.ndarray  # [N, F, H, W] uint8 grey
    labels: np.ndarray  # [N] the digit
    directions: np.ndarray  # [N] index into DIRECTIONS
    speeds: np.ndarray  # [N] pixels per frame
    digit_indices: np.ndarray  # [N] rows of sklearn's load_digits

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index) -> Clips:
        """The clips at ``index`` (a slice or index array), as ``Clips``."""
        return type(self)(
            *(
                np.asarray(a)[index]
                for a in (self.frames, self.labels, self.directions, self.speeds, self.digit_indices)
            )
        )

    @property
    def captions(self) -> list[str]:
        return [video_caption(y, d) for y, d in zip(self.labels, self.directions)]

    def rgb(self) -> torch.Tensor:
        """[N, F, H, W, 3] uint8: what a GIF of the clip decodes to."""
        return torch.from_numpy(np.repeat(self.frames[..., None], 3, axis=-1))

    def pixels(self) -> torch.Tensor:
        """[N, 3, F, H, W] in [-1, 1]: the model's input, exactly as ``preprocess videos`` makes it."""
        return to_model_input(self.rgb())


@dataclass
class TwoDigitClips(Clips):
    """Two digits per clip: ``labels`` / ``digit_indices`` are [N, 2], slot order (top or left first)."""

    @property
    def captions(self) -> list[str]:
        return [two_digit_caption(y, d) for y, d in zip(self.labels, self.directions)]


def sprites(split: DigitSplit, size: int = DIGIT_SIZE) -> np.ndarray:
    """[N, size, size] uint8: the split's digits scaled as ``preprocess videos`` scales an image."""
    return resize_center_crop(split.raw, size, size)[..., 0].numpy()


def _pick_digits(rng, split_labels: np.ndarray, shape: tuple[int, ...], labels=None) -> np.ndarray:
    """Rows of the split (int64, ``shape``): any digit, or one of digit ``labels`` (that shape) each."""
    if labels is None:
        return rng.integers(len(split_labels), size=shape)
    pools = {y: np.flatnonzero(split_labels == y) for y in range(10)}
    flat = [rng.choice(pools[int(y)]) for y in np.asarray(labels).reshape(-1)]
    return np.array(flat, dtype=np.int64).reshape(shape)


def make_clips(
    split: DigitSplit,
    n: int,
    *,
    seed: int = 0,
    labels: np.ndarray | None = None,
    directions: np.ndarray | None = None,
    num_frames: int = NUM_FRAMES,
    size: int = FRAME_SIZE,
    digit_size: int = DIGIT_SIZE,
    speeds: tuple[int, ...] = SPEEDS,
    digits_per_clip: int = 1,
) -> Clips:
    """``n`` clips of the split's digits; ``labels`` / ``directions`` fix what each clip shows (else drawn).

    ``digits_per_clip=2``: ``TwoDigitClips`` (``make_two_digit_clips``; ``labels`` then [N, 2] pairs).
    """
    if digits_per_clip == 2:
        return make_two_digit_clips(split, n, seed=seed, labels=labels, directions=directions, num_frames=num_frames)
    if digits_per_clip != 1:
        raise ValueError(f"digits_per_clip must be 1 or 2, not {digits_per_clip}")
    rng = np.random.default_rng(seed)
    pics = sprites(split, digit_size)
    split_labels = split.labels.numpy()
    d = pics.shape[-1]
    pick = _pick_digits(rng, split_labels, (n,), labels)
    dirs = rng.integers(len(DIRECTIONS), size=n) if directions is None else np.asarray(directions, dtype=np.int64)
    speed = rng.choice(np.asarray(speeds), size=n)
    frames = np.zeros((n, num_frames, size, size), dtype=np.uint8)
    room = size - d
    for k in range(n):
        dy, dx = STEP[DIRECTIONS[dirs[k]]]
        travel = int(speed[k]) * (num_frames - 1)
        if travel > room:
            raise ValueError(f"speed {speed[k]} moves {travel} px in {num_frames} frames; only {room} fit")
        start = []
        for step in (dy, dx):  # along the motion: the whole path stays inside; across it: anywhere
            lo, hi = (travel, room) if step < 0 else (0, room - travel) if step > 0 else (0, room)
            start.append(int(rng.integers(lo, hi + 1)))
        for f in range(num_frames):
            y, x = start[0] + dy * speed[k] * f, start[1] + dx * speed[k] * f
            frames[k, f, y : y + d, x : x + d] = pics[pick[k]]
    return Clips(frames, split_labels[pick], dirs, speed, split.indices[pick])


def make_two_digit_clips(
    split: DigitSplit,
    n: int,
    *,
    seed: int = 0,
    labels: np.ndarray | None = None,
    directions: np.ndarray | None = None,
    num_frames: int = NUM_FRAMES,
) -> TwoDigitClips:
    """``n`` clips of two of the split's digits crossing the 16x16 frame side by side across the motion.

    ``labels``: [n, 2] digit pairs (either order; else drawn); the slot order is drawn per clip.
    """
    rng = np.random.default_rng(seed)
    pics = sprites(split, DIGIT_SIZE)
    split_labels = split.labels.numpy()
    size, d = FRAME_SIZE, DIGIT_SIZE
    pick = _pick_digits(rng, split_labels, (n, 2), labels)
    swap = rng.integers(2, size=n).astype(bool)  # the uncaptioned arrangement
    pick[swap] = pick[swap][:, ::-1]
    dirs = rng.integers(len(DIRECTIONS), size=n) if directions is None else np.asarray(directions, dtype=np.int64)
    if (num_frames - 1) > size - d:
        raise ValueError(f"{num_frames} frames at 1 px per frame do not fit {size - d} px of travel")
    frames = np.zeros((n, num_frames, size, size), dtype=np.uint8)
    for k in range(n):
        dy, dx = STEP[DIRECTIONS[dirs[k]]]
        for f in range(num_frames):
            along = (size - d) * (dy < 0 or dx < 0) + (dy + dx) * f  # from the edge it leaves
            for slot in range(2):
                y, x = (slot * d, along) if dy == 0 else (along, slot * d)
                frames[k, f, y : y + d, x : x + d] = pics[pick[k, slot]]
    return TwoDigitClips(frames, split_labels[pick], dirs, np.ones(n, dtype=np.int64), split.indices[pick])


def halves(frames: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """[N, F, H, W] -> [N, 2, F, H, W]: each frame with only one half across the motion kept (the other
    zeroed): top then bottom for left / right motion, left then right for up / down; ``crops`` of each
    half cut its digit around its own centroid (the two-digit benchmark)."""
    out = np.zeros((len(frames), 2, *frames.shape[1:]), dtype=frames.dtype)
    mid = frames.shape[-1] // 2
    for k, direction in enumerate(np.asarray(directions)):
        dy, _ = STEP[DIRECTIONS[int(direction)]]
        if dy == 0:  # horizontal motion: stacked digits
            out[k, 0, :, :mid], out[k, 1, :, mid:] = frames[k, :, :mid], frames[k, :, mid:]
        else:
            out[k, 0, ..., :mid], out[k, 1, ..., mid:] = frames[k, ..., :mid], frames[k, ..., mid:]
    return out


def write_clips(clips: Clips, folder: Path, limit: int | None = None) -> Path:
    """``clip-NNNNN.gif`` + ``clip-NNNNN.txt`` (caption) pairs: a folder ``preprocess videos`` reads."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    captions = clips.captions
    n = len(clips) if limit is None else min(limit, len(clips))
    for k in range(n):
        stem = folder / f"clip-{k:05d}"
        images = [Image.fromarray(f) for f in clips.frames[k]]
        images[0].save(stem.with_suffix(".gif"), save_all=True, append_images=images[1:], duration=1000 // FPS, loop=0)
        stem.with_suffix(".txt").write_text(captions[k] + "\n")
    return folder


def to_gray_clips(frames: np.ndarray) -> np.ndarray:
    """WanPipeline ``output_type="np"`` frames [N, F, H, W, 3] in [0, 1] -> [N, F, H, W] uint8."""
    return (np.clip(np.asarray(frames).mean(-1), 0, 1) * 255).round().astype(np.uint8)


def centroids(frames: np.ndarray) -> np.ndarray:
    """[..., H, W] uint8 -> [..., 2] ink-weighted (y, x) centre of each frame (the frame centre if blank)."""
    w = frames.astype(np.float64)
    h, wd = w.shape[-2:]
    total = w.sum((-2, -1))
    ys, xs = np.arange(h, dtype=np.float64), np.arange(wd, dtype=np.float64)
    cy = (w.sum(-1) * ys).sum(-1) / np.maximum(total, 1e-9)
    cx = (w.sum(-2) * xs).sum(-1) / np.maximum(total, 1e-9)
    blank = total <= 0
    cy[blank], cx[blank] = (h - 1) / 2, (wd - 1) / 2
    return np.stack([cy, cx], -1)


def motion_direction(frames: np.ndarray) -> np.ndarray:
    """[N, F, H, W] -> [N] index into DIRECTIONS: the one the centroid moved furthest along, first to last frame."""
    c = centroids(frames)
    moved = c[:, -1] - c[:, 0]  # (dy, dx)
    units = np.array([STEP[d] for d in DIRECTIONS], dtype=np.float64)
    return np.argmax(moved @ units.T, axis=1)


def crops(frames: np.ndarray, size: int = DIGIT_SIZE) -> np.ndarray:
    """[..., H, W] -> [..., size, size]: each frame cut around its centroid (zero padded), for the classifier."""
    lead = frames.shape[:-2]
    flat = frames.reshape(-1, *frames.shape[-2:])
    c = np.rint(centroids(flat) - (size - 1) / 2).astype(np.int64)
    pad = np.pad(flat, ((0, 0), (size, size), (size, size)))
    out = np.stack([pad[k, y + size : y + 2 * size, x + size : x + 2 * size] for k, (y, x) in enumerate(c)])
    return out.reshape(*lead, size, size)
