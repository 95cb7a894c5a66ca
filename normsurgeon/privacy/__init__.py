"""DP-SGD with Opacus: ``make_dp_ready`` (checks and prepares a model) and exact per-sample
gradients of normsurgeon's batch-independent layers (``grad_samplers``, imported on use so that
Opacus stays an optional dependency: ``pip install 'normsurgeon[dp]'``)."""
from .dp_ready import check_dp, make_dp_ready
from .errors import NotDPReady

__all__ = ["make_dp_ready", "check_dp", "NotDPReady"]
