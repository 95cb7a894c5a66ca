"""Proxy Normalization (Labatie et al., NeurIPS 2021): GN/LN without affine, then PN-Act.

For x of shape (N, C, *positions), with y = GroupNorm_G(x) (no affine; G = 1 is LN):
    out_c = (φ(γ_c·y + β_c) − m_c) · s_c
where m_c and s_c = 1/sqrt(v_c + ε_proxy) are the mean and (biased) variance of the proxy
    φ(γ_c·Y_c + β_c),  Y_c = (1 + γ̃_c)·u + β̃_c,
u being the fixed grid of n standard-normal quantiles u_i = Φ⁻¹((i + 0.5)/n). The proxy
moments are differentiable functions of (γ, β, γ̃, β̃), computed in every forward in float32
(float64 when the parameters are float64; never in half precision): C·n activation
evaluations, tiny. There are no batch statistics: train = eval, and each
sample's output depends on that sample only. φ is any elementwise activation module, applied
to the grid as a (1, C, n) tensor so per-channel activations (PReLU) work as they are.

At inference the moments are constants: in eval mode, when no autograd graph is recorded through a
trainable parameter, they are computed once and reused while every parameter and buffer of the
layer (φ's too) is the same tensor with the same version counter (an optimizer step, ``copy_``,
``load_state_dict`` or ``.to()`` changes one of them, and the moments are recomputed). Training-mode
forwards and traced/compiled/exported forwards always compute them.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from .base import FusedActLayout, channels_to_first, channels_to_last, elements_per_channel

DEFAULT_PROXY_EPS = 0.03
DEFAULT_PROXY_POINTS = 200


def normal_quantile_grid(num_points: int = DEFAULT_PROXY_POINTS, device=None) -> torch.Tensor:
    """(num_points,) float64: Φ⁻¹((i + 0.5) / num_points), i = 0 .. num_points − 1."""
    levels = (torch.arange(num_points, dtype=torch.float64, device=device) + 0.5) / num_points
    return torch.special.ndtri(levels)


def _fx_tracing() -> bool:
    """torch.fx symbolic tracing in progress (torch.export counts as compiling)."""
    trace = torch.fx._symbolic_trace
    return getattr(trace, "is_fx_symbolic_tracing", trace.is_fx_tracing)()


def _positively_homogeneous(act: nn.Module) -> bool:
    """φ(s·z) = s·φ(z) for every s > 0: the PN scale can then move inside φ."""
    if isinstance(act, (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity)):
        return True
    return getattr(act, "fn", None) in (F.relu, torch.relu, F.leaky_relu)


def _not_inplace(act: nn.Module) -> nn.Module:
    """A copy of ``act`` that does not modify its input (PN-Act reuses the pre-activation)."""
    if getattr(act, "inplace", False):
        act = copy.deepcopy(act)
        act.inplace = False
    return act


class ProxyNormAct(FusedActLayout, nn.Module):
    """GroupNorm (``num_groups``; 1 = LayerNorm) without affine, followed by PN-Act with φ = ``act``.

    Parameters: ``weight`` γ and ``bias`` β (before φ, so a pretrained norm's affine carries
    over), ``proxy_weight`` γ̃ and ``proxy_bias`` β̃ (init 0; the only ones to weight-decay).
    """

    def __init__(self, num_channels: int, num_groups: int, act: nn.Module, eps: float = 1e-5, *,
                 proxy_eps: float = DEFAULT_PROXY_EPS, proxy_points: int = DEFAULT_PROXY_POINTS,
                 channels_last: bool = False, drop: nn.Module | None = None):
        super().__init__()
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(f"num_groups={num_groups} does not divide num_channels={num_channels}")
        self.num_channels, self.num_groups, self.eps = num_channels, num_groups, eps
        self.proxy_eps = proxy_eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.proxy_weight = nn.Parameter(torch.zeros(num_channels))
        self.proxy_bias = nn.Parameter(torch.zeros(num_channels))
        self.proxy_points = proxy_points
        self._grid = normal_quantile_grid(proxy_points)  # a plain attribute, see proxy_grid
        self._init_fused(channels_last, _not_inplace(act), drop)
        self.scale_inside_act = _positively_homogeneous(self.act)
        self._moment_cache = None  # (key, (m, s)) in eval mode, see _moment_cache_key

    def _moment_cache_key(self) -> tuple | None:
        """What the cached moments were computed from, or None when they must be computed now:
        training mode, autograd recording through a trainable parameter, tracing or compiling."""
        if self.training:
            self._moment_cache = None
            return None
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting() or _fx_tracing():
            return None
        tensors = [*self.parameters(), *self.buffers()]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return None
        if any(t.device.type == "meta" or t.is_inference() for t in tensors):
            return None
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)

    @property
    def proxy_grid(self) -> torch.Tensor:
        """The grid u, float64 on the parameters' device. A plain tensor attribute, not a buffer:
        Opacus (DP-SGD) refuses any buffer in a trainable layer. Kept, not recomputed per call,
        so traced, compiled and exported graphs hold it as a constant (ONNX has no Φ⁻¹)."""
        kept = self.__dict__.get("_grid")
        grid = kept
        if grid is None or grid.numel() != self.proxy_points or grid.device.type == "meta":
            grid = normal_quantile_grid(self.proxy_points)
        if grid.device != self.weight.device:
            grid = grid.to(self.weight.device)
        tracing = torch.compiler.is_compiling() or _fx_tracing()
        if grid is not kept and grid.device.type != "meta" and not tracing:  # never keep a fake or meta grid
            self.__dict__["_grid"] = grid
        return grid

    def proxy_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, s), each (C,): mean and 1/sqrt(var + ε_proxy) of φ(γ·Y + β) on the grid (≥ fp32)."""
        key = self._moment_cache_key()
        cache = getattr(self, "_moment_cache", None)
        if key is not None and cache is not None and cache[0] == key:
            return cache[1]
        moments = self._compute_proxy_moments()
        if key is not None:
            self._moment_cache = (key, moments)
        return moments

    def _compute_proxy_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        grid = self.proxy_grid.to(dtype)
        gamma, beta = self.weight.to(dtype)[:, None], self.bias.to(dtype)[:, None]
        proxy = (1 + self.proxy_weight.to(dtype))[:, None] * grid + self.proxy_bias.to(dtype)[:, None]
        z = self.act(self.drop(gamma * proxy + beta).unsqueeze(0)).squeeze(0)
        mean = z.mean(dim=1)
        var = (z - mean[:, None]).square().mean(dim=1)
        return mean, torch.rsqrt(var + self.proxy_eps)

    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        """γ·y + β for input ``x`` (same layout): the value φ is applied to, for observers
        (``diagnostics``). The forward may feed φ a rescaled copy (fast path) and also runs φ on
        the proxy grid, so hooking ``act`` would see neither the right values nor only data."""
        cf = channels_to_first(x) if self.channels_last else x
        z = F.group_norm(cf, self.num_groups, self.weight, self.bias, self.eps)
        return channels_to_last(z) if self.channels_last else z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2:
            raise ValueError(f"{self._where()} expects (N, C, *) or (N, *, C), got {tuple(x.shape)}")
        self._refuse_expanded_weights()
        if self.channels_last:
            x = channels_to_first(x)
        per_group = self.num_channels // self.num_groups * elements_per_channel(x)
        if per_group < 2:
            raise ValueError(f"{self._where()} normalizes over a single value per group (input "
                             f"shape {tuple(x.shape)}): the output would be constant")
        view = (1, -1) + (1,) * (x.ndim - 2)
        mean, scale = self.proxy_moments()
        plain_drop = type(self.drop) is nn.Identity
        if plain_drop and self.scale_inside_act and x.dtype == mean.dtype:
            # φ positively homogeneous and s > 0: (φ(γy + β) − m)·s = φ(sγ·y + sβ) − m·s,
            # so the scale joins the group-norm kernel's affine and one pass remains after φ
            z = F.group_norm(x, self.num_groups, self.weight * scale, self.bias * scale, self.eps)
            out = torch.sub(self.act(z), (mean * scale).view(view))
        else:
            # γ·y + β fused into the group-norm kernel, then φ, then (a − m)·s as one addcmul
            z = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
            a = self.act(z if plain_drop else self.drop(z))
            if a.dtype == mean.dtype:
                out = torch.addcmul((-mean * scale).view(view), a, scale.view(view))
            else:  # half precision: subtract the proxy mean in float32
                out = ((a.to(mean.dtype) - mean.view(view)) * scale.view(view)).to(x.dtype)
        return channels_to_last(out) if self.channels_last else out

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}, "
                f"proxy_eps={self.proxy_eps}, proxy_points={self.proxy_points}"
                f"{self._layout_repr()}")
