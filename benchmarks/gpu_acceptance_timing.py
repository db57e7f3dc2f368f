"""The timing phase of ``gpu_acceptance.py``: seconds per sample per DMD2 iteration, side by side.

Each variant (attention backend x compile off/on) is its own child process, alone on the
device: ``Trainer.step()`` timed with the device synchronised before and after, the first
``mode.timing_warmup`` iterations (compilation, allocator warm-up) left out, then one whole
``generator_update_interval`` cycle whose mean is the recipe's cost per iteration.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from benchmarks import gpu_acceptance_runs as R
from benchmarks.common import median

FASTVIDEO_S = 5.4  # FastVideo's published H200-seconds per sample-iteration (Wan2.1-1.3B DMD2, 61x448x832)
TARGET_S = 2.7
KERNEL_PACKAGES = {"flash": "flash_attn", "_flash_3": "flash_attn_interface", "sage": "sageattention"}


def unusable(backend: str, device: str) -> str | None:
    """Why ``backend`` cannot run here (None: it can): no CUDA, its package missing or too old."""
    if backend == "native":
        return None
    if device != "cuda":
        return f"{backend} attention needs CUDA (device {device})"
    package = KERNEL_PACKAGES.get(backend)
    if package and importlib.util.find_spec(package) is None:
        return f"{backend} attention: package {package} is not installed"
    from diffusers.models import attention_dispatch as dispatch

    try:
        dispatch._check_attention_backend_requirements(dispatch.AttentionBackendName(backend))
    except (RuntimeError, ImportError, ValueError) as e:
        return f"{backend} attention: {str(e).splitlines()[0]}"
    return None


def variants(args, matrix: bool) -> list[tuple[str, bool, str | None]]:
    """(attention backend, compile, why skipped) in the order they run; the baseline alone if not ``matrix``."""
    if not matrix:
        return [("native", False, None)]
    out = []
    for backend in args.attention:
        why = unusable(backend, args.device)
        for compile_ in (False, True):
            skip = why or ("--no-compile" if compile_ and args.no_compile else None)
            out.append((backend, compile_, skip))
    return out


def timing(rep, args, mode: R.Mode, assets: dict, root: Path) -> list[R.Job]:
    jobs = []
    for label, why in mode.skipped_sizes.items():
        rep.add(f"timing {label}", "SKIP", why)
    for label, size in mode.timing_sizes.items():
        base = None
        for backend, compile_, skip in variants(args, label == mode.matrix_size):
            name = f"timing {label} {backend} compile {'on' if compile_ else 'off'}"
            if skip:
                rep.add(name, "SKIP", skip)
                continue
            tag = name.replace(" ", "-")
            cfg = R.timing_config(root / "runs" / tag, assets, mode, size, backend, compile_)
            yaml_file = R.write_yaml(root / "runs" / f"{tag}.yaml", cfg)
            job = R.Job(tag, "time", [str(yaml_file), str(mode.timing_warmup + mode.timing_iters)], root / "runs")
            R.run_jobs([job], args.device, 1, args.timeout)  # alone on the device
            jobs.append(job)
            row = timing_row(label, size, backend, compile_, job, mode)
            rep.data["timing"].append(row)
            if not job.ok:
                rep.add(name, False, job.error())
                continue
            wrong = not_applied(job.report.get("roles", {}), backend, compile_)
            rep.add(name, not wrong, wrong or timing_line(row, job))
            syncs = job.report.get("host_syncs_per_iteration")
            if syncs is None:
                rep.add(
                    f"{name} host syncs", "SKIP", "counted by CUDA's sync debug mode (tests/test_host_syncs.py on CPU)"
                )
            else:  # Trainer.step outside logging: the finiteness check alone
                rep.add(f"{name} host syncs", max(syncs) <= 1, f"{syncs} per iteration (limit 1)")
            base = base or row
            if row is not base:
                agree(rep, name, row, base)
    return jobs


def timing_row(label, size, backend, compile_, job: R.Job, mode: R.Mode) -> dict:
    rows = job.report.get("iterations", [])[mode.timing_warmup :]
    seconds = [r["seconds"] for r in rows]
    frames, height, width = size
    row = {
        "size": label,
        "latent": [16, (frames - 1) // 4 + 1, height // 8, width // 8],
        "attention": backend,
        "compile": compile_,
        "ok": job.ok,
        "iterations": job.report.get("iterations", []),
        "peak_gpu_bytes": job.report.get("peak_gpu_bytes"),
        "setup_seconds": job.report.get("setup_seconds"),
    }
    if seconds:  # a whole number of interval cycles: their mean is the recipe's cost per iteration
        row["s_per_iteration"] = sum(seconds) / len(seconds)
        row["s_per_sample_iteration"] = row["s_per_iteration"] / R.TIMING_BATCH
        row["student_update_s"] = median([r["seconds"] for r in rows if r["student_update"]])
        row["critic_only_s"] = median([r["seconds"] for r in rows if not r["student_update"]])
        row["first_iteration_s"] = job.report["iterations"][0]["seconds"]
    return row


def not_applied(roles: dict, backend: str, compile_: bool) -> str:
    """'' when every role runs ``backend`` (native: diffusers' default) and is compiled iff asked."""
    wanted = {backend, "default"} if backend == "native" else {backend}
    for name, r in roles.items():
        if not set(r["attention_backends"]) <= wanted:
            return f"{name} runs attention {r['attention_backends']}, asked {backend}"
        if r["compiled_blocks"] != (r["blocks"] if compile_ else 0) or not r["blocks"]:
            return f"{name}: {r['compiled_blocks']} of {r['blocks']} blocks compiled, compile {compile_}"
    return "" if roles else "the run reported no roles"


def timing_line(row: dict, job: R.Job) -> str:
    return (
        f"{row['s_per_sample_iteration']:.3f} s per sample-iteration (latent {'x'.join(map(str, row['latent']))}; "
        f"student-update {row['student_update_s']:.3f} s, critic-only {row['critic_only_s']:.3f} s, "
        f"first {row['first_iteration_s']:.1f} s), {R.peak(job)}"
    )


def agree(rep, name: str, row: dict, base: dict) -> None:
    """Iteration 0 sees the same weights and noise in every variant: its critic loss must agree."""
    a, b = row["iterations"][0]["critic_loss"], base["iterations"][0]["critic_loss"]
    rel = abs(a - b) / max(abs(b), 1e-12)
    rep.add(f"{name} agrees", rel <= 2e-2, f"iteration-0 critic loss {a:.5g} vs {b:.5g} ({rel:.1e}, limit 2e-2)")


def speed_target(rep) -> None:
    rows = [r for r in rep.data["timing"] if r["size"] == R.LARGE and "s_per_sample_iteration" in r]
    if not rows:
        rep.add("speed target", "SKIP", f"no {R.LARGE} timing")
        return
    best = min(rows, key=lambda r: r["s_per_sample_iteration"])
    s = best["s_per_sample_iteration"]
    what = f"best {s:.3f} s ({best['attention']}, compile {'on' if best['compile'] else 'off'}) vs FastVideo {FASTVIDEO_S} s = {FASTVIDEO_S / s:.2f}x"
    if "H200" not in rep.data["device_name"]:
        rep.add("speed target", "SKIP", f"the {TARGET_S} s target is for an H200 ({rep.data['device_name']}): {what}")
    else:
        rep.add("speed target", s <= TARGET_S, f"{what}, target <= {TARGET_S} s")
