"""Diagnostics: pre-activation statistics at every norm site and the failure-mode metrics."""
from .accumulators import InstanceMoments
from .diagnose import diagnose
from .recorder import LayerStatistics, Recorder
from .report import DiagnosticsReport

__all__ = ["Recorder", "LayerStatistics", "InstanceMoments", "diagnose", "DiagnosticsReport"]
