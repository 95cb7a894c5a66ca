"""``recalibrate_bn``: precise running statistics, recomputed under the final weights.

During training, running statistics are an exponential average over batches computed under
changing weights. Recalibration resets them and re-estimates each as the plain average over
``data`` of the batch statistics under the current weights (BatchNorm's ``momentum=None``
cumulative average: mean of batch means, mean of unbiased batch variances).

It covers every running-statistics norm of the project, found by what it holds, not by its
class: a module with ``running_mean`` and ``running_var`` buffers and a ``momentum``
attribute — torch's and timm's BatchNorms, normsurgeon's ``bn``, ``bgn``, ``iebn``, and the
domain-specific BN (per domain: batches carrying a domain are routed to it, and a domain
that no batch reached keeps its statistics). Statistics a layer did not see at all (an aux
head that the forward skips) are kept too. Every other buffer of the model (cross-iteration
memories, counters of stateful layers) is restored afterwards, and train/eval flags are
restored.

A layer that must not recalibrate through its training forward implements
``begin_recalibration()`` and ``end_recalibration(completed)`` and owns all its buffers in
between (they are not restored here): Memorized BN mirrors its memory into the running
statistics, so it accumulates its own population statistics; Cross-Iteration BN normalizes as
plain BatchNorm meanwhile (its window, frozen without gradients, would shift every batch).

Under torchrun (a process group of 2 or more ranks) the model's layers are synchronized for the
recalibration (``normsurgeon.sync_statistics``, in place, undone at the end): every batch statistic
is over all ranks' batches, so the population statistics are over all ranks' data and the same on
every rank. Ranks with different numbers of batches all stop at the end of the shortest (each
synced forward waits for every rank, so going on would hang); a rank that leaves batches unread
warns with the count. A model that still has torch's or timm's BatchNorms is recalibrated per
rank, with a warning.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import warnings

import torch
from torch import nn

from ..model_state import device_of, preserved, running_statistics_layers
from ..distributed.ranks import Ranks
from ..distributed.sync import synced_layers
from .batches import check_inputs
from ..domains.routing import router
from .finetune import split_batch


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data, *, num_batches: int | None = None, inplace: bool = True) -> nn.Module:
    """Re-estimate every running-statistics norm of ``model`` on ``data``; returns the model.

    ``data``: a tensor (one batch) or an iterable of batches (x, (x, y) or (x, y, domain)).
    Modifies ``model`` in place unless ``inplace=False`` (then a recalibrated copy).
    Batches must have ≥ 2 samples (batch statistics of one sample are meaningless).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"recalibrate_bn expects an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    layers = [m for _, m in running_statistics_layers(model)]
    if not layers:
        raise ValueError("recalibrate_bn: the model has no layer with running statistics (running_mean, "
                         "running_var, momentum); nothing to recalibrate")
    protocol = [m for m in layers if callable(getattr(m, "begin_recalibration", None))
                and callable(getattr(m, "end_recalibration", None))]
    owned = {id(b) for m in layers for name, b in m.named_buffers(recurse=False)
             if name in ("running_mean", "running_var", "num_batches_tracked")}
    owned |= {id(b) for m in protocol for b in m.buffers(recurse=False)}
    before = [(m, m.running_mean.clone(), m.running_var.clone(), m.momentum) for m in layers]
    route, device = router(model), device_of(model)
    # flags, cross-iteration windows, counters: as they were
    with _over_every_rank(model), preserved(model, buffers=True, keep=owned):
        for m in protocol:
            m.begin_recalibration()  # snapshots its state before the reset below
        for m in layers:
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
            if isinstance(getattr(m, "num_batches_tracked", None), torch.Tensor):
                m.num_batches_tracked.zero_()
            m.momentum = None
        model.train()
        completed = False
        try:
            if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
                raise ValueError(f"recalibrate_bn: num_batches must be a positive int or None, got {num_batches!r}")
            count = 0
            ranks = Ranks.current() if synced_layers(model) else None
            batches = iter(itertools.islice([data] if isinstance(data, torch.Tensor) else data, num_batches))
            while True:
                batch = next(batches, None)
                if ranks is not None and ranks.any(batch is None):  # some rank has no batch left: all stop
                    if batch is not None:
                        warnings.warn(f"recalibrate_bn under {ranks.world} processes: another rank ran out of "
                                      f"batches after {count}, so rank {ranks.rank} left the rest of its batches "
                                      f"unread (a synced forward needs every rank). Give every rank the same "
                                      f"number of batches (a DistributedSampler shard).",
                                      UserWarning, stacklevel=3)
                    break
                if batch is None:
                    break
                x, _, d = split_batch(batch)
                x = check_inputs(x, "recalibrate_bn")
                if x.shape[0] < 2 and not synced_layers(model):  # (synced: the layers check all ranks' count)
                    raise ValueError(f"recalibrate_bn: a batch of {x.shape[0]} sample; batch statistics need ≥ 2 "
                                     f"samples per batch")
                with route(d):
                    model(x.to(device))
                count += 1
            if count == 0:
                raise ValueError("recalibrate_bn: data is empty (no batch)" + (
                    "" if ranks is None else f" on at least one of the {ranks.world} ranks"))
            completed = True
        finally:
            for m in protocol:
                m.end_recalibration(completed)
            for m, mean, var, momentum in before:
                m.momentum = momentum
                seen = getattr(m, "num_batches_tracked", None)
                if isinstance(seen, torch.Tensor):
                    unseen = (seen == 0).view(-1, *([1] * (mean.ndim - 1))) if seen.ndim else (seen == 0)
                    m.running_mean.copy_(torch.where(unseen, mean, m.running_mean))
                    m.running_var.copy_(torch.where(unseen, var, m.running_var))
    return model


def _over_every_rank(model: nn.Module):
    """Synchronized layers for the block under torchrun; a no-op in one process."""
    from ..distributed.sync import synchronized, unsyncable_layers

    if Ranks.current() is None:
        return contextlib.nullcontext()
    left = unsyncable_layers(model)
    if left:
        warnings.warn(f"recalibrate_bn under {Ranks.current().world} processes: {len(left)} layer(s) such as "
                      f"{left[0]} are torch/timm BatchNorms, so every rank recalibrates on its own data only. "
                      f"Convert them with normsurgeon.convert(model, to='bn') to recalibrate over every rank.",
                      UserWarning, stacklevel=3)
        return contextlib.nullcontext()
    return synchronized(model)
