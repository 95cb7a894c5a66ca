"""``DiagnosticsReport``: tables, flags, a plain-language summary, JSON and a self-contained HTML page.

Tables (pandas DataFrames):
- ``layers``: one row per norm site in depth (execution) order with every scalar of
  ``LayerStatistics`` (A, B, W, f_A, f_B, f_W, cv_sigma, ...), ``nonfinite`` (count of NaN/inf
  pre-activation values, replaced by 0 in the statistics) and, with a reference model,
  ``ref_f_A``, ``ref_f_B``, ``ref_cv_sigma`` and the ratios ``f_A_ratio``, ``f_B_ratio``,
  ``cv_sigma_ratio`` (this model / reference, matched by site name).
- ``batch``: one row per (BatchNorm-like site, batch size) from ``batch_statistics``
  (d_abs_mean, d_rms, r_mean, log_r_rms, frac_pathological, effective_sample_size, ess_ratio,
  ...) plus ``train_eval_gap`` at the smallest batch size; empty without a sweep.
- ``flags``: one row per (site, rule[, batch size]) that fired: name, metric, value, threshold,
  meaning, plus kind (failure mode) and batch_size (NaN for per-layer rules).

Flag rules and thresholds (``THRESHOLDS``):
- channel collapse (LayerNorm failure mode): ``f_A > 0.5``; with a reference, only where f_A
  also rose by at least 10% over the reference's (``f_A_ratio >= 1.1``): "what did my swap break".
- instance-variance failure (InstanceNorm failure mode): ``f_B < 0.01`` or ``cv_sigma < 0.05``
  (cv_sigma only where positions > 1: with a single position it is undefined); with a reference,
  only where the reference's value is at least 10x larger.
- noisy batch statistics (BatchNorm at small batch): ``frac_pathological > 0.01`` (fraction of
  (batch, channel) pairs with |d| > 5 or r outside [1/3, 3]) or ``ess_ratio < 0.5`` (effective
  sample size / elements per statistic), per batch size.
- non-finite activations: ``nonfinite > 0``.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

THRESHOLDS = {
    "collapse_f_A": 0.5,           # f_A above: channel collapse
    "collapse_rise": 1.1,          # with a reference: f_A / ref f_A at least this
    "instance_f_B": 0.01,          # f_B below: inter-instance power gone
    "instance_cv_sigma": 0.05,     # cv_sigma below: instance scales all equal
    "instance_reference_factor": 10.0,  # with a reference: reference value at least this many times larger
    "noisy_frac_pathological": 0.01,  # fraction of pathological batch statistics above
    "noisy_ess_ratio": 0.5,        # effective sample size / elements per statistic below
    "nonfinite": 0,                # NaN/inf pre-activation values above
}

MEANINGS = {
    "f_A": "channel collapse: channel-constant power dominates the pre-activation (LayerNorm failure mode)",
    "f_B": "instance-variance failure: almost no power varies between instances (InstanceNorm failure mode)",
    "cv_sigma": "instance-variance failure: every instance has the same scale (InstanceNorm failure mode)",
    "frac_pathological": "noisy batch statistics: many batches give |d| > 5 or r outside [1/3, 3]",
    "ess_ratio": "noisy batch statistics: batch means are much noisier than their element count suggests",
    "nonfinite": "non-finite activations: NaN/inf values in the pre-activation",
}

KINDS = {"f_A": "channel_collapse", "f_B": "instance_variance", "cv_sigma": "instance_variance",
         "frac_pathological": "noisy_batch_statistics", "ess_ratio": "noisy_batch_statistics",
         "nonfinite": "nonfinite"}

FLAG_COLUMNS = ["name", "metric", "value", "threshold", "meaning", "kind", "batch_size"]


def _f(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def compute_flags(layers: pd.DataFrame, batch: pd.DataFrame | None = None,
                  thresholds: dict | None = None) -> pd.DataFrame:
    """Apply the flag rules (module docstring) to a layers table and a batch table."""
    t = dict(THRESHOLDS, **(thresholds or {}))
    has_ref = "ref_f_A" in layers.columns
    rows = []

    def add(name, metric, value, threshold, batch_size=float("nan")):
        rows.append({"name": name, "metric": metric, "value": float(value), "threshold": threshold,
                     "meaning": MEANINGS[metric], "kind": KINDS[metric], "batch_size": batch_size})

    for _, row in layers.iterrows():
        name = row["name"]
        f_a = _f(row["f_A"])
        if f_a > t["collapse_f_A"]:
            ref = _f(row.get("ref_f_A")) if has_ref else float("nan")
            if not has_ref or math.isnan(ref) or f_a >= t["collapse_rise"] * ref:
                thr = f"> {t['collapse_f_A']:g}" + (f" and >= {t['collapse_rise']:g}x reference" if has_ref else "")
                add(name, "f_A", f_a, thr)
        f_b = _f(row["f_B"])
        factor = t["instance_reference_factor"]
        if f_b < t["instance_f_B"]:
            ref = _f(row.get("ref_f_B")) if has_ref else float("nan")
            if not has_ref or math.isnan(ref) or ref >= factor * f_b and ref > 0:
                thr = f"< {t['instance_f_B']:g}" + (f" while reference >= {factor:g}x" if has_ref else "")
                add(name, "f_B", f_b, thr)
        cv = _f(row["cv_sigma"])
        if int(row.get("positions", 2)) > 1 and cv < t["instance_cv_sigma"]:
            ref = _f(row.get("ref_cv_sigma")) if has_ref else float("nan")
            if not has_ref or math.isnan(ref) or ref >= factor * cv and ref > 0:
                thr = f"< {t['instance_cv_sigma']:g}" + (f" while reference >= {factor:g}x" if has_ref else "")
                add(name, "cv_sigma", cv, thr)
        nf = int(row.get("nonfinite", 0) or 0)
        if nf > t["nonfinite"]:
            add(name, "nonfinite", nf, f"> {t['nonfinite']}")
    if batch is not None and not batch.empty:
        for _, row in batch.iterrows():
            b = int(row["batch_size"])
            fp = _f(row.get("frac_pathological"))
            if fp > t["noisy_frac_pathological"]:
                add(row["name"], "frac_pathological", fp, f"> {t['noisy_frac_pathological']:g}", b)
            ess = _f(row.get("ess_ratio"))
            if ess < t["noisy_ess_ratio"]:
                add(row["name"], "ess_ratio", ess, f"< {t['noisy_ess_ratio']:g}", b)
    flags = pd.DataFrame(rows, columns=FLAG_COLUMNS)
    if not flags.empty and not layers.empty:
        depth = dict(zip(layers["name"], layers["depth"]))
        flags = (flags.assign(_d=flags["name"].map(depth).fillna(1e9))
                 .sort_values(["_d", "kind", "batch_size"], kind="stable").drop(columns="_d")
                 .reset_index(drop=True))
    return flags


def _names(names: list[str], limit: int = 6) -> str:
    names = list(dict.fromkeys(names))
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f" and {len(names) - limit} more"


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
    """What ``diagnose`` found (module docstring for the tables and the flag rules)."""

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

    def summary(self) -> str:
        n_sites = len(self.layers)
        head = f"normsurgeon diagnostics of {self.model_name}: {n_sites} norm sites"
        if self.meta.get("samples"):
            shape = "x".join(str(s) for s in self.meta.get("input_shape", []))
            head += f", {self.meta['samples']} samples of {shape}"
        if self.reference_name:
            head += f", compared with reference {self.reference_name}"
        lines = [head + "."]
        flagged = self.flagged()
        if not flagged:
            lines.append("No layer is flagged.")
        else:
            lines.append(f"{len(flagged)} of {n_sites} sites flagged:")
        recs = []
        f = self.flags
        collapse = f[f["kind"] == "channel_collapse"]
        if not collapse.empty:
            worst = collapse.loc[collapse["value"].idxmax()]
            lines.append(f"- channel collapse (f_A > {self.thresholds['collapse_f_A']:g}) in "
                         f"{collapse['name'].nunique()} layers: {_names(list(collapse['name']))} "
                         f"(worst {worst['name']}: f_A = {worst['value']:.2f}).")
            recs.append("channel collapse after LayerNorm-style normalization: consider 'proxy_ln' or 'proxy_gn' "
                        "(Proxy Normalization), or 'gn' with more groups")
        inst = f[f["kind"] == "instance_variance"]
        if not inst.empty:
            lines.append(f"- instance-variance failure (f_B < {self.thresholds['instance_f_B']:g} or cv_sigma < "
                         f"{self.thresholds['instance_cv_sigma']:g}) in {inst['name'].nunique()} layers: "
                         f"{_names(list(inst['name']))}.")
            recs.append("instance statistics are wiped out: consider 'gn' (groups of several channels), 'proxy_gn', "
                        "or a batch-statistics norm ('bn', 'frozen_bn', 'bgn') if batches allow")
        noisy = f[f["kind"] == "noisy_batch_statistics"]
        if not noisy.empty:
            for b in sorted(noisy["batch_size"].dropna().astype(int).unique()):
                at = noisy[noisy["batch_size"] == b]
                why = ", ".join(sorted(set(at["metric"])))
                lines.append(f"- noisy batch statistics at batch {b} ({why}) in {at['name'].nunique()} layers: "
                             f"{_names(list(at['name']))}.")
            b = int(noisy["batch_size"].min())
            k = noisy[noisy["batch_size"] == b]["name"].nunique()
            recs.append(f"at batch {b}, BatchNorm statistics are noisy in {k} layers: consider 'bgn' with "
                        f"num_groups='auto', batch_size={b}, or 'proxy_gn' (or 'frozen_bn' to keep the running "
                        f"statistics when fine-tuning)")
        nonfinite = f[f["kind"] == "nonfinite"]
        if not nonfinite.empty:
            lines.append(f"- non-finite activations in {nonfinite['name'].nunique()} layers: "
                         f"{_names(list(nonfinite['name']))}.")
            recs.insert(0, "NaN/inf activations: check the converted weights, eps and the input scale first "
                           "(other statistics of those layers are unreliable)")
        if "train_eval_gap" in self.batch.columns and self.batch["train_eval_gap"].notna().any():
            gap = self.batch.dropna(subset=["train_eval_gap"])
            worst = gap.loc[gap["train_eval_gap"].idxmax()]
            lines.append(f"Largest train/eval gap at batch {int(worst['batch_size'])}: {worst['name']} "
                         f"({worst['train_eval_gap']:.3g}).")
        for note in self.meta.get("notes", []):
            lines.append(f"Note: {note}.")
        if recs:
            lines.append("Recommendation: " + "; ".join(recs) + ".")
        else:
            lines.append("Recommendation: none needed on this data; the normalization looks healthy.")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"DiagnosticsReport({self.model_name}, {len(self.layers)} sites, {len(self.batch)} batch rows, "
                f"{len(self.flags)} flags)")

    # ------------------------------------------------------------------ data
    def to_dict(self) -> dict:
        """Every number, JSON-serializable (non-finite floats become null)."""
        return _clean({
            "model": self.model_name,
            "reference": self.reference_name,
            "meta": self.meta,
            "thresholds": self.thresholds,
            "layers": _records(self.layers),
            "reference_layers": _records(self.reference_layers),
            "batch": _records(self.batch),
            "flags": _records(self.flags),
            "channel_stats": self.channel_stats,
            "summary": self.summary(),
        })

    def figures(self) -> dict:
        """name → matplotlib Figure (the caller closes them)."""
        from . import figures as F
        figs = {"power": F.power_figure(self.layers, self.reference_layers, self.model_name, self.reference_name)}
        if self.batch is not None and not self.batch.empty:
            figs["batch_sweep"] = F.batch_sweep_figure(self.batch, self.layers, self.thresholds)
        figs["flags"] = F.flags_heatmap(self.layers, self.batch, self.flags, self.thresholds)
        return figs

    def save(self, directory) -> Path:
        """Write report.json, one PNG per figure and a self-contained report.html; returns the HTML path."""
        from . import figures as F
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))
        images = {}
        for name, fig in self.figures().items():
            buf = io.BytesIO()
            F.save_png(fig, buf)
            data = buf.getvalue()
            (out / f"{name}.png").write_bytes(data)
            images[name] = base64.b64encode(data).decode("ascii")
        path = out / "report.html"
        path.write_text(self._html(images), encoding="utf-8")
        return path

    def _html(self, images: dict[str, str]) -> str:
        esc = html.escape
        captions = {"power": "Power split of the pre-activation against depth (f_A channel-constant, "
                             "f_B inter-instance, f_W intra-instance)",
                    "batch_sweep": "Batch-size sweep of the batch statistics (BatchNorm-like sites)",
                    "flags": "Flags per layer (red: rule fired; numbers: metric values)"}

        def table(frame: pd.DataFrame | None, empty: str) -> str:
            if frame is None or frame.empty:
                return f"<p><em>{esc(empty)}</em></p>"
            return frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="", border=0,
                                 classes="t", escape=True)

        parts = [
            "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
            f"<title>normsurgeon diagnostics: {esc(self.model_name)}</title>",
            "<style>body{font-family:sans-serif;margin:2em;max-width:1400px;color:#222}"
            "table.t{border-collapse:collapse;font-size:12px;margin-bottom:1.5em}"
            "table.t th,table.t td{border:1px solid #ccc;padding:2px 6px;text-align:right}"
            "table.t th{background:#eee}pre{background:#f6f6f6;padding:1em;white-space:pre-wrap}"
            "img{max-width:100%;border:1px solid #ddd;margin:.5em 0}figcaption{color:#555;font-size:13px}"
            "</style></head><body>",
            f"<h1>normsurgeon diagnostics: {esc(self.model_name)}</h1>",
            "<h2>Summary</h2>", f"<pre>{esc(self.summary())}</pre>",
            "<h2>Figures</h2>",
        ]
        for name, b64 in images.items():
            parts.append(f"<figure><img alt='{esc(name)}' src='data:image/png;base64,{b64}'>"
                         f"<figcaption>{esc(captions.get(name, name))}</figcaption></figure>")
        parts += ["<h2>Flags</h2>", table(self.flags, "No flags."),
                  "<h2>Layers</h2>", table(self.layers, "No norm site saw data."),
                  "<h2>Batch statistics</h2>", table(self.batch, "No batch-size sweep (pass batch_sizes=...)."),
                  "<h2>Thresholds</h2>",
                  table(pd.DataFrame({"rule": list(self.thresholds), "value": list(self.thresholds.values())}), ""),
                  "</body></html>"]
        return "\n".join(parts)
