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
