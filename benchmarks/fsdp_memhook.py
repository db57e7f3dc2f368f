"""Per-process host-memory (RSS) report of one training run, by phase (benchmarks only).

``install()`` wraps, without changing what they do, the places a run passes through:
``builder.load_bundle`` (model loading + sharding + optimizer/prepare), ``Trainer.step``
(forward, backward, clip, AdamW), ``CheckpointManager.save`` and ``run.export``. At each
boundary it reads the kernel's peak RSS of the process (``VmHWM``), then resets it
(``/proc/self/clear_refs`` 5), so every phase gets its own peak. At exit each process
writes ``{MEM_REPORT}.rank{RANK}.json``:

* ``baseline_rss``: RSS just before the models load (torch, accelerate, the process
  group, the data stream: the same in every run, and not what sharding saves), and
  ``baseline_split``: its anonymous / file-backed parts;
* ``peaks``: peak RSS of each phase (``load``, ``setup``, ``train``, ``between``,
  ``checkpoint``, ``export``, ``end``), bytes; ``rss_at_end``: RSS as each phase ended
  (``file_rss_at_end``: its file-backed part, e.g. mmapped safetensors);
* ``sampled_peaks`` (with ``MEM_SAMPLE_MS``: a thread reads ``/proc/self/status`` every
  that many ms): per phase, the highest anonymous (``RssAnon``: tensors, heap) and
  file-backed (``RssFile``: mmapped files such as safetensors weights, shared page cache)
  RSS seen -- sampled, so a short spike can be missed;
* ``seconds``: wall time of each phase (``startup``: from the hook's install);
* ``ru_maxrss_start``: ``getrusage`` peak when the hook was installed (imports).

Linux only. Used by ``tests/launch/fsdp_cpu.py`` (FSDP runs, when ``MEM_REPORT`` is set)
and ``benchmarks/fsdp_single.py`` (the one-process run).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import resource
import threading
import time


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss() -> int:
    """Current resident set size, bytes."""
    return _status_kb("VmRSS") * 1024


def hwm() -> int:
    """Peak resident set size since start or the last reset, bytes."""
    return _status_kb("VmHWM") * 1024


def reset_peak() -> bool:
    """Reset VmHWM (and getrusage's max RSS) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PhaseTracker:
    """Peak RSS per named phase; ``enter(name)`` closes the current phase."""

    def __init__(self) -> None:
        self.phase = "startup"
        self.peaks: dict[str, int] = {}
        self.rss_at_end: dict[str, int] = {}
        self.file_rss_at_end: dict[str, int] = {}
        self.baseline_rss: int | None = None
        self.baseline_split: dict[str, int] = {}
        self.resettable = True
        self.seconds: dict[str, float] = {}  # wall time spent in each phase
        self.since = time.perf_counter()
        self.sampled: dict[str, dict[str, int]] = {}  # phase -> {"anon": max RssAnon, "file": max RssFile}

    def enter(self, name: str) -> None:
        peak = hwm()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), peak)
        self.rss_at_end[self.phase] = rss()
        self.file_rss_at_end[self.phase] = _status_kb("RssFile") * 1024
        self.resettable = reset_peak() and self.resettable
        now = time.perf_counter()
        self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + now - self.since
        self.phase, self.since = name, now

    def report(self) -> dict:
        self.enter("done")
        return {
            "baseline_rss": self.baseline_rss,
            "baseline_split": self.baseline_split,
            "peaks": {k: v for k, v in self.peaks.items() if k != "done"},
            "rss_at_end": {k: v for k, v in self.rss_at_end.items() if k != "done"},
            "file_rss_at_end": {k: v for k, v in self.file_rss_at_end.items() if k != "done"},
            "per_phase": self.resettable,  # False: each peak is the running peak since process start
            "sampled_peaks": self.sampled,
            "seconds": {k: v for k, v in self.seconds.items() if k != "done"},
            "ru_maxrss_start": START_MAXRSS,
            "pid": os.getpid(),
        }


START_MAXRSS = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
TRACKER = PhaseTracker()


def _sample(tracker: PhaseTracker, every_s: float) -> None:
    while True:
        with open("/proc/self/status") as f:
            kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("RssAnon", "RssFile")}
        peaks = tracker.sampled.setdefault(tracker.phase, {"anon": 0, "file": 0})
        peaks["anon"] = max(peaks["anon"], kb["RssAnon"] * 1024)
        peaks["file"] = max(peaks["file"], kb["RssFile"] * 1024)
        time.sleep(every_s)


def _around(obj, attr: str, phase: str, after: str, *, before_hook=None) -> None:
    original = getattr(obj, attr)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        if before_hook is not None:
            before_hook()
        TRACKER.enter(phase)
        try:
            return original(*args, **kwargs)
        finally:
            TRACKER.enter(after)

    setattr(obj, attr, wrapped)


def install(path: str | None = None) -> None:
    """Track this process's RSS by phase and write the report at exit (see module doc)."""
    import accel_distill.builder as builder
    import accel_distill.run as run
    from accel_distill.checkpoint import CheckpointManager
    from accel_distill.trainer import Trainer

    path = path or os.environ["MEM_REPORT"]
    if os.environ.get("MEM_SAMPLE_MS"):  # also sample the anonymous / file-backed split of RSS
        every_s = float(os.environ["MEM_SAMPLE_MS"]) / 1000
        threading.Thread(target=_sample, args=(TRACKER, every_s), daemon=True).start()

    def baseline() -> None:
        TRACKER.baseline_rss = rss()
        TRACKER.baseline_split = {"anon": _status_kb("RssAnon") * 1024, "file": _status_kb("RssFile") * 1024}

    _around(builder, "load_bundle", "load", "setup", before_hook=baseline)
    _around(Trainer, "step", "train", "between")
    _around(CheckpointManager, "save", "checkpoint", "between")
    _around(run, "export", "export", "end")

    def write() -> None:
        rank = int(os.environ.get("RANK", "0"))
        with open(f"{path}.rank{rank}.json", "w") as f:
            json.dump(TRACKER.report(), f)

    atexit.register(write)
