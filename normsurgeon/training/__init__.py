"""Training helpers for converted models: optimizer parameter groups (more to come)."""
from .param_groups import param_groups

__all__ = ["param_groups"]
