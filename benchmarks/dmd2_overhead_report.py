"""Tables and RESULT lines of benchmarks/dmd2_overhead.py (what a run measured, printed)."""

from __future__ import annotations

import torch

from benchmarks.common import SIZES, md_table

PART_NAMES = {
    "student_nograd": "student fwd, no grad (B)",
    "student_fwd_bwd": "student fwd+bwd (B)",
    "critic_nograd": "critic fwd, no grad (B)",
    "teacher_cfg": "teacher CFG fwd, no grad (2B)",
    "critic_fwd_bwd": "critic fwd+bwd (B)",
    "opt_student": "student clip + AdamW + zero_grad",
    "opt_critic": "critic clip + AdamW + zero_grad",
}


def print_tables(benches: list, pieces, size: str, repeats: int, iters: int, interval: int, n_steps: int) -> None:
    """The last run's tables: per iteration kind, its parts, and the framework pieces."""
    dev = benches[0].method.device
    shape = SIZES[size]["latent_shape"]
    print(
        f"\n### DMD2 iteration overhead (last run): size={size}, latent {list(shape)}, batch "
        f"{SIZES[size]['batch_size']}, device {dev}, {torch.get_num_threads()} threads, {repeats} repeats x "
        f"{iters} iterations per mode, student every {interval}, {n_steps}-step schedule\n"
    )
    rows = []
    for b in benches:
        for kind, label in (("student", "student update"), ("critic", "critic only")):
            s = b.summary(kind)
            k = f", mean k={s['mean_k']:.2f}" if b.mode == "simulate" else ""
            rows.append(
                [
                    b.mode,
                    f"{label}{k}",
                    s["n"],
                    f"{1e3 * s['t_iter']:.2f}",
                    f"{1e3 * s['t_parts']:.2f}",
                    f"{1e3 * s['opt']:.2f}",
                    f"{1e3 * s['extra']:.2f}",
                    f"**{s['ratio']:.3f}**",
                    f"{s['rep_min']:.3f}-{s['rep_max']:.3f}",
                    f"{s['pooled']:.3f}",
                    f"{s['faults']:.0f} / {s['parts_faults']:.0f}",
                ]
            )
    header = [
        "rollout",
        "iteration",
        "n",
        "T_iter ms (median)",
        "T_parts ms (median)",
        "of which clip+AdamW ms",
        "overhead ms (median T_iter_i - T_parts_i)",
        "ratio (paired)",
        "per-repeat range",
        "ratio (pooled medians)",
        "minor page faults iter / parts (median)",
    ]
    print(md_table(header, rows))
    print("\nParts (median ms per call, each run alone):\n")
    part_rows = []
    for b in benches:
        for kind in ("student", "critic"):
            meds = b.summary(kind)["meds"]
            for name, label in PART_NAMES.items():
                if name in meds:
                    part_rows.append([b.mode, kind, label, f"{1e3 * meds[name]:.3f}"])
    print(md_table(["rollout", "iteration", "part", "ms"], part_rows))
    print(
        "\nratio (paired) = median over iterations i of T_iter_i / T_parts_i, T_parts_i = the summed times of "
        "iteration i's own parts, run right before or after it (alternating). ratio (pooled medians) = median_i "
        "T_iter_i / sum over parts of (calls in iteration i) x (median of that part over the whole run). "
        "clip + AdamW + zero_grad are counted as parts in both."
    )
    if pieces is not None:
        print(f"\nWhere the overhead goes (median us per call over {pieces.n} alternating A/B samples):\n")
        print(md_table(["piece (A / B)", "A us", "B us", "A - B us"], pieces.rows()))


def result_line(size: str, finals: dict[str, float], label: str) -> str:
    worst = max(finals.values())
    return (
        f"RESULT dmd2_overhead size={size}{label}: T_iter/T_parts "
        + " ".join(f"{name}={r:.3f}" for name, r in finals.items())
        + f" (worst {worst:.3f}, target <= 1.05: {'PASS' if worst <= 1.05 else 'FAIL'})"
    )
