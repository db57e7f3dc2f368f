"""Reading media: decode a video or an image, sample frames, resize and centre-crop.

Videos are decoded with PyAV (its wheels bundle ffmpeg), images with Pillow. A
video yields ``num_frames`` frames taken *from its start* at the target frame
rate (default: the source's): frame i is the one on screen at
``t0 + i / fps``, so a lower target fps skips frames and a higher one repeats
them. A video that ends before the last of those instants is "too short".
An image is a 1-frame clip. Every frame is scaled (bilinear, antialiased) so
that it covers ``height x width`` and then centre-cropped to exactly that.

Anything wrong with one file raises :class:`MediaError` with a short reason
("unreadable", "too short", ...) and a detail; the caller records it and goes on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .buckets import Targets

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif"})
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})

# Reasons a file is skipped (the keys of the summary's counts).
UNREADABLE = "unreadable"
TOO_SHORT = "too short"
NOT_FOUND = "file not found"
MISSING_CAPTION = "missing caption"
UNSUPPORTED = "unsupported file type"


class MediaError(Exception):
    """One input cannot be used: ``reason`` is one of the constants above, ``detail`` says why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def media_type_of(path: str | Path) -> str | None:
    """``"video"``, ``"image"`` or None (not a supported media file), from the extension."""
    ext = Path(path).suffix.lower()
    return "video" if ext in VIDEO_EXTENSIONS else "image" if ext in IMAGE_EXTENSIONS else None


@dataclass
class Clip:
    """Decoded, resized and cropped frames of one input, with its metadata."""

    frames: torch.Tensor  # uint8 [F, H, W, 3]
    media_type: str
    fps: float | None  # sampling fps (None for images)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])

    @property
    def duration_sec(self) -> float | None:
        return self.num_frames / self.fps if self.fps else None


def to_model_input(frames: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, F, H, W, 3]`` (or ``[F, H, W, 3]``) -> float ``[B, 3, F, H, W]`` in [-1, 1], as diffusers' VideoProcessor."""
    if frames.dim() == 4:
        frames = frames[None]
    return frames.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def resize_center_crop(frames: np.ndarray | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 ``[F, h, w, 3]`` -> uint8 ``[F, height, width, 3]``: scale to cover, then crop the centre."""
    x = torch.as_tensor(frames)
    f, h, w, _ = x.shape
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        y = x.permute(0, 3, 1, 2).float()
        y = torch.nn.functional.interpolate(
            y, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=scale < 1
        )
        x = y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return x[:, top : top + height, left : left + width].contiguous()


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 ``[1, h, w, 3]`` of an image file (EXIF orientation applied)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img.load()  # truncated/corrupt files fail here, not later
            rgb = ImageOps.exif_transpose(img).convert("RGB")
    except FileNotFoundError as e:
        raise MediaError(NOT_FOUND, str(path)) from e
    except Exception as e:  # PIL raises many types for corrupt data (OSError, SyntaxError, ValueError...)
        raise MediaError(UNREADABLE, _describe(e)) from e
    return np.array(rgb)[None]


def _rate(stream) -> Fraction | None:
    for attr in ("average_rate", "guessed_rate", "base_rate"):
        rate = getattr(stream, attr, None)
        if rate:
            return Fraction(rate)
    return None


def read_video(
    path: str | Path, num_frames: int, fps: float | None = None, *, min_frames: int | None = None
) -> tuple[np.ndarray, float]:
    """``num_frames`` RGB frames ``[F, h, w, 3]`` from the start of a video at ``fps`` (default: the source's).

    Returns the frames and the fps they were sampled at; decoding stops as soon as
    the last needed frame is seen. With ``min_frames``, a video that ends earlier gives
    the frames it has, if at least that many (else it is "too short").
    """
    min_frames = num_frames if min_frames is None else min_frames
    import av

    try:
        container = av.open(str(path))
    except FileNotFoundError as e:
        raise MediaError(NOT_FOUND, str(path)) from e
    except Exception as e:
        raise MediaError(UNREADABLE, _describe(e)) from e
    try:
        if not container.streams.video:
            raise MediaError(UNREADABLE, "no video stream")
        stream = container.streams.video[0]
        src_rate = _rate(stream)
        if src_rate is None:
            raise MediaError(UNREADABLE, "unknown frame rate")
        target = float(fps) if fps else float(src_rate)
        frame_dur = 1.0 / float(src_rate)
        eps = 1e-3 * min(frame_dur, 1.0 / target)
        out: list[np.ndarray] = []
        t0: float | None = None
        prev, prev_time, prev_rgb = None, 0.0, None
        decoded = 0

        def take_prev() -> None:
            nonlocal prev_rgb
            if prev_rgb is None:
                prev_rgb = prev.to_ndarray(format="rgb24")
            out.append(prev_rgb)

        try:
            for i, frame in enumerate(container.decode(stream)):
                decoded += 1
                t = frame.time if frame.time is not None else i * frame_dur
                if t0 is None:
                    t0 = t
                # every target instant before this frame's start shows the previous frame
                while prev is not None and len(out) < num_frames and t0 + len(out) / target < t - eps:
                    take_prev()
                if len(out) == num_frames:
                    break
                prev, prev_time, prev_rgb = frame, t, None
        except MediaError:
            raise
        except Exception as e:  # corrupt data in the middle of the stream
            raise MediaError(UNREADABLE, f"after {decoded} frames: {_describe(e)}") from e
        if prev is None:
            raise MediaError(UNREADABLE, "no decodable video frames")
        # the last frame stays on screen for one source frame duration
        while len(out) < num_frames and t0 + len(out) / target < prev_time + frame_dur - eps:
            take_prev()
        if len(out) < min_frames:
            have = len(out)
            raise MediaError(
                TOO_SHORT,
                f"{have} frame(s) at {_fmt(target)} fps ({decoded} decoded, {_fmt(prev_time - t0 + frame_dur)} s), "
                f"need {min_frames}",
            )
        return np.stack(out), target
    finally:
        container.close()


def load_clip(
    path: str | Path,
    *,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    fps: float | None = None,
    targets: Targets | None = None,
) -> Clip:
    """Decode, sample, resize and crop one input; raises :class:`MediaError` for an unusable file.

    The output size is ``height x width`` and ``num_frames``, or with ``targets`` the listed size and
    length that fit the input best (:mod:`.buckets`).
    """
    targets = targets or Targets.of([(height, width)], [num_frames])
    kind = media_type_of(path)
    if kind is None:
        raise MediaError(UNSUPPORTED, Path(path).suffix or "(no extension)")
    if not Path(path).is_file():
        raise MediaError(NOT_FOUND, str(path))
    if kind == "image":
        frames = read_image(path)
        return Clip(resize_center_crop(frames, *targets.size_for(*frames.shape[1:3])), "image", None)
    frames, used_fps = read_video(path, targets.max_frames, fps, min_frames=targets.min_frames)
    frames = frames[: targets.frames_for(len(frames))]
    return Clip(resize_center_crop(frames, *targets.size_for(*frames.shape[1:3])), "video", used_fps)


def _describe(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text}" if type(e).__name__ not in text else text


def _fmt(x: float) -> str:
    return f"{x:.3f}".rstrip("0").rstrip(".") if math.isfinite(x) else str(x)
