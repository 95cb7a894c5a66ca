"""Training helpers for converted models: optimizer parameter groups, step hooks."""
from .param_groups import param_groups
from .step_hooks import after_step, needs_step_hooks, stateful_layers

__all__ = ["param_groups", "after_step", "needs_step_hooks", "stateful_layers"]
