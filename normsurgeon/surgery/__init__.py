"""Model surgery: tracing, site discovery, the target registry, rewriting and the report.

Rooms: ``graph/`` (analyses of the model's graph: tracing, sites, shape probe, pairings, producers,
shortcuts, functional norm calls, forward rewrites), ``targets/`` (the registry and the built-in
targets, with the weight ``transfer`` and ``groups`` policy they use), and the pipeline here (``pipeline``,
``sources``, ``report``, ``persist``).

The public extension API lives here: ``register_target`` / ``unregister_target`` with the types a
builder takes and returns (``SourceNorm``, ``SiteInfo``, ``Built``, ``Transfer``, ``SkipSite``) and the
graph contexts a target may ask for (``activation_context``, ``shortcut_context``,
``producer_context``, over a ``GraphContext``). See ``examples/custom_target.py``.
"""
from .graph.graph_context import GraphContext
from .graph.pairing import Pairing, activation_context
from .graph.producers import Producer, producer_context
from .graph.shortcuts import shortcut_context
from .pipeline import convert, plan
from .report import ConversionReport, SiteRow
from .targets import batch_group, domain, proxy, standard, stateful  # noqa: F401  (register the built-in targets)
from .targets.registry import (Built, ConversionError, SiteInfo, SkipSite, Target, available_targets, get_target,
                               register_target, unregister_target)
from .sources import SourceNorm, register_source
from .targets.transfer import Transfer

__all__ = ["convert", "plan", "ConversionError", "ConversionReport", "SiteRow", "Built", "SiteInfo",
           "SkipSite", "SourceNorm", "Transfer", "Target", "available_targets", "get_target", "register_target",
           "unregister_target", "register_source", "GraphContext", "Pairing", "Producer", "activation_context",
           "shortcut_context", "producer_context"]
