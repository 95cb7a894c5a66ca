"""The target registry: a name → how to build the new norm from a source norm.

A target is registered once with a builder ``build(source, site, options) -> Built`` that
creates the new module, moves the pretrained tensors over by its documented rule and says
what it transferred, reset and dropped. A builder raises ``SkipSite(reason)`` for a site it
cannot serve (e.g. instance statistics over one position) and ``ValueError`` for options that
are wrong for a layer. Two optional hooks let a target own its graph work:

- ``context(graphs) -> {site name: value}``: what the target needs to know beyond the module,
  read from the conversion's shared ``GraphContext`` (``graph_context.py``); the value reaches the
  builder as ``site.context``. Built in: ``pairing.activation_context`` (the activation after the
  norm), ``shortcuts.shortcut_context`` (on a residual shortcut), ``producers.producer_context``
  (the conv producing the input).
- ``finalize(model, installed, graphs, report) -> undo``: runs once after every new module is
  installed, with ``installed`` the (Site, Built) pairs of the sites built by targets sharing
  this finalize; it may change the model further (Proxy Norm takes the fused activations out of
  the data path) and returns a callable that undoes what it did (or None). It raises
  ``ConversionError`` after undoing its own changes when the result does not work; the pipeline
  then undoes the installs, so the input model stays as it was.

``register_target`` / ``unregister_target`` are public so users can add variants without
editing the package (``examples/custom_target.py``).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

COMMON_OPTIONS = ("eps",)


class SkipSite(Exception):
    """Raised by a builder: this site is left as it is, for the reason given."""


class ConversionError(RuntimeError):
    """The converted model failed verification; the input model is unchanged."""


@dataclass
class Built:
    """A new norm module and the account of its weight transfer."""

    module: nn.Module
    transferred: list[str] = field(default_factory=list)
    reset: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    exact: str = "no"  # "train+eval", "eval" or "no": where the swap is function-preserving
    consumes_activation: bool = False  # the module applies the following activation itself


@dataclass(frozen=True)
class Target:
    """A registered conversion target."""

    name: str
    build: Callable  # (SourceNorm, SiteInfo, dict) -> Built
    summary: str
    options: tuple[str, ...] = ()
    batch_dependent: bool = False
    context: Callable | None = None  # (GraphContext) -> {site name: value}, see the module docstring
    finalize: Callable | None = None  # (model, [(Site, Built)], GraphContext, report) -> undo or None

    @property
    def needs_context(self) -> bool:
        return self.context is not None

    def check_options(self, options: dict) -> None:
        allowed = set(self.options) | set(COMMON_OPTIONS)
        for key in options:
            if key not in allowed:
                close = difflib.get_close_matches(key, sorted(allowed), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise TypeError(f"unknown option {key!r} for target {self.name!r}.{hint} "
                                f"Options of {self.name!r}: {', '.join(sorted(allowed))}")


_TARGETS: dict[str, Target] = {}


def register_target(name: str, build: Callable, *, summary: str, options: tuple[str, ...] = (),
                    batch_dependent: bool = False, context: Callable | None = None,
                    finalize: Callable | None = None, replace: bool = False) -> Target:
    """Add a conversion target ``name`` (see the module docstring for the builder contract and the
    ``context`` / ``finalize`` hooks); returns the registered ``Target``."""
    if not isinstance(name, str) or not name:
        raise TypeError("a target name is a non-empty string")
    if name in _TARGETS and not replace:
        raise ValueError(f"target {name!r} is already registered; pass replace=True to override it")
    for what, hook in (("build", build), ("context", context), ("finalize", finalize)):
        if hook is not None and not callable(hook):
            raise TypeError(f"{what}= takes a callable, got {type(hook).__name__}: e.g. "
                            f"context=normsurgeon.surgery.activation_context")
    target = Target(name, build, summary, tuple(options), batch_dependent, context, finalize)
    _TARGETS[name] = target
    return target


def unregister_target(name: str) -> Target:
    """Remove the target ``name`` (e.g. one a test or a notebook registered) and return it.
    Unknown names are a ValueError listing the registered ones."""
    if name not in _TARGETS:
        raise ValueError(f"no target {name!r} is registered; registered targets: {', '.join(_TARGETS)}")
    return _TARGETS.pop(name)


def available_targets() -> dict[str, str]:
    """Target name → one-line summary, in registration order."""
    return {name: t.summary for name, t in _TARGETS.items()}


def get_target(name) -> Target:
    """The registered target ``name``; a ValueError lists the targets and the closest name."""
    if isinstance(name, Target):
        return name
    if not isinstance(name, str):
        raise TypeError(f"to= takes a target name (str), got {type(name).__name__}; "
                        f"targets: {', '.join(_TARGETS)}")
    if name not in _TARGETS:
        close = difflib.get_close_matches(name.lower(), list(_TARGETS), n=1, cutoff=0.4)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown target {name!r}.{hint} Available targets: {', '.join(_TARGETS)}")
    return _TARGETS[name]


@dataclass
class SiteInfo:
    """What a builder may know about the site besides the source norm."""

    name: str
    input_shape: tuple[int, ...] | None = None  # one observed input shape, None if unknown
    context: object | None = None  # graph context for targets that need it (pairing.Pairing)

    def positions(self, channels_last: bool) -> int | None:
        """Positions per (sample, channel): the product of the non-batch, non-channel sizes."""
        if self.input_shape is None:
            return None
        dims = self.input_shape[1:-1] if channels_last else self.input_shape[2:]
        count = 1
        for d in dims:
            count *= d
        return count
