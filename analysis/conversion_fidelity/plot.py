"""Figure and markdown table of results.csv (run by ``run.py --plot``)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

DEFAULT_RECIPE = "adamw lr=0.0003"
STAGES = ["convert", "calibrate", "distill 1 min", "distill 5 min", "distill 10 min"]


def plot(results: Path, out: Path) -> None:
    table = pd.read_csv(results)
    table["stage"] = pd.Categorical(table["stage"], STAGES)
    frame = table[table["recipe"] == DEFAULT_RECIPE]  # the figure: one recipe for every target
    long = pd.concat([frame.assign(held_out=h, agreement=frame[f"agreement_{k}"], kl=frame[f"kl_{k}"])
                      for k, h in (("same_photos", "new crops of the training photos"),
                                   ("new_photos", "crops of photos never used"))])
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(2, 2, figsize=(13, 8), sharex=True)
    for row, metric in enumerate(("agreement", "kl")):
        for col, held_out in enumerate(long["held_out"].unique()):
            ax = axes[row, col]
            sns.pointplot(data=long[long["held_out"] == held_out], x="stage", y=metric, hue="target", ax=ax,
                          dodge=0.3, legend=(row == 0 and col == 1))
            ax.set_title(held_out if row == 0 else "")
            ax.set_ylabel("top-1 agreement with the original" if metric == "agreement" else "KL(original ‖ converted)")
            ax.set_xlabel("")
            if metric == "kl":
                ax.set_yscale("symlog", linthresh=0.1)
                ax.set_ylim(bottom=0)
            ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"EfficientNet-Lite0 (real weights): convert → calibrate → distill ({DEFAULT_RECIPE}, CPU minutes)")
    fig.tight_layout()
    fig.savefig(out / "fidelity.png", dpi=110)
    plt.close(fig)
    lines = ["| target | recipe | stage | CPU min | steps | agreement (same photos) | KL (same) | agreement (new photos) "
             "| KL (new) |", "|---|---|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        lines.append(f"| {r.target} | {r.recipe} | {r.stage} | {r.cpu_minutes:g} | {r.steps} | {r.agreement_same_photos:.2f} | "
                     f"{max(r.kl_same_photos, 0):.3f} | {r.agreement_new_photos:.2f} | {max(r.kl_new_photos, 0):.3f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")


def plot_defaults(results: Path, out: Path) -> None:
    """fidelity_defaults.png and table_defaults.md from results_defaults.csv: agreement on both
    held-out sets against CPU minutes of distillation, the state finetune returns (kept) next to
    the last training state."""
    table = pd.read_csv(results)
    table["minutes"] = table["cpu_minutes"].astype(float).round()  # the budget (1.01 → 1)
    long = pd.concat([table.assign(held_out=h, agreement=table[f"agreement_{k}"])
                      for k, h in (("same_photos", "new crops of the training photos"),
                                   ("new_photos", "crops of photos never used"))])
    long = long[long["stage"] != "convert"]
    sns.set_theme(style="whitegrid", context="notebook")
    grid = sns.relplot(data=long, x="minutes", y="agreement", hue="target", style="state", col="held_out",
                       kind="line", markers=True, dashes={"kept": "", "last": (3, 2)}, height=4.2, aspect=1.25)
    grid.set_titles("{col_name}")
    grid.set_axis_labels("CPU minutes of distillation (0 = after calibrate)", "top-1 agreement with the original")
    ticks = sorted(long["minutes"].unique())
    grid.set(xscale="symlog", ylim=(-0.02, 1.02), xticks=ticks, xticklabels=[f"{t:g}" for t in ticks])
    grid.figure.suptitle("EfficientNet-Lite0 with normsurgeon's defaults: kept state (solid) vs last state (dashed)",
                         y=1.03)
    grid.savefig(out / "fidelity_defaults.png", dpi=110, bbox_inches="tight")
    plt.close(grid.figure)
    lines = ["| target | stage | state | CPU min | steps | kept step | calibration kept | agreement (same photos) "
             "| KL (same) | agreement (new photos) | KL (new) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        kept_step = "" if pd.isna(r.kept_step) else f"{int(r.kept_step)}"
        calibration = "" if pd.isna(r.calibration_kept) else ("yes" if r.calibration_kept else "no (rejected)")
        lines.append(f"| {r.target} | {r.stage} | {r.state} | {r.cpu_minutes:g} | {r.steps} | {kept_step} | "
                     f"{calibration} | {r.agreement_same_photos:.2f} | {max(r.kl_same_photos, 0):.3f} | "
                     f"{r.agreement_new_photos:.2f} | {max(r.kl_new_photos, 0):.3f} |")
    (out / "table_defaults.md").write_text("\n".join(lines) + "\n")
