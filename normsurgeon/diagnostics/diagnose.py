"""``diagnose``: one call from a model and some data to a ``DiagnosticsReport``.

    report = ns.diagnose(converted, images, reference=original, batch_sizes=[2, 8, 32])
    print(report.summary())
    report.save("diag/")          # report.html (self-contained), report.json, figures

The model runs in eval mode under ``torch.no_grad`` with a ``Recorder`` over ``data`` in chunks
of ``batch_size``. Its training flags (per module) are restored afterwards and its parameters
and buffers are left bit-identical (they are snapshotted and checked; anything a helper
changed is copied back, with a warning). ``reference`` (e.g. the unconverted original) is
recorded on the same data and compared site by site (matched by site name); a reference whose
norm sites do not match the model's (another architecture) is refused. ``batch_sizes`` adds the
batch-statistics sweep (``batch_statistics``, ``train_eval_gap``) for sites whose module uses
batch statistics (a ``_BatchNorm`` or anything with a ``running_mean``).
"""
from __future__ import annotations

import contextlib
import datetime
import math
import warnings
from collections.abc import Iterable, Sequence

import pandas as pd
import torch
from torch import nn

from ..model_state import device_of, preserved
from ..progress import Progress
from ..surgery.graph.sites import find_sites
from .recorder import LayerStatistics, Recorder
from .report import DiagnosticsReport


def _as_tensor(data) -> torch.Tensor:
    """A (N, ...) tensor from a tensor or an iterable of tensors / (x, y) batches."""
    if isinstance(data, torch.Tensor):
        x = data
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        parts = []
        for batch in data:
            if isinstance(batch, (tuple, list)):
                if not batch:
                    continue
                batch = batch[0]
            if not isinstance(batch, torch.Tensor):
                raise TypeError(f"data batches must be tensors or (x, y) pairs, got {type(batch).__name__}")
            parts.append(batch)
        if not parts:
            raise ValueError("data is empty: diagnose needs at least one sample")
        x = torch.cat(parts)
    else:
        raise TypeError(f"data must be a tensor or an iterable of batches, got {type(data).__name__}")
    if x.ndim < 2:
        raise ValueError(f"data must be batched (N, C, ...), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("data is empty: diagnose needs at least one sample")
    if x.is_floating_point() or x.is_complex():
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(f"data contains {bad} NaN/inf values: diagnostics need finite inputs; remove or fix those "
                             f"samples")
    return x


def _warn_restored(what: str):
    def warn(changed: list[str]) -> None:
        warnings.warn(f"diagnose: {len(changed)} tensors of the {what} were modified during diagnostics "
                      f"(e.g. {changed[0]!r}) and have been restored", RuntimeWarning, stacklevel=5)
    return warn


def _record(model: nn.Module, x: torch.Tensor, batch_size: int) -> tuple[list[LayerStatistics], dict[str, int]]:
    device = device_of(model)
    with Recorder(model) as rec, torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            model(x[start:start + batch_size].to(device))
        stats = rec.statistics()
        nonfinite = {name: int(count) for name, count in rec.nonfinite.items()}
    return stats, nonfinite


def _layers_frame(stats: list[LayerStatistics], nonfinite: dict[str, int]) -> pd.DataFrame:
    rows = []
    for s in sorted(stats, key=lambda s: s.depth):
        row = s.as_row()
        row["nonfinite"] = int(nonfinite.get(s.name, 0))
        rows.append(row)
    cols = ["name", "depth", "module_type", "norm", "channels", "instances", "positions", "A", "B", "W",
            "f_A", "f_B", "f_W", "cv_sigma", "nonfinite"]
    return pd.DataFrame(rows, columns=cols if not rows else None).reset_index(drop=True)


def _ratio(a: float, b: float) -> float:
    if not (math.isfinite(a) and math.isfinite(b)):
        return float("nan")
    if b == 0:
        return float("nan") if a == 0 else float("inf")
    return a / b


def _with_reference(layers: pd.DataFrame, ref: pd.DataFrame) -> pd.DataFrame:
    ref = ref.set_index("name")
    out = layers.copy()
    for col in ("f_A", "f_B", "cv_sigma"):
        ref_vals = [float(ref.at[n, col]) if n in ref.index else float("nan") for n in out["name"]]
        out[f"ref_{col}"] = ref_vals
        out[f"{col}_ratio"] = [_ratio(float(v), r) for v, r in zip(out[col], ref_vals)]
    out["ref_module_type"] = [ref.at[n, "module_type"] if n in ref.index else None for n in out["name"]]
    return out


def _batch_norm_sites(model: nn.Module, names: Sequence[str]) -> list[str]:
    out = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm) or isinstance(
                getattr(module, "running_mean", None), torch.Tensor):
            out.append(name)
    return out


def _check_reference(model: nn.Module, reference: nn.Module) -> None:
    """The reference must have the model's norm sites (same names): the unconverted original."""
    ours, theirs = [s.name for s in find_sites(model)], {s.name for s in find_sites(reference)}
    missing = [n for n in ours if n not in theirs]
    if missing:
        raise ValueError(
            f"reference ({type(reference).__name__}) does not match the model ({type(model).__name__}): "
            f"{len(missing)} of its {len(ours)} norm sites have no site of the same name in the reference "
            f"(e.g. {missing[0]!r}). Pass the unconverted original of this model as reference=, or no reference.")


def _check_channels(layers: pd.DataFrame, ref: pd.DataFrame) -> None:
    channels = dict(zip(ref["name"], ref["channels"]))
    differ = [n for n, c in zip(layers["name"], layers["channels"]) if n in channels and channels[n] != c]
    if differ:
        raise ValueError(f"reference does not match the model: {len(differ)} sites have another channel count "
                         f"(e.g. {differ[0]!r}: {dict(zip(layers['name'], layers['channels']))[differ[0]]} here, "
                         f"{channels[differ[0]]} in the reference). Pass the unconverted original as reference=.")


def _forward_count(n: int, batch_size: int, models: int, batch_sizes, max_batches: int) -> int:
    """Forward passes diagnose makes: recording chunks per model, the sweep's batches, the gap's two."""
    count = models * math.ceil(n / batch_size)
    if batch_sizes:
        count += len(batch_sizes) * max_batches + 2
    return count


def _batch_frame(model, x, batch_sizes, population, max_batches, generator, notes) -> pd.DataFrame:
    try:
        from .batch_statistics import batch_statistics, train_eval_gap
    except ImportError as exc:  # the sweep is optional; the rest of the report stands on its own
        notes.append(f"batch-size sweep skipped: batch_statistics is unavailable ({exc})")
        warnings.warn(f"diagnose: batch_statistics unavailable, batch sweep skipped ({exc})", RuntimeWarning,
                      stacklevel=3)
        return pd.DataFrame()
    if not population:
        notes.append("batch-size sweep: no site uses batch statistics (no BatchNorm-like module)")
        return pd.DataFrame()
    n = x.shape[0]
    big = [b for b in batch_sizes if 2 * b > n]
    if big:
        notes.append(f"batch sizes {big} exceed half of the {n} samples: their batches overlap heavily and the "
                     f"effective sample size is overestimated (use N >> batch size)")
    rows = batch_statistics(model, x, list(batch_sizes), population, max_batches=max_batches, generator=generator)
    frame = pd.DataFrame([r for r in rows if r.get("name") in population])
    gap, smallest = {}, None
    for b in batch_sizes:  # the smallest batch size at which train mode runs at all (BN refuses 1 value)
        try:
            gap = train_eval_gap(model, x, b)
        except ValueError as exc:
            notes.append(f"train/eval gap not measurable at batch {b}: {exc}")
            continue
        smallest = b
        break
    gap = {k: float(v) for k, v in gap.items() if k in population}
    if frame.empty:
        return frame
    frame["train_eval_gap"] = [gap.get(n, float("nan")) if smallest is not None and int(b) == smallest
                               else float("nan")
                               for n, b in zip(frame["name"], frame["batch_size"])]
    return frame


def diagnose(model: nn.Module, data, *, batch_sizes: Sequence[int] | None = None,
             reference: nn.Module | None = None, batch_size: int = 16, max_batches: int = 64,
             generator: torch.Generator | None = None, data_source: str | None = None,
             progress: bool = False) -> DiagnosticsReport:
    """Pre-activation diagnostics of ``model`` on ``data`` (module docstring).

    ``data``: a (N, C, H, W) tensor, or an iterable of tensors / (x, y) batches (x concatenated).
    ``batch_sizes``: batch sizes for the batch-statistics sweep (BatchNorm-like sites only).
    ``reference``: the unconverted original (same norm site names), to compare with.
    ``batch_size``: chunk size for recording (eval mode: it does not change the statistics).
    ``data_source``: where the data came from, for the report's title (e.g. ``"photos/"``).
    ``progress``: show the forward passes done against their total on stderr.
    Raises TypeError for a non-Module model/reference, ValueError for empty or non-finite data,
    a bad batch size, fewer samples than ``min(batch_sizes)``, or a reference of another
    structure. Non-finite *activations* are not errors: those layers are flagged in the report.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"diagnose expects an nn.Module, got {type(model).__name__}")
    if reference is not None and not isinstance(reference, nn.Module):
        raise TypeError(f"reference must be an nn.Module, got {type(reference).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_sizes is not None:
        batch_sizes = sorted({int(b) for b in batch_sizes})
        if not batch_sizes or batch_sizes[0] < 1:
            raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes!r}")
    x = _as_tensor(data)
    n = x.shape[0]
    if reference is not None and reference is not model:
        _check_reference(model, reference)
    if batch_sizes is not None and n < batch_sizes[0]:
        raise ValueError(f"data has {n} samples, fewer than the smallest batch size {batch_sizes[0]}: "
                         f"the batch-statistics sweep needs at least one full batch; pass more samples or smaller "
                         f"batch_sizes")

    notes: list[str] = []
    models = [model] + ([reference] if reference is not None and reference is not model else [])
    restore = contextlib.ExitStack()
    for m, what in zip(models, ("model", "reference")):  # flags and every tensor come back, with a warning
        restore.enter_context(preserved(m, buffers=True, parameters=True, on_restore=_warn_restored(what)))
    bar = Progress("diagnose: forward passes", total=_forward_count(n, batch_size, len(models), batch_sizes,
                                                                     max_batches), unit="batch", enabled=progress)
    hooks = [m.register_forward_hook(lambda *_: bar.update()) for m in models]  # counts every forward pass
    try:
        for m in models:
            m.eval()
        stats, nonfinite = _record(model, x, batch_size)
        layers = _layers_frame(stats, nonfinite)
        ref_layers = None
        if reference is not None:
            ref_stats, ref_nonfinite = _record(reference, x, batch_size)
            ref_layers = _layers_frame(ref_stats, ref_nonfinite)
            _check_channels(layers, ref_layers)
            layers = _with_reference(layers, ref_layers)
        batch = pd.DataFrame()
        if batch_sizes is not None:
            bn_sites = _batch_norm_sites(model, [s.name for s in stats])
            population = {s.name: (s.mean, s.var) for s in stats if s.name in bn_sites}
            model.eval()
            batch = _batch_frame(model, x.to(device_of(model)), batch_sizes, population, max_batches, generator, notes)
    finally:
        for h in hooks:
            h.remove()
        bar.close()
        restore.close()

    recipes = getattr(model, "normsurgeon_recipes", None) or []
    cfg = getattr(model, "pretrained_cfg", None)
    meta = {"samples": int(n), "input_shape": list(x.shape[1:]), "dtype": str(x.dtype).replace("torch.", ""),
            "batch_size": int(batch_size), "batch_sizes": list(batch_sizes) if batch_sizes else [],
            "max_batches": int(max_batches), "notes": notes,
            "architecture": cfg.get("architecture") if isinstance(cfg, dict) else None,
            "target": " then ".join(r["to"] for r in recipes) or None, "data_source": data_source,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    channel_stats = {s.name: {"mean": s.mean.double().tolist(), "var": s.var.double().tolist()} for s in stats}
    return DiagnosticsReport(model_name=type(model).__name__, layers=layers, batch=batch,
                             reference_name=type(reference).__name__ if reference is not None else None,
                             reference_layers=ref_layers, meta=meta, channel_stats=channel_stats)
