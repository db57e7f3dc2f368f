"""The subprocess side of ``gpu_acceptance.py``: one run per process, peak memory measured here.

Every command writes a JSON report (exit status, peak GPU memory from
``torch.cuda.max_memory_allocated``, peak RSS, wall seconds) next to what it produces:

    python -m benchmarks.gpu_acceptance_child train REPORT -- --config run.yaml [overrides]
        train_distill.py itself (run as __main__), exactly as a user runs it
    python -m benchmarks.gpu_acceptance_child time REPORT run.yaml ITERATIONS
        config file -> load_config -> build_runtime -> Trainer.step() ITERATIONS times, each timed
        with the device synchronised before and after (no checkpoint, no export: a 1.3B DMD2
        checkpoint with both optimizers is ~31 GB)
    python -m benchmarks.gpu_acceptance_child stock REPORT EXPORT BASE EMBEDS OUT.pt SHAPE
        stock diffusers only (asserts accel_distill is never imported): WanPipeline samples the
        merged export, and the base pipeline with the export's LoRA file and scheduler
    python -m benchmarks.gpu_acceptance_child ours REPORT EXPORT EMBEDS OUT.pt SHAPE
        the project's few-step sampler on the exported transformer, same seeds
"""

from __future__ import annotations

import json
import math
import os
import resource
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOISE_SEED = 0  # the initial latents (CPU generator, as WanPipeline draws them)
RENOISE_SEED = 123  # the global RNG the few-step schedulers re-noise from
COMPILE_BACKEND_ENV = "ACCEL_DISTILL_ACCEPTANCE_COMPILE_BACKEND"  # set by gpu_acceptance.py on CPU


def _peaks() -> dict:
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    name = torch.cuda.get_device_name() if gpu is not None else None
    return {"peak_gpu_bytes": gpu, "peak_rss_bytes": rss, "device_name": name}


def _write(report: str, data: dict) -> None:
    Path(report).write_text(json.dumps(data, indent=2) + "\n")


def _device_and_dtype():
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, torch.bfloat16  # the dtype the exports were trained in (bf16 mixed precision)


def train(report: str, argv: list[str]) -> int:
    start, rc = time.perf_counter(), 1
    sys.argv = [str(ROOT / "train_distill.py"), *argv]
    try:
        runpy.run_path(str(ROOT / "train_distill.py"), run_name="__main__")
        rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        _write(report, {"rc": rc, "seconds": time.perf_counter() - start, **_peaks()})
    return rc


def time_run(report: str, config: str, iterations: int) -> int:
    import yaml

    from benchmarks.common import build_trainer, timed

    start = time.perf_counter()
    rt, trainer = build_trainer(yaml.safe_load(Path(config).read_text()), Path(config))
    device = rt.accelerator.device
    setup = time.perf_counter() - start
    rows = []
    for _ in range(iterations):
        metrics: dict = {}
        seconds = timed(lambda out=metrics: out.update(trainer.step()), device)
        losses = {k: float(v) for k, v in metrics.items() if k.endswith("loss")}  # after the timed span
        rows.append({"seconds": seconds, "student_update": "dmd_loss" in losses, **losses})
    ok = all(math.isfinite(v) for r in rows for k, v in r.items() if k.endswith("loss"))
    roles = {name: speed_switches(role.transformer) for name, role in rt.bundle.roles.items()}
    error = None if ok else "a non-finite loss"
    syncs = [counted_syncs(trainer.step, device) for _ in range(2)]  # after the timed ones: not in their time
    result = {"rc": 0 if ok else 1, "error": error, "setup_seconds": setup, "iterations": rows, "roles": roles}
    result["host_syncs_per_iteration"] = None if None in syncs else syncs
    _write(report, {**result, **_peaks()})
    return 0 if ok else 1


def counted_syncs(step, device) -> int | None:
    """Host-device synchronisations ``step()`` makes, by CUDA's sync debug mode (None off CUDA)."""
    import warnings

    import torch

    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def speed_switches(model) -> dict:
    """What the run really applied: compiled transformer blocks and each attention processor's backend."""
    blocks = [m for m in model.modules() if type(m).__name__ == "WanTransformerBlock"]
    backends = {
        str(getattr(getattr(m.processor, "_attention_backend", None), "value", None) or "default")
        for m in model.modules()
        if hasattr(m, "processor") and hasattr(m, "norm_q")
    }
    compiled = sum(getattr(m, "_compiled_call_impl", None) is not None for m in blocks)
    return {"blocks": len(blocks), "compiled_blocks": compiled, "attention_backends": sorted(backends)}


def _embeds(path: str, device, dtype):
    import torch

    return torch.load(path).to(device, dtype)


def _noise(shape: list[int]):
    import torch

    return torch.randn(shape, generator=torch.Generator().manual_seed(NOISE_SEED))


def stock(report: str, export: str, base: str, embeds_file: str, out: str, shape: list[int]) -> int:
    import torch
    from diffusers import FlowMatchLCMScheduler, WanPipeline

    device, dtype = _device_and_dtype()
    embeds = _embeds(embeds_file, device, dtype)
    frames, height, width = shape[2:]
    scale_t, scale_s = 4, 8  # the tiny VAE's factors, as Wan's
    steps = json.loads((Path(export) / "accel_distill_export.json").read_text())["num_inference_steps"]

    def sample(pipe, seen=None):
        pipe.set_progress_bar_config(disable=True)
        if seen is not None:
            pipe.transformer.register_forward_pre_hook(
                lambda m, a, kw: seen.append(float(kw["timestep"][0])), with_kwargs=True
            )
        torch.manual_seed(RENOISE_SEED)
        return pipe(
            prompt_embeds=embeds,
            num_inference_steps=steps,
            guidance_scale=1.0,
            height=height * scale_s,
            width=width * scale_s,
            num_frames=(frames - 1) * scale_t + 1,
            output_type="latent",
            generator=torch.Generator().manual_seed(NOISE_SEED),
        ).frames.cpu()

    seen: list[float] = []
    merged = WanPipeline.from_pretrained(export, torch_dtype=dtype).to(device)
    result = {"merged": sample(merged, seen), "timesteps": seen, "scheduler": type(merged.scheduler).__name__}
    del merged
    with_lora = WanPipeline.from_pretrained(base, torch_dtype=dtype).to(device)
    with_lora.load_lora_weights(export)
    with_lora.scheduler = FlowMatchLCMScheduler.from_pretrained(export, subfolder="scheduler")
    result["lora"] = sample(with_lora)
    clean = not any(m.startswith("accel_distill") for m in sys.modules)
    torch.save(result, out)
    error = None if clean else "stock sampling imported accel_distill"
    _write(report, {"rc": 0 if clean else 1, "error": error, **_peaks()})
    return 0 if clean else 1


def ours(report: str, export: str, embeds_file: str, out: str, shape: list[int]) -> int:
    import torch
    from diffusers import WanTransformer3DModel

    from accel_distill.sampling import few_step_sample
    from accel_distill.schedule import fit_few_step_schedule

    device, dtype = _device_and_dtype()
    embeds = _embeds(embeds_file, device, dtype)
    info = json.loads((Path(export) / "accel_distill_export.json").read_text())
    kind = "ode" if info["scheduler"]["class"] == "FlowMatchEulerDiscreteScheduler" else "sde"
    schedule = fit_few_step_schedule(info["timesteps"], kind=kind)
    model = WanTransformer3DModel.from_pretrained(export, subfolder="transformer", torch_dtype=dtype).to(device)
    torch.manual_seed(RENOISE_SEED)

    def predict(x, t):  # as WanPipeline calls the transformer
        return model(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=embeds, return_dict=False)[0]

    with torch.no_grad():
        latents = few_step_sample(predict, schedule, _noise(shape).to(device))
    torch.save({"ours": latents.cpu(), "timesteps": list(schedule.timesteps)}, out)
    _write(report, {"rc": 0, **_peaks()})
    return 0


def _compile_backend(name: str) -> None:
    """Make ``Module.compile()`` (what ``compile_repeated_blocks`` calls) default to backend ``name``.

    The CPU tiny mode uses ``aot_eager``: dynamo tracing, graph breaks, recompiles and AOTAutograd's
    joint graph all run, but not inductor's C++ code generation (~90 s on 2 cores for the tiny model).
    """
    import functools

    import torch

    original = torch.nn.Module.compile

    @functools.wraps(original)
    def compile_with_backend(self, *args, **kwargs):
        kwargs.setdefault("backend", name)
        return original(self, *args, **kwargs)

    torch.nn.Module.compile = compile_with_backend


def main(argv: list[str]) -> int:
    command, report, *rest = argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if os.environ.get(COMPILE_BACKEND_ENV):
        _compile_backend(os.environ[COMPILE_BACKEND_ENV])
    if command == "train":
        return train(report, rest[1:] if rest[:1] == ["--"] else rest)
    if command == "time":
        return time_run(report, rest[0], int(rest[1]))
    if command == "stock":
        return stock(report, *rest[:4], json.loads(rest[4]))
    if command == "ours":
        return ours(report, *rest[:3], json.loads(rest[3]))
    raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
