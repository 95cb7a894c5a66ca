"""What the fine-tuning studies share: the pretrained Lite0 with a new head, accuracy, running jobs in
worker processes (one thread each) with each result appended to a CSV as it arrives (an interrupted
study resumes where it stopped), and the summary, markdown table and figure next to the script.

    sys.path.insert(0, os.path.dirname(HERE))   # analysis/
    from finetune_studies import finished, lite0_with_new_head, run_jobs, write_outputs
"""
from __future__ import annotations

import csv
import multiprocessing as mp
import os
import time
from typing import Callable


def lite0_with_new_head(num_classes: int, seed: int):
    """The embedded EfficientNet-Lite0 (ImageNet weights) with a fresh ``num_classes`` head drawn from ``seed``."""
    import torch

    from normsurgeon import zoo

    torch.manual_seed(seed)
    model = zoo.efficientnet_lite0()
    model.reset_classifier(num_classes)
    return model


def accuracy(model, x, y) -> float:
    """Top-1 accuracy in eval mode (``normsurgeon.training.evaluate``)."""
    from normsurgeon.training import evaluate

    return evaluate(model, (x, y))["eval_accuracy"]


def finished(results: str, key: Callable[[dict], tuple]) -> set:
    """The keys of the runs already in ``results`` (rows as read by csv, values as strings)."""
    if not os.path.exists(results):
        return set()
    with open(results, newline="") as f:
        return {key(row) for row in csv.DictReader(f)}


def run_jobs(one_run: Callable[[dict], dict], jobs: list[dict], results: str, fields: list[str], workers: int,
             describe: Callable[[dict], str]) -> None:
    """``one_run(job)`` for every job in ``workers`` spawned processes; each result is appended to
    ``results`` (columns ``fields``, missing ones empty) and printed with ``describe``."""
    wall0 = time.perf_counter()
    with mp.get_context("spawn").Pool(workers) as pool:
        for out in pool.imap_unordered(one_run, jobs):
            new = not os.path.exists(results)
            with open(results, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields, restval="")
                if new:
                    writer.writeheader()
                writer.writerow(out)
            print(f"{describe(out)} ({time.perf_counter() - wall0:.0f} s wall)", flush=True)


def write_outputs(here: str, summarize: Callable, table: Callable, plot: Callable) -> None:
    """results.csv → summary.csv, table.md, accuracy.png in ``here``; prints the table."""
    import pandas as pd

    frame = pd.read_csv(os.path.join(here, "results.csv"))
    summary = summarize(frame)
    summary.to_csv(os.path.join(here, "summary.csv"), index=False, float_format="%.4g")
    with open(os.path.join(here, "table.md"), "w") as f:
        f.write(table(summary) + "\n")
    plot(frame, os.path.join(here, "accuracy.png"))
    print(table(summary))


def accuracy_figure(frame, rows: list[str], path: str, title: str, size=(10, 4.2), **pointplot) -> None:
    """Test accuracy in % (column ``test``) per row in the order of ``rows``, mean ± sd over seeds,
    each run as a grey dot; ``pointplot`` goes to seaborn's pointplot (e.g. hue="batch")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    order = [r for r in rows if r in set(frame["row"])]
    frame = frame.assign(**{"test accuracy %": 100 * frame["test"]})
    sns.set_theme(style="whitegrid", context="notebook")
    fig, ax = plt.subplots(figsize=size)
    sns.pointplot(data=frame, x="row", y="test accuracy %", order=order, errorbar="sd", linestyle="none",
                  capsize=0.15, ax=ax, **pointplot)
    dodge = {"dodge": 0.35} if "hue" in pointplot else {}
    sns.stripplot(data=frame, x="row", y="test accuracy %", order=order, color="0.6", size=3, ax=ax,
                  hue=pointplot.get("hue"), palette=["0.6"] * frame[pointplot["hue"]].nunique() if "hue" in pointplot
                  else None, legend=False, **dodge)
    ax.set_xlabel("")
    ax.set_ylim(0, 100)
    ax.tick_params(axis="x", rotation=25)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
