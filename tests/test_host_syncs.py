"""Host-device synchronisations per iteration, counted on the CPU.

On a GPU every tensor -> Python conversion (``item``, ``tolist``, ``bool(t)``, ``float(t)``,
``.cpu()``, ``nonzero`` ...) waits for the queued kernels. A CPU run cannot feel that, so
the conversions are counted with a ``TorchFunctionMode`` and attributed to the code that made
them: outside logging steps an iteration may make exactly one (the trainer's finiteness
check that every rank must agree on). Draws from the methods' shared generator live on the
CPU by construction and are no sync on any device.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import accel_distill
from accel_distill.builder import build_runtime
from accel_distill.config import load_config
from accel_distill.ema import EMACallback
from accel_distill.trainer import Trainer
from tests.conftest import base_config, write_config

SYNCING = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.nonzero,
    torch.nonzero,
}
# Host-only by construction: the methods' shared generator is a CPU one (asserted below); torch
# keeps an optimizer's step counter on the host unless capturable=True (Adam reads it each step).
HOST_ONLY = {"/methods/base.py:shared_randint", "<library> torch/optim/optimizer.py:_get_value"}
PACKAGE = str(Path(accel_distill.__file__).parent)


class SyncCounter(TorchFunctionMode):
    """Counts syncing calls by the accel_distill function that made them."""

    def __init__(self):
        super().__init__()
        self.sites: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCING:
            self.sites[self._site()] += 1
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _site() -> str:
        """The function that converted: ours by its path in the package, a library's by its file."""
        frame = sys._getframe(2)
        path = frame.f_code.co_filename
        if path.startswith(PACKAGE):
            return f"{path[len(PACKAGE) :]}:{frame.f_code.co_name}"
        return f"<library> {'/'.join(Path(path).parts[-3:])}:{frame.f_code.co_name}"


def run_counting(tmp_path, tiny_wan, tiny_teacher, data, method: str, **method_config) -> list[Counter]:
    cfg = base_config(method, tiny_wan, tiny_teacher, data, tmp_path / "out")
    cfg["method_config"].update(method_config)
    cfg["training"].update(log_every=1000, max_train_steps=1000, train_batch_size=2)
    cfg["roles"]["student"]["ema"] = {"decay": 0.9}
    cfg["pipeline_config"].update(num_frames=5, height=32, width=32)  # data-free rollouts
    path = write_config(tmp_path / "run.yaml", cfg)
    run = load_config(str(path))
    rt = build_runtime(run)
    assert rt.method.shared_gen.device.type == "cpu"  # what makes HOST_ONLY sound
    ema = EMACallback(rt.bundle, {"student": run.roles["student"].ema})
    stream = iter(rt.stream)
    batches = [next(stream) for _ in range(4)]  # decoding parquet is host work: outside the count
    trainer = Trainer(rt.accelerator, rt.method, iter(batches), run.training, callbacks=[ema])
    counts = []
    for _ in range(4):  # DMD2 interval 2: student-update and critic-only iterations both
        with SyncCounter() as counter:
            trainer.step()
        counts.append(counter.sites)
    return counts


@pytest.mark.parametrize(
    "method, data, method_config",
    [
        ("finetune", "latent_data", {}),
        ("dmd2", "latent_data", {"rollout_mode": "data"}),
        ("dmd2", "text_data", {"rollout_mode": "simulate"}),
    ],
    ids=["finetune", "dmd2-data", "dmd2-simulate"],
)
def test_one_host_sync_per_iteration_outside_logging(
    request, tmp_path, tiny_wan, tiny_teacher, method, data, method_config
):
    counts = run_counting(tmp_path, tiny_wan, tiny_teacher, request.getfixturevalue(data), method, **method_config)
    for it, sites in enumerate(counts):
        device_syncs = {site: n for site, n in sites.items() if site not in HOST_ONLY}
        assert sum(device_syncs.values()) == 1, f"iteration {it}: {dict(sites)}"
        assert list(device_syncs) == ["/trainer/loop.py:_finite"], dict(sites)


def test_the_counter_sees_a_sync():
    """The counter is not blind: an item() inside accel_distill code is attributed to it."""
    from accel_distill.methods.dmd2 import dmd_gradient

    with SyncCounter() as counter:
        x = torch.ones(2, 3)
        float(dmd_gradient(x, x, x * 0).sum())
        bool(x.sum() > 0)
    assert sum(counter.sites.values()) == 2
