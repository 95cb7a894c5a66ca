"""Small-batch training: BN against its batch-independent and small-batch replacements (issue 6).

Question: when a ResNet is trained from scratch at a per-step batch of 2 instead of 32, does
BatchNorm lose accuracy, do GroupNorm and Proxy Norm stay batch-independent, and do the three
small-batch fixes (Batch Group Norm, Cross-Iteration BN, Memorized BN) recover what BN loses?

Data: sklearn ``load_digits`` (1,797 8×8 digits, 10 classes), a fixed stratified 75/25 split
(random_state=0), upsampled bilinearly to 32×32, standardized with the training mean and std.
Model: a small CIFAR-style ResNet built from torchvision's ``BasicBlock`` (3×3 stem, three
stages of one block at widths 8/16/32 and strides 1/2/2, global pool, linear head; ~20k
parameters), with ``nn.BatchNorm2d``. For each seed the BN model is created once and converted
with ``normsurgeon.convert`` to every target, so all targets start from the same weights:

    bn        plain BatchNorm (normsurgeon's)
    gn        GroupNorm, 4 groups (group sizes 2/4/8 channels)
    proxy_gn  GroupNorm (4 groups, no affine) + Proxy-Normalized activation
    bgn       Batch Group Norm, num_groups="auto", batch_size=B (B=32: G=C, i.e. BN)
    cbn       Cross-Iteration BN, window=4, burn-in = one epoch of optimizer steps
    mbn       Memorized BN, memory=4 (double forward after each step)

Training: ``normsurgeon.finetune`` with labels, SGD (momentum 0.9, nesterov), cosine schedule,
weight decay 5e-4, the same number of epochs (samples seen) at every batch size, learning rate
scaled linearly from 0.1 at batch 32 (0.00625 at batch 2). Evaluation on the test split, in
eval mode, once with the running statistics as trained, and, for the batch-statistics targets
(bn, bgn, cbn, mbn), again after ``normsurgeon.recalibrate_bn`` on one pass over the training
set in batches of 32.

Run: PYTHONPATH=. .venv/bin/python analysis/small_batch/run.py [--seeds 0 1 2] [--epochs 4]
     [--jobs 2] [--plot-only]
Writes results.csv (one row per run), summary.csv (mean ± std per target × batch) and
accuracy.png next to this file; prints the CPU time used (time.process_time, all processes).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torchvision.models.resnet import BasicBlock  # noqa: E402

import normsurgeon as ns  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = ["bn", "gn", "proxy_gn", "bgn", "cbn", "mbn"]
BATCH_STATISTICS = {"bn", "bgn", "cbn", "mbn"}  # eval uses running statistics: recalibrate
SIZE, WIDTHS, LR32, WEIGHT_DECAY, GN_GROUPS, WINDOW = 32, (8, 16, 32), 0.1, 5e-4, 4, 4


class TinyResNet(nn.Module):
    """3×3 stem → one torchvision BasicBlock per stage (strides 1, 2, 2) → pool → linear."""

    def __init__(self, widths=WIDTHS, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None if stride == 1 and cin == w else nn.Sequential(
                nn.Conv2d(cin, w, 1, stride, bias=False), nn.BatchNorm2d(w))
            blocks.append(BasicBlock(cin, w, stride, down))
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def digits():
    """(x_train, y_train, x_test, y_test): stratified 75/25, 32×32, standardized."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(data.images, data.target, test_size=0.25,
                                              stratify=data.target, random_state=0)

    def prep(x):
        x = torch.tensor(x, dtype=torch.float32).unsqueeze(1)
        return F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)

    x_tr, x_te = prep(x_tr), prep(x_te)
    mean, std = x_tr.mean(), x_tr.std()
    return ((x_tr - mean) / std, torch.tensor(y_tr), (x_te - mean) / std, torch.tensor(y_te))


def convert(base: nn.Module, target: str, batch: int, burnin: int) -> nn.Module:
    options = {"bn": {}, "gn": {"num_groups": GN_GROUPS}, "proxy_gn": {"num_groups": GN_GROUPS},
               "bgn": {"num_groups": "auto", "batch_size": batch},
               "cbn": {"window": WINDOW, "burnin": burnin}, "mbn": {"memory": WINDOW}}[target]
    return ns.convert(base, to=target, input_size=(1, SIZE, SIZE), **options)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + 256]).argmax(1) == y[i:i + 256]).sum()) for i in range(0, len(x), 256))
    return correct / len(x)


def one_run(job: dict) -> dict:
    torch.set_num_threads(1)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    target, batch, seed, epochs = job["target"], job["batch"], job["seed"], job["epochs"]
    x_tr, y_tr, x_te, y_te = digits()
    steps_per_epoch = len(x_tr) // batch
    torch.manual_seed(seed)
    base = TinyResNet()  # same initial weights for every target of a seed
    model = convert(base, target, batch, burnin=steps_per_epoch)
    lr = LR32 * batch / 32
    # from scratch: batch-statistics targets train their statistics, and the last state is evaluated
    # (finetune's defaults since this study was first run freeze statistics and keep the best
    # evaluated state, which here would be chosen on the test split)
    history = ns.finetune(model, (x_tr, y_tr), epochs=epochs, lr=lr, batch_size=batch, loss="labels",
                          weight_decay=WEIGHT_DECAY, eval_data=(x_te, y_te), seed=seed, progress=False,
                          log_every=steps_per_epoch, train_statistics=target in BATCH_STATISTICS,
                          keep_best=False)
    row = {"target": target, "batch": batch, "seed": seed, "epochs": epochs, "steps": epochs * steps_per_epoch,
           "lr": lr, "train_loss_last_epoch": history.frame()["loss"].dropna().iloc[-1],
           "acc": history.last("eval_accuracy")}
    check = accuracy(model, x_te, y_te)
    assert abs(check - row["acc"]) < 1e-9, (check, row["acc"])
    if target in BATCH_STATISTICS:
        order = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(seed))
        batches = [x_tr[order[i:i + 32]] for i in range(0, len(x_tr) - 31, 32)]
        ns.recalibrate_bn(model, batches)
        row["acc_recal"] = accuracy(model, x_te, y_te)
    else:
        row["acc_recal"] = row["acc"]  # batch-independent: nothing to recalibrate
    row["cpu_s"], row["wall_s"] = time.process_time() - cpu0, time.perf_counter() - wall0
    print(f"{target:9s} B={batch:2d} seed={seed} acc={row['acc']:.4f} recal={row['acc_recal']:.4f} "
          f"cpu={row['cpu_s']:.0f}s", flush=True)
    return row


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    g = frame.groupby(["target", "batch"], sort=False)
    out = g.agg(n=("seed", "size"), acc_mean=("acc", "mean"), acc_std=("acc", "std"),
                acc_recal_mean=("acc_recal", "mean"), acc_recal_std=("acc_recal", "std"),
                cpu_s_mean=("cpu_s", "mean")).reset_index()
    out["target"] = pd.Categorical(out["target"], [t for t in TARGETS if t in set(out["target"])])
    return out.sort_values(["target", "batch"]).reset_index(drop=True)


def plot(frame: pd.DataFrame, path: str) -> None:
    order = [t for t in TARGETS if t in set(frame["target"])]
    long = pd.concat([frame.assign(eval="running statistics as trained", accuracy=frame["acc"]),
                      frame.assign(eval="after recalibrate_bn (batches of 32)", accuracy=frame["acc_recal"])])
    long["error %"] = 100 * (1 - long["accuracy"])
    sns.set_theme(style="whitegrid", context="notebook")
    grid = sns.catplot(data=long, x="target", y="error %", hue="batch", col="eval", kind="point", order=order,
                       errorbar="sd", dodge=0.3, linestyle="none", markers=["o", "s"], capsize=0.15,
                       palette=["tab:red", "tab:blue"], height=4, aspect=1.3)
    grid.set(yscale="log")
    grid.set_titles("{col_name}")
    grid.figure.suptitle("load_digits, tiny ResNet from scratch: test error (mean ± sd over seeds), "
                         "batch 2 vs 32", y=1.03)
    grid.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(grid.figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 32])
    parser.add_argument("--targets", nargs="+", default=TARGETS, choices=TARGETS)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (1 thread each)")
    parser.add_argument("--out", default=HERE)
    parser.add_argument("--plot-only", action="store_true", help="redo summary.csv and the figure from results.csv")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    results = os.path.join(args.out, "results.csv")
    if args.plot_only:
        frame = pd.read_csv(results)
    else:
        cost = {"mbn": 6, "cbn": 5, "bgn": 4, "proxy_gn": 3, "bn": 2, "gn": 1}  # longest first
        jobs = sorted(({"target": t, "batch": b, "seed": s, "epochs": args.epochs}
                       for t in args.targets for b in args.batches for s in args.seeds),
                      key=lambda j: -cost[j["target"]] * (3 if j["batch"] < 8 else 1))
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            rows = pool.map(one_run, jobs, chunksize=1)
        frame = pd.DataFrame(rows)
        frame["target"] = pd.Categorical(frame["target"], [t for t in TARGETS if t in args.targets])
        frame = frame.sort_values(["target", "batch", "seed"]).reset_index(drop=True)
        frame.to_csv(results, index=False, float_format="%.6g")
    summary = summarize(frame)
    summary.to_csv(os.path.join(args.out, "summary.csv"), index=False, float_format="%.6g")
    plot(frame, os.path.join(args.out, "accuracy.png"))
    with pd.option_context("display.width", 160):
        print(summary.to_string(index=False))
    workers = frame["cpu_s"].sum()
    print(f"CPU time: {workers / 60:.1f} min in the runs (sum of time.process_time per run) + "
          f"{(time.process_time() - cpu0) / 60:.1f} min in the main process; wall {time.perf_counter() - wall0:.0f} s")


if __name__ == "__main__":
    main()
