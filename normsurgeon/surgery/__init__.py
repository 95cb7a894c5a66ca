"""Model surgery: tracing, site discovery, the target registry, rewriting and the report.

The public extension API lives here: ``register_target`` / ``unregister_target`` with the types a
builder takes and returns (``SourceNorm``, ``SiteInfo``, ``Built``, ``Transfer``, ``SkipSite``) and the
graph contexts a target may ask for (``activation_context``, ``shortcut_context``,
``producer_context``, over a ``GraphContext``). See ``examples/custom_target.py``.
"""
from . import (batch_group_targets, domain_targets, proxy_targets, standard_targets,  # noqa: F401
               stateful_targets)  # (register the built-in targets)
from .graph_context import GraphContext
from .pairing import Pairing, activation_context
from .pipeline import convert, plan
from .producers import Producer, producer_context
from .registry import (Built, ConversionError, SiteInfo, SkipSite, Target, available_targets, get_target,
                       register_target, unregister_target)
from .report import ConversionReport, SiteRow
from .shortcuts import shortcut_context
from .sources import SourceNorm, register_source
from .transfer import Transfer

__all__ = ["convert", "plan", "ConversionError", "ConversionReport", "SiteRow", "Built", "SiteInfo",
           "SkipSite", "SourceNorm", "Transfer", "Target", "available_targets", "get_target", "register_target",
           "unregister_target", "register_source", "GraphContext", "Pairing", "Producer", "activation_context",
           "shortcut_context", "producer_context"]
