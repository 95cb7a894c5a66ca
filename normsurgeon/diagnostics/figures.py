"""Figures of a ``DiagnosticsReport`` (seaborn on matplotlib's Agg backend; nothing is displayed).

- ``power_figure``: stacked bars of f_A, f_B, f_W per site against depth (two panels with a reference).
- ``batch_sweep_figure``: ess_ratio and frac_pathological against batch size, one line per site.
- ``flags_heatmap``: per-site x rule matrix, red where a flag fired, annotated with the metric values.
Each returns a matplotlib ``Figure``; ``save_png`` writes one and closes it.
"""
from __future__ import annotations

import math

import functools

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .report import THRESHOLDS


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


def _new_figure(w: float, h: float, ncols: int = 1, **kw):
    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # Agg canvas: never a window, whatever the global backend
    axes = fig.subplots(1, ncols, squeeze=False, **kw)[0]
    return fig, axes


def save_png(fig: Figure, target) -> None:
    """PNG without the software/URL metadata; closes the figure."""
    fig.savefig(target, format="png", metadata={"Software": None})
    fig.clear()  # not managed by pyplot: clearing releases its artists


def _tick_labels(ax, layers: pd.DataFrame) -> None:
    n = len(layers)
    step = max(1, math.ceil(n / 40))
    idx = list(range(0, n, step))
    ax.set_xticks(idx)
    ax.set_xticklabels([str(layers["name"].iloc[i]) for i in idx], rotation=90, fontsize=7)


def _power_panel(ax, layers: pd.DataFrame, title: str) -> None:
    x = np.arange(len(layers))
    bottom = np.zeros(len(layers))
    for key in ("f_A", "f_B", "f_W"):
        vals = layers[key].to_numpy(dtype=float) if len(layers) else np.zeros(0)
        vals = np.nan_to_num(vals)
        ax.bar(x, vals, bottom=bottom, width=0.9, color=_COLORS[key], label=_LABELS[key], linewidth=0)
        bottom += vals
    ax.axhline(THRESHOLDS["collapse_f_A"], color="k", ls="--", lw=0.8)
    ax.set_ylim(0, 1.0)
    ax.set_xlim(-0.6, max(len(layers) - 0.4, 0.6))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("site (depth order)")
    _tick_labels(ax, layers)


@_styled("whitegrid")
def power_figure(layers: pd.DataFrame, reference_layers: pd.DataFrame | None = None,
                 name: str = "model", reference_name: str | None = None) -> Figure:
    """Stacked f_A / f_B / f_W per site against depth; the reference in a second panel if given."""
    panels = [(layers, name)]
    if reference_layers is not None:
        panels = [(reference_layers, f"reference: {reference_name or 'reference'}"), (layers, name)]
    width = min(28.0, max(7.0, 0.16 * max(len(p[0]) for p in panels) + 3.0)) * (1 if len(panels) == 1 else 1.6)
    fig, axes = _new_figure(width, 4.6, len(panels), sharey=True)
    for ax, (frame, title) in zip(axes, panels):
        _power_panel(ax, frame.sort_values("depth") if len(frame) else frame, title)
    axes[0].set_ylabel("fraction of pre-activation power")
    axes[-1].legend(loc="upper left", fontsize=8, frameon=True, framealpha=0.9)
    fig.suptitle("Power split against depth (dashed: collapse threshold f_A = %g)" % THRESHOLDS["collapse_f_A"],
                 fontsize=11)
    return fig


@_styled("whitegrid")
def batch_sweep_figure(batch: pd.DataFrame, layers: pd.DataFrame | None = None,
                       thresholds: dict | None = None) -> Figure:
    """ess_ratio and frac_pathological against batch size, one line per site (colored by depth)."""
    t = dict(THRESHOLDS, **(thresholds or {}))
    frame = batch.copy()
    depth = dict(zip(layers["name"], layers["depth"])) if layers is not None and len(layers) else {}
    frame["depth"] = frame["name"].map(depth).fillna(-1).astype(int)
    frame = frame.sort_values(["depth", "batch_size"])
    n_sites = frame["name"].nunique()
    fig, axes = _new_figure(12.0, 4.4, 2)
    few = n_sites <= 10
    palette = "tab10" if few else "viridis"
    hue = "name" if few else "depth"
    for ax, (col, thr, label) in zip(axes, [("ess_ratio", t["noisy_ess_ratio"], "ESS / elements per statistic"),
                                            ("frac_pathological", t["noisy_frac_pathological"],
                                             "fraction pathological (|d|>5 or r∉[1/3,3])")]):
        if col not in frame.columns:
            ax.text(0.5, 0.5, f"no {col}", ha="center", va="center", transform=ax.transAxes)
            continue
        data = frame.dropna(subset=[col])
        sns.lineplot(data=data, x="batch_size", y=col, hue=hue, palette=palette, marker="o", ax=ax,
                     legend=("brief" if few else "auto") if ax is axes[1] else False, linewidth=1)
        ax.axhline(thr, color="k", ls="--", lw=0.8)
        ax.set_xscale("log", base=2)
        sizes = sorted(frame["batch_size"].unique())
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(int(s)) for s in sizes])
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        if col == "frac_pathological":
            ax.set_ylim(bottom=0)
    leg = axes[1].get_legend()
    if leg is not None:
        leg.set_title("site" if few else "depth")
        for txt in leg.get_texts():
            txt.set_fontsize(7)
    fig.suptitle("Batch statistics against batch size (dashed: flag thresholds)", fontsize=11)
    return fig


def _annotation(col: str, v, positions: int) -> str:
    def bad(u):
        return u is None or (isinstance(u, float) and math.isnan(u))
    if isinstance(v, tuple):
        return " / ".join("–" if bad(u) else f"{float(u):.2f}" for u in v)
    if col == "cv_sigma" and int(positions) < 2:
        return "n/a"  # one position per channel: instance scales are undefined
    if bad(v):
        return ""
    if col == "nonfinite":
        return f"{int(v)}"
    v = float(v)
    return f"{v:.2f}" if v == 0 or abs(v) >= 0.1 else f"{v:.1g}" if abs(v) < 0.001 else f"{v:.3f}"


@_styled("white")
def flags_heatmap(layers: pd.DataFrame, batch: pd.DataFrame | None, flags: pd.DataFrame,
                  thresholds: dict | None = None) -> Figure:
    """Site x rule matrix: 1 (red) where a flag fired, 0 where checked and fine, blank where n/a."""
    names = list(layers.sort_values("depth")["name"]) if len(layers) else []
    cols = ["f_A", "f_B", "cv_sigma", "nonfinite"]
    values = {c: dict(zip(layers["name"], layers[c])) for c in cols} if len(layers) else {c: {} for c in cols}
    sizes = []
    if batch is not None and not batch.empty:
        sizes = sorted(int(b) for b in batch["batch_size"].unique())
        for b in sizes:
            at = batch[batch["batch_size"] == b]
            cols.append(f"batch {b}")
            ess = at["ess_ratio"] if "ess_ratio" in at.columns else pd.Series(np.nan, index=at.index)
            path = at["frac_pathological"] if "frac_pathological" in at.columns else pd.Series(np.nan, index=at.index)
            values[f"batch {b}"] = {n: (e, p) for n, e, p in zip(at["name"], ess, path)}
    positions = dict(zip(layers["name"], layers["positions"])) if "positions" in layers.columns else {}
    fired = np.full((len(names), len(cols)), np.nan)
    annot = np.full((len(names), len(cols)), "", dtype=object)
    index = {n: i for i, n in enumerate(names)}
    for j, c in enumerate(cols):
        for n, v in values[c].items():
            if n in index:
                fired[index[n], j] = 0.0
                annot[index[n], j] = _annotation(c, v, positions.get(n, 2))
    for _, f in flags.iterrows():
        if f["name"] not in index:
            continue
        col = f"batch {int(f['batch_size'])}" if f["kind"] == "noisy_batch_statistics" else f["metric"]
        if col in cols:
            fired[index[f["name"]], cols.index(col)] = 1.0
    height = min(40.0, max(3.0, 0.24 * len(names) + 1.5))
    fig, axes = _new_figure(max(6.0, 1.1 * len(cols) + 3.5), height)
    ax = axes[0]
    if names:
        frame = pd.DataFrame(fired, index=names, columns=cols)
        sns.heatmap(frame, ax=ax, cmap=sns.color_palette(["#e8f0e8", "#d9534f"], as_cmap=True), vmin=0, vmax=1,
                    cbar=False, linewidths=0.5, linecolor="white",
                    annot=annot if len(names) <= 80 else False, fmt="", annot_kws={"fontsize": 7})
        ax.tick_params(axis="y", labelsize=7)
        ax.tick_params(axis="x", labelsize=8, rotation=0)
    else:
        ax.text(0.5, 0.5, "no sites", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("Flags per site (red: fired; batch columns: ess_ratio / frac_pathological)", fontsize=10)
    return fig
