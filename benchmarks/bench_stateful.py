"""Train-step cost of the stateful targets (cbn, mbn) on ResNet-18, and CBN's memory overhead.

    .venv/bin/python benchmarks/bench_stateful.py                 # batch 8 at 112x112, 10 repeats
    .venv/bin/python benchmarks/bench_stateful.py --repeats 20 --threads 1

One timed train step = forward, loss, backward, SGD step, ``normsurgeon.after_step(model, x)``
(MBN's double forward included; for BN the call is a cheap no-op walk). Variants:
  bn            torchvision ResNet-18 as is (nn.BatchNorm2d)
  cbn k=4       convert(to='cbn', window=4), burn-in 0, warmed up so the window is full
  cbn autograd  the same layer, but the derivatives ∂μ/∂W, ∂ν/∂W of every entry come from two
                extra ``torch.autograd.grad`` passes per layer (retain_graph), as the official
                code does; the stored numbers are identical, only the way they are obtained differs
  mbn k=4       convert(to='mbn', memory=4)
After two warm-up steps per variant, each repeat runs every variant once in a shuffled order;
tables show medians. A second table times only the derivative computation for every CBN layer
of the same model and batch (analytic ``conv_statistics`` vs the two autograd passes), summed
over layers; μ, σ² and y − μ of the output, which both routes take from the forward, and the
analytic route's destination (the layer's window slot) are prepared outside that timing.
FLOORS are checked at the end.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import normsurgeon as ns  # noqa: E402
from machine import add_threads_argument, apply_threads, cpu_model  # noqa: E402
from normsurgeon.layers import CrossIterationBatchNorm  # noqa: E402
from normsurgeon.layers._conv_statistics import ConvStatistics, conv_statistics  # noqa: E402

FLOORS = {"cbn k=4": 1.6, "mbn k=4": 2.2}  # x bn, train step
AUTOGRAD_FLOOR = 2.0  # ours at least this many times faster than the autograd baseline


def autograd_statistics(conv: nn.Conv2d, y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> ConvStatistics:
    """The official code's route: ∂μ/∂W and ∂ν/∂W by two autograd passes through the conv."""
    dims = (0, 2, 3)
    d_mean, = torch.autograd.grad(y.mean(dims).sum(), conv.weight, retain_graph=True)
    d_second, = torch.autograd.grad(y.square().mean(dims).sum(), conv.weight, retain_graph=True)
    per_group = conv.out_channels // conv.groups
    return ConvStatistics(mean, var, d_mean[::per_group].clone(),
                          d_second - 2 * mean.view(-1, 1, 1, 1) * d_mean)


class AutogradCBN(CrossIterationBatchNorm):
    """CBN whose stored derivatives come from autograd passes (the baseline)."""

    def _normalize(self, x):
        self._conv_output = x  # the graph node the autograd passes differentiate
        try:
            return super()._normalize(x)
        finally:
            self._conv_output = None

    def _push(self, conv, conv_input, centered, mean, var):
        import normsurgeon.layers.cross_iteration_bn as cib
        stats = autograd_statistics(conv, self._conv_output, mean, var)

        def store(*args, out, **kwargs):  # what conv_statistics does with out=: fill the window's slot
            out[0].copy_(stats.mean_patch.view_as(out[0]))
            out[1].copy_(stats.var_grad)
            return stats

        original = cib.conv_statistics
        cib.conv_statistics = store
        try:
            super()._push(conv, conv_input, centered, mean, var)
        finally:
            cib.conv_statistics = original


def with_autograd_baseline(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if type(m) is CrossIterationBatchNorm:
            m.__class__ = AutogradCBN
    return model


def train_step(model, opt, x, target):
    out = model(x)
    loss = nn.functional.cross_entropy(out, target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    ns.after_step(model, x)


def derivative_times(model: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float, int]:
    """Median over repeats of the summed per-layer derivative time: (analytic ms, autograd ms, layers)."""
    named = dict(model.named_modules())
    convs = [named[m.conv_name] for m in model.modules() if isinstance(m, CrossIterationBatchNorm)]
    pairs = []
    hooks = [c.register_forward_hook(lambda mod, a, o: pairs.append((mod, a[0], o))) for c in convs]
    model.train()
    out = model(x)  # keeps the graph alive for the autograd route
    for h in hooks:
        h.remove()
    analytic, autograd = [], []
    # μ, σ² and y − μ come from the forward in both routes, and the layer hands the analytic route
    # its window slot to write into: all prepared here, outside the timing
    moments = [torch.var_mean(y.detach(), dim=(0, 2, 3), unbiased=False) for _, _, y in pairs]
    centered = [(y - mean.view(1, -1, 1, 1)).detach() for (_, _, y), (_, mean) in zip(pairs, moments)]
    slots = [(conv.weight.new_empty((conv.groups,) + conv.weight.shape[1:]), torch.empty_like(conv.weight))
             for conv, _, _ in pairs]
    for _ in range(repeats):
        for route, sink in (("analytic", analytic), ("autograd", autograd)):
            t0 = time.perf_counter()
            for (conv, inp, y), (var, mean), c, slot in zip(pairs, moments, centered, slots):
                if route == "analytic":
                    conv_statistics(conv, inp, c, mean, var, centered=True, out=slot)
                else:
                    autograd_statistics(conv, y, mean, var)
            sink.append((time.perf_counter() - t0) * 1e3)
    del out
    return statistics.median(analytic), statistics.median(autograd), len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=10)
    add_threads_argument(parser)
    args = parser.parse_args()
    apply_threads(parser, args)
    import torchvision

    print("# stateful targets: ResNet-18 train step (forward + backward + SGD step + normsurgeon.after_step)")
    print(f"# CPU: {cpu_model()} | os.cpu_count()={os.cpu_count()} | torch.get_num_threads()={torch.get_num_threads()}")
    print(f"# python {platform.python_version()} | torch {torch.__version__} | normsurgeon {ns.__version__}")
    if hasattr(os, "getloadavg"):
        print("# load average at start: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    print(f"# batch {args.batch} at {args.size}x{args.size} | median of {args.repeats} repeats after 2 warm-up steps each")

    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=100)
    size = (3, args.size, args.size)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        variants = {
            "bn": base,
            "cbn k=4": ns.convert(base, to="cbn", window=4, input_size=size),
            "cbn autograd": with_autograd_baseline(ns.convert(base, to="cbn", window=4, input_size=size)),
            "mbn k=4": ns.convert(base, to="mbn", memory=4, input_size=size),
        }
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *size, generator=gen)
    target = torch.randint(0, 100, (args.batch,), generator=gen)
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in variants.items()}
    for name, model in variants.items():
        model.train()
        for _ in range(4 if "cbn" in name else 2):  # cbn: fill the window (k − 1 = 3 entries)
            train_step(model, opts[name], x, target)
    times = {k: [] for k in variants}
    order = list(variants)
    for _ in range(args.repeats):
        random.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            train_step(variants[name], opts[name], x, target)
            times[name].append((time.perf_counter() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    print()
    print(f"{'variant':<14} {'median ms':>10} {'min ms':>8} {'x bn':>6}")
    print(f"{'-' * 14} {'-' * 10} {'-' * 8} {'-' * 6}")
    for name in variants:
        print(f"{name:<14} {med[name]:>10.1f} {min(times[name]):>8.1f} {med[name] / med['bn']:>6.2f}")

    ours, theirs, count = derivative_times(variants["cbn k=4"], x, args.repeats)
    print()
    print(f"derivatives for the window, all {count} CBN layers of one step (median of {args.repeats}):")
    print(f"  analytic (conv_statistics)     {ours:8.1f} ms")
    print(f"  two autograd passes per layer  {theirs:8.1f} ms   ({theirs / ours:.2f}x ours)")

    cbns = [m for m in variants["cbn k=4"].modules() if isinstance(m, CrossIterationBatchNorm)]
    state = sum(m.state_bytes() for m in cbns)
    weights = sum(m.weight_shape[0] * m.weight_shape[1] * m.weight_shape[2] * m.weight_shape[3] for m in cbns)
    print()
    print(f"CBN window state (k=4): {state / 2**20:.1f} MiB for {weights / 1e6:.2f} M conv weights "
          f"= {state / weights:.2f} bytes per conv weight ({state / (4 * weights):.2f}x the fp32 weights; "
          f"the official layout, past W + dmu/dW + dnu/dW per past entry, is 9x = 36 bytes)")

    print()
    print("floors:")
    for name, floor in FLOORS.items():
        ratio = med[name] / med["bn"]
        print(f"  {name}: train step x bn = {ratio:.2f}, floor <= {floor}: {'met' if ratio <= floor else 'NOT met'}")
    step_speedup = med["cbn autograd"] / med["cbn k=4"]
    print(f"  cbn vs autograd baseline: derivatives {theirs / ours:.2f}x faster, floor >= {AUTOGRAD_FLOOR}: "
          f"{'met' if theirs / ours >= AUTOGRAD_FLOOR else 'NOT met'} (whole train step: {step_speedup:.2f}x)")


if __name__ == "__main__":
    main()
