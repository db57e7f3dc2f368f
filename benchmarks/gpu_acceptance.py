"""GPU acceptance: everything a user's first day touches, on one GPU, offline, in one command.

    PYTHONPATH=. .venv/bin/python benchmarks/gpu_acceptance.py                 # one GPU (target <= 8 min)
    PYTHONPATH=. .venv/bin/python benchmarks/gpu_acceptance.py --device cpu --tiny   # the same checks, CPU

A random-weight transformer built from the real Wan2.1-T2V-1.3B config (``--tiny``: a
~26k-parameter one) with a tiny VAE and text encoder, saved as a diffusers folder; then, each
run a YAML file and its own ``train_distill.py`` process, bf16 mixed precision:

* finetune and DMD2 with a LoRA student, its EMA, validation media, checkpoints every 2 of 4
  iterations, a resume from the middle checkpoint (its losses equal the straight run's), export;
* stock ``diffusers.WanPipeline`` (no accel_distill import) samples the DMD2 export, merged and as
  base + LoRA file, and equals the project's own few-step sampler on the same seeds;
* peak GPU memory of every run (``torch.cuda.max_memory_allocated`` in the child; CPU: peak RSS);
* seconds per sample per DMD2 iteration (configs/wan/dmd2_t2v_1.3b.yaml's recipe: full-parameter
  student and critic, batch 1) at 61x448x832 (latent 16x16x56x104) and at 29x256x448, native
  vs flash attention and compile off/on side by side. FastVideo publishes ~5.4 H200-seconds per
  sample-iteration; the target is <= 2.7 s on one H200 with dense attention.

One line per check (``PASS``/``FAIL``/``SKIP name: detail``), a JSON file (``--json``, default
``<out>/gpu_acceptance.json``) and exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import gpu_acceptance_runs as R  # noqa: E402
from benchmarks import gpu_acceptance_timing as T  # noqa: E402

TIME_LIMIT_S = 8 * 60  # the whole run on an H100/H200


class Report:
    """Collects the check lines and the JSON."""

    def __init__(self, args: argparse.Namespace, mode: R.Mode):
        import diffusers
        import torch

        self.start = time.perf_counter()
        self.checks: list[dict] = []
        self.data: dict = {
            "mode": mode.name,
            "device": args.device,
            "device_name": "cpu",  # the GPU's name comes from the children (no CUDA context here)
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "fastvideo_reference_s": T.FASTVIDEO_S,
            "target_s": T.TARGET_S,
            "checks": self.checks,
            "runs": {},
            "timing": [],
        }

    def add(self, name: str, status: str | bool, detail: str) -> None:
        status = status if isinstance(status, str) else ("PASS" if status else "FAIL")
        self.checks.append({"name": name, "status": status, "detail": detail})
        print(f"{status} {name}: {detail}", flush=True)

    def runs(self, jobs: list[R.Job]) -> None:
        for job in jobs:
            self.data["device_name"] = job.report.get("device_name") or self.data["device_name"]
            keep = ("rc", "peak_gpu_bytes", "peak_rss_bytes", "device_name", "setup_seconds")
            self.data["runs"][job.name] = {"exit": job.rc, "seconds": round(job.seconds, 2)}
            self.data["runs"][job.name].update({k: job.report[k] for k in keep if k in job.report})


def all_lora(file: Path) -> bool:
    from safetensors.torch import load_file

    keys = list(load_file(file)) if file.exists() else []
    return bool(keys) and all(".lora_A." in k or ".lora_B." in k for k in keys)


def close(a, b, rel: float) -> tuple[bool, str]:
    """``a`` equals ``b`` (rel 0: bitwise) or within ``rel`` of max|b|; with the difference for the line."""
    import torch

    if a.shape != b.shape:
        return False, f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    if torch.equal(a, b):
        return True, "bitwise equal"
    diff = (a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1e-12)
    return diff <= rel, f"max |diff| / max |ref| = {diff:.2e} (limit {rel:g})"


# --- feature runs ------------------------------------------------------------------------------


def check_run(rep: Report, name: str, job: R.Job, out: Path, expect_dmd: list[int] | None) -> list[dict]:
    """The straight run: exit 0, 4 finite logged iterations, EMA stepping, adapter-only checkpoints."""
    rows = R.metrics(out)
    if not job.ok:
        rep.add(name, False, job.error())
        return rows
    its = [r["iteration"] for r in rows]
    losses = [v for r in rows for k, v in r.items() if k in R.LOSS_KEYS]
    problems = []
    if its != [1, 2, 3, 4]:
        problems.append(f"logged iterations {its}")
    if not losses or not all(math.isfinite(v) for v in losses) or any(r["skipped_steps"] for r in rows):
        problems.append("non-finite loss or skipped step")
    if not any("ema_decay/student" in r for r in rows):
        problems.append("no ema_decay/student logged")
    if expect_dmd is not None and [r["iteration"] for r in rows if "dmd_loss" in r] != expect_dmd:
        problems.append(f"dmd_loss at {[r['iteration'] for r in rows if 'dmd_loss' in r]}, expected {expect_dmd}")
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    if ckpts != ["checkpoint-2", "checkpoint-4"]:
        problems.append(f"checkpoints {ckpts}")
    else:
        roles = json.loads((out / "checkpoints" / "checkpoint-4" / "roles.json").read_text())["models"]
        files = ["model.safetensors"] + [f"model_{i}.safetensors" for i in range(1, len(roles))]
        if not all(all_lora(out / "checkpoints" / "checkpoint-4" / f) for f in files):
            problems.append("a checkpoint holds more than the LoRA adapters")
        if expect_dmd is not None and roles != ["student", "critic"]:
            problems.append(f"checkpointed roles {roles} (the frozen teacher is never saved)")
    last = rows[-1] if rows else {}
    shown = ", ".join(f"{k} {last[k]:.4g}" for k in R.LOSS_KEYS if k in last)
    rep.add(name, not problems, "; ".join(problems) or f"4 iterations, {shown}, {R.peak(job)}, {job.seconds:.0f} s")
    return rows


def check_validation(rep: Report, name: str, out: Path, rows: list[dict], steps: int) -> None:
    root = out / "validation"
    expected = sorted(f"{i}_{steps}steps_g1.{ext}" for i in range(2) for ext in ("png", "gif"))
    found = {s: sorted(p.name for p in (root / f"step-{s}").glob("*")) for s in (2, 4)}
    logged = [r["iteration"] for r in rows if "validation_seconds" in r]
    ok = all(found[s] == expected for s in found) and logged == [2, 4]
    rep.add(name, ok, f"step-2 and step-4: {expected} each, validation_seconds at {logged}" if ok else f"{found}")


def check_resume(rep: Report, name: str, job: R.Job, straight: list[dict], out: Path, exact: bool) -> None:
    if not job.ok:
        rep.add(name, False, job.error())
        return
    resumed = R.metrics(out)
    ok, detail = R.compare_losses(straight, resumed, exact)
    ok = ok and [r["iteration"] for r in resumed] == [3, 4]
    rep.add(name, ok, f"from checkpoint-2: {detail}")


def check_export(rep: Report, name: str, straight: Path, resumed: Path, method: str, merged: bool, exact: bool):
    from safetensors.torch import load_file

    export = straight / "export"
    lora = export / "pytorch_lora_weights.safetensors"
    if not lora.exists():
        rep.add(name, False, f"no {lora}")
        return
    info = json.loads((export / "accel_distill_export.json").read_text())
    problems = [
        f"{k}={info.get(k)!r}" for k, v in (("method", method), ("adapter", "lora"), ("ema", True)) if info.get(k) != v
    ]
    if merged and not (export / "transformer" / "config.json").exists():
        problems.append("no merged transformer")
    other = resumed / "export" / "pytorch_lora_weights.safetensors"
    if other.exists():
        a, b = load_file(lora), load_file(other)
        results = [close(b[k], a[k], 0 if exact else 1e-3) for k in a] if a.keys() == b.keys() else [(False, "keys")]
        if not all(ok for ok, _ in results):
            problems.append(f"resumed export differs: {next(d for ok, d in results if not ok)}")
    else:
        problems.append("no resumed export")
    what = "merged pipeline + " if merged else ""
    rep.add(name, not problems, "; ".join(problems) or f"{what}LoRA file (EMA weights), equal to the resumed run's")


def check_sampling(rep: Report, name: str, stock: R.Job, ours: R.Job, folder: Path, exact: bool) -> None:
    import torch

    if not (stock.ok and ours.ok):
        bad = stock if not stock.ok else ours
        rep.add(name, False, f"{bad.name}: {bad.error()}")
        rep.add("stock WanPipeline + LoRA file", "SKIP", "sampling failed")
        return
    s, o = torch.load(folder / "stock.pt"), torch.load(folder / "ours.pt")
    ok, detail = close(o["ours"], s["merged"], 0 if exact else 1e-2)
    steps = [float(t) for t in o["timesteps"]]
    ok = ok and s["scheduler"] == "FlowMatchLCMScheduler" and s["timesteps"] == steps
    rep.add(
        name,
        ok,
        f"{s['scheduler']} visits {s['timesteps']} (trained {steps}); stock vs ours: {detail}",
    )
    ok, detail = close(s["lora"], s["merged"], 5e-2)  # bf16 weights fused vs added at run time
    rep.add("stock WanPipeline + LoRA file", ok, f"base + load_lora_weights vs merged export: {detail}")


def feature_checks(rep: Report, args, mode: R.Mode, assets: dict, root: Path) -> list[R.Job]:
    exact = args.device == "cpu"
    runs = root / "runs"
    ft, dmd = runs / "finetune", runs / "dmd2"
    ft_yaml = R.write_yaml(runs / "finetune.yaml", R.finetune_config(ft, assets, mode))
    dmd_yaml = R.write_yaml(runs / "dmd2.yaml", R.dmd2_config(dmd, assets, mode))
    first = [R.train_job("finetune", ft_yaml, runs), R.train_job("dmd2", dmd_yaml, runs)]
    R.run_jobs(first, args.device, args.jobs, args.timeout)

    def resume(name: str, yaml_file: Path, straight: Path) -> R.Job:
        ckpt = straight / "checkpoints" / "checkpoint-2"
        out = f"training.output_dir={straight}-resumed"
        return R.train_job(name, yaml_file, runs, out, f"training.resume_from_checkpoint={ckpt}")

    shape = json.dumps([1, *mode.feature_latent])
    export, embeds = str(dmd / "export"), str(assets["embeds"])
    second = [resume("finetune-resumed", ft_yaml, ft), resume("dmd2-resumed", dmd_yaml, dmd)]
    second += [
        R.Job("stock", "stock", [export, str(assets["model"]), embeds, str(runs / "stock.pt"), shape], runs),
        R.Job("ours", "ours", [export, embeds, str(runs / "ours.pt"), shape], runs),
    ]
    needs = [first[0], first[1], first[1], first[1]]  # what each second-round job starts from
    R.run_jobs([j for j, n in zip(second, needs) if n.ok], args.device, args.jobs, args.timeout)
    for (name, job), out, steps in zip(zip(("finetune", "dmd2"), first), (ft, dmd), (4, 3)):
        rows = guarded(rep, name, check_run, job, out, [1, 3] if name == "dmd2" else None) or []
        resumed = Path(f"{out}-resumed")
        if not job.ok:
            for check in ("validation", "resume", "export"):
                rep.add(f"{name} {check}", False, f"the {name} run failed")
            continue
        guarded(rep, f"{name} validation", check_validation, out, rows, steps)
        guarded(rep, f"{name} resume", check_resume, second[first.index(job)], rows, resumed, exact)
        guarded(rep, f"{name} export", check_export, out, resumed, name, name == "dmd2", exact)
    if first[1].ok:
        guarded(rep, "stock WanPipeline sampling", check_sampling, second[2], second[3], runs, exact)
    else:
        rep.add("stock WanPipeline sampling", False, "the dmd2 run failed: no export")
        rep.add("stock WanPipeline + LoRA file", False, "the dmd2 run failed: no export")
    return first + [job for job in second if job.rc is not None]


def guarded(rep: Report, name: str, check, *args):
    """Run ``check(rep, name, *args)``; a check that raises is a FAIL line, not a crash."""
    try:
        return check(rep, name, *args)
    except Exception as e:  # noqa: BLE001 (any failure of the checked run ends here)
        rep.add(name, False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return None


# --- main --------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--tiny", action="store_true", help="a ~26k-parameter transformer instead of the 1.3B config")
    p.add_argument("--out", type=Path, default=R.ROOT / "outputs" / "gpu_acceptance", help="work folder")
    p.add_argument("--json", type=Path, default=None, help="default: <out>/gpu_acceptance.json")
    p.add_argument("--attention", type=lambda s: s.split(","), default=["native", "flash"], help="backends to time")
    p.add_argument("--no-compile", action="store_true", help="skip the compile-on timings")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--jobs", type=int, default=None, help="feature runs at once (default: 4 on cuda, 2 on cpu)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per child process")
    args = p.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if args.device == "cpu" and not args.tiny:
        p.error("--device cpu needs --tiny (the 1.3B-shaped runs need a GPU)")
    args.jobs = args.jobs or (4 if args.device == "cuda" else 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = R.make_mode(args.tiny)
    rep = Report(args, mode)
    shutil.rmtree(args.out / "runs", ignore_errors=True)  # the built model is kept for reruns
    try:
        run_checks(rep, args, mode)
    except Exception as e:  # noqa: BLE001 (a crash of the script itself is one more FAIL line, the JSON is written)
        rep.add("acceptance script", False, f"{type(e).__name__}: {e}")
    total = time.perf_counter() - rep.start
    if mode.name != "tiny":
        rep.add("duration", total <= TIME_LIMIT_S, f"{total:.0f} s (limit {TIME_LIMIT_S} s on an H100/H200)")
    rep.data["seconds"] = round(total, 1)
    counts = {s: sum(c["status"] == s for c in rep.checks) for s in ("PASS", "FAIL", "SKIP")}
    rep.data["passed"] = counts["FAIL"] == 0
    path = args.json or args.out / "gpu_acceptance.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rep.data, indent=2) + "\n")
    print(
        f"RESULT gpu_acceptance {mode.name} on {rep.data['device_name']}: {counts['PASS']} passed, "
        f"{counts['FAIL']} failed, {counts['SKIP']} skipped in {total:.0f} s (json: {path})"
    )
    return 0 if rep.data["passed"] else 1


def run_checks(rep: Report, args, mode: R.Mode) -> None:
    start = time.perf_counter()
    assets = R.build_assets(args.out, mode)
    differs = R.differing_keys(assets["model"], mode.transformer)
    params = model_params(assets["model"] / "transformer")
    rep.data["model"] = {"config": mode.transformer, "parameters": params, "path": str(assets["model"])}
    built = "built" if assets["built"] else "reused"
    rep.add(
        "model",
        not differs,
        f"differs from the embedded config in {differs}"
        if differs
        else f"{mode.name} transformer config, {params:,} random parameters, tiny VAE + text encoder "
        f"({built} in {time.perf_counter() - start:.0f} s); every run in bf16 mixed precision",
    )
    jobs = feature_checks(rep, args, mode, assets, args.out)
    rep.runs(jobs)
    if args.skip_timing:
        rep.add("timing", "SKIP", "--skip-timing")
    else:
        timed = T.timing(rep, args, mode, assets, args.out)
        rep.runs(timed)
        jobs += timed
        T.speed_target(rep)
    measured = [j for j in jobs if j.report]
    peaks = ", ".join(f"{j.name} {R.peak(j).split(' ', 2)[-1]}" for j in measured)
    gpu_ok = args.device != "cuda" or all(j.report.get("peak_gpu_bytes") for j in measured)
    rep.add("peak memory", bool(measured) and gpu_ok, f"{'GPU' if args.device == 'cuda' else 'RSS'}: {peaks}")


def model_params(folder: Path) -> int:
    """Parameter count from the safetensors headers (no weights read)."""
    total = 0
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


if __name__ == "__main__":
    sys.exit(main())
