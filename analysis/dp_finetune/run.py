"""DP-SGD fine-tuning: at a given privacy budget, how much does carrying the pretrained norm weights buy?

DP-SGD (Opacus) forbids batch statistics, so every BatchNorm of a pretrained network has to go.
Opacus's own answer, ``ModuleValidator.fix``, puts a fresh GroupNorm in its place (γ = 1, β = 0,
gcd(32, C) groups). normsurgeon carries the pretrained norms over. Rows, all from the embedded
EfficientNet-Lite0 (real ImageNet weights) with a new head:

    opacus_fix       fresh GroupNorm(gcd(32, C), C), γ = 1, β = 0, the fused ReLU6 kept: what
                     ``ModuleValidator.fix`` does on torchvision models (on timm's BatchNormAct2d it
                     does nothing at all, and make_private then refuses the model)
    gn               normsurgeon gn: running statistics folded into γ, β
    frozen_bn        normsurgeon frozen_bn, trainable_affine=True: each BN kept exactly as a
                     per-channel affine (Opacus #472)
    proxy_gn         normsurgeon proxy_gn: GroupNorm + Proxy-Normalized activation
    ln               normsurgeon ln: one statistic per sample over (C, positions)

Task: ``normsurgeon.photo_task`` at SIZE px with TRAIN_PER_CLASS crops per photo (train, test
from disjoint tiles). Training: ``ns.make_dp_ready`` then Opacus ``make_private_with_epsilon``
(Poisson sampling, expected batch BATCH, clipping norm 1.0, ε = EPSILON, δ = DELTA over
EPOCHS epochs; the accountant's ε is recorded), SGD with momentum 0.9, lr LR, only the norm
layers' parameters and the head train (``trainable="norm+head"``: per-sample gradients of every
conv cost ~20 CPU s per step of 32 here; norm+head costs about 3). Seeds 0, 1, 2 set the head's
initialization, the sampling and the noise. Evaluation: test accuracy of the last state.

    PYTHONPATH=. .venv/bin/python analysis/dp_finetune/run.py [--rows ...] [--seeds 0 1 2] [--jobs 2]
    PYTHONPATH=. .venv/bin/python analysis/dp_finetune/run.py --plot-only
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
SIZE, TRAIN_PER_CLASS, BATCH, EPOCHS, LR, EPSILON, DELTA, CLIP = 112, 16, 64, 3, 0.1, 8.0, 1e-4, 1.0
ROWS = ["opacus_fix", "gn", "frozen_bn", "proxy_gn", "ln"]
FIELDS = ["row", "seed", "epsilon", "delta", "noise_multiplier", "steps", "test", "train", "test_at_start",
          "train_cpu_s", "cpu_s"]


@functools.lru_cache(maxsize=1)
def task():
    from normsurgeon.photo_task import photo_task

    return photo_task(size=SIZE, train_per_class=TRAIN_PER_CLASS, val_per_class=0)


def opacus_fix_semantics(model: nn.Module) -> nn.Module:
    """Every BatchNorm → GroupNorm(gcd(32, C), C) with γ = 1, β = 0, as Opacus's fixer builds it
    (through normsurgeon's gn so that timm's fused activation stays; nothing else is carried)."""
    import normsurgeon as ns
    from normsurgeon.layers import GroupNorm

    model = ns.convert(model, to="gn", fold_statistics=False)
    for m in model.modules():
        if isinstance(m, GroupNorm):
            m.num_groups = math.gcd(32, m.num_channels)
            with torch.no_grad():
                m.weight.fill_(1.0)
                m.bias.zero_()
    return model


def build(row: str, seed: int, num_classes: int) -> nn.Module:
    import normsurgeon as ns

    model = lite0_with_new_head(num_classes, seed)
    if row == "opacus_fix":
        return opacus_fix_semantics(model)
    options = {"frozen_bn": {"trainable_affine": True}}.get(row, {})
    return ns.convert(model, to=row, **options)


def one_run(job: dict) -> dict:
    import normsurgeon as ns
    from normsurgeon.training.trainable import only_trainable, select_trainable
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    cpu0 = time.process_time()
    row, seed = job["row"], job["seed"]
    data = task()
    model = ns.make_dp_ready(build(row, seed, data.num_classes))
    start = accuracy(model, *data.test)
    names = select_trainable(model, "norm+head")
    with only_trainable(model, names):
        torch.manual_seed(seed)
        loader = DataLoader(TensorDataset(*data.train), batch_size=BATCH, shuffle=True)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9)
        engine = PrivacyEngine(accountant="rdp")
        private, optimizer, loader = engine.make_private_with_epsilon(
            module=model.train(), optimizer=optimizer, data_loader=loader, target_epsilon=EPSILON,
            target_delta=DELTA, epochs=EPOCHS, max_grad_norm=CLIP, poisson_sampling=True)
        steps, cpu = 0, time.process_time()
        for _ in range(EPOCHS):
            for x, y in loader:
                if len(x) == 0:
                    continue
                loss = nn.functional.cross_entropy(private(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
        train_cpu = time.process_time() - cpu
        out = {"row": row, "seed": seed, "epsilon": engine.get_epsilon(DELTA), "delta": DELTA,
               "noise_multiplier": optimizer.noise_multiplier, "steps": steps,
               "test": accuracy(private, *data.test), "train": accuracy(private, *data.train),
               "test_at_start": start, "train_cpu_s": train_cpu}
    out["cpu_s"] = time.process_time() - cpu0
    return out


def summarize(frame):
    import pandas as pd

    g = frame.groupby("row", sort=False)
    out = g.agg(n=("seed", "size"), epsilon=("epsilon", "mean"), noise=("noise_multiplier", "mean"),
                test_mean=("test", "mean"), test_sd=("test", "std"), train_mean=("train", "mean"),
                cpu_min=("train_cpu_s", lambda s: s.mean() / 60)).reset_index()
    out["row"] = pd.Categorical(out["row"], [r for r in ROWS if r in set(out["row"])])
    return out.sort_values("row").reset_index(drop=True)


def table(summary) -> str:
    lines = ["| row | test accuracy | train accuracy | ε (δ = {:g}) | noise multiplier | CPU min/run |".format(DELTA),
             "|---|---|---|---|---|---|"]
    for r in summary.to_dict("records"):
        lines.append(f"| {r['row']} | {100 * r['test_mean']:.1f} ± {100 * r['test_sd']:.1f} | {100 * r['train_mean']:.1f} | "
                     f"{r['epsilon']:.2f} | {r['noise']:.2f} | {r['cpu_min']:.1f} |")
    return "\n".join(lines)


def plot(frame, path: str) -> None:
    accuracy_figure(frame, ROWS, path, f"DP-SGD, Lite0 norm + head, ε = {EPSILON:g}, "
                    f"δ = {DELTA:g}: test accuracy, mean ± sd", size=(8, 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    if not args.plot_only:
        results = os.path.join(HERE, "results.csv")
        done = finished(results, lambda r: (r["row"], int(r["seed"])))
        jobs = [{"row": r, "seed": s} for r in args.rows for s in args.seeds if (r, s) not in done]
        run_jobs(one_run, jobs, results, FIELDS, args.jobs, lambda out: (
            f"{out['row']:11s} seed={out['seed']} test={out['test']:.3f} (start {out['test_at_start']:.3f}) "
            f"ε={out['epsilon']:.2f} σ={out['noise_multiplier']:.2f} steps={out['steps']} cpu={out['cpu_s']:.0f}s"))
    write_outputs(HERE, summarize, table, plot)


if __name__ == "__main__":
    main()
