"""Shared test helpers: randomized norm statistics so that weight transfer is really exercised."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", category=FutureWarning, module="torchvision")
torch.set_num_threads(1)  # 2 cores shared with other work: one thread is faster and steadier here


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm non-trivial affine and running statistics (in place), deterministically."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(module, name, None)
            is_norm = "Norm" in type(module).__name__ or isinstance(
                module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm))
            if not is_norm or not isinstance(t, torch.Tensor) or not t.is_floating_point():
                continue
            if name == "running_var":
                t.copy_(torch.rand(t.shape, generator=gen) * 1.5 + 0.5)
            elif name == "weight":
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.2)
    return model


def small_convnet() -> nn.Module:
    """conv → BN → ReLU → grouped conv → BN → ReLU → pool → linear (16 channels, 5 classes), with
    randomized norms: a network that exports and compiles in seconds."""
    torch.manual_seed(0)
    return randomize_norms(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)))


@pytest.fixture
def rand_input():
    def make(*shape, seed=0):
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return make
