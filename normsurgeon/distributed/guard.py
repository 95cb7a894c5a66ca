"""A converted model notices when torch's or timm's ``convert_sync_batchnorm`` destroyed its variants.

``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (and timm's ``convert_sync_batchnorm``) rebuild
every ``_BatchNorm`` subclass as a plain ``SyncBatchNorm`` with the same num_features, affine and
running statistics: bgn's groups, iebn's gate, cbn's window, mbn's memory, a channels-last layout
and timm's fused drop/act are silently dropped (timm issue #1254 is this bug for BatchNormAct2d).
``normsurgeon.convert`` therefore leaves a forward pre-hook on the model it returns: at every
forward it checks that each such layer is still in its place (one dict lookup per layer) and raises,
naming the layer and what was lost, when a ``SyncBatchNorm`` took it. The fix is
``normsurgeon.sync_statistics(model)``, which keeps every variant and also trains on CPU (gloo).
A plain channels-first BatchNorm without fused act is equivalent to ``SyncBatchNorm`` and not guarded.
"""
from __future__ import annotations

import torch
from torch import nn


def _loses_something(layer: nn.Module) -> bool:
    from ..layers import BatchNorm
    if not isinstance(layer, nn.modules.batchnorm._BatchNorm) or not type(layer).__module__.startswith("normsurgeon."):
        return False
    if type(layer) is not BatchNorm and type(layer).__name__ != "SyncedBatchNorm":
        return True  # every variant has its own forward and state
    fused = any(type(getattr(layer, n, None)) not in (nn.Identity, type(None)) for n in ("act", "drop"))
    return fused or bool(getattr(layer, "channels_last", False))


class ConvertSyncGuard:
    """Forward pre-hook: (parent, attribute, layer) of every guarded layer; raises when a
    ``SyncBatchNorm`` sits where the layer was. Copied with the model by ``deepcopy``."""

    def __init__(self, model: nn.Module):
        self.sites = []
        for name, parent in model.named_modules():
            for child_name, child in parent.named_children():
                if _loses_something(child):
                    self.sites.append((f"{name}.{child_name}" if name else child_name, parent, child_name, child))

    def __call__(self, model: nn.Module, args) -> None:
        if torch.compiler.is_compiling():
            return
        for name, parent, attribute, layer in self.sites:
            now = parent._modules.get(attribute)
            if now is not layer and isinstance(now, nn.SyncBatchNorm):
                raise RuntimeError(_message(name, layer, now))


def _message(name: str, layer: nn.Module, now: nn.Module) -> str:
    lost = sorted(set(layer.state_dict()) - set(now.state_dict()))
    what = []
    if lost:
        what.append(f"its state {lost[:6]}{' …' if len(lost) > 6 else ''}")
    act = getattr(layer, "act", None)
    if act is not None and type(act) is not nn.Identity:
        what.append(f"its fused {type(act).__name__} activation")
    if getattr(layer, "channels_last", False):
        what.append("its channels-last layout")
    what.append(f"{type(layer).__name__}'s own normalization")
    return (f"'{name}' was a normsurgeon {type(layer).__name__} and is now a {type(now).__module__}."
            f"{type(now).__name__}: torch.nn.SyncBatchNorm.convert_sync_batchnorm (or timm's "
            f"convert_sync_batchnorm) rebuilt it as a plain SyncBatchNorm, dropping {', '.join(what)}. Start again "
            f"from the model before that call and use normsurgeon.sync_statistics(model) instead: it keeps every "
            f"variant and also trains on CPU (gloo).")


def install_guard(model: nn.Module) -> None:
    """(Re)install the guard on ``model``: one hook covering its current layers."""
    for key in [k for k, hook in model._forward_pre_hooks.items() if isinstance(hook, ConvertSyncGuard)]:
        del model._forward_pre_hooks[key]
    guard = ConvertSyncGuard(model)
    if guard.sites:
        model.register_forward_pre_hook(guard)
