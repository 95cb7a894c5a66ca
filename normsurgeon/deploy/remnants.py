"""What stays at a norm's site once its affine part is folded into a neighbouring linear layer.

``FoldedAct``: the fused ``drop`` then ``act`` of a timm NormAct layer (or a normsurgeon layer), kept
as children of the same names so that the activation is never lost (and a PReLU keeps its key suffix).

``InstanceGate``: Instance-Enhancement BN after its BN part x' = γ·(x − μ)/sqrt(σ² + eps) moved into
the conv before it. For x' of shape (N, C, *positions),

    y_{n,c} = x'_{n,c} · sigmoid(w'_c · mean_p x'_{n,c,p} + b'_c) + β_c,   then drop, act,

with w', b' rewritten for x' (``affine._instance_enhancement``), so y equals the IEBN's eval output.
"""
from __future__ import annotations

import torch
from torch import nn


class FoldedAct(nn.Module):
    """act(drop(x)): a folded NormAct layer's epilogue."""

    def __init__(self, drop: nn.Module | None, act: nn.Module | None):
        super().__init__()
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


class InstanceGate(nn.Module):
    """IEBN's per-sample gate and shift on the folded conv's output x' (module docstring).

    ``weight`` w', ``bias`` b' (the gate's), ``shift`` β: (C,) parameters, in the dtype and device
    of ``like`` and trainable when it is.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, shift: torch.Tensor, *,
                 drop: nn.Module | None = None, act: nn.Module | None = None, like: torch.Tensor | None = None):
        super().__init__()
        kind = {} if like is None else {"dtype": like.dtype, "device": like.device}
        grad = True if like is None else like.requires_grad
        self.weight = nn.Parameter(weight.detach().to(**kind), requires_grad=grad)
        self.bias = nn.Parameter(bias.detach().to(**kind), requires_grad=grad)
        self.shift = nn.Parameter(shift.detach().to(**kind), requires_grad=grad)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = x.shape[:2] + (1,) * (x.ndim - 2)
        context = x.mean(dim=tuple(range(2, x.ndim)))  # (N, C)
        gate = torch.sigmoid(torch.addcmul(self.bias, context, self.weight))
        y = torch.addcmul(self.shift.view((1, -1) + (1,) * (x.ndim - 2)), x, gate.view(view))
        return self.act(self.drop(y))
