"""What every normsurgeon normalization layer shares: channel layout and a fused drop/act.

Source norms come in two layouts: channels-first (N, C, *) as BatchNorm/GroupNorm and
timm's LayerNorm2d, and channels-last (N, *, C) as a transformer's ``nn.LayerNorm(C)``.
A converted layer keeps the layout of the norm it replaces (``channels_last``), so it is a
drop-in at the same call site. timm's NormAct layers apply ``drop`` then ``act`` after the
norm; converted layers keep both as children named ``drop`` and ``act`` (``nn.Identity``
when absent), so the activation is never silently lost and state_dict keys stay the same.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


class FusedActLayout:
    """Mixin: ``channels_last`` layout handling plus timm-style ``drop`` → ``act`` epilogue.

    Call ``_init_fused(channels_last, act, drop)`` in ``__init__`` after the base class init,
    and ``_apply(x, fn)`` in ``forward`` with ``fn`` mapping a channels-first tensor
    (N, C, *) to a normalized tensor of the same shape.
    """

    channels_last: bool = False
    site_name: str | None = None  # qualified name in the converted model, for error messages

    def _init_fused(self, channels_last: bool = False, act: nn.Module | None = None,
                    drop: nn.Module | None = None) -> None:
        self.channels_last = bool(channels_last)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def _epilogue(self, y: torch.Tensor) -> torch.Tensor:
        """drop then act, skipping the module calls when both are Identity (hot path)."""
        if type(self.drop) is nn.Identity and type(self.act) is nn.Identity:
            return y
        return self.act(self.drop(y))

    def _apply_norm(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if x.ndim < 2:
            raise ValueError(f"{self._where()} expects an input with a batch and a channel axis, "
                             f"got shape {tuple(x.shape)}")
        if self.channels_last:
            y = channels_to_last(fn(channels_to_first(x)))
        else:
            y = fn(x)
        return self._epilogue(y)

    def _refuse_expanded_weights(self) -> None:
        """Opacus's ``grad_sample_mode="ew"`` hands the forward torch's ``ExpandedWeight``
        parameters, which only conv/linear/embedding and F.group_norm/layer_norm/instance_norm
        accept. Layers that compute with γ otherwise call this first, for an error naming them."""
        if type(getattr(self, "weight", None)).__name__ == "ExpandedWeight":
            raise NotImplementedError(
                f"{self._where()} has no per-sample gradient rule in Opacus's grad_sample_mode='ew' "
                f"(torch's expanded weights). Use grad_sample_mode='hooks' (the default), 'functorch' "
                f"or 'ghost', after normsurgeon.make_dp_ready(model).")

    def _where(self) -> str:
        name = type(self).__name__
        return f"{name} at '{self.site_name}'" if self.site_name else name

    def _layout_repr(self) -> str:
        return ", channels_last=True" if self.channels_last else ""


def channels_to_last(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *) → (N, *, C), a view. Written as an explicit permutation rather than
    ``movedim(1, -1)``: the legacy ONNX exporter turns movedim's negative axes into an invalid
    Transpose perm such as {0, -1, 1, 2}."""
    return x.permute(0, *range(2, x.ndim), 1)


def channels_to_first(x: torch.Tensor) -> torch.Tensor:
    """(N, *, C) → (N, C, *), a view (explicit permutation, see ``channels_to_last``)."""
    return x.permute(0, x.ndim - 1, *range(1, x.ndim - 1))


def elements_per_channel(x: torch.Tensor) -> int:
    """Number of positions per (sample, channel) of a channels-first tensor (N, C, *)."""
    return math.prod(x.shape[2:])
