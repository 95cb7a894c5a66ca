"""Failure modes of batch-independent normalization, at CPU scale (Labatie et al. 2021, Fig. 2).

Question: do LayerNorm and InstanceNorm show the failure modes the Proxy Normalization paper
describes — LN's collapse toward channel-wise constant pre-activations (f_A rising with depth),
IN's missing inter-instance variability (f_B ≈ 0) — while BatchNorm and LN + Proxy Norm keep
f_A flat near mean β² / (mean β² + mean γ²)?

Part 1, the paper's random network scaled down: `depth` blocks of conv 3×3 (circular padding,
He init, no bias) → norm → ReLU at `width` channels, γ ~ N(1, 0.2²), β ~ N(0, 0.2²), Gaussian
inputs; the BatchNorm net is converted with normsurgeon to ln, in, gn, proxy_ln (γ, β carried
over unchanged). Part 2: the real EfficientNet-Lite0 (normsurgeon.zoo) on the skimage photos,
converted to ln, in, gn, proxy_gn, against the original. Pre-activations are recorded with
normsurgeon.diagnostics.Recorder (power split A + B + W per layer).

Run: .venv/bin/python analysis/failure_modes/run.py   (about a minute on 2 CPU cores)
Writes random_net.csv, lite0.csv, random_net.png, lite0.png next to this file.
"""
from __future__ import annotations

import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import normsurgeon as ns  # noqa: E402
from normsurgeon import zoo  # noqa: E402
from normsurgeon.diagnostics import Recorder  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def random_net(width: int, depth: int, seed: int) -> nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, padding_mode="circular", bias=False)]
    for i in range(depth):
        conv = nn.Conv2d(width, width, 3, padding=1, padding_mode="circular", bias=False)
        bn = nn.BatchNorm2d(width)
        with torch.no_grad():
            conv.weight.normal_(0, (2 / (9 * width)) ** 0.5, generator=gen)
            bn.weight.normal_(1.0, 0.2, generator=gen)
            bn.bias.normal_(0.0, 0.2, generator=gen)
        layers += [bn, nn.ReLU(), conv] if i < depth - 1 else [bn, nn.ReLU()]
    with torch.no_grad():
        layers[0].weight.normal_(0, (2 / 27) ** 0.5, generator=gen)
    return nn.Sequential(*layers)


def record(model: nn.Module, x: torch.Tensor, train: bool) -> list:
    model.train(train)
    with torch.no_grad(), Recorder(model) as rec:
        model(x)
    return rec.statistics()


def part1(width=64, depth=24, batch=32, size=16, seed=0) -> pd.DataFrame:
    base = random_net(width, depth, seed)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    variants = {"BN": base}
    for label, to, opts in [("LN", "ln", {}), ("IN", "in", {}), ("GN (8 groups)", "gn", {"num_groups": 8}),
                            ("LN + PN", "proxy_ln", {})]:
        variants[label] = ns.convert(base, to=to, fold_statistics=False, input_size=(3, size, size), **opts) \
            if to != "proxy_ln" else ns.convert(base, to=to, input_size=(3, size, size), **opts)
    rows = []
    for label, model in variants.items():
        for s in record(model, x, train=True):  # BN: batch statistics, as in the paper's random nets
            rows.append({"model": label, **s.as_row()})
    bn = [m for m in base if isinstance(m, nn.BatchNorm2d)]
    beta2 = torch.cat([m.bias.detach() for m in bn]).square().mean().item()
    gamma2 = torch.cat([m.weight.detach() for m in bn]).square().mean().item()
    frame = pd.DataFrame(rows)
    frame.attrs["bn_prediction"] = beta2 / (beta2 + gamma2)
    return frame


def part2() -> pd.DataFrame:
    original = zoo.efficientnet_lite0()
    photos, _ = zoo.sample_images()
    rows = []
    for label, to in [("original (BN)", None), ("ln", "ln"), ("in", "in"), ("gn", "gn"), ("proxy_gn", "proxy_gn")]:
        model = original if to is None else ns.convert(original, to=to)
        for s in record(model, photos, train=False):
            rows.append({"model": label, **s.as_row()})
    return pd.DataFrame(rows)


def plot(frame: pd.DataFrame, title: str, path: str, hline: float | None = None) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    sns.lineplot(frame, x="depth", y="f_A", hue="model", ax=axes[0])
    sns.lineplot(frame, x="depth", y="f_B", hue="model", ax=axes[1], legend=False)
    axes[0].set_title("f_A: channel-constant power (collapse)")
    axes[1].set_title("f_B: inter-instance power")
    if hline is not None:
        axes[0].axhline(hline, ls=":", c="k", lw=1)
    axes[1].set_yscale("symlog", linthresh=1e-3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    torch.manual_seed(0)
    random_frame = part1()
    random_frame.to_csv(os.path.join(HERE, "random_net.csv"), index=False)
    prediction = random_frame.attrs["bn_prediction"]
    plot(random_frame, f"random ReLU net, width 64, depth 24 (dotted: mean β²/(mean β²+mean γ²) = {prediction:.3f})",
         os.path.join(HERE, "random_net.png"), prediction)
    lite = part2()
    lite.to_csv(os.path.join(HERE, "lite0.csv"), index=False)
    plot(lite, "EfficientNet-Lite0 (real ImageNet weights), 9 photos, eval mode", os.path.join(HERE, "lite0.png"))
    summary = (random_frame.assign(half=lambda f: (f.depth >= f.depth.max() / 2).map({True: "deep", False: "shallow"}))
               .groupby(["model", "half"])[["f_A", "f_B", "cv_sigma"]].mean().unstack())
    print(f"BN prediction for f_A: {prediction:.4f}")
    print(summary.round(4).to_string())
    print(lite.groupby("model")[["f_A", "f_B", "cv_sigma"]].mean().round(4).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
