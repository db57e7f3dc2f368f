"""Transformer forward passes per DMD2 cycle: ours (measured) vs FastVideo's DMD2 (analytical).

A cycle is ``generator_update_interval`` = K iterations: one student-update
iteration and K - 1 critic-only ones. The student has an n-step schedule and
rolls out in ``simulate`` mode (backward simulation from noise). B = batch rows.

Ours is *counted*: a forward hook on each role's transformer (the module the
trainer calls) records every call and the batch rows it carried, while a real
``Trainer`` runs ``--iters`` iterations of a runtime built from a config file.
The expected values it should match, per cycle:

* student: every iteration draws one exit index k ~ U{0, ..., n-1}, runs the k
  no-grad rollout steps before it (only those) and one graded forward (with grad
  on the update iteration, without on critic-only iterations, whose critic reuses
  nothing else): K * (1 + (n - 1) / 2) calls, B rows each. On the update
  iteration the critic trains on that same (detached) sample: no second rollout.
* teacher: one CFG evaluation on the update iteration, cond and negative halves
  batched into ONE call of 2B rows (g != 1): 1 call, 2B rows.
* critic: one no-grad fake-score forward in the DMD loss + one forward (with
  grad) for its own flow-matching loss every iteration: 1 + K calls, B rows each.

FastVideo's ``DistillationPipeline.train_one_step`` (fastvideo/training/
distillation_pipeline.py) for the same cycle:

* student: ``_generator_multi_step_simulation_forward`` always runs all n - 1
  no-grad steps (``for step_idx in range(max_target_idx)``) whatever exit index
  it drew, then the graded forward: n calls per rollout. It rolls out once for
  the generator loss on the update iteration and once more in
  ``faker_score_forward`` on every iteration (K + 1 rollouts): (K + 1) * n calls.
* teacher: CFG as two separate calls (cond, then uncond) of B rows: 2 calls, 2B rows.
* critic (fake score): once in ``_dmd_forward`` + once per iteration in
  ``faker_score_forward``: 1 + K calls.

Both run the same backward passes (1 student, K critic per cycle), so forward
counts are the whole difference. For K = 5, n = 4: ours 12.5 + 1 + 6 = 19.5
calls (20.5B rows), FastVideo 24 + 2 + 6 = 32 calls (32B rows). Run from the
repository root:

    PYTHONPATH=. .venv/bin/python benchmarks/dmd2_forward_count.py --size tiny
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.common import SIZES, build_models_and_data, build_trainer, dmd2_config, md_table

ROLES = ("student", "teacher", "critic")


def ours_expected(k_interval: int, n: int, guidance: float, mode: str) -> dict[str, tuple[float, float]]:
    """(calls, rows in units of B) per cycle of this library's DMD2."""
    rollout = (n - 1) / 2 if mode == "simulate" else 0.0
    teacher = (1.0, 2.0) if guidance != 1.0 else (1.0, 1.0)
    student = k_interval * (1 + rollout)
    return {"student": (student, student), "teacher": teacher, "critic": (1.0 + k_interval, 1.0 + k_interval)}


def fastvideo_expected(k_interval: int, n: int, guidance: float, mode: str) -> dict[str, tuple[float, float]]:
    """(calls, rows in units of B) per cycle of FastVideo's DMD2 (simulate_generator_forward for 'simulate')."""
    per_rollout = n if mode == "simulate" else 1
    student = (k_interval + 1) * per_rollout
    teacher = (2.0, 2.0) if guidance != 1.0 else (1.0, 1.0)
    return {"student": (student, student), "teacher": teacher, "critic": (1.0 + k_interval, 1.0 + k_interval)}


class Counter:
    """Forward hooks on each of ``roles``' transformers: calls, rows and calls with grad, per cycle."""

    def __init__(self, bundle, roles: Sequence[str] = ROLES):
        self.cycles: list[dict[str, list[int]]] = []
        self.handles = [
            bundle[role].transformer.register_forward_hook(self._hook(role), with_kwargs=True) for role in roles
        ]

    def new_cycle(self) -> None:
        self.cycles.append(defaultdict(lambda: [0, 0, 0]))

    def _hook(self, role: str):
        def hook(module, args, kwargs, output):
            x = kwargs.get("hidden_states", args[0] if args else None)
            c = self.cycles[-1][role]
            c[0] += 1
            c[1] += int(x.shape[0])
            c[2] += int(torch.is_grad_enabled())

        return hook

    def mean(self, role: str, i: int, cycles: list | None = None) -> float:
        cycles = self.cycles if cycles is None else cycles
        return sum(c[role][i] for c in cycles) / len(cycles)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--iters", type=int, default=None, help="iterations per repeat (a multiple of --interval)")
    p.add_argument("--repeats", type=int, default=1, help="consecutive blocks of --iters, each reported")
    p.add_argument("--interval", type=int, default=5, help="generator_update_interval K")
    p.add_argument("--steps", default="1000,750,500,250", help="dmd_denoising_steps (n = their count)")
    p.add_argument("--mode", choices=("simulate", "data"), default="simulate")
    p.add_argument("--guidance", type=float, default=3.0, help="real_score_guidance_scale")
    p.add_argument("--threads", type=int, default=1, help="torch threads (counts do not depend on it)")
    a = p.parse_args()
    k_int = a.interval
    iters = a.iters if a.iters is not None else {"tiny": 40 * k_int, "20m": 8 * k_int}[a.size]
    if iters < k_int or iters % k_int:
        p.error("--iters must be a positive multiple of --interval")
    steps = [float(s) for s in a.steps.split(",")]
    n = len(steps)
    torch.set_num_threads(a.threads)

    with tempfile.TemporaryDirectory(prefix="dmd2-count-") as tmp:
        root = Path(tmp)
        student, teacher, data = build_models_and_data(root, a.size)
        bs = SIZES[a.size]["batch_size"]
        cfg = dmd2_config(
            student,
            teacher,
            data,
            root / "out",
            batch_size=bs,
            rollout_mode=a.mode,
            steps=steps,
            interval=k_int,
            guidance=a.guidance,
        )
        rt, trainer = build_trainer(cfg, root / "run.yaml")
        counter = Counter(rt.bundle)
        blocks = []
        for _ in range(a.repeats):
            start = len(counter.cycles)
            for _ in range(iters):
                if trainer.state.iteration % k_int == 0:
                    counter.new_cycle()
                trainer.step()
            blocks.append(counter.cycles[start:])

    ours = ours_expected(k_int, n, a.guidance, a.mode)
    fv = fastvideo_expected(k_int, n, a.guidance, a.mode)
    n_cycles = len(counter.cycles)
    print(
        f"\n### DMD2 transformer forwards per cycle: K={k_int} iterations per cycle (1 student update), "
        f"{n}-step schedule {steps}, rollout {a.mode}, CFG g={a.guidance}, batch B={bs}, size={a.size}, "
        f"{n_cycles} cycles measured\n"
    )
    rows = []
    tot = {"m_calls": 0.0, "m_rows": 0.0, "e_calls": 0.0, "e_rows": 0.0, "f_calls": 0.0, "f_rows": 0.0}
    for role in ROLES:
        m_calls, m_rows = counter.mean(role, 0), counter.mean(role, 1) / bs
        m_grad = counter.mean(role, 2)
        e_calls, e_rows = ours[role]
        f_calls, f_rows = fv[role]
        for key, v in zip(tot, (m_calls, m_rows, e_calls, e_rows, f_calls, f_rows)):
            tot[key] += v
        rows.append(
            [
                role,
                f"{m_calls:.2f}",
                f"{m_grad:.2f}",
                f"{e_calls:g}",
                f"{m_rows:.2f}",
                f"{f_calls:g}",
                f"{f_rows:g}",
                f"{m_calls / f_calls:.3f}",
            ]
        )
    rows.append(
        [
            "**total**",
            f"**{tot['m_calls']:.2f}**",
            "",
            f"{tot['e_calls']:g}",
            f"**{tot['m_rows']:.2f}**",
            f"**{tot['f_calls']:g}**",
            f"**{tot['f_rows']:g}**",
            f"**{tot['m_calls'] / tot['f_calls']:.3f}**",
        ]
    )
    print(
        md_table(
            [
                "role",
                "ours calls (measured)",
                "of which with grad",
                "ours calls (expected)",
                "ours rows / B (measured)",
                "FastVideo calls",
                "FastVideo rows / B",
                "calls ours / FastVideo",
            ],
            rows,
        )
    )
    if a.repeats > 1:
        print(
            "\nPer repeat (mean calls per cycle, all roles): "
            + ", ".join(f"{sum(counter.mean(r, 0, b) for r in ROLES):.2f}" for b in blocks)
        )
    per_cycle = [c["student"][0] for c in counter.cycles]
    print(
        f"\nStudent calls per cycle ranged {min(per_cycle)}-{max(per_cycle)} "
        f"(exit index drawn per iteration; FastVideo: always {fv['student'][0]:g})."
    )
    print(
        "\nExpected per cycle, K iterations, n steps, B rows:\n"
        + (
            f"  ours      student K*(1 + (n-1)/2) = {ours['student'][0]:g} (rollout stops at the drawn exit index; "
            if a.mode == "simulate"
            else f"  ours      student K = {ours['student'][0]:g} (one forward on noised data per iteration; "
        )
        + "the update iteration's critic reuses the student sample), teacher 1 call of 2B (CFG batched), critic 1 + K\n"
        + (
            f"  FastVideo student (K+1)*n = {fv['student'][0]:g} (a second rollout for the fake-score loss every "
            "iteration, all n-1 no-grad steps always run)"
            if a.mode == "simulate"
            else f"  FastVideo student K+1 = {fv['student'][0]:g} (a second student forward for the fake-score loss)"
        )
        + ", teacher 2 calls of B (cond, uncond), critic 1 + K"
    )
    call_ratio, row_ratio = tot["m_calls"] / tot["f_calls"], tot["m_rows"] / tot["f_rows"]
    exp_call, exp_row = tot["e_calls"] / tot["f_calls"], tot["e_rows"] / tot["f_rows"]
    print(
        f"\nRESULT dmd2_forward_count K={k_int} n={n} {a.mode}: ours/FastVideo forward calls = {call_ratio:.3f} "
        f"(expected {exp_call:.3f}), forwards weighted by batch rows = {row_ratio:.3f} (expected {exp_row:.3f})"
    )


if __name__ == "__main__":
    main()
