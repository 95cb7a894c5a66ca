"""A complete custom conversion target: Group RMS Norm, registered with ``register_target``.

Group RMS Norm (an illustration: RMSNorm, Zhang & Sennrich 2019, over channel groups):
x (N, C, *positions), channels split into G contiguous groups, per sample n and group g

    y_{n,c,p} = γ_c · x_{n,c,p} / sqrt(mean_{(c', p') in g} x²_{n,c',p'} + eps) + β_c

No mean subtraction, no batch statistics (train = eval). What the example shows:

- the builder contract: ``build(source: SourceNorm, site: SiteInfo, options) -> Built``, with
  ``Transfer`` moving γ, β and accounting for the dropped running statistics, and ``SkipSite``
  for a site it cannot serve;
- graph context: ``context=shortcut_context`` tells the builder which norms sit on a residual
  shortcut (``site.context``), and it keeps those as they are;
- a timm NormAct layer's fused activation and drop (``source.act``, ``source.drop``) kept in the new
  layer; a target that drops them gets a warning naming the sites;
- ``unregister_target`` when done.

    python examples/custom_target.py
"""
from __future__ import annotations

import timm
import torch
from torch import nn

import normsurgeon as ns
from normsurgeon.surgery import (Built, SiteInfo, SkipSite, SourceNorm, Transfer, register_target,
                                 shortcut_context, unregister_target)


class GroupRMSNorm(nn.Module):
    """RMS normalization per (sample, channel group), per-channel affine, then timm's fused drop/act."""

    def __init__(self, num_channels: int, num_groups: int, eps: float = 1e-5,
                 act: nn.Module | None = None, drop: nn.Module | None = None):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"num_groups={num_groups} does not divide num_channels={num_channels}")
        self.num_groups, self.eps = num_groups, eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        groups = x.reshape(n, self.num_groups, -1)  # (N, G, C/G · positions)
        y = (groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + self.eps)).reshape_as(x)
        shape = (1, c) + (1,) * (x.ndim - 2)
        return self.act(self.drop(y * self.weight.view(shape) + self.bias.view(shape)))


def build_group_rms(source: SourceNorm, site: SiteInfo, options: dict) -> Built:
    """GroupRMSNorm from any channels-first source norm; shortcut norms are left as they are."""
    if site.context is True:
        raise SkipSite("on a residual shortcut: kept as it is")
    if source.channels_last:
        raise SkipSite("a channels-last norm (transformer tokens): this example handles (N, C, *) only")
    groups = options.get("num_groups", 8)
    if source.num_channels % groups:
        raise SkipSite(f"{groups} groups do not divide its {source.num_channels} channels")
    module = GroupRMSNorm(source.num_channels, groups, options.get("eps", source.eps or 1e-5),
                          act=source.act, drop=source.drop)
    t = Transfer(source, module).affine().drop_statistics()  # γ, β copied; running statistics dropped
    t.note(f"RMS over {groups} channel groups, no mean subtraction")
    return t.exact("no")


def register() -> None:
    register_target("group_rms", build_group_rms, options=("num_groups",), context=shortcut_context,
                    summary="Group RMS Norm (example): RMS over channel groups, per-channel affine")


def main() -> nn.Module:
    register()
    try:
        torch.manual_seed(0)
        model = timm.create_model("resnet18", num_classes=10).eval()
        new = ns.convert(model, to="group_rms", num_groups=8, input_size=(3, 64, 64))
        report = new.normsurgeon_report
        print(report.summary())
        shortcut = next(r for r in report.rows if r.name == "layer2.0.downsample.1")
        print(f"{shortcut.name}: {shortcut.status} ({shortcut.reason})")
        out = new(torch.randn(2, 3, 64, 64))
        print("output", tuple(out.shape), "finite:", bool(torch.isfinite(out).all()))
        return new
    finally:
        unregister_target("group_rms")


if __name__ == "__main__":
    main()
