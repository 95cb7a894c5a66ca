"""Multi-process training: batch statistics over every rank of a torch.distributed process group.

``sync_statistics(model)`` / ``unsync(model)`` (``sync.py``), the collective (``moments.py``), the
synchronized layers (``synced_layers.py``, ``synced_stateful.py``).
"""
from .moments import SyncedMoments, require_process_group, synced_moments
from .sync import sync_statistics, synced_layers, unsync

__all__ = ["sync_statistics", "unsync", "synced_layers", "synced_moments", "SyncedMoments", "require_process_group"]
