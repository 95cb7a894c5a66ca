"""The HTML page of a ``DiagnosticsReport``: one self-contained file (figures inlined as PNG, no script,
nothing fetched) that a practitioner reads top to bottom.

Title and subtitle (model, target or "original", data, reference, batch sizes, date); a summary
with, per failure mode found, the evidence, what it means and what to do; every metric explained
in one sentence with a link to its section of the README; the figures with captions; the tables,
each in a box of its own that scrolls sideways instead of widening the page.
"""
from __future__ import annotations

import html
import re
from pathlib import Path

import pandas as pd

from .flags import what_was_checked

_README = Path(__file__).resolve().parents[2] / "README.md"
#: Where the metric links point: the README of this source checkout when there is one (set it to the
#: project's hosted README for reports that travel).
README_URL = _README.as_uri() if _README.is_file() else "README.md"

#: (metric, column names it labels, one sentence, README anchor)
METRICS = [
    ("f_A", ("f_A", "ref_f_A", "f_A_ratio"),
     "share of the pre-activation's power that is the same for every input and position; close to 1 means the "
     "channels have collapsed to constants (the LayerNorm failure mode).", "metric-f_a"),
    ("f_B", ("f_B", "ref_f_B", "f_B_ratio"),
     "share of the power in how each channel's mean differs between inputs; close to 0 means every input gets "
     "the same channel means (the InstanceNorm failure mode).", "metric-f_b"),
    ("f_W", ("f_W",),
     "share of the power in the variation inside each input, across positions; f_A + f_B + f_W = 1.",
     "metric-f_w"),
    ("CV_σ", ("cv_sigma", "ref_cv_sigma", "cv_sigma_ratio"),
     "how much a channel's scale (its standard deviation over one input's positions) varies between inputs, "
     "relative to its mean; close to 0 means every input has the same scale.", "metric-cv_sigma"),
    ("r, d", ("d_abs_mean", "d_rms", "r_mean", "log_r_rms", "frac_pathological"),
     "Batch Renormalization's comparison of one batch's statistics with the population's: "
     "d = (batch mean − population mean) / population std and r = batch std / population std, per channel; "
     "healthy d ≈ 0 and r ≈ 1, pathological |d| > 5 or r outside [1/3, 3].", "metric-r-d"),
    ("ESS", ("effective_sample_size", "ess_ratio"),
     "effective sample size of a batch mean: the population variance divided by the variance of the batch "
     "means (harmonic mean over channels), so the batch mean is as noisy as a mean of ESS independent values; "
     "below 30 counts as noisy.", "metric-ess"),
    ("elements per statistic", ("elements_per_statistic",),
     "values pooled into one batch statistic: batch size × positions (fewer effective ones when neighbouring "
     "positions are alike).", "metric-elements"),
    ("train/eval gap", ("train_eval_gap",),
     "relative difference between a norm's output with the batch's statistics (train mode) and with the "
     "population statistics (eval mode) on the same batch.", "metric-gap"),
]

CAPTIONS = {
    "power": "Where each site's pre-activation power sits, sites from the first (top) to the last: f_A "
             "(channel-constant, red), f_B (between inputs, blue), f_W (within inputs, grey). The dashed line is "
             "the collapse threshold; flagged sites have red labels; a hatched bar says why a site has no split.",
    "batch_sweep": "How noisy the batch statistics of each batch-statistics site would be in training at each "
                   "batch size: left the effective sample size of the batch mean (dashed: 30, below is noisy), "
                   "right the fraction of batch statistics beyond Batch Renormalization's bounds.",
    "flags": "Every rule at every site: red fired, green checked and fine, grey the rule does not apply to that "
             "norm; the cells hold the values (power: degenerate output or ok; ESS @ b: effective sample size at "
             "batch b).",
}

_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;padding:1.5em 2em;max-width:1200px;
 color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.sub{color:#555;margin-top:0}.verdict{font-size:1.1em;padding:.6em .9em;border-radius:6px}
.ok{background:#e9f5ea;border:1px solid #9c9}.bad{background:#fdf0ee;border:1px solid #e3a59c}
.finding{border-left:4px solid #d9534f;padding:.3em 1em;margin:1em 0;background:#fafafa}
.finding.degenerate{border-left-color:#999}.finding h3{margin:.3em 0;font-size:1.05em}
.finding p{margin:.4em 0}dl.metrics dt{font-weight:bold;margin-top:.5em}dl.metrics dd{margin-left:1.5em}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #ddd}
figcaption{color:#555;font-size:.9em;max-width:900px}
.scroll{overflow:auto;max-height:70vh;max-width:100%;border:1px solid #ddd;margin-bottom:1.5em}
table.t{border-collapse:collapse;font-size:12px}
table.t th,table.t td{border:1px solid #e2e2e2;padding:2px 6px;text-align:right;white-space:nowrap}
table.t th{background:#f0f0f0;position:sticky;top:0}table.t td:first-child{text-align:left}
.note{color:#555}
"""


def _titles() -> dict[str, str]:
    return {col: f"{label}: {sentence}" for label, cols, sentence, _ in METRICS for col in cols}


def _table(frame: pd.DataFrame | None, empty: str) -> str:
    if frame is None or frame.empty:
        return f"<p class='note'><em>{html.escape(empty)}</em></p>"
    text = frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="", border=0, classes="t",
                         escape=True)
    titles = _titles()
    text = re.sub(r"<th>([^<]+)</th>",
                  lambda m: f"<th title=\"{html.escape(titles[m.group(1)])}\">{m.group(1)}</th>"
                  if m.group(1) in titles else m.group(0), text)
    return f"<div class='scroll'>{text}</div>"


def _finding(f) -> str:
    esc = html.escape
    evidence = "".join(f"<li>{esc(e)}</li>" for e in f.evidence)
    return (f"<article class='finding {esc(f.kind)}'><h3>{esc(f.title)}</h3><ul>{evidence}</ul>"
            f"<p><b>What this means.</b> {esc(f.meaning)}</p><p><b>What to do.</b> {esc(f.todo)}</p></article>")


def render(report, images: dict[str, str]) -> str:
    """The page as a string; ``images`` maps figure names to base64 PNG data."""
    esc = html.escape
    found = report.findings()
    flagged = len(report.flagged())
    sub = [report.describe_data()]
    if report.reference_name:
        sub.append(f"compared with the reference {report.reference_name}")
    if report.meta.get("date"):
        sub.append(report.meta["date"])
    if found:
        verdict = (f"<p class='verdict bad'>{flagged} of {len(report.layers)} norm sites flagged, "
                   f"{len(found)} finding{'s' if len(found) > 1 else ''}.</p>")
    else:
        verdict = (f"<p class='verdict ok'>No failure mode found. "
                   f"{esc(what_was_checked(report.layers, report.batch))}</p>")
    notes = "".join(f"<p class='note'>Note: {esc(n)}.</p>" for n in report.meta.get("notes", []))
    metrics = "".join(f"<dt id='{anchor}'>{esc(label)}</dt><dd>{esc(sentence[0].upper() + sentence[1:])} "
                      f"<a href='{README_URL}#{anchor}'>README: {esc(label)}</a></dd>"
                      for label, _, sentence, anchor in METRICS)
    figures = "".join(f"<figure><img alt='{esc(name)} figure' src='data:image/png;base64,{b64}'>"
                      f"<figcaption>{esc(CAPTIONS.get(name, name))}</figcaption></figure>"
                      for name, b64 in images.items())
    thresholds = pd.DataFrame({"rule": list(report.thresholds), "value": list(report.thresholds.values())})
    parts = [
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>normsurgeon diagnostics: {esc(report.title())}</title><style>{_STYLE}</style></head><body>",
        f"<h1>Normalization diagnostics: {esc(report.title())}</h1>",
        f"<p class='sub'>{esc(' · '.join(sub))}</p>",
        "<h2 id='summary'>Summary</h2>", verdict, *(_finding(f) for f in found), notes,
        "<h2 id='metrics'>The metrics</h2>",
        "<p>Measured at every norm's pre-activation: its output after the affine, before the activation.</p>",
        f"<dl class='metrics'>{metrics}</dl>",
        "<h2 id='figures'>Figures</h2>", figures,
        "<h2 id='flags'>Flags</h2>", _table(report.flags, "No flags."),
        "<h2 id='layers'>Layers</h2>",
        "<p class='note'>One row per norm site in execution order; hover a column name for its meaning.</p>",
        _table(report.layers, "No norm site saw data."),
        "<h2 id='batch'>Batch statistics</h2>",
        _table(report.batch, "No batch-size sweep (pass batch_sizes=...)."),
        "<h2 id='thresholds'>Thresholds</h2>", _table(thresholds, ""),
        "</body></html>",
    ]
    return "\n".join(parts)
