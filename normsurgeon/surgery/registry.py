"""The target registry: a name → how to build the new norm from a source norm.

A target is registered once with a builder ``build(source, site, options) -> Built`` that
creates the new module, moves the pretrained tensors over by its documented rule and says
what it transferred, reset and dropped. A builder raises ``SkipSite(reason)`` for a site it
cannot serve (e.g. instance statistics over one position) and ``ValueError`` for options that
are wrong for a layer. ``register_target`` is public so users can add variants without
editing the package.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

COMMON_OPTIONS = ("eps",)
CONTEXTS = ("activation", "shortcut", "producer")


class SkipSite(Exception):
    """Raised by a builder: this site is left as it is, for the reason given."""


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
    needs_context: bool = False  # needs graph context beyond the module itself
    context: str = "activation"  # which: "activation" (pairing.Pairing), "shortcut" (bool) or
    # "producer" (producers.Producer, or the reason a site has no usable producing conv)

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
                    batch_dependent: bool = False, needs_context: bool = False,
                    context: str = "activation", replace: bool = False) -> Target:
    """Add a conversion target ``name`` (see the module docstring for the builder contract)."""
    if not isinstance(name, str) or not name:
        raise TypeError("a target name is a non-empty string")
    if name in _TARGETS and not replace:
        raise ValueError(f"target {name!r} is already registered; pass replace=True to override it")
    if context not in CONTEXTS:
        raise ValueError(f"context={context!r}: one of {', '.join(map(repr, CONTEXTS))}")
    target = Target(name, build, summary, tuple(options), batch_dependent, needs_context, context)
    _TARGETS[name] = target
    return target


def unregister_target(name: str) -> None:
    _TARGETS.pop(name, None)


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
