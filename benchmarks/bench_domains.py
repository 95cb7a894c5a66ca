"""BNEnsemble inference time: one batched forward of K·N samples against K separate forwards.

Rows (eval mode, no_grad, same model and input, interleaved in random order each repeat):
  BNEnsemble batched         normsurgeon.BNEnsemble(model)                (one forward of K·N)
  BNEnsemble K passes        normsurgeon.BNEnsemble(model, batched=False) (K forwards of N, same math)
  K plain forwards           K routed forwards of N, no instance statistics, no mixing (lower bound
                             of any K-pass implementation)
  1 plain forward            one routed forward of N (the cost of knowing the domain)
Floor: BNEnsemble batched is not slower than the K separate passes (median ≤ 1.0 × K passes).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import normsurgeon as ns  # noqa: E402
from machine import add_threads_argument, apply_threads, cpu_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="torchvision model name (weights=None)")
    parser.add_argument("--domains", type=int, default=3, help="K")
    parser.add_argument("--shape", default="8,3,64,64", help="N,C,H,W of the input")
    parser.add_argument("--repeats", type=int, default=15)
    add_threads_argument(parser)
    args = parser.parse_args()
    apply_threads(parser, args)
    import torchvision

    n, c, h, w = (int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ns.convert(getattr(torchvision.models, args.model)(num_classes=10), to="dsbn",
                           domains=args.domains, input_size=(c, h, w)).eval()
    x = torch.randn(n, c, h, w)
    k = args.domains

    def k_plain():
        for j in range(k):
            with ns.domain(model, j):
                model(x)

    def one_plain():
        with ns.domain(model, 0):
            model(x)

    batched, looped = ns.BNEnsemble(model), ns.BNEnsemble(model, batched=False)
    variants = {"BNEnsemble batched": lambda: batched(x), "BNEnsemble K passes": lambda: looped(x),
                "K plain forwards": k_plain, "1 plain forward": one_plain}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for fn in variants.values():
            fn(), fn()
        for _ in range(args.repeats):
            order = list(variants)
            random.shuffle(order)
            for name in order:
                t = time.perf_counter()
                variants[name]()
                times[name].append((time.perf_counter() - t) * 1e3)
    print("# BNEnsemble inference (eval, no_grad)")
    print(f"# CPU: {cpu_model()} | os.cpu_count()={os.cpu_count()} | torch.get_num_threads()={torch.get_num_threads()}")
    print(f"# torch {torch.__version__} | normsurgeon {ns.__version__} | load average {os.getloadavg()[0]:.2f}")
    print(f"# {args.model}, K={k} domains, input {tuple(x.shape)} | median of {args.repeats} repeats after 2 warm-up calls")
    print(f"{'variant':<22} {'median ms':>9} {'min ms':>7} {'x K passes':>10}")
    ref = statistics.median(times["BNEnsemble K passes"])
    for name, ts in times.items():
        print(f"{name:<22} {statistics.median(ts):9.1f} {min(ts):7.1f} {statistics.median(ts) / ref:10.2f}")
    ratio = statistics.median(times["BNEnsemble batched"]) / ref
    print(f"floor (batched <= 1.0 x K passes): {'met' if ratio <= 1.0 else 'NOT met'} ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
