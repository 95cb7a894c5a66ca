"""Batch Normalization Embeddings (BNE): predict on an unseen domain as a mixture of known ones.

Segu, Tonioni, Tombari (arXiv 2011.12672). Domain k's embedding is its population statistics
(μ_{k,l}, σ²_{k,l}) at every dsbn layer l (the running statistics). A test sample x is run
through every domain path k; at layer l its instance statistics (m_l, v_l) (per-channel mean and
variance over positions of the layer input, shape (C_l,)) are compared with domain k's by the
2-Wasserstein distance between diagonal Gaussians,

    D_{l,k} = sqrt( Σ_c (m_{l,c} − μ_{k,l,c})² + (sqrt v_{l,c} − σ_{k,l,c})² ),

where both come from path k (the sample's statistics under domain k's normalization upstream).
Our choices where the paper leaves it open (documented, tested against numpy):
- per-layer normalization over domains, D̃_{l,k} = D_{l,k} / Σ_j D_{l,j}, so every layer
  gets one equal vote whatever its channel count or activation scale;
- aggregation by the mean over layers, D_k = (1/L) Σ_l D̃_{l,k}; layers whose input has fewer
  than two positions per channel (instance variance undefined) are left out;
- inverse-distance weights w_k = (1/D_k) / Σ_j (1/D_j);
- prediction Σ_k w_k f_k(x), f_k the model's output under domain k (or its softmax with
  ``combine="probabilities"``).
The K paths run as one forward of the batch repeated K times with per-sample routing
(``batched=True``, default) or as K forwards (``batched=False``, the reference).
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers.base import elements_per_channel
from .routing import domain, domain_layers, domains_of

TINY = 1e-12


def wasserstein_to_domains(mean: torch.Tensor, var: torch.Tensor, layer) -> torch.Tensor:
    """W2 between N(mean, diag var) (shape (K, N, C), row k from path k) and each domain's
    N(μ_k, diag σ²_k) (layer.running_mean/var, (K, C)): (N, K)."""
    mu = layer.running_mean.float().unsqueeze(1)
    sigma = layer.running_var.float().clamp_min(0).sqrt().unsqueeze(1)
    squared = (mean - mu).square().sum(-1) + (var.clamp_min(0).sqrt() - sigma).square().sum(-1)
    return squared.sqrt().transpose(0, 1)


def mixture_weights(distances: torch.Tensor) -> torch.Tensor:
    """(L, N, K) per-layer distances → (N, K) weights: normalize per layer over domains, mean over
    layers, inverse distance normalized to sum 1."""
    per_layer = distances / distances.sum(-1, keepdim=True).clamp_min(TINY)
    inverse = 1.0 / per_layer.mean(0).clamp_min(TINY)
    return inverse / inverse.sum(-1, keepdim=True)


class BNEnsemble(nn.Module):
    """Wraps a dsbn model: ``forward(x)`` → Σ_k w_k(x) f_k(x) (see the module docstring).

    Args:
        model: a model converted with ``normsurgeon.convert(model, to="dsbn", domains=...)``.
        combine: "outputs" (weight the model's outputs, e.g. logits) or "probabilities"
            (weight their softmax over the last axis).
        batched: one forward of K·N samples (default) or K forwards of N.

    ``forward(x, return_weights=False)`` returns the prediction, shaped like the model's output,
    and with ``return_weights=True`` also the (N, K) weights (columns in ``self.domains`` order).
    Inference only: call ``.eval()`` first (the running statistics are the embeddings).
    """

    def __init__(self, model: nn.Module, *, combine: str = "outputs", batched: bool = True):
        super().__init__()
        if not isinstance(model, nn.Module) or not domain_layers(model):
            raise ValueError(
                f"BNEnsemble needs a model with domain-specific BatchNorm layers, and "
                f"{type(model).__name__} has none. Convert it and train one statistics set per domain "
                f"first: model = normsurgeon.convert(model, to='dsbn', domains=['a', 'b', ...])")
        if combine not in ("outputs", "probabilities"):
            raise ValueError(f"combine={combine!r}: 'outputs' or 'probabilities'")
        self.model = model
        self.domains = domains_of(model)
        self.combine = combine
        self.batched = batched

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    def forward(self, x: torch.Tensor, return_weights: bool = False):
        if self.model.training:
            raise RuntimeError("BNEnsemble is inference-only (it compares samples with the running "
                               "statistics): call .eval() on it or on the model first")
        k, n = self.num_domains, x.shape[0]
        distances: list[torch.Tensor] = []  # per layer: (N, K)
        current: list[int | None] = [None]  # the path being run when not batched

        def observe(layer, args):
            inp = args[0]
            if elements_per_channel(inp.movedim(-1, 1) if layer.channels_last else inp) < 2:
                return
            mean, var = layer.instance_statistics(inp)
            if current[0] is None:
                d = wasserstein_to_domains(mean.view(k, n, -1), var.view(k, n, -1), layer)
                distances.append(d)
            else:
                d = wasserstein_to_domains(mean.expand(k, -1, -1), var.expand(k, -1, -1), layer)
                distances.append(d[:, current[0]])

        handles = [layer.register_forward_pre_hook(observe) for _, layer in domain_layers(self.model)]
        try:
            if self.batched:
                route = torch.arange(k, device=x.device).repeat_interleave(n)
                with domain(self.model, route):
                    out = self.model(x.repeat(k, *([1] * (x.ndim - 1))))
                out = self._check_output(out).reshape(k, n, *out.shape[1:])
                per_layer = torch.stack(distances)  # (L, N, K)
            else:
                outs = []
                for j in range(k):
                    current[0] = j
                    with domain(self.model, j):
                        outs.append(self._check_output(self.model(x)))
                out = torch.stack(outs)
                count = len(distances) // k
                per_layer = torch.stack([torch.stack(distances[j * count:(j + 1) * count]) for j in range(k)], -1)
        finally:
            for h in handles:
                h.remove()
        if not distances:
            raise ValueError("no dsbn layer of this model sees more than one position per channel, so no "
                             "instance statistics can be compared with the domains (BNE needs spatial inputs)")
        weights = mixture_weights(per_layer)
        if self.combine == "probabilities":
            out = out.softmax(-1)
        mix = weights.transpose(0, 1).to(out.dtype).reshape(k, n, *([1] * (out.ndim - 2)))
        prediction = (mix * out).sum(0)
        return (prediction, weights) if return_weights else prediction

    @staticmethod
    def _check_output(out):
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"BNEnsemble combines tensor outputs; the model returned {type(out).__name__}")
        return out

    def extra_repr(self) -> str:
        return f"domains={list(self.domains)}, combine={self.combine!r}, batched={self.batched}"
