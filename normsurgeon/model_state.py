"""Small helpers about a model's state: where it lives, what to give back after running it
(``preserved``: train/eval flags, buffers, parameters), its running-statistics layers."""
from __future__ import annotations

import contextlib
import itertools
from typing import Callable

import torch
from torch import nn


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless model)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def preserved(model: nn.Module, *, modes: bool = True, buffers: bool = False, parameters: bool = False,
              keep: set[int] = frozenset(), on_restore: Callable[[list[str]], None] | None = None):
    """Give ``model`` back as it was on exit: the one way normsurgeon saves and restores state.

    ``modes``: every module's own ``training`` flag (never ``model.train(flag)``, which would reset a
    stage the user froze with ``model.layer1.eval()``). ``buffers`` / ``parameters``: every tensor's
    value, shape and identity (the same tensor object stays registered, so optimizers and aliases
    still hold it); buffers added inside are removed. Tensors whose ``id`` is in ``keep`` keep what
    happened to them. ``on_restore(names)`` is called with the qualified names of the tensors that
    had changed, when there are any.
    """
    flags = [(m, m.training) for m in model.modules()] if modes else []
    saved = []  # (module name, store, its entries as they were, the values of its tensors)
    for prefix, module in model.named_modules():
        for store in ([module._buffers] if buffers else []) + ([module._parameters] if parameters else []):
            values = {k: t.detach().clone() for k, t in store.items() if t is not None and id(t) not in keep}
            saved.append((prefix, store, dict(store), values))
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag
        changed = []
        with torch.no_grad():
            for prefix, store, entries, values in saved:
                kept = {k for k, t in entries.items() if t is not None and id(t) in keep}
                names = [k for k in set(store) | set(entries) if k not in kept and store.get(k) is not entries.get(k)]
                names += [k for k, v in values.items() if k not in names
                          and (store[k].shape != v.shape or not torch.equal(store[k].detach(), v))]
                if not names:
                    continue
                changed += [f"{prefix}.{k}" if prefix else k for k in sorted(names)]
                now = dict(store)
                store.clear()  # the very same tensor objects, in their order (kept ones as they are now)
                store.update({k: now[k] if k in kept and k in now else t for k, t in entries.items()})
                for k, v in values.items():
                    if entries[k].shape == v.shape:
                        entries[k].copy_(v)
                    else:
                        entries[k].data = v
        if changed and on_restore is not None:
            on_restore(changed)


def running_statistics_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every norm that keeps running statistics, found by what it holds:
    ``running_mean`` and ``running_var`` tensors and a ``momentum`` attribute (torch's and timm's
    BatchNorms, normsurgeon's bn, bgn, iebn, cbn, mbn, dsbn)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(getattr(m, "running_mean", None), torch.Tensor)
            and isinstance(getattr(m, "running_var", None), torch.Tensor) and hasattr(m, "momentum")]
