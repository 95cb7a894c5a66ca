"""Threshold review of ``ns.diagnose``'s flags: false alarms on healthy networks, failure modes still caught.

Question: do the flag rules fire where a failure mode is, and stay silent on a healthy pretrained
BatchNorm network at its own training batch size? For each network below, the flags of the rules
before this review ("old") and of the current rules ("new", ``normsurgeon/diagnostics/flags.py``)
are counted, with the numbers the decisions rest on.

1. The embedded EfficientNet-Lite0 (real ImageNet weights, BatchNorm), on 152 training crops of the
   19-photo task at 112 px (the demo's data), batch sizes 2, 8, 32: healthy at 32, noisy at 2.
2. A random-init timm ResNet-18 on the same crops at 224 px, batch sizes 16 and 32: the issue's
   "12 layers noisy at batch 16".
3. The random ReLU network of ``run.py`` (width 64, depth 24, 32 Gaussian 16×16 inputs), its BatchNorm
   statistics calibrated on the inputs, and its conversions to ln, gn (8 groups), in and proxy_ln
   (γ, β unchanged), each against the BatchNorm net as reference and alone.
4. Lite0 converted to ln, in, gn and proxy_gn (no calibration, no training) against the original.

Run: .venv/bin/python analysis/failure_modes/thresholds.py   (7.4 CPU minutes; 15.6 min wall on 2 busy cores)
Writes thresholds.csv (network, variant, rule set, kind, batch size, flagged sites, sites),
batch_ess.csv (effective sample sizes per site and batch size) and layer_metrics.csv (f_A, f_B, CV_σ
summarized per network and variant) next to this file.
"""
from __future__ import annotations

import math
import os
import sys

import pandas as pd
import torch

import normsurgeon as ns
from normsurgeon import zoo
from normsurgeon.diagnostics.flags import compute_flags
from normsurgeon.photo_task import available_photos, photo_task

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from run import random_net  # noqa: E402  (the study's own network)


def old_flags(layers: pd.DataFrame, batch: pd.DataFrame) -> pd.DataFrame:
    """The rules before this review: f_A > 0.5, f_B < 0.01, CV_σ < 0.05 at every site whatever its norm;
    frac_pathological > 0.01 or ess_ratio < 0.5 per batch size; NaN/inf."""
    rows = []
    has_ref = "ref_f_A" in layers.columns
    for _, r in layers.iterrows():
        ref = lambda c: r[f"ref_{c}"] if has_ref else math.nan  # noqa: E731
        if r["f_A"] > 0.5 and (not has_ref or r["f_A"] >= 1.1 * ref("f_A")):
            rows.append((r["name"], "channel_collapse", math.nan))
        for c, limit in (("f_B", 0.01), ("cv_sigma", 0.05)):
            if r[c] < limit and (c != "cv_sigma" or r["positions"] > 1) and (
                    not has_ref or (ref(c) > 0 and ref(c) >= 10 * r[c])):
                rows.append((r["name"], "instance_variance", math.nan))
        if r["nonfinite"] > 0:
            rows.append((r["name"], "nonfinite", math.nan))
    for _, r in batch.iterrows():
        ess_ratio = r["effective_sample_size_arith"] / r["elements_per_statistic"]
        if r["frac_pathological_all"] > 0.01 or ess_ratio < 0.5:
            rows.append((r["name"], "noisy_batch_statistics", r["batch_size"]))
    return pd.DataFrame(rows, columns=["name", "kind", "batch_size"])


def summarize(net: str, variant: str, layers: pd.DataFrame, out: list) -> None:
    live = layers[(layers["A"] + layers["B"] + layers["W"]) > 0]
    row = {"network": net, "variant": variant, "sites": len(layers), "norm": " ".join(sorted(set(layers["norm"])))}
    for col in ("f_A", "f_B", "cv_sigma"):
        row.update({f"{col}_min": live[col].min(), f"{col}_median": live[col].median(), f"{col}_max": live[col].max()})
    out.append(row)


def count(net: str, variant: str, rules: str, flags: pd.DataFrame, out: list) -> None:
    if flags.empty:
        out.append({"network": net, "variant": variant, "rules": rules, "kind": "(none)", "batch_size": math.nan,
                    "flagged": 0, "sites": ""})
        return
    for (kind, b), g in flags.groupby(["kind", flags["batch_size"].fillna(-1)]):
        names = list(dict.fromkeys(g["name"]))
        out.append({"network": net, "variant": variant, "rules": rules, "kind": kind,
                    "batch_size": math.nan if b == -1 else int(b), "flagged": len(names), "sites": " ".join(names)})


def with_old_columns(model, x, report) -> pd.DataFrame:
    """The old rules need the old batch statistics: only exactly-zero-variance channels excluded, and the
    arithmetic mean over channels of σ²_pop / Var(μ_B) as the ESS. Recomputed with those two changes."""
    from normsurgeon.diagnostics import batch_statistics as bs

    batch = report.batch.copy()
    if batch.empty:
        return batch
    population = {n: (torch.tensor(v["mean"]), torch.tensor(v["var"])) for n, v in report.channel_stats.items()
                  if n in set(batch["name"])}
    saved_valid, saved_result = bs.varying_channels, bs._BatchAccumulator.result

    def result(self, name, b, n):
        row = saved_result(self, name, b, n)
        k = self.batches
        if k >= 2 and n > b and bool(self.valid.any()):
            var_mu = self.mu_m2[self.valid] / (k - 1) / ((n - b) / (n - 1))
            row["effective_sample_size"] = float((self.var_pop[self.valid] / var_mu).mean())
        return row

    bs.varying_channels = lambda mean, var: var > 0
    bs._BatchAccumulator.result = result
    try:
        rows = bs.batch_statistics(model, x, sorted(batch["batch_size"].unique().astype(int).tolist()), population,
                                   max_batches=report.meta["max_batches"], generator=torch.Generator().manual_seed(0))
    finally:
        bs.varying_channels, bs._BatchAccumulator.result = saved_valid, saved_result
    old = pd.DataFrame(rows).set_index(["name", "batch_size"])
    key = list(zip(batch["name"], batch["batch_size"]))
    batch["frac_pathological_all"] = [old.loc[k, "frac_pathological"] for k in key]
    batch["effective_sample_size_arith"] = [old.loc[k, "effective_sample_size"] for k in key]
    return batch


def main() -> int:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    counts, ess_rows, metrics = [], [], []
    task112 = photo_task(available_photos(system=False), size=112)
    crops112 = task112.train[0][::2][:152]

    # 1. Lite0, healthy pretrained BatchNorm
    lite = zoo.efficientnet_lite0(pretrained=True).eval()
    report = ns.diagnose(lite, crops112, batch_sizes=[2, 8, 32], max_batches=16,
                         generator=torch.Generator().manual_seed(0))
    count("lite0 (BN, pretrained)", "original", "new", report.flags, counts)
    summarize("lite0 (BN, pretrained)", "original, 152 crops", report.layers, metrics)
    count("lite0 (BN, pretrained)", "original", "old", old_flags(report.layers, with_old_columns(lite, crops112, report)),
          counts)
    for _, r in report.batch.iterrows():
        ess_rows.append({"network": "lite0", **r[["name", "batch_size", "elements_per_statistic", "constant_channels",
                                                  "d_rms", "log_r_rms", "effective_sample_size"]].to_dict()})
    # f_A of a BatchNorm site in eval mode is what its β, γ make of roughly standardized inputs
    pred = []
    for _, r in report.layers.iterrows():
        m = lite.get_submodule(r["name"])
        b2, g2 = float(m.bias.detach().square().mean()), float(m.weight.detach().square().mean())
        pred.append(b2 / (b2 + g2))
    corr = pd.Series(pred).corr(report.layers["f_A"])
    print(f"lite0: f_A measured vs mean β²/(mean β² + mean γ²): correlation {corr:.3f}; "
          f"f_A > 0.5 at {(report.layers['f_A'] > 0.5).sum()} sites, predicted > 0.5 at {sum(p > 0.5 for p in pred)}")

    # 2. random-init ResNet-18 at batch 16 and 32
    import timm
    torch.manual_seed(0)
    r18 = timm.create_model("resnet18").eval()
    crops224 = photo_task(available_photos(system=False), size=224).train[0][::2][:152]
    report = ns.diagnose(r18, crops224, batch_sizes=[16, 32], max_batches=16, generator=torch.Generator().manual_seed(0))
    count("resnet18 (random init)", "original", "new", report.flags, counts)
    count("resnet18 (random init)", "original", "old", old_flags(report.layers, with_old_columns(r18, crops224, report)),
          counts)
    for _, r in report.batch.iterrows():
        ess_rows.append({"network": "resnet18", **r[["name", "batch_size", "elements_per_statistic",
                                                     "constant_channels", "d_rms", "log_r_rms",
                                                     "effective_sample_size"]].to_dict()})

    # 3. the random ReLU network and its conversions
    size = 16
    x = torch.randn(32, 3, size, size, generator=torch.Generator().manual_seed(1))
    bn = ns.recalibrate_bn(random_net(64, 24, 0), x).eval()  # BN statistics of the inputs: eval-mode BN normalizes
    report = ns.diagnose(bn, x, batch_sizes=[32], max_batches=16, generator=torch.Generator().manual_seed(0))
    count("random net (width 64, depth 24)", "BN", "new", report.flags, counts)
    summarize("random net (width 64, depth 24)", "BN", report.layers, metrics)
    for label, to, opts in [("ln", "ln", {}), ("gn (8 groups)", "gn", {"num_groups": 8}), ("in", "in", {}),
                            ("proxy_ln", "proxy_ln", {})]:
        extra = {} if to == "proxy_ln" else {"fold_statistics": False}
        model = ns.convert(bn, to=to, input_size=(3, size, size), **extra, **opts)
        versus = ns.diagnose(model, x, reference=bn)
        count("random net (width 64, depth 24)", f"{label} vs BN", "new", versus.flags, counts)
        summarize("random net (width 64, depth 24)", label, versus.layers, metrics)
        count("random net (width 64, depth 24)", f"{label} alone", "new", ns.diagnose(model, x).flags, counts)

    # 4. Lite0 conversions against the original
    photos, _ = zoo.sample_images()
    summarize("lite0 (BN, pretrained)", "original, 9 photos", ns.diagnose(lite, photos).layers, metrics)
    for to in ("ln", "in", "gn", "proxy_gn"):
        model = ns.convert(lite, to=to)
        versus = ns.diagnose(model, photos, reference=lite)
        count("lite0 (BN, pretrained)", f"{to} vs original, 9 photos", "new", versus.flags, counts)
        count("lite0 (BN, pretrained)", f"{to} alone, 9 photos", "new", ns.diagnose(model, photos).flags, counts)
        summarize("lite0 (BN, pretrained)", f"{to}, 9 photos", versus.layers, metrics)

    frame = pd.DataFrame(counts)
    frame.to_csv(os.path.join(HERE, "thresholds.csv"), index=False)
    pd.DataFrame(ess_rows).to_csv(os.path.join(HERE, "batch_ess.csv"), index=False)
    pd.DataFrame(metrics).to_csv(os.path.join(HERE, "layer_metrics.csv"), index=False, float_format="%.4g")
    with pd.option_context("display.width", 200, "display.max_colwidth", 60):
        print(frame.drop(columns="sites").to_string(index=False))
        ess = pd.DataFrame(ess_rows)
        print(ess.groupby(["network", "batch_size"])["effective_sample_size"].describe()[["min", "50%", "max"]])
        print(pd.DataFrame(metrics).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
