"""TEST-ONLY: run train_distill.py with accelerate's real FSDP2 code path on CPU (gloo).

accelerate drops the FSDP plugin when there is no GPU and silently runs DDP. This shim
re-installs it after ``Accelerator`` is built (on ``PartialState`` and the accelerator's
state, see shared/design/FACTS.md) so the project's own FSDP2 path is what the tests run
(context parallelism included: diffusers' CP on CPU needs one accelerator "device", see below).
It must never move into library code. Optionally dumps each rank's shard sizes
(``SHARD_REPORT``) and peak host memory by phase (``MEM_REPORT``, benchmarks/fsdp_memhook.py).
"""

import json
import os
import sys

import accelerate
import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

import accel_distill.builder as builder

_Accelerator = accelerate.Accelerator


def fsdp_on_cpu(*args, **kwargs):
    acc = _Accelerator(*args, **kwargs)
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch set
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    for state in (PartialState(), acc.state):
        state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    # diffusers' enable_parallelism places its CP config on device ``rank % torch.accelerator.device_count()``,
    # 0 on a CPU host (shared/design/FACTS.md): one CPU "device", after the process group is up
    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1
    return acc


builder.Accelerator = fsdp_on_cpu

if os.environ.get("SHARD_REPORT"):  # where to write {role or role.module: [local params, total params]} per rank
    _build = builder.build_runtime

    def build_and_report(cfg):
        rt = _build(cfg)
        report = {}
        for role in rt.bundle.roles.values():
            for key, module in role.modules.items():
                params = list(module.parameters())
                local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
                report[role.unit(key)] = [local, sum(p.numel() for p in params)]
        path = f"{os.environ['SHARD_REPORT']}.rank{rt.accelerator.process_index}.json"
        with open(path, "w") as f:
            json.dump(report, f)
        return rt

    builder.build_runtime = build_and_report
    import accel_distill.run as run

    run.build_runtime = build_and_report

if os.environ.get("MEM_REPORT"):  # benchmarks: each rank's peak RSS by phase -> {MEM_REPORT}.rank{N}.json
    from benchmarks.fsdp_memhook import install

    install()

from accel_distill.cli import main  # noqa: E402


def run_all(argv: list[str]) -> int:
    """``--config a.yaml ... --and --config b.yaml ...``: the runs one after another in these processes
    (one launch instead of several: tests pay the start-up of 2 processes once)."""
    runs, current = [], []
    for arg in argv:
        if arg == "--and":
            runs.append(current)
            current = []
        else:
            current.append(arg)
    runs.append(current)
    destroy = AcceleratorState.destroy_process_group
    for i, run in enumerate(runs):
        # end_training destroys the process group: keep it for the runs that follow
        AcceleratorState.destroy_process_group = destroy if i == len(runs) - 1 else lambda self, group=None: None
        code = main(run)
        if code:
            return code
    return 0


sys.exit(run_all(sys.argv[1:]))
