"""Training converted models: calibration, fine-tuning, step hooks, BN recalibration."""
from .calibrate import calibrate
from .finetune import History, evaluate, finetune
from .param_groups import param_groups
from .recalibrate import recalibrate_bn
from .step_hooks import after_step, needs_step_hooks, stateful_layers

__all__ = ["param_groups", "after_step", "needs_step_hooks", "stateful_layers", "calibrate", "finetune",
           "evaluate", "History", "recalibrate_bn"]
