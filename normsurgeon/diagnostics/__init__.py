"""Diagnostics: pre-activation statistics at every norm site and the failure-mode metrics."""
from .accumulators import InstanceMoments
from .recorder import LayerStatistics, Recorder

__all__ = ["Recorder", "LayerStatistics", "InstanceMoments"]
