"""Figures of a ``DiagnosticsReport`` (seaborn on matplotlib's Agg backend; nothing is displayed).

- ``power_figure``: horizontal stacked bars of f_A, f_B, f_W per site, sites top to bottom in depth
  order (readable labels for any number of sites; two panels with a reference). A site with no
  power (all zero), a constant or a non-finite output is marked in words, never left blank.
- ``batch_sweep_figure``: effective sample size and fraction of pathological batch statistics
  against batch size, one line per site coloured by depth.
- ``flags_heatmap``: per-site x rule matrix, red where a flag fired, annotated with the metric values.
Each returns a matplotlib ``Figure``; ``save_png`` writes one and closes it.
"""
from __future__ import annotations

import functools
import math

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .families import COLLAPSE, INSTANCE
from .flags import THRESHOLDS


def _styled(style: str):
    """Run a figure function under a seaborn style without touching the global rcParams."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with mpl.rc_context({**sns.axes_style(style), **sns.plotting_context("paper")}):
                return fn(*args, **kwargs)
        return inner
    return wrap


_COLORS = {"f_A": "#c44e52", "f_B": "#4c72b0", "f_W": "#8c8c8c"}
_LABELS = {"f_A": "f_A channel-constant", "f_B": "f_B inter-instance", "f_W": "f_W intra-instance"}
_DEGENERATE_WORDS = {"zero_output": "no power: all zero", "constant_output": "constant output",
                     "nonfinite": "NaN/inf values"}
SITE_HEIGHT = 0.22  # inches per site in the figures with one row per site


def _new_figure(w: float, h: float, ncols: int = 1, **kw):
    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # Agg canvas: never a window, whatever the global backend
    axes = fig.subplots(1, ncols, squeeze=False, **kw)[0]
    return fig, axes


def save_png(fig: Figure, target) -> None:
    """PNG without the software/URL metadata; closes the figure."""
    fig.savefig(target, format="png", metadata={"Software": None})
    fig.clear()  # not managed by pyplot: clearing releases its artists


def _degenerate(flags: pd.DataFrame | None) -> dict[str, str]:
    if flags is None or flags.empty:
        return {}
    deg = flags[flags["kind"] == "degenerate"]
    return {n: _DEGENERATE_WORDS[m] for n, m in zip(deg["name"], deg["metric"])}


def _power_panel(ax, layers: pd.DataFrame, title: str, marks: dict[str, str], flagged: set[str]) -> None:
    y = np.arange(len(layers))
    left = np.zeros(len(layers))
    for key in ("f_A", "f_B", "f_W"):
        vals = np.nan_to_num(layers[key].to_numpy(dtype=float)) if len(layers) else np.zeros(0)
        ax.barh(y, vals, left=left, height=0.8, color=_COLORS[key], label=_LABELS[key], linewidth=0)
        left += vals
    names = list(layers["name"]) if len(layers) else []
    for i, name in enumerate(names):
        if name in marks:  # no meaningful split: a hatched bar that says why
            ax.barh(i, 1.0, height=0.8, color="#f4f4f4", hatch="///", edgecolor="#999999", linewidth=0)
            ax.text(0.5, i, marks[name], ha="center", va="center", fontsize=7, color="#333333")
    ax.axvline(THRESHOLDS["collapse_f_A"], color="k", ls="--", lw=0.8)
    ax.set_xlim(0, 1.0)
    ax.set_ylim(len(layers) - 0.5, -0.5)  # depth 0 at the top
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=7)
    for label in ax.get_yticklabels():
        if label.get_text() in flagged:
            label.set_color("#c0392b")
            label.set_fontweight("bold")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("fraction of pre-activation power")
    ax.grid(axis="y", visible=False)


@_styled("whitegrid")
def power_figure(layers: pd.DataFrame, reference_layers: pd.DataFrame | None = None,
                 name: str = "model", reference_name: str | None = None, flags: pd.DataFrame | None = None,
                 thresholds: dict | None = None) -> Figure:
    """Stacked f_A / f_B / f_W per site (one row each, depth order); the reference in a second panel."""
    t = dict(THRESHOLDS, **(thresholds or {}))
    panels = [(layers, name, _degenerate(flags), set(flags["name"]) if flags is not None else set())]
    if reference_layers is not None:
        from .flags import compute_flags
        ref_flags = compute_flags(reference_layers)
        panels = [(reference_layers, f"reference: {reference_name or 'reference'}", _degenerate(ref_flags), set()),
                  *panels]
    rows = max(len(p[0]) for p in panels)
    fig, axes = _new_figure(6.5 * len(panels) + 1.5, SITE_HEIGHT * rows + 1.6, len(panels))
    for ax, (frame, title, marks, flagged) in zip(axes, panels):
        _power_panel(ax, frame.sort_values("depth") if len(frame) else frame, title, marks, flagged)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles[:3], labels[:3], loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    fig.suptitle(f"Power split per site, in depth order (dashed: collapse threshold f_A = {t['collapse_f_A']:g}; "
                 f"red labels: flagged)", fontsize=10)
    return fig


@_styled("whitegrid")
def batch_sweep_figure(batch: pd.DataFrame, layers: pd.DataFrame | None = None,
                       thresholds: dict | None = None) -> Figure:
    """Effective sample size and fraction of pathological batch statistics against batch size, one
    line per site coloured by depth (a colour bar, not a legend, so nothing covers the lines)."""
    t = dict(THRESHOLDS, **(thresholds or {}))
    frame = batch.copy()
    depth = dict(zip(layers["name"], layers["depth"])) if layers is not None and len(layers) else {}
    frame["depth"] = frame["name"].map(depth).fillna(-1).astype(int)
    frame = frame.sort_values(["depth", "batch_size"])
    fig, axes = _new_figure(12.0, 4.4, 2)
    cmap = mpl.colormaps["viridis"]
    top = max(int(frame["depth"].max()), 1)
    panels = [("effective_sample_size", t["noisy_ess"], "effective sample size of the batch mean", "log"),
              ("frac_pathological", None, "fraction pathological (|d| > 5 or r ∉ [1/3, 3])", "linear")]
    sizes = sorted(frame["batch_size"].unique())
    for ax, (col, thr, label, scale) in zip(axes, panels):
        if col not in frame.columns:
            ax.text(0.5, 0.5, f"no {col}", ha="center", va="center", transform=ax.transAxes)
            continue
        for (_, d), g in frame.dropna(subset=[col]).groupby(["name", "depth"], sort=False):
            values = g[col].replace([np.inf], np.nan)
            ax.plot(g["batch_size"], values, marker="o", ms=3, lw=1, color=cmap(max(d, 0) / top), alpha=0.8)
        if thr is not None:
            ax.axhline(thr, color="k", ls="--", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale(scale)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(int(s)) for s in sizes])
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        if scale == "linear":
            ax.set_ylim(bottom=0)
    bar = fig.colorbar(mpl.cm.ScalarMappable(mpl.colors.Normalize(0, top), cmap), ax=list(axes), pad=0.01)
    bar.set_label("site depth (0 = first)")
    fig.suptitle(f"Batch statistics against batch size (dashed: the noisy-statistics threshold, ESS = "
                 f"{t['noisy_ess']:g})", fontsize=11)
    return fig


def _annotation(col: str, v, positions: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if col == "cv_sigma" and int(positions) < 2:
        return "n/a"  # one position per channel: instance scales are undefined
    if col == "power":
        return v
    v = float(v)
    if math.isinf(v):
        return "inf"
    if col.startswith("ESS"):
        return f"{v:.0f}" if v >= 10 else f"{v:.1f}"
    return f"{v:.2f}" if v == 0 or abs(v) >= 0.1 else f"{v:.1g}" if abs(v) < 0.001 else f"{v:.3f}"


@_styled("white")
def flags_heatmap(layers: pd.DataFrame, batch: pd.DataFrame | None, flags: pd.DataFrame,
                  thresholds: dict | None = None) -> Figure:
    """Site x rule matrix: red where a flag fired, green where the rule ran and passed, grey where the
    rule does not apply to the site's norm (its value is still written), blank where there is no value."""
    layers = layers.sort_values("depth") if len(layers) else layers
    names = list(layers["name"]) if len(layers) else []
    family = dict(zip(layers["name"], layers["norm"])) if "norm" in layers.columns else {}
    deg = _degenerate(flags)
    cols = ["power", "f_A", "f_B", "cv_sigma"]
    values = {"power": {n: deg.get(n, "ok") for n in names}}
    values.update({c: dict(zip(layers["name"], layers[c])) if len(layers) else {} for c in cols[1:]})
    applies = {"power": lambda n: True, "f_A": lambda n: family.get(n, "unknown") in COLLAPSE,
               "f_B": lambda n: family.get(n, "unknown") in INSTANCE,
               "cv_sigma": lambda n: family.get(n, "unknown") in INSTANCE}
    if batch is not None and not batch.empty and "effective_sample_size" in batch.columns:
        for b in sorted(int(b) for b in batch["batch_size"].unique()):
            at = batch[batch["batch_size"] == b]
            key = f"ESS @ {b}"
            cols.append(key)
            values[key] = dict(zip(at["name"], at["effective_sample_size"]))
            applies[key] = lambda n, has=set(at["name"]): n in has
    positions = dict(zip(layers["name"], layers["positions"])) if "positions" in layers.columns else {}
    fired = np.full((len(names), len(cols)), np.nan)
    annot = np.full((len(names), len(cols)), "", dtype=object)
    index = {n: i for i, n in enumerate(names)}
    for j, c in enumerate(cols):
        for n, v in values[c].items():
            if n in index:
                fired[index[n], j] = 0.0 if applies[c](n) and n not in deg or c == "power" else 0.5
                annot[index[n], j] = _annotation(c, v, positions.get(n, 2))
    for _, f in flags.iterrows():
        if f["name"] not in index:
            continue
        col = (f"ESS @ {int(f['batch_size'])}" if f["kind"] == "noisy_batch_statistics" else
               "power" if f["kind"] == "degenerate" else f["metric"])
        if col in cols:
            fired[index[f["name"]], cols.index(col)] = 1.0
    fig, axes = _new_figure(max(6.0, 1.15 * len(cols) + 3.5), min(60.0, max(3.0, SITE_HEIGHT * len(names) + 1.5)))
    ax = axes[0]
    if names:
        frame = pd.DataFrame(fired, index=names, columns=["power" if c == "power" else c for c in cols])
        sns.heatmap(frame, ax=ax, cmap=mpl.colors.ListedColormap(["#e8f0e8", "#eeeeee", "#d9534f"]), vmin=0, vmax=1,
                    cbar=False, linewidths=0.5, linecolor="white",
                    annot=annot if len(names) <= 120 else False, fmt="", annot_kws={"fontsize": 7})
        ax.tick_params(axis="y", labelsize=7)
        ax.tick_params(axis="x", labelsize=8, rotation=0, labeltop=True, labelbottom=False)
    else:
        ax.text(0.5, 0.5, "no sites", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("Flags per site (red: fired; green: checked and fine; grey: the rule does not apply to this norm)",
                 fontsize=9)
    return fig
