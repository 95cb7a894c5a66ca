"""The error of the DP-SGD checks."""
from __future__ import annotations


class NotDPReady(ValueError):
    """The model cannot be trained with DP-SGD as it is; the message says where and what to do."""
