"""Framework overhead of one DMD2 iteration: T_iter / T_parts.

T_iter is the wall time of a full ``Trainer.step()`` on a real runtime (config
file -> ``load_config`` -> ``build_runtime``): next batch from the parquet
stream, host->device move, ``DMD2Method.train_step`` through the adapter, one
backward, grad clipping, the non-finite guard, the AdamW +
LR-scheduler steps and ``zero_grad``.

T_parts is the time of the unavoidable pieces of that same iteration, each
run alone, straight on the same ``torch.nn.Module`` objects with inputs of the
same shapes (no adapter, no method, no trainer, no accelerate):

* student-update iteration: ``k`` student no-grad forwards (simulate-mode rollout
  to exit index ``k``; 0 in data mode), student forward + backward, critic
  no-grad forward, teacher CFG no-grad forward of batch 2B (cond and negative
  halves in one call), critic forward + backward, then for student and critic
  each ``clip_grad_norm_`` + ``AdamW.step`` + ``zero_grad``;
* critic-only iteration: ``k + 1`` student no-grad forwards (rollout + the
  graded step without grad), critic forward + backward, critic clip + AdamW.

The optimizer steps and clipping are counted as parts (they are required work;
their share is shown in its own column). ``k`` is the exit index the iteration
really drew (predicted from a copy of the method's shared generator, checked
afterwards), so each iteration is compared with parts of exactly its own work.

Measurements interleave: each trainer iteration is paired with its own parts,
run right after it or (every other pair of iterations) right before it, and the
rollout modes alternate in blocks, so machine noise and drift hit both sides
alike. The headline is ratio (paired) = median_i T_iter_i / T_parts_i; also
shown: the same with T_parts_i built from each part's median over the whole run
(the "summed medians" definition), and T_iter - T_parts in ms, which does not
shrink with model size the way the ratio does. A last table times framework
pieces (accelerate's optimizer wrapper, LR scheduler, data, non-finite guard,
per-sample noise streams) against plain-torch equivalents to show where the
difference goes.

A run is ``--repeats`` such blocks; runs repeat until two consecutive ones agree
within ``--agree`` on every ratio (at most ``--max-runs``), and the RESULT line is
the median of the runs' ratios. The machine's state (load average, torch threads)
is printed at the start and the end: wall-time ratios from a loaded machine are
not figures. Minor page faults of each iteration and of its parts are counted too:
on the CPU, glibc's malloc returns freed heap tops to the kernel and faults them
in again, which a GPU's caching allocator does not (rerun with
``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` set to see that part go).

Many-threaded CPU runs on a loaded machine inflate every small op (an OpenMP
parallel region waits for a descheduled thread), which hurts the op-rich trainer
side more than the parts; compare with ``--threads 1`` when the box is busy.
Run from the repository root:

    PYTHONPATH=. .venv/bin/python benchmarks/dmd2_overhead.py --size tiny
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.common import (
    SIZES,
    TEXT_DIM,
    TEXT_MAX_LENGTH,
    build_models_and_data,
    build_trainer,
    dmd2_config,
    median,
    timed,
    use_clock,
)
from benchmarks.dmd2_overhead_report import print_tables, result_line
from benchmarks.dmd2_pieces import Pieces

STEPS = (1000.0, 757.0, 522.0)  # tests' 3-step schedule: simulate exit index k in {0, 1, 2}
INTERVAL = 2  # student update on even iterations, critic-only on odd ones


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def machine_state() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"load average (1, 5, 15 min) {load}; torch threads {torch.get_num_threads()}; {os.cpu_count()} CPUs"


def part_counts(kind: str, k: int) -> dict[str, int]:
    if kind == "student":
        return {
            "student_nograd": k,
            "student_fwd_bwd": 1,
            "critic_nograd": 1,
            "teacher_cfg": 1,
            "critic_fwd_bwd": 1,
            "opt_student": 1,
            "opt_critic": 1,
        }
    return {"student_nograd": k + 1, "critic_fwd_bwd": 1, "opt_critic": 1}


class Parts:
    """The model passes of a DMD2 iteration, run alone on the runtime's own modules."""

    def __init__(self, rt, latent_shape: tuple[int, ...], batch_size: int):
        self.acc, self.device = rt.accelerator, rt.method.device
        self.roles = {r: rt.bundle[r] for r in ("student", "teacher", "critic")}
        gen = torch.Generator().manual_seed(0)
        b = batch_size
        self.x = torch.randn((b, *latent_shape), generator=gen).to(self.device)
        self.t = torch.full((b,), 500.0, device=self.device)
        self.cond = torch.randn((b, TEXT_MAX_LENGTH, TEXT_DIM), generator=gen).to(self.device)
        neg = torch.randn((b, TEXT_MAX_LENGTH, TEXT_DIM), generator=gen).to(self.device)
        self.x2, self.t2, self.cond2 = (
            torch.cat([self.x, self.x]),
            torch.cat([self.t, self.t]),
            torch.cat([self.cond, neg]),
        )

    def _forward(self, role: str, x, t, cond) -> torch.Tensor:
        h = self.roles[role]
        with self.acc.autocast():
            return h.transformer(
                hidden_states=x.to(h.dtype), timestep=t, encoder_hidden_states=cond.to(h.dtype), return_dict=False
            )[0]

    def _nograd(self, role: str, x, t, cond) -> None:
        with torch.no_grad():
            self._forward(role, x, t, cond)

    def _fwd_bwd(self, role: str) -> None:
        self._forward(role, self.x, self.t, self.cond).float().square().mean().backward()

    def _opt(self, role: str) -> None:
        h = self.roles[role]
        opt = getattr(h.optimizer, "optimizer", h.optimizer)  # the torch AdamW under accelerate's wrapper
        limit = h.max_grad_norm if h.max_grad_norm is not None else math.inf
        torch.nn.utils.clip_grad_norm_(list(h.transformer.parameters()), limit)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def fn(self, name: str):
        return {
            "student_nograd": lambda: self._nograd("student", self.x, self.t, self.cond),
            "student_fwd_bwd": lambda: self._fwd_bwd("student"),
            "critic_nograd": lambda: self._nograd("critic", self.x, self.t, self.cond),
            "teacher_cfg": lambda: self._nograd("teacher", self.x2, self.t2, self.cond2),
            "critic_fwd_bwd": lambda: self._fwd_bwd("critic"),
            "opt_student": lambda: self._opt("student"),
            "opt_critic": lambda: self._opt("critic"),
        }[name]

    def run(self, kind: str, k: int) -> tuple[dict[str, list[float]], int]:
        """Time every part of one iteration of ``kind``, in the order the iteration runs them; and their faults."""
        out: dict[str, list[float]] = defaultdict(list)
        faults = minor_faults()
        for name, count in part_counts(kind, k).items():
            for _ in range(count):
                out[name].append(timed(self.fn(name), self.device))
        return out, minor_faults() - faults


class Bench:
    """One rollout mode: a runtime, its trainer, its parts and the samples collected so far."""

    def __init__(self, mode: str, root: Path, models: tuple[Path, Path, Path], size: str, prefetch: int):
        student, teacher, data = models
        shape, bs = SIZES[size]["latent_shape"], SIZES[size]["batch_size"]
        cfg = dmd2_config(
            student,
            teacher,
            data,
            root / f"out-{mode}",
            batch_size=bs,
            rollout_mode=mode,
            steps=STEPS,
            interval=INTERVAL,
            prefetch=prefetch,
        )
        self.mode = mode
        self.rt, self.trainer = build_trainer(cfg, root / f"{mode}.yaml")
        self.method = self.rt.method
        self.parts = Parts(self.rt, shape, bs)
        self.reset()

    def reset(self) -> None:
        """Forget the samples (a new run)."""
        # per iteration kind: [(T_iter, k, repeat, T_parts of its own parts, faults iter, faults parts)]
        self.iters: dict[str, list[tuple[float, int, int, float, int, int]]] = defaultdict(list)
        self.part_times: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    def _exit_index(self) -> tuple[int, torch.Generator | None]:
        """The exit index the next simulate rollout will draw (from a copy of the shared generator)."""
        if self.mode != "simulate":
            return 0, None
        m = self.method
        gen = torch.Generator(m.shared_gen.device)
        gen.set_state(m.shared_gen.get_state())
        k = int(torch.randint(len(m.timesteps), (1,), generator=gen, device=m.device))
        return k, gen

    def one(self, repeat: int | None, parts_first: bool = False) -> None:
        """One trainer iteration and, right before or after it, its parts; recorded unless warm-up."""
        kind = "student" if self.method.updates_student(self.trainer.state.iteration) else "critic"
        k, gen = self._exit_index()
        if parts_first:
            parts, parts_faults = self.parts.run(kind, k)
        faults = minor_faults()
        t_iter = timed(self.trainer.step, self.method.device)
        faults = minor_faults() - faults
        if gen is not None and not torch.equal(gen.get_state(), self.method.shared_gen.get_state()):
            raise RuntimeError("the iteration drew from the shared generator differently than predicted")
        if not parts_first:
            parts, parts_faults = self.parts.run(kind, k)
        if repeat is None:
            return
        self.iters[kind].append((t_iter, k, repeat, sum(sum(ts) for ts in parts.values()), faults, parts_faults))
        for name, times in parts.items():
            self.part_times[kind][name] += times

    def summary(self, kind: str) -> dict:
        meds = {n: median(ts) for n, ts in self.part_times[kind].items()}
        t_iter, t_parts, paired, pooled, extra, by_repeat = [], [], [], [], [], defaultdict(list)
        for ti, k, rep, own, _, _ in self.iters[kind]:
            # pooled: this iteration's part counts x the medians over all runs of each part
            tp = sum(c * meds[n] for n, c in part_counts(kind, k).items() if c)
            t_iter.append(ti)
            t_parts.append(own)
            paired.append(ti / own)
            extra.append(ti - own)
            pooled.append(ti / tp)
            by_repeat[rep].append(ti / own)
        opt = sum(meds.get(n, 0.0) for n in ("opt_student", "opt_critic") if n in part_counts(kind, 0))
        rep_ratios = [median(r) for r in by_repeat.values()]
        return {
            "n": len(t_iter),
            "mean_k": sum(it[1] for it in self.iters[kind]) / max(1, len(t_iter)),
            "t_iter": median(t_iter),
            "t_parts": median(t_parts),
            "opt": opt,
            "ratio": median(paired),
            "extra": median(extra),
            "pooled": median(pooled),
            "rep_min": min(rep_ratios),
            "rep_max": max(rep_ratios),
            "faults": median([it[4] for it in self.iters[kind]]),
            "parts_faults": median([it[5] for it in self.iters[kind]]),
            "meds": meds,
        }


def run_once(benches: list[Bench], pieces: Pieces | None, repeats: int, iters: int, n_pieces: int) -> None:
    """One run: ``repeats`` interleaved blocks of ``iters`` iterations per mode, each paired with its parts."""
    for b in benches:
        b.reset()
    for rep in range(repeats):
        for b in benches:
            # Untimed: the first work after the other runtime's block runs cold (caches, freed
            # pages), and every block starts with a student update; keep that out of both sides.
            b.parts.run("student", 0)
            for i in range(iters):
                # ABBA per iteration kind against drift, flipped every repeat
                b.one(rep, parts_first=(i // 2 + rep) % 2 == 1)
        if pieces is not None:
            for _ in range(n_pieces):
                pieces.run()
        print(f"  repeat {rep + 1}/{repeats} done", file=sys.stderr, flush=True)


def ratios(benches: list[Bench]) -> dict[str, float]:
    """``{"<mode>/<iteration>": ratio (paired)}`` of the run just made."""
    return {
        f"{b.mode}/{label.replace(' ', '-')}": b.summary(kind)["ratio"]
        for b in benches
        for kind, label in (("student", "student update"), ("critic", "critic only"))
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--iters", type=int, default=None, help="trainer iterations per mode per repeat (even)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repetitions (blocks per mode) per run")
    p.add_argument("--warmup", type=int, default=4, help="unrecorded iterations (+ parts) per mode first")
    p.add_argument("--modes", default="data,simulate", help="rollout modes, comma-separated")
    p.add_argument("--prefetch", type=int, default=2, help="training.dataloader_num_workers (prefetch depth)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--clock",
        choices=["wall", "thread"],
        default="wall",
        help="thread: this thread's CPU time, steadier on a shared machine (CPU only; needs --prefetch 0 and "
        "--threads 1 so that all the work is on the timed thread)",
    )
    p.add_argument("--pieces", type=int, default=None, help="framework-piece A/B samples per repeat (0: skip)")
    p.add_argument("--agree", type=float, default=0.03, help="stop when two consecutive runs' ratios differ by <= this")
    p.add_argument("--min-runs", type=int, default=2)
    p.add_argument("--max-runs", type=int, default=4)
    a = p.parse_args()
    iters = a.iters if a.iters is not None else {"tiny": 20, "20m": 4}[a.size]
    repeats = a.repeats if a.repeats is not None else {"tiny": 8, "20m": 4}[a.size]
    n_pieces = a.pieces if a.pieces is not None else {"tiny": 4, "20m": 1}[a.size]
    if iters < 2 or iters % 2:
        p.error("--iters must be even (student-update and critic-only iterations alternate)")
    if not 1 <= a.min_runs <= a.max_runs:
        p.error("need 1 <= --min-runs <= --max-runs")
    if a.clock == "thread" and (a.prefetch != 0 or a.threads != 1):
        p.error("--clock thread times this thread only: use it with --prefetch 0 --threads 1")
    use_clock(a.clock)
    torch.set_num_threads(a.threads)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    print(f"machine at start: {machine_state()}; clock {a.clock}", flush=True)

    with tempfile.TemporaryDirectory(prefix="dmd2-overhead-") as tmp:
        root = Path(tmp)
        models = build_models_and_data(root, a.size)
        benches = [Bench(m, root, models, a.size, a.prefetch) for m in modes]
        for b in benches:
            for _ in range(a.warmup):
                b.one(None)
        pieces = Pieces(benches[0]) if n_pieces else None
        runs: list[dict[str, float]] = []
        while len(runs) < a.max_runs:
            print(f"run {len(runs) + 1} (at most {a.max_runs})", file=sys.stderr, flush=True)
            run_once(benches, pieces, repeats, iters, n_pieces)
            runs.append(ratios(benches))
            print(result_line(a.size, runs[-1], f" run {len(runs)}"), flush=True)
            if len(runs) >= a.min_runs and len(runs) >= 2:
                spread = max(abs(runs[-1][n] - runs[-2][n]) for n in runs[-1])
                if spread <= a.agree:
                    break
        print_tables(benches, pieces, a.size, repeats, iters, INTERVAL, len(STEPS))
        spread = max(abs(runs[-1][n] - runs[-2][n]) for n in runs[-1]) if len(runs) > 1 else math.nan
        agreed = "yes" if spread <= a.agree else f"NO (after {a.max_runs} runs: not a figure)"
        print(f"\nruns: {len(runs)}; last two runs differ by at most {spread:.3f} (agree within {a.agree}: {agreed})")
        print(f"machine at end: {machine_state()}")
        finals = {n: median([r[n] for r in runs]) for n in runs[-1]}
        print(result_line(a.size, finals, f" median of {len(runs)} runs"))


if __name__ == "__main__":
    main()
