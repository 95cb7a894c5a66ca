"""Model surgery: tracing, site discovery, the target registry, rewriting and the report."""
from .pipeline import ConversionError, convert, plan
from .registry import Built, SiteInfo, SkipSite, available_targets, get_target, register_target
from .report import ConversionReport, SiteRow
from .sources import SourceNorm, register_source

__all__ = ["convert", "plan", "ConversionError", "ConversionReport", "SiteRow", "Built", "SiteInfo",
           "SkipSite", "SourceNorm", "available_targets", "get_target", "register_target",
           "register_source"]
