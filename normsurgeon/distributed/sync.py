"""``sync_statistics`` / ``unsync``: switch a converted model's batch statistics to every rank and back.

    torch.distributed.init_process_group("gloo")        # under torchrun; "nccl" on GPUs
    model = ns.sync_statistics(ns.convert(model, to="bn"))   # a copy; inplace=True to change model
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ...
    local = ns.unsync(model)                             # local layers again (CPU inference, export)

Each bn, bgn, iebn, cbn, mbn and dsbn layer becomes its synchronized subclass (``synced_layers``,
``synced_stateful``): the same parameters, buffers and state_dict keys, batch statistics over every
rank (one all-gather per layer in the forward, one all-reduce in the backward). Buffers come out
identical on every rank, so DDP's ``broadcast_buffers`` (True by default) is correct either way;
``broadcast_buffers=False`` saves one broadcast per forward. A layer left as torch's or timm's
BatchNorm would silently normalize per rank, so it is refused: convert it to ``'bn'`` first.

At the first training forward, the ranks compare the synchronized layers (name, class, shapes, dtypes) with
one ``all_gather_object``: a rank with a different model raises on every rank instead of hanging.
Like ``normsurgeon.convert``, both functions return a modified deep copy unless ``inplace=True``.
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist
from torch import nn

from ..layers import (BatchGroupNorm, BatchNorm, CrossIterationBatchNorm, DomainSpecificBatchNorm,
                      InstanceEnhancementBatchNorm, MemorizedBatchNorm)
from .moments import require_process_group
from .synced_layers import (SyncedBatchGroupNorm, SyncedBatchNorm, SyncedDomainSpecificBatchNorm,
                            SyncedInstanceEnhancementBatchNorm)
from .synced_stateful import SyncedCrossIterationBatchNorm, SyncedMemorizedBatchNorm

SYNCED = {BatchNorm: SyncedBatchNorm, BatchGroupNorm: SyncedBatchGroupNorm,
          InstanceEnhancementBatchNorm: SyncedInstanceEnhancementBatchNorm,
          DomainSpecificBatchNorm: SyncedDomainSpecificBatchNorm,
          CrossIterationBatchNorm: SyncedCrossIterationBatchNorm, MemorizedBatchNorm: SyncedMemorizedBatchNorm}
LOCAL = {synced: local for local, synced in SYNCED.items()}


def synced_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every synchronized layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if type(m) in LOCAL]


def unsyncable_layers(model: nn.Module) -> list[str]:
    """Batch-statistics layers that sync_statistics cannot synchronize (torch's/timm's BatchNorms)."""
    return [f"{n or '(the model itself)'} ({type(m).__name__})" for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m) not in SYNCED and type(m) not in LOCAL]


def sync_statistics(model: nn.Module, process_group=None, *, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (``model`` itself with ``inplace=True``) whose batch statistics are computed
    over every rank of ``process_group`` (None: the default group). See the module docstring."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"sync_statistics expects an nn.Module, got {type(model).__name__}")
    require_process_group(process_group, "normsurgeon.sync_statistics")
    left = unsyncable_layers(model)
    if left:
        shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        raise ValueError(f"sync_statistics would leave {len(left)} batch-statistics layer(s) normalizing per rank: "
                         f"{shown}. Convert them first, e.g. normsurgeon.convert(model, to='bn') (timm's fused "
                         f"activation is kept), then call sync_statistics on the converted model.")
    work = model if inplace else copy.deepcopy(model)
    count = 0
    for name, module in work.named_modules():
        cls = SYNCED.get(type(module)) or (type(module) if type(module) in LOCAL else None)
        if cls is None:
            continue
        module.__class__ = cls
        module.process_group = process_group
        if not module.site_name:
            module.site_name = name
        count += 1
    if count == 0:
        raise ValueError("sync_statistics: the model has no batch-statistics layer to synchronize (bn, bgn, iebn, "
                         "cbn, mbn or dsbn); convert it with normsurgeon.convert first, or train it without syncing")
    _remove_checks(work)
    work.register_forward_pre_hook(FirstStepCheck())
    return work


def unsync(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (``model`` itself with ``inplace=True``) with local layers again: same state,
    no process group needed (CPU inference, export, ``normsurgeon.fold``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unsync expects an nn.Module, got {type(model).__name__}")
    work = model if inplace else copy.deepcopy(model)
    for _, module in synced_layers(work):
        module.__class__ = LOCAL[type(module)]
        module.__dict__.pop("process_group", None)
    _remove_checks(work)
    return work


@contextlib.contextmanager
def synchronized(model: nn.Module):
    """``model``'s layers synchronized in place for the block, local again after it (those that were
    synchronized before stay so). For ``finetune`` and ``recalibrate_bn`` under torchrun."""
    already = bool(synced_layers(model))
    nothing = not any(type(m) in SYNCED for m in model.modules()) and not unsyncable_layers(model)
    already = already or nothing  # (a gn/ln/pn model has no batch statistics to synchronize)
    if not already:
        sync_statistics(model, inplace=True)
    try:
        yield model
    finally:
        if not already:
            unsync(model, inplace=True)


def _remove_checks(model: nn.Module) -> None:
    for key in [k for k, hook in model._forward_pre_hooks.items() if isinstance(hook, FirstStepCheck)]:
        del model._forward_pre_hooks[key]


def layer_signature(model: nn.Module) -> list[tuple]:
    """What every rank must agree on: per synced layer its name, class, and tensor shapes and dtypes."""
    return [(name, type(m).__name__,
             tuple((k, tuple(t.shape), str(t.dtype)) for k, t in (*m.named_parameters(recurse=False),
                                                                  *m.named_buffers(recurse=False)) if t is not None))
            for name, m in synced_layers(model)]


class FirstStepCheck:
    """Forward pre-hook on the synced model: at its first forward, one ``all_gather_object`` of
    ``layer_signature``; ranks that disagree raise together (every rank sees every signature)."""

    def __init__(self):
        self.done = False

    def __call__(self, model: nn.Module, args) -> None:
        if self.done or torch.compiler.is_compiling():
            return
        layers = synced_layers(model)
        if not any(m.training for _, m in layers):
            return  # an eval forward makes no collective (it may run on one rank only): check later
        group = getattr(layers[0][1], "process_group", None)
        require_process_group(group, "normsurgeon.sync_statistics")
        mine = layer_signature(model)
        every = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, mine, group=group)
        self.done = True
        for rank, theirs in enumerate(every):
            if theirs != mine:
                raise RuntimeError(_disagreement(dist.get_rank(group), mine, rank, theirs))


def _disagreement(me: int, mine: list, rank: int, theirs: list) -> str:
    for a, b in zip(mine, theirs):
        if a != b:
            return (f"ranks disagree on the synchronized layers: rank {me} has {a[0]!r} as {a[1]} with "
                    f"{list(a[2])}, rank {rank} has {b[0]!r} as {b[1]} with {list(b[2])}. Every rank must build "
                    f"the same model (same architecture, conversion and dtype) before sync_statistics.")
    return (f"ranks disagree on the synchronized layers: rank {me} has {len(mine)}, rank {rank} has "
            f"{len(theirs)}. Every rank must build the same model (same architecture and conversion) before "
            f"sync_statistics.")
