"""The graph analysis every target of one conversion shares.

A target that needs more than its own module (the activation after it, its producing conv,
whether it sits on a residual shortcut) registers ``context=f`` with ``f(graphs) -> {site
name: value}``; the value reaches its builder as ``SiteInfo.context``. ``graphs`` is one
``GraphContext``: the whole-model graph traced in train mode by ``analyze``, the eval-mode graph
traced on first use, the module table, and a cache so that two targets (or two sites) asking
for the same analysis compute it once. The whole model is traced at most twice per conversion;
a module is traced alone only when its own forward is rewritten (``pairing.py``,
``functional_sites.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import fx, nn

from .sites import Analysis
from .tracing import TraceResult, trace


@dataclass
class GraphContext:
    """``model``'s graphs in both modes, its modules, its readable sites, and cached analyses."""

    model: nn.Module
    analysis: Analysis
    site_names: list[str]  # sites whose source can be read (the ones targets may build for)
    _traces: dict[bool, TraceResult] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict)
    _modules: dict[str, nn.Module] | None = None

    def __post_init__(self):
        self._traces[True] = self.analysis.trace

    def graph(self, train: bool = True) -> fx.Graph | None:
        """The whole-model graph in train (or eval) mode; None when the model cannot be traced."""
        if train not in self._traces:
            self._traces[train] = trace(self.model, train=train)
        return self._traces[train].graph

    @property
    def modules(self) -> dict[str, nn.Module]:
        if self._modules is None:
            self._modules = dict(self.model.named_modules())
        return self._modules

    def cached(self, key, compute: Callable[[], object]):
        """``compute()`` the first time ``key`` is asked for, the same value afterwards."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def context_for(self, context: Callable[["GraphContext"], dict] | None) -> dict:
        """What a target's ``context`` callable says about each site (computed once per callable)."""
        if context is None:
            return {}
        return self.cached(("context", context), lambda: context(self))
