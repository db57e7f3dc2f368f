"""Speed switches: attention backend and regional compile reach the roles they name, and change nothing else."""

from __future__ import annotations

import torch

from accel_distill.builder import build_runtime
from accel_distill.config import load_config
from tests.conftest import base_config, write_config


def backends(module: torch.nn.Module) -> set:
    return {getattr(m.processor, "_attention_backend", None) for m in module.modules() if getattr(m, "processor", None)}


def compiled_blocks(module: torch.nn.Module) -> list[bool]:
    return [getattr(b, "_compiled_call_impl", None) is not None for b in module.blocks]


def test_global_switches_with_a_per_role_override(tmp_path, tiny_wan, tiny_teacher, latent_data):
    cfg = base_config("dmd2", tiny_wan, tiny_teacher, latent_data, tmp_path / "out")
    cfg["training"].update(attention_backend="_native_math", compile=True)
    cfg["roles"]["teacher"].update(attention_backend="native", compile=False)
    rt = build_runtime(load_config(str(write_config(tmp_path / "run.yaml", cfg))))
    student, teacher, critic = (
        rt.accelerator.unwrap_model(rt.bundle[r].transformer) for r in ("student", "teacher", "critic")
    )
    assert {b.value for b in backends(student)} == {"_native_math"} == {b.value for b in backends(critic)}
    assert {b.value for b in backends(teacher)} == {"native"}
    assert all(compiled_blocks(student)) and all(compiled_blocks(critic)) and len(compiled_blocks(student)) > 0
    assert not any(compiled_blocks(teacher))
    # a role's backend is its own: the default of every other model stays diffusers' (native)
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    assert _AttentionBackendRegistry.get_active_backend()[0].value == "native"


def test_unset_switches_leave_the_models_as_loaded(tmp_path, tiny_wan, tiny_teacher, latent_data):
    cfg = base_config("finetune", tiny_wan, tiny_teacher, latent_data, tmp_path / "out")
    rt = build_runtime(load_config(str(write_config(tmp_path / "run.yaml", cfg))))
    student = rt.accelerator.unwrap_model(rt.bundle["student"].transformer)
    assert backends(student) == {None} and not any(compiled_blocks(student))


def test_math_backend_computes_what_native_sdpa_computes(tmp_path, tiny_wan, tiny_teacher, latent_data):
    """A backend switch is a kernel choice: the student's prediction is unchanged (to float tolerance)."""
    preds = []
    for backend in ("native", "_native_math"):
        cfg = base_config("finetune", tiny_wan, tiny_teacher, latent_data, tmp_path / backend)
        cfg["training"]["attention_backend"] = backend
        rt = build_runtime(load_config(str(write_config(tmp_path / f"{backend}.yaml", cfg))))
        batch = next(iter(rt.stream))
        x = rt.adapter.normalize_latents(batch["latents"])
        t = torch.full((x.shape[0],), 500.0)
        with torch.no_grad():
            preds.append(rt.adapter.predict(rt.bundle["student"], x, t, rt.adapter.conditioning(batch)))
    torch.testing.assert_close(preds[0], preds[1], rtol=1e-5, atol=1e-5)
    assert preds[0].abs().sum() > 0
