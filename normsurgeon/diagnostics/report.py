"""``DiagnosticsReport``: tables, flags, a plain-language summary, JSON and a self-contained HTML page.

Tables (pandas DataFrames):
- ``layers``: one row per norm site in depth (execution) order with every scalar of
  ``LayerStatistics`` (norm family, A, B, W, f_A, f_B, f_W, cv_sigma, ...), ``nonfinite`` (count of
  NaN/inf pre-activation values, replaced by 0 in the statistics) and, with a reference model,
  ``ref_f_A``, ``ref_f_B``, ``ref_cv_sigma`` and the ratios ``f_A_ratio``, ``f_B_ratio``,
  ``cv_sigma_ratio`` (this model / reference, matched by site name).
- ``batch``: one row per (BatchNorm-like site, batch size) from ``batch_statistics``
  (d_abs_mean, d_rms, r_mean, log_r_rms, frac_pathological, effective_sample_size, ess_ratio,
  ...) plus ``train_eval_gap`` at the smallest batch size; empty without a sweep.
- ``flags``: one row per (site, rule[, batch size]) that fired: name, kind (failure mode),
  metric, value, threshold, norm (family), batch_size (NaN for per-layer rules), meaning.

The rules and their thresholds are in ``flags.py``; ``findings()`` says in words what each
failure mode found means and what to do about it.
"""
from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .flags import THRESHOLDS, Finding, compute_flags, findings, what_was_checked

__all__ = ["DiagnosticsReport", "THRESHOLDS", "compute_flags"]


def _clean(v):
    """JSON-safe scalars: numpy → Python, non-finite floats → None."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _records(frame: pd.DataFrame | None) -> list[dict]:
    if frame is None or frame.empty:
        return []
    return [_clean(r) for r in frame.to_dict(orient="records")]


@dataclass
class DiagnosticsReport:
    """What ``diagnose`` found (module docstring for the tables, ``flags.py`` for the rules)."""

    model_name: str
    layers: pd.DataFrame
    batch: pd.DataFrame = field(default_factory=pd.DataFrame)
    reference_name: str | None = None
    reference_layers: pd.DataFrame | None = None
    meta: dict = field(default_factory=dict)
    channel_stats: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=lambda: dict(THRESHOLDS))
    flags: pd.DataFrame = None  # computed from layers and batch when not given

    def __post_init__(self):
        if self.batch is None:
            self.batch = pd.DataFrame()
        if self.flags is None:
            self.flags = compute_flags(self.layers, self.batch, self.thresholds)

    # ------------------------------------------------------------------ text
    def flagged(self, kind: str | None = None) -> list[str]:
        """Names of flagged sites (optionally of one failure mode), in depth order."""
        f = self.flags if kind is None else self.flags[self.flags["kind"] == kind]
        return list(dict.fromkeys(f["name"]))

    def findings(self) -> list[Finding]:
        """The flags grouped by failure mode, with what each means and what to do."""
        sizes = sorted(int(b) for b in self.batch["batch_size"].unique()) if "batch_size" in self.batch.columns else None
        return findings(self.flags, self.layers, self.thresholds, sizes)

    def title(self) -> str:
        """Model and what it is: 'EfficientNet (tf_efficientnet_lite0), converted to 'gn''."""
        arch = self.meta.get("architecture")
        label = f"{self.model_name} ({arch})" if arch and arch != self.model_name else self.model_name
        target = self.meta.get("target")
        return f"{label}, " + (f"converted to {target!r}" if target else "original (not converted)")

    def describe_data(self) -> str:
        """'152 inputs of 3×112×112 from photo crops, batch sizes 2, 32'."""
        shape = "×".join(str(s) for s in self.meta.get("input_shape", []))
        text = f"{self.meta.get('samples', 0)} inputs of {shape}"
        if self.meta.get("data_source"):
            text += f" from {self.meta['data_source']}"
        sizes = self.meta.get("batch_sizes") or []
        text += f", batch sizes {', '.join(map(str, sizes))}" if sizes else ", no batch-size sweep"
        return text

    def summary(self) -> str:
        lines = [f"normsurgeon diagnostics of {self.title()}: {len(self.layers)} norm sites, {self.describe_data()}"
                 + (f", compared with reference {self.reference_name}" if self.reference_name else "")
                 + (f" ({self.meta['date']})" if self.meta.get("date") else "") + "."]
        found = self.findings()
        if not found:
            lines.append("No failure mode found. " + what_was_checked(self.layers, self.batch))
        else:
            lines.append(f"{len(self.flagged())} of {len(self.layers)} sites flagged:")
        for f in found:
            lines.append(f"- {f.title}: " + "; ".join(f.evidence) + ".")
            lines.append(f"  What it means: {f.meaning}")
            lines.append(f"  What to do: {f.todo}")
        if "train_eval_gap" in self.batch.columns and self.batch["train_eval_gap"].notna().any():
            gap = self.batch.dropna(subset=["train_eval_gap"])
            worst = gap.loc[gap["train_eval_gap"].idxmax()]
            lines.append(f"Largest train/eval gap at batch {int(worst['batch_size'])}: {worst['name']} "
                         f"({worst['train_eval_gap']:.3g}).")
        for note in self.meta.get("notes", []):
            lines.append(f"Note: {note}.")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"DiagnosticsReport({self.model_name}, {len(self.layers)} sites, {len(self.batch)} batch rows, "
                f"{len(self.flags)} flags)")

    # ------------------------------------------------------------------ data
    def to_dict(self) -> dict:
        """Every number, JSON-serializable (non-finite floats become null)."""
        return _clean({
            "model": self.model_name,
            "title": self.title(),
            "reference": self.reference_name,
            "meta": self.meta,
            "thresholds": self.thresholds,
            "layers": _records(self.layers),
            "reference_layers": _records(self.reference_layers),
            "batch": _records(self.batch),
            "flags": _records(self.flags),
            "findings": [f.__dict__ for f in self.findings()],
            "channel_stats": self.channel_stats,
            "summary": self.summary(),
        })

    def figures(self) -> dict:
        """name → matplotlib Figure (the caller closes them)."""
        from . import figures as F
        figs = {"power": F.power_figure(self.layers, self.reference_layers, self.model_name, self.reference_name,
                                        self.flags, self.thresholds)}
        if self.batch is not None and not self.batch.empty:
            figs["batch_sweep"] = F.batch_sweep_figure(self.batch, self.layers, self.thresholds)
        figs["flags"] = F.flags_heatmap(self.layers, self.batch, self.flags, self.thresholds)
        return figs

    def save(self, directory) -> list[Path]:
        """Write report.html (self-contained), report.json and one PNG per figure into ``directory``
        (created if needed); returns every path written, report.html first."""
        from . import figures as F
        from .page import render
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "report.html", out / "report.json"]
        written[1].write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))
        images = {}
        for name, fig in self.figures().items():
            buf = io.BytesIO()
            F.save_png(fig, buf)
            data = buf.getvalue()
            path = out / f"{name}.png"
            path.write_bytes(data)
            written.append(path)
            images[name] = base64.b64encode(data).decode("ascii")
        written[0].write_text(render(self, images), encoding="utf-8")
        return written
