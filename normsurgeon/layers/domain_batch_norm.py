"""Domain-specific BatchNorm (DSBN): one set of BN statistics per source domain.

Segu, Tonioni, Tombari, "Batch Normalization Embeddings for Deep Domain Generalization": the
network shares every parameter except its BN layers, which keep one (μ_k, σ²_k) per domain k.
For x of shape (N, C, *positions) routed to domain k,
    y = γ_c (x − μ_{k,c}) / sqrt(σ²_{k,c} + eps) + β_c          (γ_{k,c}, β_{k,c} if per_domain_affine)
with batch statistics in training (updating only domain k's running statistics, exactly as
``nn.BatchNorm2d`` would) and domain k's running statistics in eval.

Routing: the ``route`` attribute, set by ``normsurgeon.domain(model, d)``, is a domain index
(the whole batch is from one domain) or a (N,) long tensor of per-sample indices. A mixed
training batch is normalized as its domain-pure sub-batches separately (each domain's
statistics over its own samples), so it equals running those sub-batches one by one. A
forward with no route raises: there is no silent default domain.

Buffers: ``running_mean``, ``running_var`` (K, C); ``num_batches_tracked`` (K,).
"""
from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import FusedActLayout, elements_per_channel


def domain_names(domains: int | Sequence[str]) -> tuple[str, ...]:
    """``domains=K`` → ('0', ..., 'K-1'); a sequence of names → the names (unique, non-empty str)."""
    if isinstance(domains, bool) or not isinstance(domains, (int, Sequence)) or isinstance(domains, str):
        raise TypeError(f"domains= takes the number of domains (int) or a list of domain names, "
                        f"got {domains!r}")
    if isinstance(domains, int):
        if domains < 1:
            raise ValueError(f"domains={domains}: at least one domain is needed")
        return tuple(str(k) for k in range(domains))
    names = tuple(domains)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"domains= needs at least one name, each a non-empty string; got {list(names)!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"domain names must be unique, got {list(names)!r}")
    return names


def resolve_route(names: Sequence[str], d, where: str = "the model") -> int | torch.Tensor:
    """A domain (name or index) → its index; per-sample domains (tensor or list) → (N,) long tensor.

    Raises ValueError for an unknown name or an index outside [0, K), TypeError for anything else.
    """
    k = len(names)
    listing = ", ".join(f"{i}={n!r}" for i, n in enumerate(names))
    if isinstance(d, str):
        if d not in names:
            close = difflib.get_close_matches(d, list(names), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown domain {d!r} for {where}.{hint} Its domains are {listing}")
        return names.index(d)
    if isinstance(d, int) and not isinstance(d, bool):
        if not 0 <= d < k:
            raise ValueError(f"domain index {d} is out of range for {where}, which has {k} domain(s) ({listing})")
        return d
    if isinstance(d, (list, tuple)) and d:
        d = torch.tensor([resolve_route(names, v, where) for v in d], dtype=torch.long)
    if isinstance(d, torch.Tensor):
        if d.is_floating_point() or d.is_complex() or d.dtype == torch.bool:
            raise TypeError(f"a per-sample domain tensor holds integer indices, got dtype {d.dtype}")
        if d.ndim == 0:
            return resolve_route(names, int(d), where)
        if d.ndim != 1 or d.numel() == 0:
            raise ValueError(f"a per-sample domain tensor has shape (N,), got {tuple(d.shape)}")
        low, high = int(d.min()), int(d.max())
        if low < 0 or high >= k:
            bad = low if low < 0 else high
            raise ValueError(f"per-sample domain index {bad} is out of range for {where}, which has {k} "
                             f"domain(s) ({listing})")
        return low if low == high else d.long()  # a domain-pure batch takes the one-domain path
    raise TypeError(f"a domain is a name (str), an index (int) or a per-sample index tensor of shape (N,); "
                    f"got {type(d).__name__}")


class DomainSpecificBatchNorm(FusedActLayout, nn.Module):
    """BatchNorm with one set of running statistics (and optionally affine) per domain.

    Args:
        num_features: C.
        domains: K, or the K domain names (index k ↔ ``domains[k]``).
        per_domain_affine: γ, β of shape (K, C) instead of shared (C,).
        statistics_pending: no statistics to start from; the first training batch of each
            domain sets that domain's running statistics (momentum 1 once).
    """

    def __init__(self, num_features: int, domains: int | Sequence[str], eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, *, per_domain_affine: bool = False,
                 channels_last: bool = False, act: nn.Module | None = None, drop: nn.Module | None = None,
                 statistics_pending: bool = False):
        super().__init__()
        self.num_features = num_features
        self.domains = domain_names(domains)
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.per_domain_affine = bool(per_domain_affine and affine)
        k = len(self.domains)
        if affine:
            shape = (k, num_features) if self.per_domain_affine else (num_features,)
            self.weight = nn.Parameter(torch.ones(shape))
            self.bias = nn.Parameter(torch.zeros(shape))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(k, num_features))
        self.register_buffer("running_var", torch.ones(k, num_features))
        self.register_buffer("num_batches_tracked", torch.zeros(k, dtype=torch.long))
        self.statistics_pending = [bool(statistics_pending)] * k
        self.route: int | torch.Tensor | None = None
        self._init_fused(channels_last, act, drop)

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.statistics_pending = [False] * self.num_domains  # loaded statistics are real ones

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.route
        if route is None:
            if x.device.type != "meta":
                raise RuntimeError(
                    f"{self._where()} has no domain chosen. Route every forward: "
                    f"`with normsurgeon.domain(model, {self.domains[0]!r}):` for a batch from one domain, "
                    f"or normsurgeon.domain(model, idx) with a (N,) index tensor for a mixed batch "
                    f"(domains: {', '.join(self.domains)}). For a sample from an unknown domain use "
                    f"normsurgeon.BNEnsemble(model).")
            route = 0  # shape probe on meta tensors (conversion checks): no values are computed
        return self._apply_norm(x, lambda t: self._normalize(t, route))

    def _normalize(self, x: torch.Tensor, route: int | torch.Tensor) -> torch.Tensor:
        if isinstance(route, int):
            return self._one_domain(x, route)
        if route.shape != (x.shape[0],):
            folded = " (the model folds positions or patches into the batch axis here: route domain-pure " \
                     "batches for this model)" if route.ndim == 1 and x.shape[0] % route.shape[0] == 0 else ""
            raise ValueError(f"{self._where()}: the per-sample domain tensor has shape {tuple(route.shape)} "
                             f"but this layer's input has {x.shape[0]} rows on the batch axis{folded}")
        route = route.to(x.device)
        if self.training:
            return self._mixed_train(x, route)
        return self._mixed_eval(x, route)

    def _affine(self, k):
        if self.weight is None or not self.per_domain_affine:
            return self.weight, self.bias
        return self.weight[k], self.bias[k]

    def _one_domain(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Exactly ``nn.BatchNorm`` with domain k's statistics (and affine)."""
        weight, bias = self._affine(k)
        if not self.training:
            return F.batch_norm(x, self.running_mean[k], self.running_var[k], weight, bias, False, 0.0, self.eps)
        if x.shape[0] * elements_per_channel(x) < 2:
            raise ValueError(
                f"{self._where()} needs batch statistics but domain {self.domains[k]!r} got one value per "
                f"channel (input shape {tuple(x.shape)}): use 2 or more samples per domain, or call model.eval()")
        momentum = self.momentum
        if x.device.type != "meta":
            self.num_batches_tracked[k].add_(1)
            if momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked[k])
            if self.statistics_pending[k]:
                self.statistics_pending[k] = False
                momentum = 1.0
        return F.batch_norm(x, self.running_mean[k], self.running_var[k], weight, bias, True,
                            momentum if momentum is not None else 0.0, self.eps)

    def _mixed_train(self, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        """Each domain's sub-batch normalized by its own statistics; output in the input's order."""
        order = torch.argsort(route, stable=True)
        counts = torch.bincount(route, minlength=self.num_domains).tolist()
        pieces = x.index_select(0, order).split(counts)
        out = torch.cat([self._one_domain(p, k) for k, p in enumerate(pieces) if counts[k]])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return out.index_select(0, inverse)

    def _mixed_eval(self, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        """y = x·s + t with per-sample s = γ/sqrt(σ²_k + eps), t = β − μ_k·s (k = the sample's domain)."""
        scale = torch.rsqrt(self.running_var.index_select(0, route) + self.eps)  # (N, C)
        if self.weight is not None:
            weight = self.weight.index_select(0, route) if self.per_domain_affine else self.weight
            scale = scale * weight
        shift = -self.running_mean.index_select(0, route) * scale
        if self.bias is not None:
            shift = shift + (self.bias.index_select(0, route) if self.per_domain_affine else self.bias)
        view = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
        return torch.addcmul(shift.view(view).to(x.dtype), x, scale.view(view).to(x.dtype))

    def instance_statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample, per-channel mean and (biased) variance over positions of an input ``x``
        in this layer's layout: two float32 tensors of shape (N, C)."""
        if self.channels_last:
            x = x.movedim(-1, 1)
        flat = x.reshape(x.shape[0], x.shape[1], -1).float()
        var, mean = torch.var_mean(flat, dim=2, correction=0)
        return mean, var

    def extra_repr(self) -> str:
        extra = ", per_domain_affine=True" if self.per_domain_affine else ""
        extra += "" if self.affine else ", affine=False"
        return (f"{self.num_features}, domains={list(self.domains)}, eps={self.eps}, momentum={self.momentum}"
                f"{extra}{self._layout_repr()}")
