"""Noisy / confused batch statistics (DESIGN.md §5): how far a batch's statistics at each norm
site stray from the precise population statistics, per batch size, and the train/eval gap.

For a site's pre-activation y viewed as (n, C, S) and a batch of n samples, per channel c:
  μ_B, σ²_B   batch mean and biased variance over the n·S elements (n, positions)
  d = (μ_B − μ_pop) / σ_pop,   r = σ_B / σ_pop       (Batch Renormalization's r, d)
Healthy: d ≈ 0, r ≈ 1; pathological: |d| > 5 or r ∉ [1/3, 3]. For i.i.d. elements the batch
mean's variance is σ²_pop / (n·S), so the effective sample size σ²_pop / Var_batches(μ_B)
equals the elements per statistic n·S; correlated elements (within an image, or between the
images of a batch) shrink it, and ``ess_ratio`` says by how much. Over channels the ESS is the
harmonic mean, 1 / mean_c(Var_batches(μ_B,c) / σ²_pop,c) = 1 / Var(d): the sample size whose
i.i.d. noise equals the noise BatchNorm actually sees in d.

Constant channels (σ²_pop ≤ 1e-6·μ²_pop: a dead filter, γ = 0; below what float32 resolves) have
no meaningful r or d and are excluded and counted (``constant_channels``). log r is taken with r
clipped to [1/3, 3], Batch Renormalization's bounds, so that a batch in which a sparse channel is
silent (r = 0) counts as r = 1/3 instead of −∞.

Everything is accumulated on the device in float64, O(C) per site and batch size, with no
host sync per batch.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .accumulators import chan_merge
from ..model_state import preserved
from ..surgery.graph.sites import find_sites
from .hooks import attach_preactivation_hooks

PATHOLOGICAL_D = 5.0
PATHOLOGICAL_R = 3.0
CONSTANT_RELATIVE_VARIANCE = 1e-6  # σ²_pop ≤ this · μ²_pop: a constant channel


def varying_channels(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Channels whose population variance is measurable (not constant up to float32 rounding)."""
    floor = (CONSTANT_RELATIVE_VARIANCE * mean.square()).clamp_min(torch.finfo(torch.float64).tiny)
    return var > floor


def _check_data(data: torch.Tensor) -> int:
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"data must be a torch.Tensor of shape (N, ...), got {type(data).__name__}")
    if data.ndim < 1 or data.shape[0] < 1:
        raise ValueError(f"data must have at least one sample along dim 0, got shape {tuple(data.shape)}")
    if data.is_floating_point() or data.is_complex():
        bad = int((~torch.isfinite(data)).sum())
        if bad:
            raise ValueError(f"data contains {bad} non-finite value(s) (NaN or inf); "
                             "clean or filter the inputs first")
    return data.shape[0]


def _check_batch_size(b, n: int) -> int:
    if isinstance(b, bool) or not isinstance(b, int):
        raise TypeError(f"batch sizes must be integers, got {b!r}")
    if b < 1:
        raise ValueError(f"batch size must be >= 1, got {b}")
    if b > n:
        raise ValueError(f"batch size {b} needs at least {b} samples, but data has only {n}")
    return b


class _BatchAccumulator:
    """Per-channel running sums of d and r statistics for one site and one batch size."""

    def __init__(self, mean_pop: torch.Tensor, var_pop: torch.Tensor):
        self.valid = varying_channels(mean_pop, var_pop)
        self.mean_pop = mean_pop
        self.sigma_pop = torch.where(self.valid, var_pop, torch.ones_like(var_pop)).sqrt()
        self.var_pop = var_pop
        zeros = lambda: torch.zeros_like(var_pop)  # noqa: E731
        self.abs_d, self.sq_d, self.r, self.sq_log_r, self.patho = zeros(), zeros(), zeros(), zeros(), zeros()
        self.count = torch.zeros((), dtype=torch.float64, device=var_pop.device)
        self.mu_mean, self.mu_m2 = zeros(), zeros()
        self.batches = 0
        self.positions: int | None = None
        self.samples: int | None = None

    def update(self, y: torch.Tensor) -> None:
        y = y.detach().to(torch.float64)
        if self.positions is None:
            self.samples, self.positions = y.shape[0], y.shape[-1]
        var_b, mu_b = torch.var_mean(y, dim=(0, 2), unbiased=False)
        d = (mu_b - self.mean_pop) / self.sigma_pop
        r = var_b.sqrt() / self.sigma_pop
        log_r = r.clamp(1 / PATHOLOGICAL_R, PATHOLOGICAL_R).log()
        patho = (d.abs() > PATHOLOGICAL_D) | (r < 1 / PATHOLOGICAL_R) | (r > PATHOLOGICAL_R)
        zero = torch.zeros((), dtype=torch.float64, device=y.device)
        v = self.valid
        self.abs_d += torch.where(v, d.abs(), zero)
        self.sq_d += torch.where(v, d.square(), zero)
        self.r += torch.where(v, r, zero)
        self.sq_log_r += torch.where(v, log_r.square(), zero)
        self.patho += (patho & v).to(torch.float64)
        self.count, self.mu_mean, self.mu_m2 = chan_merge(self.count, self.mu_mean, self.mu_m2, mu_b[None])
        self.batches += 1

    def result(self, name: str, batch_size: int, samples: int) -> dict:
        k = self.batches
        n_valid = int(self.valid.sum())
        elements = batch_size * self.positions
        row = {"name": name, "batch_size": batch_size, "batches": k, "elements_per_statistic": elements,
               "channels": int(self.valid.numel()), "constant_channels": int(self.valid.numel()) - n_valid}
        if n_valid == 0:  # every channel constant over the population: nothing to measure
            nan = math.nan
            row.update(d_abs_mean=nan, d_rms=nan, r_mean=nan, log_r_rms=nan, frac_pathological=nan,
                       effective_sample_size=nan, ess_ratio=nan)
            return row
        pairs = k * n_valid
        row["d_abs_mean"] = float(self.abs_d.sum() / pairs)
        row["d_rms"] = math.sqrt(float(self.sq_d.sum() / pairs))
        row["r_mean"] = float(self.r.sum() / pairs)
        row["log_r_rms"] = math.sqrt(float(self.sq_log_r.sum() / pairs))
        row["frac_pathological"] = float(self.patho.sum() / pairs)
        if k < 2 or samples <= batch_size:  # needs two batches that are not the whole data
            ess = math.nan
        else:
            # batches are b-subsets of N samples: remove the finite-population factor
            # (N − b)/(N − 1) so that the ESS is the one of an infinite population
            fpc = (samples - batch_size) / (samples - 1)
            var_d = self.mu_m2[self.valid] / (k - 1) / fpc / self.var_pop[self.valid]
            mean_var_d = float(var_d.mean())
            ess = 1 / mean_var_d if mean_var_d > 0 else math.inf  # harmonic mean over channels
        row["effective_sample_size"] = ess
        row["ess_ratio"] = ess / elements
        return row


def _draw_batches(n: int, b: int, count: int, generator: torch.Generator | None):
    """``count`` index batches of size b: successive random permutations of range(n), chunked."""
    drawn = 0
    while drawn < count:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - b + 1, b):
            if drawn == count:
                return
            yield perm[start:start + b]
            drawn += 1


def batch_statistics(model, data: torch.Tensor, batch_sizes: list[int], population: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     *, max_batches: int = 64, generator: torch.Generator | None = None) -> list[dict]:
    """Batch vs population statistics at every norm site, per batch size.

    Args:
        model: the network; run in eval mode under ``torch.no_grad`` (its training flags are
            restored afterwards; nothing else changes).
        data: (N, ...) inputs on the model's device.
        batch_sizes: batch sizes to probe, each in [1, N].
        population: ``{site name: (mean (C,), var (C,))}`` precise population statistics of the
            pre-activation (e.g. from ``Recorder`` over the whole data). Sites not in it are skipped.
        max_batches: batches drawn per batch size: chunks of successive random permutations of
            the data (no repeats within a batch; a fresh permutation when one is used up).
        generator: CPU ``torch.Generator`` for reproducible draws.

    Returns one dict per (site, batch size), sites in execution order then batch sizes as given:
    ``name, batch_size, batches, elements_per_statistic`` (b × positions), ``channels``,
    ``constant_channels`` (excluded, module docstring), ``d_abs_mean, d_rms, r_mean, log_r_rms``
    (log of r clipped to [1/3, 3]), ``frac_pathological`` (fraction of (batch, channel) pairs with
    |d| > 5 or r ∉ [1/3, 3]), ``effective_sample_size`` (harmonic mean over channels of
    σ²_pop / Var_batches(μ_B), unbiased variance over the batches, divided by the finite-population
    factor (N − b)/(N − 1) of drawing b-subsets of N samples; NaN with a single batch or b = N)
    and ``ess_ratio`` (ESS / elements).
    """
    n = _check_data(data)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(batch_sizes, int) or not len(batch_sizes):
        raise ValueError(f"batch_sizes must be a non-empty list of integers, got {batch_sizes!r}")
    sizes = [_check_batch_size(b, n) for b in batch_sizes]
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise ValueError(f"max_batches must be an integer >= 1, got {max_batches!r}")

    pop: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (mean, var) in population.items():
        mean = torch.as_tensor(mean, dtype=torch.float64, device=data.device).reshape(-1)
        var = torch.as_tensor(var, dtype=torch.float64, device=data.device).reshape(-1)
        if mean.shape != var.shape:
            raise ValueError(f"population[{name!r}]: mean has {mean.numel()} channels, var {var.numel()}")
        pop[name] = (mean, var)

    order: list[str] = []
    current: dict[str, dict[str, _BatchAccumulator]] = {}  # per batch size: name -> accumulator

    def on_preactivation(name: str, y: torch.Tensor) -> None:
        if name not in pop:
            return
        if name not in current:
            mean, var = pop[name]
            if mean.numel() != y.shape[1]:
                raise ValueError(f"population[{name!r}] has {mean.numel()} channels, "
                                 f"but the site's pre-activation has {y.shape[1]}")
            current[name] = _BatchAccumulator(mean.to(y.device), var.to(y.device))
            if name not in order:
                order.append(name)
        current[name].update(y)

    results: dict[tuple[str, int], dict] = {}
    handles = attach_preactivation_hooks(model, on_preactivation)
    try:
        with preserved(model), torch.no_grad():
            model.eval()
            for b in sizes:
                current.clear()
                for idx in _draw_batches(n, b, max_batches, generator):
                    model(data[idx.to(data.device)])
                for name, acc in current.items():
                    results[(name, b)] = acc.result(name, b, n)
    finally:
        for h in handles:
            h.remove()
    return [results[(name, b)] for name in order for b in sizes if (name, b) in results]


def _is_stochastic_regularizer(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.dropout._DropoutNd) or "drop" in type(m).__name__.lower()


def train_eval_gap(model: nn.Module, data: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Per site, ‖y_train − y_eval‖ / ‖y_eval‖ of the pre-activation on the first ``batch_size``
    samples, between a train-mode and an eval-mode forward (without grad).

    In the train-mode forward only the norm sites are in train mode; dropout / drop-path style
    modules stay in eval so that the gap measures batch statistics, not stochastic noise. The
    model is left exactly as found: every buffer (running stats, num_batches_tracked, ...) and
    every module's training flag are restored and no hooks remain. A site whose eval
    pre-activation is all zeros reports 0 if the train one is too, else inf.
    """
    n = _check_data(data)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    b = _check_batch_size(batch_size, n)
    x = data[:b]
    outputs: dict[str, list[torch.Tensor]] = {}
    sink: dict = {"mode": None}

    def on_preactivation(name: str, y: torch.Tensor) -> None:
        outputs.setdefault((sink["mode"], name), []).append(y.detach().to(torch.float64).clone())

    sites = find_sites(model)
    order: list[str] = []
    handles = attach_preactivation_hooks(model, on_preactivation)
    try:
        with preserved(model, buffers=True), torch.no_grad():
            model.eval()
            sink["mode"] = "eval"
            model(x)
            for site in sites:
                site.module.train()
            for m in model.modules():
                if _is_stochastic_regularizer(m):
                    m.eval()
            sink["mode"] = "train"
            model(x)
    finally:
        for h in handles:
            h.remove()
    for mode, name in outputs:
        if mode == "eval" and name not in order:
            order.append(name)
    gaps: dict[str, float] = {}
    for name in order:
        ev, tr = outputs[("eval", name)], outputs.get(("train", name))
        if tr is None or len(tr) != len(ev):
            continue
        diff = math.sqrt(sum(float((t - e).square().sum()) for t, e in zip(tr, ev)))
        ref = math.sqrt(sum(float(e.square().sum()) for e in ev))
        gaps[name] = diff / ref if ref > 0 else (0.0 if diff == 0 else math.inf)
    return gaps
