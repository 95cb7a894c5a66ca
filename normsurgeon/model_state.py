"""Small helpers about a model's state: where it lives, its train/eval flags, buffers kept aside."""
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
def buffers_restored(model: nn.Module, except_ids: set[int] = frozenset()):
    """Every buffer of ``model`` (but those whose id is in ``except_ids``) gets its value back on exit."""
    saved = [(b, b.clone()) for b in model.buffers() if id(b) not in except_ids]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
