"""Placing roles across processes: FSDP2 sharding of frozen roles, rank-0 loading, gathering.

Under FSDP, trainable roles are sharded by ``accelerator.prepare`` (one model and
its optimizer per call). Frozen roles have no optimizer and must stay out of
``prepare`` and ``save_state``, so they are sharded here the same way: FSDP2
``fully_shard`` per transformer block, then the root, with the accelerate
plugin's mixed-precision / reshard / offload settings. With rank-0 loading only
process 0 reads their weights; the others build the module on the meta device
and receive their shards, so N ranks do not each hold a full 14B copy in host RAM.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType


def is_fsdp(acc: Accelerator) -> bool:
    return acc.distributed_type == DistributedType.FSDP


def disable_accelerate_rank0_loading(acc: Accelerator) -> None:
    """Turn off accelerate's ``fsdp_cpu_ram_efficient_loading``, which fails on diffusers models.

    It calls ``get_parameter_or_buffer``, a transformers-only method. Frozen roles load on
    rank 0 through :func:`fsdp_shard` instead; trainable roles load on every rank.
    """
    from accelerate.logging import get_logger

    plugin = acc.state.fsdp_plugin
    if plugin.cpu_ram_efficient_loading:
        get_logger(__name__).warning(
            "fsdp_cpu_ram_efficient_loading is not supported for diffusers models and is turned off; "
            "frozen roles still load on rank 0 only (roles.<role>.rank0_loading)",
            main_process_only=True,
        )
        plugin.cpu_ram_efficient_loading = False


@contextlib.contextmanager
def own_wrap_classes(acc: Accelerator, module: torch.nn.Module) -> Iterator[None]:
    """Under FSDP, let ``prepare`` wrap ``module`` per its own ``_no_split_modules`` (none: the root alone).

    The accelerate plugin names the model's block class (``WanTransformerBlock``) for every prepare
    call, and refuses a module without it -- a method's small auxiliary network, say.
    """
    plugin = acc.state.fsdp_plugin if is_fsdp(acc) else None
    if plugin is None:
        yield
        return
    saved = plugin.transformer_cls_names_to_wrap
    plugin.transformer_cls_names_to_wrap = list(getattr(module, "_no_split_modules", None) or [])
    try:
        yield
    finally:
        plugin.transformer_cls_names_to_wrap = saved


def share_dtypes_from_rank0(module: torch.nn.Module) -> None:
    """Give an empty (meta) module on every rank the per-parameter dtypes rank 0 loaded.

    ``from_pretrained`` keeps some modules in fp32 (``_keep_in_fp32_modules``); shards
    must agree on dtype across ranks.
    """
    layout = [{n: str(p.dtype) for n, p in module.named_parameters()}]
    dist.broadcast_object_list(layout, src=0)
    for name, param in module.named_parameters():
        wanted = getattr(torch, layout[0][name].replace("torch.", ""))
        if param.dtype != wanted:
            param.data = param.data.to(wanted)


def fsdp_shard(acc: Accelerator, module: torch.nn.Module, *, from_rank0: bool) -> torch.nn.Module:
    """FSDP2-shard ``module`` per transformer block and at the root, in place.

    ``from_rank0``: only process 0 holds real weights (the others are on meta); they
    are broadcast shard by shard after sharding.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = acc.state.fsdp_plugin
    kwargs = {
        "reshard_after_forward": plugin.reshard_after_forward,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        "offload_policy": plugin.cpu_offload,
    }
    if from_rank0:
        share_dtypes_from_rank0(module)
        full = module.state_dict() if acc.is_main_process else {}
        # buffers are real on every rank (built with include_buffers=False): keep them
        buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
        module.to("meta")
    blocks = set(plugin.transformer_cls_names_to_wrap or getattr(module, "_no_split_modules", None) or ())
    for sub in list(module.modules())[1:]:
        if type(sub).__name__ in blocks:
            fully_shard(sub, **kwargs)
    fully_shard(module, **kwargs)
    if from_rank0:
        module.to_empty(device=acc.device)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(module, full, options=options)
        with torch.no_grad():
            for name, value in buffers.items():
                module.get_buffer(name).copy_(value)
    return module


def local_fraction(module: torch.nn.Module) -> float:
    """Share of the module's parameters this process holds (1.0 unsharded)."""
    params = list(module.parameters())
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
    return local / max(1, sum(p.numel() for p in params))


def unwrapped_class(module: torch.nn.Module) -> type:
    """The model class under FSDP2's dynamic ``FSDP<Class>`` subclass (or the class itself)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def gather_full_model(acc: Accelerator, module: torch.nn.Module) -> torch.nn.Module | None:
    """The whole model with full weights on the main process, None elsewhere.

    Collective under FSDP: every rank must call it.
    """
    from accelerate import init_empty_weights

    state = acc.get_state_dict(module)
    if not acc.is_main_process:
        return None
    inner = acc.unwrap_model(module)
    with init_empty_weights():
        full = unwrapped_class(inner).from_config(inner.config)
    if getattr(inner, "peft_config", None):  # same LoRA layout, so the adapter's keys load too
        full.add_adapter(inner.peft_config["default"])
    # Without FSDP the state dict shares storage with the live (maybe EMA-swapped) weights: copy.
    # Under FSDP it is already a fresh full CPU copy on this rank: a second one would double the peak.
    copy = not is_fsdp(acc)
    full.load_state_dict({k: v.detach().to("cpu", copy=copy) for k, v in state.items()}, assign=True)
    return full
