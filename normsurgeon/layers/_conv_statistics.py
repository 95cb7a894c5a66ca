"""Batch statistics of a conv's output and their derivatives with respect to the conv's weight.

Cross-Iteration BN (Yao et al. CVPR 2021, §3.2) compensates past statistics to the current
weights with a first-order Taylor expansion, which needs ∂μ/∂W and ∂ν/∂W of the producing conv.
The official code gets them from two extra ``autograd.grad`` passes per layer; both have closed
forms that cost one conv weight-gradient in total.

Notation: x (N, Cin, H, W) is the conv's input, already padded if the conv pads in its own
forward (``conv_geometry``); W (C, Cin/G, kh, kw) with G groups, bias b (C,);
y = conv(x; W) + b of shape (N, C, OH, OW); M = N·OH·OW values per channel; channel c belongs
to group g = c // (C/G); patch_{m} (Cin/G, kh, kw) is the input window of group g seen by
output position m. Then, per channel c:

    μ_c  = (1/M) Σ_m y_{c,m}                ∂μ_c/∂W_c = p̄_g = (1/M) Σ_m patch_m      ∂μ_c/∂b_c = 1
    σ²_c = (1/M) Σ_m (y_{c,m} − μ_c)²        ∂σ²_c/∂W_c = (2/M) Σ_m (y_{c,m} − μ_c)·patch_m,  ∂σ²_c/∂b_c = 0
    ν_c  = σ²_c + μ_c² (second moment)       ∂ν_c/∂W_c = ∂σ²_c/∂W_c + 2μ_c·p̄_g        ∂ν_c/∂b_c = 2μ_c

(μ_c depends on W_c only, so these per-channel derivatives are the full Jacobian.) Both Σ_m
terms are conv weight-gradients: p̄ with an all-ones grad_output, computed on the batch-summed
input (the ones do not depend on n, so Σ_n can be taken first: 1/N of the work), and
∂σ²/∂W with grad_output (2/M)(y − μ). ``torch.nn.grad.conv2d_weight`` handles stride, padding,
dilation and groups. Over small outputs both come from the im2col patches instead
(``weight_derivatives``).
μ is exactly linear in (W, b), so its compensation has no Taylor error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.grad import conv2d_weight


@dataclass
class ConvGeometry:
    """What ``F.conv2d`` sees: the (possibly pre-padded) input and the numeric conv arguments."""

    input: torch.Tensor
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int


def _is_conv2d_same(conv: nn.Module) -> bool:
    try:
        from timm.layers import Conv2dSame
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return type(conv) is Conv2dSame


def supported_conv(conv: nn.Module) -> str | None:
    """None if CBN can compensate with respect to ``conv.weight``, else the reason it cannot."""
    if not isinstance(conv, nn.Conv2d):
        return f"its input comes from a {type(conv).__name__}, not a Conv2d"
    if type(conv).forward is not nn.Conv2d.forward and not _is_conv2d_same(conv):
        return (f"its conv is a {type(conv).__name__} with its own forward (e.g. weight "
                f"standardization): the statistics are not a function of .weight alone")
    return None


def conv_geometry(conv: nn.Conv2d, x: torch.Tensor) -> ConvGeometry:
    """The input and arguments of the ``F.conv2d`` call that ``conv(x)`` makes.

    ``nn.Conv2d`` with ``padding_mode != 'zeros'`` or ``padding='same'`` pads in its forward, and
    timm's ``Conv2dSame`` pads dynamically; those paddings are applied here so the returned
    input is what the weight actually multiplies.
    """
    if _is_conv2d_same(conv):
        from timm.layers.padding import pad_same
        x = pad_same(x, conv.weight.shape[-2:], conv.stride, conv.dilation)
        return ConvGeometry(x, tuple(conv.stride), (0, 0), tuple(conv.dilation), conv.groups)
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        return ConvGeometry(x, tuple(conv.stride), (0, 0), tuple(conv.dilation), conv.groups)
    if isinstance(conv.padding, str):  # 'same' (possibly asymmetric) or 'valid'
        if conv.padding == "same":
            x = F.pad(x, conv._reversed_padding_repeated_twice)
        return ConvGeometry(x, tuple(conv.stride), (0, 0), tuple(conv.dilation), conv.groups)
    return ConvGeometry(x, tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)


def mean_patch(geo: ConvGeometry, weight_shape: torch.Size, count: int, out_hw: tuple[int, int]) -> torch.Tensor:
    """p̄ of shape (G, Cin/G, kh, kw): ∂μ_c/∂W_c for every channel c of group g (see module doc)."""
    groups = geo.groups
    summed = geo.input.sum(dim=0, keepdim=True)  # (1, Cin, H, W): Σ_n first
    ones = summed.new_ones((1, groups) + tuple(out_hw))
    shape = (groups,) + tuple(weight_shape[1:])
    return conv2d_weight(summed, shape, ones, geo.stride, geo.padding, geo.dilation, groups).div_(count)


_SMALL_OUTPUT = 36  # OH·OW at or below which the unfolded route is used on CPU


def _unfolded_derivatives(geo: ConvGeometry, centered: torch.Tensor, weight_shape: torch.Size, count: int,
                          out: tuple[torch.Tensor, torch.Tensor]) -> None:
    """p̄ and ∂σ²/∂W of a conv with a small output, written into ``out``, from its im2col patches.

    P (G, N·OH·OW, Cin/G·kh·kw) = ``F.unfold`` of the input; per group ∂σ²/∂W = (2/M)·(y − μ)P,
    one matrix product straight into its destination, and p̄ = (1/M)·Σ_rows P. Over a small output
    the patches are small (≤ 36 positions per image). On CPU, oneDNN's weight-gradient kernel is
    2–3× slower there, and this route is 1.3× faster than the swapped forward conv (whose result
    came out transposed) that it replaced: ResNet-18 stage 4, ``benchmarks/README.md``.
    """
    channels, cin_g, kh, kw = weight_shape
    groups, (n, _, oh, ow) = geo.groups, centered.shape
    rows, length = n * oh * ow, cin_g * kh * kw
    patches = F.unfold(geo.input, (kh, kw), geo.dilation, geo.padding, geo.stride)  # (N, Cin·kh·kw, OH·OW)
    patches = patches.view(n, groups, length, oh * ow).permute(1, 0, 3, 2).reshape(groups, rows, length)
    outputs = centered.reshape(n, groups, channels // groups, oh * ow).permute(1, 2, 0, 3)
    outputs = outputs.reshape(groups, channels // groups, rows)
    patch_out, grad_out = out
    grad = grad_out.view(groups, channels // groups, length)
    torch.baddbmm(grad, outputs, patches, beta=0, alpha=2.0 / count, out=grad)
    torch.sum(patches, dim=1, out=patch_out.view(groups, length))
    patch_out.div_(count)


def weight_derivatives(geo: ConvGeometry, centered: torch.Tensor, weight_shape: torch.Size, count: int,
                       out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(p̄ (G, Cin/G, kh, kw), ∂σ²/∂W (C, Cin/G, kh, kw)) from ``centered`` = y − μ (N, C, OH, OW).

    ``out``: two tensors of those shapes to write into (the CBN window's slots), so the results
    are not copied once more. Routes: for a kh×kw > 1 kernel over a small output (OH·OW ≤
    ``_SMALL_OUTPUT``, e.g. ResNet's last stage) on CPU, one matrix product over the im2col
    patches (``_unfolded_derivatives``); otherwise ``mean_patch`` and one conv weight-gradient,
    scaled by 2/M on the way into ``out``.
    """
    kh, kw = weight_shape[2:]
    oh, ow = centered.shape[2:]
    if out is None:
        groups = geo.groups
        out = (centered.new_empty((groups,) + tuple(weight_shape[1:])), centered.new_empty(tuple(weight_shape)))
    if kh * kw > 1 and oh * ow <= _SMALL_OUTPUT and centered.device.type == "cpu":
        _unfolded_derivatives(geo, centered, weight_shape, count, out)
        return out
    patch_out, grad_out = out
    patch_out.copy_(mean_patch(geo, weight_shape, count, (oh, ow)))
    grad = conv2d_weight(geo.input, tuple(weight_shape), centered, geo.stride, geo.padding, geo.dilation, geo.groups)
    torch.mul(grad, 2.0 / count, out=grad_out)
    return out


@dataclass
class ConvStatistics:
    """Per-channel batch statistics of a conv's output and their weight derivatives.

    mean, var: (C,) — μ and biased σ²; mean_patch: (G, Cin/G, kh, kw) — ∂μ_c/∂W_c shared by
    the channels of a group; var_grad: (C, Cin/G, kh, kw) — ∂σ²_c/∂W_c (central moment).
    """

    mean: torch.Tensor
    var: torch.Tensor
    mean_patch: torch.Tensor
    var_grad: torch.Tensor

    def dmean_dweight(self) -> torch.Tensor:
        """∂μ_c/∂W_c as a (C, Cin/G, kh, kw) tensor (p̄ of each channel's group)."""
        per_group = self.var_grad.shape[0] // self.mean_patch.shape[0]
        return self.mean_patch.repeat_interleave(per_group, dim=0)

    def dsecond_moment_dweight(self) -> torch.Tensor:
        """∂ν_c/∂W_c = ∂σ²_c/∂W_c + 2μ_c·p̄_g, (C, Cin/G, kh, kw)."""
        return self.var_grad + 2 * self.mean.view(-1, 1, 1, 1) * self.dmean_dweight()


@torch.no_grad()
def conv_statistics(conv: nn.Conv2d, x: torch.Tensor, y: torch.Tensor,
                    mean: torch.Tensor | None = None, var: torch.Tensor | None = None,
                    centered: bool = False, out: tuple[torch.Tensor, torch.Tensor] | None = None) -> ConvStatistics:
    """Statistics of ``y = conv(x)`` and their analytic derivatives w.r.t. ``conv.weight``.

    ``mean``/``var`` (C,) may be passed when already computed (e.g. detached from the forward);
    ``centered=True`` says ``y`` is already y − μ (then ``mean`` and ``var`` are required).
    ``out``: (p̄, ∂σ²/∂W) destinations, see ``weight_derivatives``. Computed in the precision of
    ``out`` if given (a bf16 conv may feed a float32 window), else in the conv weight's.
    """
    weight = conv.weight
    dtype = out[1].dtype if out is not None else weight.dtype
    y = y.detach().to(dtype)
    count = y.shape[0] * y.shape[2] * y.shape[3]
    if centered and (mean is None or var is None):
        raise ValueError("conv_statistics(centered=True) needs the mean and var of the uncentered output")
    if mean is None or var is None:
        var, mean = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
    mean, var = mean.detach().to(dtype), var.detach().to(dtype)
    geo = conv_geometry(conv, x.detach().to(dtype))
    patch, grad = weight_derivatives(geo, y if centered else y - mean.view(1, -1, 1, 1), weight.shape, count, out)
    return ConvStatistics(mean, var, patch, grad)
