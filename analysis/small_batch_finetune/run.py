"""Small-batch fine-tuning of a pretrained model: which conversion should a user pick at batch 2?

What users do: take a pretrained network, put a new head on it and fine-tune it with labels at
the batch their memory allows. This study does that with the embedded EfficientNet-Lite0
(real ImageNet weights) on ``normsurgeon.photo_task`` (which photo does a crop come from;
train, validation and test crops from disjoint tiles of each photo) at a per-step batch of 2
and of 32, with the same number of optimizer steps at both, for every row below:

    bn                 BatchNorm trained as it is (batch statistics, running estimates updated)
    bn_frozen_stats    BatchNorm with population statistics, γ and β trained (finetune's default)
    frozen_bn          normsurgeon frozen_bn: statistics and γ, β fixed (detectron2's FrozenBatchNorm)
    naive_gn           the loop users paste: every nn.BatchNorm2d → a fresh nn.GroupNorm(gcd(32, C), C),
                       nothing carried over (on timm's BatchNormAct2d this also drops the fused ReLU6)
    gn, proxy_gn       normsurgeon's conversions (statistics folded into γ, β; Proxy Norm)
    bgn                Batch Group Norm, num_groups="auto", batch_size=B (train_statistics=True)
    cbn, mbn, iebn     Cross-Iteration BN (window 4), Memorized BN (memory 4), IEBN (train_statistics=True)

Training: ``normsurgeon.finetune`` with labels, AdamW lr 1e-4 (the same at both batch sizes),
cosine schedule after 20 warm-up steps, weight decay 5e-5 on weights (``param_groups``),
STEPS optimizer steps, validation every 50 steps and the best validation state kept (the
default). The seed sets the new head's initialization and the data order; the photo task is
the same for every run. Evaluation of the returned model in eval mode: accuracy on the test
split, on every 4th training crop (the train/test gap), and, for the rows that train batch
statistics, again after ``normsurgeon.recalibrate_bn`` over the training split in batches of 32.

Run (see README.md for the Debian photo packages; without them the task has 19 classes):
    PYTHONPATH=. .venv/bin/python analysis/small_batch_finetune/run.py [--rows ...] [--seeds 0 1 2]
        [--batches 2 32] [--jobs 2]          # appends to results.csv, skips runs already there
    PYTHONPATH=. .venv/bin/python analysis/small_batch_finetune/run.py --plot-only
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
import warnings

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from finetune_studies import (accuracy, accuracy_figure, finished, lite0_with_new_head, run_jobs,  # noqa: E402
                              write_outputs)
SIZE, STEPS, LR, WARMUP, EVAL_EVERY = 112, 250, 1e-4, 20, 50
ROWS = {  # row: (normsurgeon target or None for the original model, options, train_statistics)
    "bn": (None, {}, True),
    "bn_frozen_stats": (None, {}, False),
    "frozen_bn": ("frozen_bn", {}, False),
    "naive_gn": ("naive", {}, False),
    "gn": ("gn", {}, False),
    "proxy_gn": ("proxy_gn", {}, False),
    "bgn": ("bgn", {"num_groups": "auto"}, True),
    "cbn": ("cbn", {}, True),
    "mbn": ("mbn", {}, True),
    "iebn": ("iebn", {}, True),
}
TRAINS_STATISTICS = {row for row, (_, _, train) in ROWS.items() if train}


@functools.lru_cache(maxsize=1)
def task():
    from normsurgeon.photo_task import photo_task

    return photo_task(size=SIZE)


def naive_groupnorm_swap(model: nn.Module) -> nn.Module:
    """The replace-BN-with-GN loop of forum answers: a fresh GroupNorm per nn.BatchNorm2d, in place."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, nn.GroupNorm(math.gcd(32, child.num_features), child.num_features))
    return model


def build(row: str, batch: int, seed: int, num_classes: int) -> nn.Module:
    import normsurgeon as ns

    target, options, _ = ROWS[row]
    model = lite0_with_new_head(num_classes, seed)
    if target == "naive":
        return naive_groupnorm_swap(model)
    if target is None:
        return model
    if target == "bgn":
        options = dict(options, batch_size=batch)
    return ns.convert(model, to=target, **options)


def one_run(job: dict) -> dict:
    import normsurgeon as ns

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    cpu0 = time.process_time()
    row, batch, seed = job["row"], job["batch"], job["seed"]
    data = task()
    model = build(row, batch, seed, data.num_classes)
    history = ns.finetune(model, data.train, steps=STEPS, lr=LR, optimizer="adamw", batch_size=batch,
                          scheduler="cosine", warmup_steps=WARMUP, loss="labels", eval_data=data.val,
                          eval_every=EVAL_EVERY, train_statistics=ROWS[row][2], seed=seed, progress=False,
                          log_every=EVAL_EVERY)
    restored = next((r["restored_best_step"] for r in history if "restored_best_step" in r), STEPS)
    out = {"row": row, "batch": batch, "seed": seed, "classes": data.num_classes, "steps": STEPS,
           "best_step": restored, "val": max(r["eval_accuracy"] for r in history if "eval_accuracy" in r),
           "test": accuracy(model, *data.test),
           "train": accuracy(model, data.train[0][::4], data.train[1][::4]),
           "train_cpu_s": history.last("cpu_s")}
    if row in TRAINS_STATISTICS:
        order = torch.randperm(len(data.train[0]), generator=torch.Generator().manual_seed(seed))
        ns.recalibrate_bn(model, [data.train[0][order[i:i + 32]] for i in range(0, len(order) - 31, 32)])
        out["test_recalibrated"] = accuracy(model, *data.test)
    out["cpu_s"] = time.process_time() - cpu0
    return out


FIELDS = ["row", "batch", "seed", "classes", "steps", "best_step", "val", "test", "train", "test_recalibrated",
          "train_cpu_s", "cpu_s"]


def summarize(frame):
    import pandas as pd

    frame = frame.assign(gap=frame["train"] - frame["test"], train_cpu_min=frame["train_cpu_s"] / 60)
    g = frame.groupby(["row", "batch"], sort=False)
    out = g.agg(n=("seed", "size"), test_mean=("test", "mean"), test_sd=("test", "std"),
                gap_mean=("gap", "mean"), gap_sd=("gap", "std"),
                recal_mean=("test_recalibrated", "mean"), recal_sd=("test_recalibrated", "std"),
                best_step=("best_step", "mean"), train_cpu_min=("train_cpu_min", "mean")).reset_index()
    out["row"] = pd.Categorical(out["row"], [r for r in ROWS if r in set(out["row"])])
    return out.sort_values(["row", "batch"]).reset_index(drop=True)


def table(summary) -> str:
    """Markdown: one line per row, batch 2 and 32 side by side (accuracy in %, mean ± sd)."""
    def cell(r, mean, sd):
        return "–" if r is None or math.isnan(r[mean]) else f"{100 * r[mean]:.1f} ± {100 * r[sd]:.1f}"

    lines = ["| row | test, B=2 | test, B=32 | train − test, B=2 | train − test, B=32 | recalibrated, B=2 | "
             "recalibrated, B=32 | CPU min/run B=2 / B=32 |", "|---|---|---|---|---|---|---|---|"]
    for name in [r for r in ROWS if r in set(summary["row"].astype(str))]:
        at = {int(b): rec for b, rec in ((rec["batch"], rec) for rec in summary[summary["row"] == name].to_dict("records"))}
        small, big = at.get(2), at.get(32)
        cpu = " / ".join(f"{r['train_cpu_min']:.1f}" if r is not None else "–" for r in (small, big))
        lines.append(f"| {name} | {cell(small, 'test_mean', 'test_sd')} | {cell(big, 'test_mean', 'test_sd')} | "
                     f"{cell(small, 'gap_mean', 'gap_sd')} | {cell(big, 'gap_mean', 'gap_sd')} | "
                     f"{cell(small, 'recal_mean', 'recal_sd')} | {cell(big, 'recal_mean', 'recal_sd')} | {cpu} |")
    return "\n".join(lines)


def plot(frame, path: str) -> None:
    frame = frame.assign(batch=frame["batch"].astype(str))
    accuracy_figure(frame, list(ROWS), path, f"Pretrained EfficientNet-Lite0 fine-tuned on {int(frame['classes'].iloc[0])} "
                    f"photos ({STEPS} steps, {SIZE} px): test accuracy, mean ± sd over seeds", hue="batch",
                    hue_order=["2", "32"], dodge=0.35, markers=["o", "s"], palette=["tab:red", "tab:blue"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 32])
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (1 thread each)")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    if not args.plot_only:
        results = os.path.join(HERE, "results.csv")
        done = finished(results, lambda r: (r["row"], int(r["batch"]), int(r["seed"])))
        jobs = [{"row": r, "batch": b, "seed": s} for b in sorted(args.batches) for r in args.rows
                for s in args.seeds if (r, b, s) not in done]
        run_jobs(one_run, jobs, results, FIELDS, args.jobs, lambda out: (
            f"{out['row']:16s} B={out['batch']:2d} seed={out['seed']} test={out['test']:.3f} "
            f"train={out['train']:.3f} recal={out.get('test_recalibrated', float('nan')):.3f} "
            f"best step {out['best_step']} cpu={out['cpu_s']:.0f}s"))
    write_outputs(HERE, summarize, table, plot)


if __name__ == "__main__":
    main()
