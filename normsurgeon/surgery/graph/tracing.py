"""torch.fx tracing with normsurgeon's leaf rules, and a readable account of failures.

Leaves (never traced into, so their train/eval behaviour and buffer updates survive):
every registered norm class and its subclasses, timm's notrace registry (modules and
functions), torchvision's FrozenBatchNorm2d and StochasticDepth, timm's DropPath /
DropBlock2d / StdConv layers (StdConv's internal ``F.batch_norm`` on weights is not a site),
and every elementwise activation module (timm's Mish would otherwise be traced into ops).

When a submodule cannot be traced, it becomes a leaf and tracing is retried ("progressive
leafing"), so one odd block does not cost the whole graph; norms inside it are still found
by the module walk. Only a failure in the root's own forward gives up (``TraceResult.graph``
is None) with the location of the op that broke tracing.
"""
from __future__ import annotations

import linecache
import os
import traceback
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ...model_state import preserved
from ..sources import match_source

_TORCH_DIR = os.path.dirname(torch.__file__)
_MAX_LEAF_RETRIES = 32


def _leaf_types() -> tuple[type, ...]:
    import timm.layers as tl
    import timm.models  # noqa: F401  (registers the model files' notrace modules)
    from timm.layers import get_notrace_modules
    from torchvision.ops.misc import FrozenBatchNorm2d
    from torchvision.ops.stochastic_depth import StochasticDepth
    from .activations import elementwise_module_types
    extra = (FrozenBatchNorm2d, StochasticDepth, tl.DropPath, tl.DropBlock2d, tl.StdConv2d,
             tl.StdConv2dSame, tl.ScaledStdConv2d, tl.ScaledStdConv2dSame)
    return tuple(get_notrace_modules()) + extra + elementwise_module_types()


def _leaf_functions() -> tuple:
    from timm.layers import get_notrace_functions
    return tuple(f for f in get_notrace_functions() if callable(f))


class NormTracer(fx.Tracer):
    """An ``fx.Tracer`` with normsurgeon's leaf rules that remembers where it was when it failed."""

    def __init__(self, extra_leaf_names: set[str] = frozenset()):
        super().__init__(autowrap_functions=_leaf_functions())
        self.leaf_types = _leaf_types()
        self.extra_leaf_names = set(extra_leaf_names)
        self.entered: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (qualname in self.extra_leaf_names or isinstance(m, self.leaf_types)
                or match_source(m).is_site or super().is_leaf_module(m, qualname))

    def call_module(self, m, forward, args, kwargs):
        self.entered.append(self.path_of_module(m))
        result = super().call_module(m, forward, args, kwargs)
        self.entered.pop()
        return result


@dataclass
class TraceResult:
    """A graph of the model (or None) and what tracing had to give up on."""

    graph: fx.Graph | None
    leaves_added: dict[str, str] = field(default_factory=dict)  # qualname -> why
    error: str | None = None  # root failure: message and location

    @property
    def ok(self) -> bool:
        return self.graph is not None


def failure_location(exc: BaseException) -> str:
    """'file:line in func: source' of the innermost frame outside torch (the op that broke)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not os.path.abspath(f.filename).startswith(_TORCH_DIR)
              and os.path.abspath(f.filename) != os.path.abspath(__file__)]
    if not frames:
        return "inside torch"
    f = frames[-1]
    line = (f.line or linecache.getline(f.filename, f.lineno)).strip()
    return f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}: `{line}`"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def trace(model: nn.Module, train: bool = True, leaves_first: frozenset[str] = frozenset()) -> TraceResult:
    """Trace ``model`` in train (or eval) mode, with the submodules named in ``leaves_first`` as leaves
    too; unrecoverable failures come back as ``error``. Every module's own train/eval flag is given
    back afterwards."""
    leaves: dict[str, str] = {}
    with preserved(model):
        model.train(train)
        for _ in range(_MAX_LEAF_RETRIES):
            tracer = NormTracer(set(leaves) | set(leaves_first))
            try:
                graph = tracer.trace(model)
                return TraceResult(graph, leaves)
            except Exception as exc:  # noqa: BLE001  (any failure is reported, not raised)
                stack = [name for name in tracer.entered if name and name not in leaves]
                reason = f"{_first_line(exc)} at {failure_location(exc)}"
                if not stack:
                    return TraceResult(None, leaves, reason)
                leaves[stack[-1]] = reason
        return TraceResult(None, leaves, f"gave up after {_MAX_LEAF_RETRIES} untraceable submodules")
