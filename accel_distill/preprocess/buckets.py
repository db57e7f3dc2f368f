"""Several target sizes: each input goes to the size that fits it best (as finetrainers / musubi-tuner bucket).

``--sizes 480x832,832x480,624x624`` and ``--num-frames 81,49,17``: an input's
resolution is the listed size whose aspect ratio is closest to the input's (on a log
scale, so 2:1 and 1:2 are as far from 1:1), ties going to the size whose area is
closest to the input's; a video's length is the longest listed frame count it can
supply at the sampling fps (shorter than all of them: skipped as "too short"); an
image is one frame. Every (size, length) pair is a latent shape, i.e. one bucket of
the training reader, which batches each bucket on its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Targets:
    sizes: tuple[tuple[int, int], ...]  # (height, width)
    frame_counts: tuple[int, ...]  # descending

    @classmethod
    def of(cls, sizes: Sequence[tuple[int, int]], frame_counts: Sequence[int]) -> Targets:
        if not sizes or not frame_counts:
            raise ValueError("need at least one size and one frame count")
        return cls(
            tuple(dict.fromkeys((int(h), int(w)) for h, w in sizes)), tuple(sorted(set(frame_counts), reverse=True))
        )

    def size_for(self, height: int, width: int) -> tuple[int, int]:
        """The listed (height, width) closest in aspect ratio to ``height x width``, then in area."""
        aspect, area = math.log(width / height), math.log(width * height)
        return min(
            self.sizes, key=lambda s: (round(abs(math.log(s[1] / s[0]) - aspect), 9), abs(math.log(s[0] * s[1]) - area))
        )

    def frames_for(self, available: int) -> int | None:
        """The longest listed frame count not above ``available`` (None: shorter than every one)."""
        return next((n for n in self.frame_counts if n <= available), None)

    @property
    def max_frames(self) -> int:
        return self.frame_counts[0]

    @property
    def min_frames(self) -> int:
        return self.frame_counts[-1]


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"480x832,832x480"`` -> ``[(480, 832), (832, 480)]`` (height x width); ValueError for anything else."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        h, sep, w = part.lower().partition("x")
        if not sep or not h.isdigit() or not w.isdigit() or int(h) < 1 or int(w) < 1:
            raise ValueError(f"expected HEIGHTxWIDTH[,HEIGHTxWIDTH...], got {part!r}")
        out.append((int(h), int(w)))
    if not out:
        raise ValueError("expected HEIGHTxWIDTH[,HEIGHTxWIDTH...]")
    return out
