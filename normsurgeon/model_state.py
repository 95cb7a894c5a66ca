"""Small helpers about a model's state: where it lives, its train/eval flags, buffers kept aside,
its running-statistics layers."""
from __future__ import annotations

import contextlib
import itertools

import torch
from torch import nn


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless model)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def training_flags(model: nn.Module) -> dict[nn.Module, bool]:
    """Every module's ``training`` flag, to restore with :func:`restore_training_flags`."""
    return {m: m.training for m in model.modules()}


def restore_training_flags(flags: dict[nn.Module, bool]) -> None:
    for m, training in flags.items():
        m.training = training


@contextlib.contextmanager
def flags_preserved(model: nn.Module):
    """Every module's own ``training`` flag is given back on exit (never ``model.train(flag)``,
    which would reset a stage the user froze with ``model.layer1.eval()``)."""
    flags = training_flags(model)
    try:
        yield
    finally:
        restore_training_flags(flags)


def running_statistics_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every norm that keeps running statistics, found by what it holds:
    ``running_mean`` and ``running_var`` tensors and a ``momentum`` attribute (torch's and timm's
    BatchNorms, normsurgeon's bn, bgn, iebn, cbn, mbn, dsbn)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(getattr(m, "running_mean", None), torch.Tensor)
            and isinstance(getattr(m, "running_var", None), torch.Tensor) and hasattr(m, "momentum")]


@contextlib.contextmanager
def buffers_restored(model: nn.Module, except_ids: set[int] = frozenset()):
    """Every buffer of ``model`` (but those whose id is in ``except_ids``) gets its value back on exit."""
    saved = [(b, b.clone()) for b in model.buffers() if id(b) not in except_ids]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
