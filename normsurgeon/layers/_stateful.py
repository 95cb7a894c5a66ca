"""What stateful layers (CBN, MBN) share: noticing a training loop that never reports its steps.

Such a layer counts its gradient-enabled training forwards since the last
``after_optimizer_step`` (a Python counter, not state). When the count reaches
``step_hook_patience`` while the layer depends on the hook, it warns once per process and
layer class: the loop forgot ``normsurgeon.after_step(model, inputs)``. Forwards run by
``torch.compile`` are not counted (the counter would be a recompile guard), so a compiled loop
without the hook is not warned about.
"""
from __future__ import annotations

import warnings

import torch

_WARNED: set[str] = set()


class StepHookClient:
    """Mixin for layers that need ``normsurgeon.after_step`` after every optimizer step."""

    step_hook_patience: int = 100  # training forwards without a reported step before warning
    _forwards_since_step: int = 0

    def _needs_step_hook(self) -> bool:
        """Whether this layer computes something wrong without the hook right now."""
        return True

    def _missing_hook_consequence(self) -> str:
        return ""

    def _note_training_forward(self) -> None:
        if not torch.is_grad_enabled():
            return  # refresh / recalibration forwards are not training iterations
        if torch.compiler.is_compiling():
            return  # a Python counter read in a compiled forward would recompile it at every step
        self._forwards_since_step += 1
        if self._forwards_since_step == self.step_hook_patience and self._needs_step_hook():
            kind = type(self).__name__
            if kind in _WARNED:
                return
            _WARNED.add(kind)
            warnings.warn(
                f"{kind} layers ran {self.step_hook_patience} training forwards with gradients and no "
                f"optimizer step was reported to them: call normsurgeon.after_step(model, inputs) after "
                f"every optimizer.step() (normsurgeon.finetune does it for you). "
                f"{self._missing_hook_consequence()} (If you really accumulate gradients over this many "
                f"forwards, raise {kind}.step_hook_patience.)", UserWarning, stacklevel=4)

    def _note_step(self) -> None:
        self._forwards_since_step = 0
