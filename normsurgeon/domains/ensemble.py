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

Calibrated embeddings (``BNEnsemble.fit_embeddings``; used by default once fitted, our addition).
The W2 rule above recognizes the source domains of the mild digit study
(analysis/domain_generalization) for only ~0.70-0.79 of samples. Correcting the population
variance for the between-sample spread of the means (comparing with a domain's *expected
instance* statistics) or z-scoring the distances across domains does not help (0.76 vs 0.79
on a trained fold): the domains' statistics differ mostly in how the channels vary
*together*, which per-channel distances cannot see; with the covariance it is 0.93-0.99. So a domain's embedding becomes the distribution of its samples' instance
statistics: the feature of sample x on path k is

    f_k(x) = concat over dsbn layers l (> 1 position) of [ m_l, log(v_l + eps_l) ]   (Σ_l 2 C_l,)

and domain k's embedding is the mean μ_k and covariance Σ_k of f_k over domain k's own
calibration samples (run through path k, eval mode), with Σ_k shrunk towards its diagonal,
Σ_k ← (1 − λ) Σ_k + λ diag(Σ_k) + δ I (λ = ``shrinkage`` = 0.1, δ = 1e-5 · mean diag). The
distance is the Mahalanobis distance

    D_k = sqrt( (f_k(x) − μ_k)ᵀ Σ_k⁻¹ (f_k(x) − μ_k) ),

which replaces the per-layer W2 and its normalization and averaging; the weights are again
w_k = (1/D_k) / Σ_j (1/D_j). ``distance="wasserstein"`` keeps the paper's rule even when fitted.
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


def instance_features(mean: torch.Tensor, var: torch.Tensor, layer) -> torch.Tensor:
    """One layer's block of the calibrated embedding feature: [m, log(v + eps)] on the last axis."""
    return torch.cat([mean, (var.clamp_min(0) + layer.eps).log()], -1)


def mahalanobis(features: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """features (K, N, F) (row k from path k), mean (K, F), cov (K, F, F) → (N, K) distances."""
    chol = torch.linalg.cholesky(cov.double())
    diff = (features.double() - mean.double().unsqueeze(1)).transpose(1, 2)  # (K, F, N)
    z = torch.linalg.solve_triangular(chol, diff, upper=False)
    return z.square().sum(1).sqrt().float().transpose(0, 1)


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

    ``fit_embeddings(data_by_domain)`` calibrates the Mahalanobis embeddings (module docstring);
    afterwards they are used unless ``distance="wasserstein"``. ``distance="mahalanobis"``
    requires them.
    """

    def __init__(self, model: nn.Module, *, combine: str = "outputs", batched: bool = True,
                 distance: str | None = None, shrinkage: float = 0.1):
        super().__init__()
        if not isinstance(model, nn.Module) or not domain_layers(model):
            raise ValueError(
                f"BNEnsemble needs a model with domain-specific BatchNorm layers, and "
                f"{type(model).__name__} has none. Convert it and train one statistics set per domain "
                f"first: model = normsurgeon.convert(model, to='dsbn', domains=['a', 'b', ...])")
        if combine not in ("outputs", "probabilities"):
            raise ValueError(f"combine={combine!r}: 'outputs' or 'probabilities'")
        if distance not in (None, "wasserstein", "mahalanobis"):
            raise ValueError(f"distance={distance!r}: None (Mahalanobis once fit_embeddings was called, "
                             f"else Wasserstein), 'wasserstein' or 'mahalanobis'")
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage={shrinkage}: a number in [0, 1]")
        self.model = model
        self.domains = domains_of(model)
        self.combine = combine
        self.batched = batched
        self.distance = distance
        self.shrinkage = shrinkage
        self.register_buffer("embedding_mean", None)  # (K, F) after fit_embeddings
        self.register_buffer("embedding_cov", None)  # (K, F, F)

    @property
    def rule(self) -> str:
        """The distance in use: 'mahalanobis' (calibrated embeddings) or 'wasserstein' (paper)."""
        if self.distance is not None:
            return self.distance
        return "wasserstein" if self.embedding_mean is None else "mahalanobis"

    def _features(self, x: torch.Tensor, route) -> torch.Tensor:
        """(N, F) calibrated-embedding features of x on path ``route``."""
        blocks: list[torch.Tensor] = []

        def observe(layer, args):
            inp = args[0]
            if elements_per_channel(inp.movedim(-1, 1) if layer.channels_last else inp) >= 2:
                blocks.append(instance_features(*layer.instance_statistics(inp), layer))

        handles = [layer.register_forward_pre_hook(observe) for _, layer in domain_layers(self.model)]
        try:
            with domain(self.model, route):
                self.model(x)
        finally:
            for h in handles:
                h.remove()
        return torch.cat(blocks, -1)

    @torch.no_grad()
    def fit_embeddings(self, data_by_domain, batch_size: int = 256) -> "BNEnsemble":
        """Calibrate each domain's embedding from its own samples.

        ``data_by_domain``: a dict {domain name or index: inputs (N_k, ...)} covering every domain,
        or a sequence of K input tensors in ``self.domains`` order; N_k > 1. The model must be in
        eval mode. Returns self.
        """
        if self.model.training:
            raise RuntimeError("fit_embeddings runs the model with its running statistics: call .eval() first")
        k = self.num_domains
        if isinstance(data_by_domain, dict):
            by_index = {}
            for key, value in data_by_domain.items():
                index = self.domains.index(key) if isinstance(key, str) and key in self.domains else key
                if not isinstance(index, int) or not 0 <= index < k:
                    raise ValueError(f"fit_embeddings: unknown domain {key!r}; domains: {list(self.domains)}")
                by_index[index] = value
            data = [by_index.get(j) for j in range(k)]
        else:
            data = list(data_by_domain)
        missing = [self.domains[j] for j in range(k) if j >= len(data) or data[j] is None]
        if missing or len(data) != k:
            raise ValueError(f"fit_embeddings needs samples of every domain ({list(self.domains)}); "
                             f"missing: {missing or 'got ' + str(len(data)) + ' entries'}")
        means, covs = [], []
        for j, x in enumerate(data):
            if x.shape[0] < 2:
                raise ValueError(f"fit_embeddings: domain {self.domains[j]!r} has {x.shape[0]} sample(s); "
                                 f"a covariance needs 2 or more")
            f = torch.cat([self._features(chunk, j) for chunk in x.split(batch_size)]).double()
            if f.shape[1] == 0:
                raise ValueError("no dsbn layer of this model sees more than one position per channel")
            mean = f.mean(0)
            cov = torch.cov(f.T).reshape(f.shape[1], f.shape[1])
            diag = torch.diag(cov.diagonal())
            cov = (1 - self.shrinkage) * cov + self.shrinkage * diag
            cov = cov + 1e-5 * cov.diagonal().mean().clamp_min(TINY) * torch.eye(len(mean), dtype=cov.dtype)
            means.append(mean.float())
            covs.append(cov.float())
        self.embedding_mean = torch.stack(means)
        self.embedding_cov = torch.stack(covs)
        return self

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A saved ensemble restores as it was: fitted embeddings are taken (the buffers are
        created to their saved shapes), and an unfitted state makes this ensemble unfitted."""
        for name in ("embedding_mean", "embedding_cov"):
            saved = state_dict.get(prefix + name)
            if saved is not None and getattr(self, name) is None:
                setattr(self, name, torch.empty_like(saved))
            elif saved is None and getattr(self, name) is not None:
                setattr(self, name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, return_weights: bool = False):
        if self.model.training:
            raise RuntimeError("BNEnsemble is inference-only (it compares samples with the running "
                               "statistics): call .eval() on it or on the model first")
        k, n = self.num_domains, x.shape[0]
        rule = self.rule
        if rule == "mahalanobis" and self.embedding_mean is None:
            raise RuntimeError("distance='mahalanobis' needs calibrated embeddings: call "
                               "ensemble.fit_embeddings({domain: samples, ...}) first")
        distances: list[torch.Tensor] = []  # per layer: (N, K), or feature blocks (K, N, F_l)
        current: list[int | None] = [None]  # the path being run when not batched

        def observe(layer, args):
            inp = args[0]
            if elements_per_channel(inp.movedim(-1, 1) if layer.channels_last else inp) < 2:
                return
            mean, var = layer.instance_statistics(inp)
            if rule == "mahalanobis":
                distances.append(instance_features(mean, var, layer).view(-1 if current[0] is None else 1, n, 2 * mean.shape[-1]))
            elif current[0] is None:
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
                per_layer = torch.cat(distances, -1) if rule == "mahalanobis" else torch.stack(distances)
            else:
                outs = []
                for j in range(k):
                    current[0] = j
                    with domain(self.model, j):
                        outs.append(self._check_output(self.model(x)))
                out = torch.stack(outs)
                count = len(distances) // k
                if rule == "mahalanobis":  # (K, N, F)
                    per_layer = torch.cat([torch.cat(distances[j * count:(j + 1) * count], -1) for j in range(k)])
                else:
                    per_layer = torch.stack([torch.stack(distances[j * count:(j + 1) * count]) for j in range(k)], -1)
        finally:
            for h in handles:
                h.remove()
        if not distances:
            raise ValueError("no dsbn layer of this model sees more than one position per channel, so no "
                             "instance statistics can be compared with the domains (BNE needs spatial inputs)")
        if rule == "mahalanobis":
            d = mahalanobis(per_layer, self.embedding_mean, self.embedding_cov)  # (N, K)
            inverse = 1.0 / d.clamp_min(TINY)
            weights = inverse / inverse.sum(-1, keepdim=True)
        else:
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
        return (f"domains={list(self.domains)}, combine={self.combine!r}, batched={self.batched}, "
                f"distance={self.rule!r}")
