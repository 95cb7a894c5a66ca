"""The flag rules of a diagnostics report, and what each finding means and what to do about it.

Rules (``THRESHOLDS``; the reasoning and the numbers behind them are in
``analysis/failure_modes/README.md``, section "Thresholds"), each only at the sites whose norm
can have that failure mode (``families``):
- degenerate output: all zero (A + B + W = 0), constant (B + W ≤ 1e-6·(A + B + W), below what
  float32 resolves), or NaN/inf values. The other rules are skipped at such a site.
- channel collapse (LayerNorm failure mode): ``f_A > 0.5``; with a reference, only where f_A
  also rose by at least 10% over the reference's (``f_A_ratio >= 1.1``).
- instance-variance failure (InstanceNorm failure mode): ``f_B < 0.001`` or ``cv_sigma < 0.01``
  (cv_sigma only where positions > 1); with a reference, only where the reference's value is at
  least 10× larger.
- noisy batch statistics (BatchNorm at small batch): effective sample size < 30 at a batch size,
  i.e. batch means off by more than 1/√30 ≈ 0.18 population standard deviations (RMS).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from .families import COLLAPSE, INSTANCE, NAMES, family_names

THRESHOLDS = {
    "collapse_f_A": 0.5,           # f_A above: channel collapse
    "collapse_rise": 1.1,          # with a reference: f_A / ref f_A at least this
    "instance_f_B": 0.001,         # f_B below: inter-instance power gone
    "instance_cv_sigma": 0.01,     # cv_sigma below: instance scales all equal
    "instance_reference_factor": 10.0,  # with a reference: reference value at least this many times larger
    "noisy_ess": 30.0,             # effective sample size of the batch mean below: noisy batch statistics
    "constant_power": 1e-6,        # (B + W) / (A + B + W) at or below: constant output
}

KINDS = ("degenerate", "channel_collapse", "instance_variance", "noisy_batch_statistics")
FLAG_COLUMNS = ["name", "kind", "metric", "value", "threshold", "norm", "batch_size", "meaning"]

_MEANINGS = {
    "zero_output": "degenerate: the output is exactly zero",
    "constant_output": "degenerate: the output is constant (the same value for every input and position)",
    "nonfinite": "degenerate: NaN/inf values in the pre-activation",
    "f_A": "channel collapse: channel-constant power dominates the pre-activation",
    "f_B": "instance-variance failure: almost no power varies between inputs",
    "cv_sigma": "instance-variance failure: every input has the same scale",
    "effective_sample_size": "noisy batch statistics: the batch mean rests on few effective samples",
}


def _f(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _layer_rules(row, t: dict, has_ref: bool, add) -> None:
    family = row.get("norm") if isinstance(row.get("norm"), str) else "unknown"
    total = _f(row["A"]) + _f(row["B"]) + _f(row["W"]) if "A" in row else float("nan")
    if int(_f(row.get("nonfinite", 0)) or 0) > 0:
        add("nonfinite", int(row["nonfinite"]), "> 0")
        return
    if total == 0:
        add("zero_output", 0.0, "A + B + W = 0")
        return
    if math.isfinite(total) and _f(row["B"]) + _f(row["W"]) <= t["constant_power"] * total:
        add("constant_output", (_f(row["B"]) + _f(row["W"])) / total, f"(B + W) / total ≤ {t['constant_power']:g}")
        return
    if family in COLLAPSE:
        f_a = _f(row["f_A"])
        ref = _f(row.get("ref_f_A")) if has_ref else float("nan")
        if f_a > t["collapse_f_A"] and (math.isnan(ref) or f_a >= t["collapse_rise"] * ref):
            add("f_A", f_a, f"> {t['collapse_f_A']:g}" + (f" and ≥ {t['collapse_rise']:g}× reference" if has_ref else ""))
    if family in INSTANCE:
        factor = t["instance_reference_factor"]
        checks = [("f_B", t["instance_f_B"], True), ("cv_sigma", t["instance_cv_sigma"], int(row.get("positions", 2)) > 1)]
        for metric, limit, defined in checks:
            value = _f(row[metric])
            ref = _f(row.get(f"ref_{metric}")) if has_ref else float("nan")
            if defined and value < limit and (math.isnan(ref) or (ref > 0 and ref >= factor * value)):
                add(metric, value, f"< {limit:g}" + (f" while reference ≥ {factor:g}×" if has_ref else ""))


def compute_flags(layers: pd.DataFrame, batch: pd.DataFrame | None = None,
                  thresholds: dict | None = None) -> pd.DataFrame:
    """Apply the rules (module docstring) to a layers table and a batch table; one row per flag."""
    t = dict(THRESHOLDS, **(thresholds or {}))
    has_ref = "ref_f_A" in layers.columns
    family = dict(zip(layers["name"], layers["norm"])) if "norm" in layers.columns else {}
    rows = []

    def adder(name, batch_size=float("nan")):
        def add(metric, value, threshold):
            kind = ("degenerate" if metric in ("zero_output", "constant_output", "nonfinite") else
                    "channel_collapse" if metric == "f_A" else
                    "noisy_batch_statistics" if metric == "effective_sample_size" else "instance_variance")
            rows.append({"name": name, "kind": kind, "metric": metric, "value": float(value), "threshold": threshold,
                         "norm": family.get(name, "unknown"), "batch_size": batch_size,
                         "meaning": _MEANINGS[metric]})
        return add

    degenerate = set()
    for _, row in layers.iterrows():
        before = len(rows)
        _layer_rules(row, t, has_ref, adder(row["name"]))
        if any(r["kind"] == "degenerate" for r in rows[before:]):
            degenerate.add(row["name"])
    if batch is not None and not batch.empty and "effective_sample_size" in batch.columns:
        for _, row in batch.iterrows():
            ess = _f(row["effective_sample_size"])
            if row["name"] not in degenerate and ess < t["noisy_ess"]:
                adder(row["name"], int(row["batch_size"]))("effective_sample_size", ess, f"< {t['noisy_ess']:g}")
    flags = pd.DataFrame(rows, columns=FLAG_COLUMNS)
    if not flags.empty and not layers.empty:
        depth = dict(zip(layers["name"], layers["depth"]))
        flags = (flags.assign(_d=flags["name"].map(depth).fillna(1e9))
                 .sort_values(["_d", "kind", "batch_size"], kind="stable").drop(columns="_d")
                 .reset_index(drop=True))
    return flags


# ----------------------------------------------------------------------------- findings in words
@dataclass
class Finding:
    """One failure mode found: a title, the evidence, what it means and what to do."""

    kind: str
    title: str
    evidence: list[str]
    meaning: str
    todo: str
    sites: list[str] = field(default_factory=list)


def names(sites: list[str], limit: int = 6) -> str:
    sites = list(dict.fromkeys(sites))
    if len(sites) <= limit:
        return ", ".join(sites)
    return ", ".join(sites[:limit]) + f" and {len(sites) - limit} more"


_TODO_COLLAPSE = {
    "group": "convert to 'proxy_gn' (Proxy Norm keeps each channel centred, as BatchNorm does) or use 'gn' with "
             "more groups; keep batch statistics ('frozen_bn', 'bgn') if your batches allow",
    "layer": "convert to 'proxy_ln' or 'proxy_gn', or to 'gn' with several groups",
    "positional": "use 'gn' or 'proxy_gn' at these sites instead of a per-position norm",
    "proxy": "Proxy Norm should keep f_A near BatchNorm's here: calibrate the converted model (ns.calibrate) and "
             "fine-tune it",
    "batch_group": "use more groups (num_groups closer to the channel count)",
    "unknown": "compare with the original model (reference=) to see whether the swap caused it",
}
_TODO_INSTANCE = {
    "instance": "use 'gn' (groups of several channels) or 'proxy_gn', or a batch-statistics norm ('frozen_bn', "
                "'bgn') if your batches allow",
    "group": "use fewer, larger groups (a smaller num_groups or a larger group_size), or 'proxy_gn'",
    "layer": "calibrate (ns.calibrate) and fine-tune, then diagnose again",
    "positional": "calibrate (ns.calibrate) and fine-tune, then diagnose again",
    "proxy": "calibrate (ns.calibrate) and fine-tune, then diagnose again",
    "unknown": "compare with the original model (reference=) to see whether the swap caused it",
}


def _todo(table: dict, families) -> str:
    parts = list(dict.fromkeys(table.get(f, table["unknown"]) for f in families))
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


def findings(flags: pd.DataFrame, layers: pd.DataFrame, thresholds: dict, batch_sizes=None) -> list[Finding]:
    """The flags grouped by failure mode, in words (the HTML and text summaries show these);
    ``batch_sizes``: those of the sweep, to say at which ones nothing was found."""
    out = []
    t = thresholds
    has_ref = "ref_f_A" in layers.columns
    ref = layers.set_index("name") if has_ref else None

    deg = flags[flags["kind"] == "degenerate"]
    if not deg.empty:
        evidence = [f"{label}: {names(list(deg[deg['metric'] == m]['name']))}"
                    for m, label in (("zero_output", "all zero"), ("constant_output", "constant"),
                                     ("nonfinite", "NaN/inf values")) if (deg["metric"] == m).any()]
        todo = ("On a freshly initialised model, zero or constant output is expected where γ starts at 0 (timm "
                "zero-initialises the last BatchNorm of each residual block); on a trained model, check that the "
                "weights loaded.")
        if (deg["metric"] == "nonfinite").any():
            todo = "Check the converted weights, eps and the input scale first. " + todo
        out.append(Finding(
            "degenerate", f"Degenerate output in {deg['name'].nunique()} {family_names(deg['norm'])} layers", evidence,
            "These layers output all zeros, one constant, or NaN/inf, so their power split and failure-mode metrics "
            "are meaningless; the other rules are skipped there. This is not a normalization failure.",
            todo, list(dict.fromkeys(deg["name"]))))

    col = flags[flags["kind"] == "channel_collapse"]
    if not col.empty:
        worst = col.loc[col["value"].idxmax()]
        extra = f", reference {ref.at[worst['name'], 'ref_f_A']:.2f}" if has_ref else ""
        fams = list(dict.fromkeys(col["norm"]))
        out.append(Finding(
            "channel_collapse", f"Channel collapse in {col['name'].nunique()} {family_names(fams)} layers",
            [f"f_A > {t['collapse_f_A']:g}" + (f" and ≥ {t['collapse_rise']:g}× the reference's" if has_ref else "")
             + f": {names(list(col['name']))} (worst {worst['name']}: f_A = {worst['value']:.2f}{extra})"],
            f"Most of the pre-activation's power is the same for every input and position (f_A, the channel-constant "
            f"share), so these channels carry little information to the next layer. This is the LayerNorm failure "
            f"mode of Labatie et al. (2021): {family_names(fams)} does not centre each channel over the data."
            + ("" if has_ref else " Without a reference, this rule cannot tell a collapse from channel means that "
                                  "trained weights put there on purpose."),
            ("" if has_ref else "First diagnose again with reference= the unconverted original (normsurgeon "
                                "diagnose --to does): only a rise over the original is a collapse. ")
            + _todo(_TODO_COLLAPSE, fams), list(dict.fromkeys(col["name"]))))

    inst = flags[flags["kind"] == "instance_variance"]
    if not inst.empty:
        fams = list(dict.fromkeys(inst["norm"]))
        evidence = []
        for metric, label, limit in (("f_B", "f_B", t["instance_f_B"]), ("cv_sigma", "CV_σ", t["instance_cv_sigma"])):
            at = inst[inst["metric"] == metric]
            if not at.empty:
                evidence.append(f"{label} < {limit:g}: {names(list(at['name']))} (lowest {at['value'].min():.2g})")
        out.append(Finding(
            "instance_variance", f"Instance-variance failure in {inst['name'].nunique()} {family_names(fams)} layers",
            evidence,
            f"Every input gets almost the same per-channel mean (f_B) or scale (CV_σ) at these sites: "
            f"{family_names(fams)} erased instance statistics that later layers use to tell inputs apart. This is "
            f"the InstanceNorm failure mode of Labatie et al. (2021).",
            _todo(_TODO_INSTANCE, fams), list(dict.fromkeys(inst["name"]))))

    noisy = flags[flags["kind"] == "noisy_batch_statistics"]
    if not noisy.empty:
        sizes = sorted(noisy["batch_size"].dropna().astype(int).unique())
        evidence = []
        for b in sizes:
            at = noisy[noisy["batch_size"] == b]
            low = at.loc[at["value"].idxmin()]
            evidence.append(f"batch {b}, effective sample size < {t['noisy_ess']:g} in {at['name'].nunique()} layers: "
                            f"{names(list(at['name']))} (smallest {low['name']}: {low['value']:.1f}, so its batch "
                            f"means stray by about {1 / math.sqrt(max(low['value'], 1e-12)):.2f} population standard "
                            f"deviations)")
        fams = list(dict.fromkeys(noisy["norm"]))
        clean = sorted({int(b) for b in batch_sizes} - set(sizes)) if batch_sizes is not None else []
        if clean:
            evidence.append(f"batch {' and '.join(map(str, clean))}: no layer below {t['noisy_ess']:g}")
        b = sizes[0]
        at_sizes = " and ".join(str(s) for s in sizes)
        out.append(Finding(
            "noisy_batch_statistics",
            f"Noisy batch statistics at batch {at_sizes} in {noisy['name'].nunique()} {family_names(fams)} layers",
            evidence,
            f"In training mode a batch-statistics norm normalizes each batch with that batch's own mean and variance. "
            f"At batch {at_sizes} they stray from the population statistics that inference uses, so training sees "
            f"noise that inference never sees (BatchNorm's small-batch problem).",
            f"Fine-tune with population statistics (ns.finetune's default train_statistics=False, or 'frozen_bn'), "
            f"convert to 'bgn' (num_groups='auto', batch_size={b}) or to a batch-independent norm ('gn', "
            f"'proxy_gn'), or use a larger batch.", list(dict.fromkeys(noisy["name"]))))
    return out


def what_was_checked(layers: pd.DataFrame, batch: pd.DataFrame | None) -> str:
    """One sentence on which rules ran where, for a report without findings."""
    fams = list(layers["norm"]) if "norm" in layers.columns else ["unknown"] * len(layers)
    parts = [f"{len(layers)} {family_names(fams)} sites: degenerate output"]
    if any(f in COLLAPSE for f in fams):
        parts.append("channel collapse")
    if any(f in INSTANCE for f in fams):
        parts.append("instance-variance failure")
    if batch is not None and not batch.empty:
        sizes = ", ".join(str(int(b)) for b in sorted(batch["batch_size"].unique()))
        parts.append(f"noisy batch statistics at batch {sizes}")
    return "Checked at " + ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1] + "."


__all__ = ["THRESHOLDS", "KINDS", "FLAG_COLUMNS", "compute_flags", "Finding", "findings", "what_was_checked", "NAMES"]
