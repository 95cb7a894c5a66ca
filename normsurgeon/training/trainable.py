"""Which parameters fine-tuning trains: ``finetune(..., trainable=...)``.

Named selections (combine with "+", e.g. ``"norm+head"``):
- ``"all"``: every parameter that requires grad (the default);
- ``"norm"``: the parameters of every normalization site (``surgery.graph.sites.find_sites``: the
  norm modules and what they own: γ, β, Proxy Norm's γ̃, β̃, IEBN's gate);
- ``"head"``: the classifier: ``model.get_classifier()`` for timm models, else the last
  ``nn.Linear`` in module order (torchvision's ``fc`` / ``classifier[-1]`` / ``heads.head``).

Or a list of glob patterns on parameter names (``["layer4.*", "fc.*"]``), or a callable
``(name, parameter) -> bool``. Parameters that already have ``requires_grad=False`` are
never trained. Everything not selected is frozen for the run (``requires_grad=False``) and
given back its flag afterwards.
"""
from __future__ import annotations

import contextlib
import fnmatch
from typing import Callable, Iterable

from torch import nn

SELECTIONS = ("all", "norm", "head")


def _norm_names(model: nn.Module) -> set[str]:
    from ..surgery.graph.sites import find_sites

    names = set()
    for site in find_sites(model):
        for prefix in site.names:
            names |= {f"{prefix}.{n}" if prefix else n for n, _ in site.module.named_parameters()}
    return names


def _head_names(model: nn.Module) -> set[str]:
    head = None
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
    else:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    owned = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    if not owned:
        raise ValueError(f"trainable='head': found no classifier in {type(model).__name__} (no get_classifier() "
                         f"with parameters and no nn.Linear); name its parameters with glob patterns instead, "
                         f"e.g. trainable=['fc.*']")
    return {n for n, p in model.named_parameters() if id(p) in owned}


def select_trainable(model: nn.Module, trainable: str | Iterable[str] | Callable = "all") -> list[str]:
    """The names of the parameters ``trainable`` selects (see the module docstring), in model order."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if callable(trainable):
        chosen = {n for n, p in params if trainable(n, p)}
        what = "the callable"
    elif isinstance(trainable, str):
        parts = [s.strip() for s in trainable.split("+")]
        unknown = [s for s in parts if s not in SELECTIONS]
        if unknown:
            raise ValueError(f"trainable={trainable!r}: unknown selection {unknown[0]!r}; use one of "
                             f"{', '.join(SELECTIONS)} (joined with '+', e.g. 'norm+head'), a list of glob "
                             f"patterns on parameter names, or a callable(name, parameter) -> bool")
        chosen = set()
        for part in parts:
            chosen |= {n for n, _ in params} if part == "all" else (
                _norm_names(model) if part == "norm" else _head_names(model))
        what = repr(trainable)
    else:
        patterns = list(trainable)
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise TypeError(f"trainable must be a string, a list of glob patterns or a callable, got {trainable!r}")
        chosen = {n for n, _ in params if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)}
        what = f"the patterns {patterns}"
    names = [n for n, _ in params if n in chosen]
    if not names:
        example = ", ".join(n for n, _ in params[:3])
        raise ValueError(f"trainable: {what} selects no trainable parameter of {type(model).__name__} "
                         f"({len(params)} parameters require grad, e.g. {example}); nothing would be trained")
    return names


@contextlib.contextmanager
def only_trainable(model: nn.Module, names: Iterable[str]):
    """Freeze every parameter not in ``names`` for the duration; restore each flag on exit."""
    keep = set(names)
    frozen = [p for n, p in model.named_parameters() if p.requires_grad and n not in keep]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
