"""Calibration: refit each new norm's affine so the converted model computes like the original.

At every norm site the pre-activation z (the norm's output after its affine, before its
activation) is affine in the layer's own (γ, β): z = γ·ŷ + β, with ŷ independent of them
(for IEBN, γ is gated per sample, z = γ·g(x)·ŷ + β, still linear in (γ, β) jointly). So a
per-channel map t ≈ a·z + b is absorbed exactly by γ' = a·γ, β' = a·β + b.

For each batch, the original runs once and its pre-activations t (N, C, S) are kept; then the
converted model runs once with a hook at every site, in execution order: the hook fits (a, b)
per channel by least squares on everything seen so far, writes γ', β' into the layer and
re-runs that layer, so every later layer is fitted on the already calibrated upstream. The fit
is over all batches: the hook accumulates Σz₀, Σz₀², Σz₀·t, Σt per channel, where
z₀ = (z − B)/A is the pre-activation under the initial (γ₀, β₀) and (A, B) the current map,
and solves for (A, B) (moment matching by default, or least squares). Cost: one forward of each model per batch, no backward.
Both models run in eval mode (batch-statistics targets use their running statistics).

A fit is kept only when it does not make the model worse on images it was not fitted on:
``holdout`` images (every 4th image of ``data`` by default, or data of their own) are left
out of the fit, and the calibrated model must rank no lower than the uncalibrated one on
them by (top-1 agreement with the original, −KL), compared in that order. Otherwise the
model comes back uncalibrated, with a warning that gives both numbers. The fit itself runs
on augmented views of each batch (the batch, its mirror image and a zoomed crop of it), so
the moments come from more than the exact pixels of a few images.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..diagnostics.hooks import as_ncs, attach_preactivation_hooks
from ..surgery.graph.sites import find_sites
from ..model_state import device_of, preserved
from .batches import input_batches


METHODS = ("moments", "lsq")


@dataclass
class _SiteFit:
    """Running least-squares fit of t ≈ A·z₀ + B for one site, per channel (float64)."""

    module: nn.Module
    channels_last: bool
    gamma0: torch.Tensor
    beta0: torch.Tensor
    scale: torch.Tensor  # A
    shift: torch.Tensor  # B
    sums: torch.Tensor = field(default=None)  # (6, C): n, Σz₀, Σz₀², Σz₀t, Σt, Σt²
    mse_before: float | None = None
    mse_after: float | None = None

    @classmethod
    def of(cls, module: nn.Module, channels_last: bool) -> "_SiteFit":
        w = module.weight.detach().to(torch.float64).clone()
        b = module.bias.detach().to(torch.float64).clone()
        c = w.numel()
        return cls(module, channels_last, w, b, torch.ones(c, dtype=torch.float64),
                   torch.zeros(c, dtype=torch.float64), torch.zeros(6, c, dtype=torch.float64))

    def add(self, z: torch.Tensor, t: torch.Tensor) -> None:
        """z, t: (N, C, S) current pre-activation and the original's."""
        z, t = z.to(torch.float64), t.to(torch.float64)
        z0 = (z - self.shift[:, None]) / self.scale[:, None]  # A ≠ 0: fits keep |A| ≥ 1e-3
        self.sums += torch.stack([torch.full_like(z0[0, :, 0], z0.shape[0] * z0.shape[2]),
                                  z0.sum((0, 2)), (z0 * z0).sum((0, 2)), (z0 * t).sum((0, 2)),
                                  t.sum((0, 2)), (t * t).sum((0, 2))])
        if self.mse_before is None:
            self.mse_before = float(((z - t) ** 2).mean())

    def solve(self, method: str) -> None:
        n, sz, szz, szt, st, stt = self.sums
        mz, mt = sz / n, st / n
        var = szz / n - mz * mz
        cov = szt / n - mz * mt
        flat = var <= 1e-10 * (1 + mz * mz)  # a constant channel: any A fits, keep the scale
        if method == "moments":
            var_t = (stt / n - mt * mt).clamp_min(0)
            a = torch.where(cov < 0, -1.0, 1.0) * (var_t / var.clamp_min(1e-30)).sqrt()
        else:
            a = cov / var.clamp_min(1e-30)
        a = torch.where(flat, self.scale, a)
        a = torch.where(a.abs() < 1e-3, torch.where(a < 0, -1e-3, 1e-3), a)  # keep the map invertible
        self.scale, self.shift = a, mt - a * mz
        with torch.no_grad():
            self.module.weight.copy_(self.scale * self.gamma0)
            self.module.bias.copy_(self.scale * self.beta0 + self.shift)

    def residual(self) -> float:
        """Mean squared error of the current fit over everything seen."""
        n, sz, szz, szt, st, stt = self.sums
        a, b = self.scale, self.shift
        sse = stt - 2 * a * szt - 2 * b * st + a * a * szz + 2 * a * b * sz + b * b * n
        return float(sse.sum() / n.sum())


def _preactivation_hooks(fits: dict[str, _SiteFit], targets: dict[str, torch.Tensor], method: str) -> list:
    """Hooks that fit each site on arrival and return the re-run (calibrated) output."""
    handles, seen = [], {}
    for name, fit in fits.items():
        module = fit.module
        act = getattr(module, "act", None)
        if not hasattr(module, "preactivation") and isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
            def capture(m, args, name=name):
                seen[name] = args[0].clone()  # the activation may run in place
            handles.append(act.register_forward_pre_hook(capture))

        def refit(m, args, out, name=name, fit=fit):
            if getattr(m, "_normsurgeon_refitting", False) or name not in targets:
                return None
            if hasattr(m, "preactivation"):
                z = m.preactivation(args[0])
            else:
                z = seen.pop(name, out)
            fit.add(as_ncs(z, fit.channels_last), targets.pop(name))
            fit.solve(method)
            m._normsurgeon_refitting = True
            try:
                return m(*args)
            finally:
                m._normsurgeon_refitting = False
        handles.append(module.register_forward_hook(refit))
    return handles


def augmented_views(x: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
    """x (N, C, H, W) → [x, x mirrored left-right, a random crop of 50–100% of the area, aspect
    3/4–4/3, resized back to H×W (one box for the whole batch)]."""
    views = [x, x.flip(-1)]
    if x.ndim == 4 and min(x.shape[-2:]) >= 8:
        height, width = x.shape[-2:]
        area = float(torch.empty(()).uniform_(0.5, 1.0, generator=generator))
        aspect = math.exp(float(torch.empty(()).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)))
        h = max(1, min(height, round(math.sqrt(area * height * width / aspect))))
        w = max(1, min(width, round(math.sqrt(area * height * width * aspect))))
        top = int(torch.randint(0, height - h + 1, (), generator=generator))
        left = int(torch.randint(0, width - w + 1, (), generator=generator))
        crop = x[..., top:top + h, left:left + w]
        views.append(torch.nn.functional.interpolate(crop, size=(height, width), mode="bilinear",
                                                     align_corners=False, antialias=True))
    return views


def _split_holdout(batches: list[torch.Tensor], holdout) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(batches to fit on, held-out images or None). A fraction f holds out every round(1/f)-th image."""
    if holdout is None or (isinstance(holdout, (int, float)) and not isinstance(holdout, bool) and holdout == 0):
        return batches, None
    if isinstance(holdout, (int, float)) and not isinstance(holdout, bool):
        if not 0 < holdout < 1:
            raise ValueError(f"calibrate: holdout must be a fraction in (0, 1), held-out data, or None, got {holdout!r}")
        images = torch.cat(batches)
        every = max(2, round(1 / holdout))
        if len(images) < every:
            raise ValueError(f"calibrate: {len(images)} image{'s' * (len(images) != 1)} cannot be split into a fit and "
                             f"a held-out part (holdout={holdout:g} holds out every {every}th); give more images, "
                             f"held-out data (holdout=...), or holdout=None to skip the check")
        held = torch.zeros(len(images), dtype=torch.bool)
        held[every - 1::every] = True
        size = batches[0].shape[0]
        return list(images[~held].split(size)), images[held]
    return batches, torch.cat(list(input_batches(holdout, None, "calibrate holdout")))


def calibrate(converted: nn.Module, original: nn.Module, data, *, num_batches: int | None = None,
              method: str = "moments", inplace: bool = False, augment: bool = True,
              holdout: float | torch.Tensor | None = 0.25) -> nn.Module:
    """Refit the affine of every norm site of ``converted`` to the original's pre-activations.

    ``data``: a tensor (one batch) or an iterable of batches (tensors or (x, y) pairs),
    unlabeled; ``num_batches`` caps how many are read. ``method``: "moments" (default) gives
    each channel the original's mean and standard deviation, a = sign(cov)·σ_t/σ_z,
    b = μ_t − a·μ_z; "lsq" is the least-squares fit a = cov(z, t)/σ_z², which is closer per
    layer but shrinks weakly correlated channels towards constants (before a ReLU that kills
    them), and on the embedded EfficientNet-Lite0 lowered top-1 agreement. Returns the calibrated model (a copy
    unless ``inplace=True``; ``original`` is never modified) with
    ``model.normsurgeon_calibration``: one dict per site (site, mse_before on the first batch,
    mse_after over all batches, scale and shift statistics) plus skipped sites with a reason,
    and ``model.normsurgeon_calibration_check``: the held-out agreement and KL before and after,
    and whether the fit was kept. ``augment`` fits on augmented views (``augmented_views``);
    ``holdout`` is the fraction of ``data`` held out (every 4th image by default), held-out data
    of its own (then all of ``data`` is fitted), or None to keep the fit unchecked.
    """
    if not isinstance(converted, nn.Module) or not isinstance(original, nn.Module):
        raise TypeError("calibrate(converted, original, data): both models must be nn.Modules")
    if converted is original:
        raise ValueError("calibrate needs two different models: the converted one and the original")
    if method not in METHODS:
        raise ValueError(f"calibrate: method must be one of {METHODS}, got {method!r}")
    model = copy.deepcopy(converted)  # fitted on a copy: a rejected fit leaves ``converted`` as it was
    original_sites = {s.name: s for s in find_sites(original) if s.match.reader is not None}
    fits, rows = {}, []
    for site in find_sites(model):
        if site.match.reader is None:
            continue
        module, ref = site.module, original_sites.get(site.name)
        reason = None
        if ref is None:
            reason = "no norm at this name in the original"
        elif not isinstance(getattr(module, "weight", None), nn.Parameter) or \
                not isinstance(getattr(module, "bias", None), nn.Parameter):
            reason = "the layer has no affine (weight and bias) to fit"
        elif module.weight.ndim != 1:
            reason = f"the affine is not per channel (weight shape {tuple(module.weight.shape)})"
        if reason:
            rows.append({"site": site.name, "skipped": reason})
            continue
        fits[site.name] = _SiteFit.of(module, site.match.reader(module).channels_last)
    if not fits:
        raise ValueError("calibrate: no norm site of the converted model has an affine to fit "
                         "and a counterpart in the original")
    device = device_of(model)
    batches, held_out = _split_holdout(list(input_batches(data, num_batches, "calibrate")), holdout)
    generator = torch.Generator().manual_seed(0)
    targets: dict[str, torch.Tensor] = {}
    record = attach_preactivation_hooks(original, lambda name, t: targets.__setitem__(name, t.clone()),
                                        include=list(fits))  # clone: the activation may run in place
    refit = _preactivation_hooks(fits, targets, method)
    try:
        with preserved(original), preserved(model), torch.no_grad():
            original.eval()
            model.eval()
            for batch in batches:
                for x in (augmented_views(batch, generator) if augment else [batch]):
                    targets.clear()
                    original(x.to(device_of(original)))
                    model(x.to(device))
                    missing = [n for n in fits if n in targets]
                    if missing:
                        raise RuntimeError(f"calibrate: site {missing[0]!r} ran in the original but not in the "
                                           f"converted model; the models do not correspond")
    finally:
        for h in record + refit:
            h.remove()
    for name, fit in fits.items():
        rows.append({"site": name, "mse_before": fit.mse_before, "mse_after": fit.residual()
                     if fit.mse_before is not None else None,
                     "scale_min": float(fit.scale.min()), "scale_max": float(fit.scale.max()),
                     "shift_abs_max": float(fit.shift.abs().max())})
    check = _held_out_check(converted, model, original, held_out)
    result = model
    if not check["kept"]:
        warnings.warn(f"calibrate: fit rejected, the model is returned uncalibrated: on {check['held_out']} held-out "
                      f"images top-1 agreement with the original would go {check['agreement_before']:.1%} → "
                      f"{check['agreement_after']:.1%} and KL {check['kl_before']:.3g} → {check['kl_after']:.3g}. "
                      f"Calibrate on more varied images, or pass holdout=None to keep the fit anyway.",
                      UserWarning, stacklevel=2)
        result = converted if inplace else copy.deepcopy(converted)
    elif inplace:
        converted.load_state_dict(model.state_dict())
        result = converted
    result.normsurgeon_calibration = rows
    result.normsurgeon_calibration_check = check
    return result


def _held_out_check(before: nn.Module, after: nn.Module, original: nn.Module, held_out) -> dict:
    """Agreement and KL with the original on ``held_out``, before and after the fit; kept when the
    agreement rises, or stays and the KL does not rise (beyond 1e-6 + 0.1 %)."""
    if held_out is None:
        return {"held_out": 0, "kept": True}
    from .finetune import evaluate

    cache: dict = {}
    m0 = evaluate(before, held_out, original, teacher_cache=cache)
    m1 = evaluate(after, held_out, original, teacher_cache=cache)
    tolerance = 1e-6 + 1e-3 * abs(m0["eval_kl"])  # float noise of an exact model is not a loss
    kept = m1["eval_agreement"] > m0["eval_agreement"] or (
        m1["eval_agreement"] == m0["eval_agreement"] and m1["eval_kl"] <= m0["eval_kl"] + tolerance)
    return {"held_out": m0["eval_images"], "agreement_before": m0["eval_agreement"], "kl_before": m0["eval_kl"],
            "agreement_after": m1["eval_agreement"], "kl_after": m1["eval_kl"], "kept": kept}
