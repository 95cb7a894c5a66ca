"""Step hooks: what stateful normalization layers need from the training loop.

Some targets keep state across iterations (Cross-Iteration BN counts optimizer steps for its
burn-in; Memorized BN refreshes its newest memory entry by re-running the batch under the
updated weights). They cannot see the optimizer, so the loop tells them, once per step::

    loss.backward()
    optimizer.step()
    normsurgeon.after_step(model, inputs)   # inputs: the batch the step was computed on

``normsurgeon.finetune`` does this for you. The call is cheap when the model has no stateful
layer (it only walks the modules), so a custom loop can always call it.

The protocol a layer implements (both optional):

- ``after_optimizer_step(self) -> None``: called once after every optimizer step, after the
  refresh forward below.
- ``refreshes_after_step: bool`` (True) together with a ``refreshing: bool`` attribute: the
  layer wants a no-grad forward of the same batch under the new weights. ``after_step`` sets
  ``refreshing = True`` on such layers for that forward and runs the model in its current
  mode. Every other buffer of the model (other BatchNorms' running statistics, counters) is
  restored afterwards, so the refresh forward changes only what the refreshing layers write.
  A layer in eval mode (statistics frozen, e.g. by ``finetune``'s default) takes no part: it
  is not refreshed and its hook is not called (its statistics did not train in that step).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..model_state import preserved


def stateful_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer that implements the step-hook protocol."""
    return [(n, m) for n, m in model.named_modules()
            if callable(getattr(m, "after_optimizer_step", None)) or getattr(m, "refreshes_after_step", False)]


def needs_step_hooks(model: nn.Module) -> bool:
    """True when the model has a layer that needs ``after_step`` after each optimizer step."""
    return bool(stateful_layers(model))


def after_step(model: nn.Module, inputs: Any = None) -> None:
    """Tell the model's stateful layers that an optimizer step happened on ``inputs``.

    ``inputs`` is what the model was called with (a tensor, or a tuple of positional
    arguments); it is needed only when a layer refreshes after the step (Memorized BN).
    """
    layers = [m for _, m in stateful_layers(model) if m.training]  # frozen (eval-mode) layers sit the step out
    refreshing = [m for m in layers if getattr(m, "refreshes_after_step", False)]
    if refreshing:
        if inputs is None:
            names = [n for n, m in stateful_layers(model) if getattr(m, "refreshes_after_step", False) and m.training]
            raise ValueError(f"after_step needs the batch the step was computed on: {len(names)} layers "
                             f"(e.g. {names[0]!r}) re-run it under the new weights. Call "
                             f"normsurgeon.after_step(model, inputs).")
        _refresh_forward(model, refreshing, inputs)
    for m in layers:
        hook = getattr(m, "after_optimizer_step", None)
        if callable(hook):
            hook()


def _refresh_forward(model: nn.Module, refreshing: list[nn.Module], inputs: Any) -> None:
    """No-grad forward with ``refreshing`` layers flagged; every other buffer is restored."""
    owned = {id(b) for m in refreshing for b in m.buffers()}
    for m in refreshing:
        m.refreshing = True
    try:
        with preserved(model, modes=False, buffers=True, keep=owned), torch.no_grad():
            model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    finally:
        for m in refreshing:
            m.refreshing = False
