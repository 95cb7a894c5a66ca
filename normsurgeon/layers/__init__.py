"""The normalization zoo: one file per family. Each layer keeps the channel layout of the norm it
replaces (``channels_last``) and timm's fused ``drop``/``act`` children."""
from .batch_group_norm import BatchGroupNorm, InstanceEnhancementBatchNorm
from .batch_norm import BatchNorm, FrozenBatchNorm
from .domain_batch_norm import DomainSpecificBatchNorm
from .cross_iteration_bn import CrossIterationBatchNorm
from .memorized_bn import MemorizedBatchNorm
from .group_norm import GroupNorm, GroupNorm1
from .instance_norm import InstanceNorm
from .positional_norm import PositionalNorm
from .proxy_norm import ProxyNormAct

__all__ = ["BatchGroupNorm", "InstanceEnhancementBatchNorm", "BatchNorm", "FrozenBatchNorm", "DomainSpecificBatchNorm",
           "GroupNorm", "GroupNorm1", "InstanceNorm", "PositionalNorm", "ProxyNormAct", "CrossIterationBatchNorm",
           "MemorizedBatchNorm"]
