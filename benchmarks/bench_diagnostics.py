"""Recording overhead of normsurgeon.diagnostics.Recorder on a ResNet-50 eval forward.

Plain eval forward vs the same forward with a Recorder attached at every norm site, batch 16
at 224×224 by default, interleaved in one run, median of repeats. Floor: ≤ 1.3×.

Run: .venv/bin/python benchmarks/bench_diagnostics.py [--batch 16] [--size 224] [--repeats 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from normsurgeon.diagnostics import Recorder  # noqa: E402
from machine import cpu_model  # noqa: E402

FLOOR = 1.3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    rec = Recorder(model)
    rec.close()  # attach / detach per timed call below, as a user would

    def plain():
        with torch.no_grad():
            model(x)

    def recorded():
        with torch.no_grad(), Recorder(model) as r:
            model(x)
        r.statistics()  # includes the one host sync at the end

    times = {"plain forward": [], "forward + Recorder": []}
    for fn in (plain, recorded):
        fn()
    for _ in range(args.repeats):
        for label, fn in (("plain forward", plain), ("forward + Recorder", recorded)):
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    base = statistics.median(times["plain forward"])
    print(f"# ResNet-50 eval, batch {args.batch} at {args.size}x{args.size} | {cpu_model()} | "
          f"threads {torch.get_num_threads()} | median of {args.repeats}")
    for label, values in times.items():
        print(f"{label:20s} {statistics.median(values) * 1e3:8.0f} ms  (min {min(values) * 1e3:.0f})  "
              f"x{statistics.median(values) / base:.2f}")
    ratio = statistics.median(times["forward + Recorder"]) / base
    print(f"floor (≤ {FLOOR}x): {'met' if ratio <= FLOOR else 'NOT met'} ({ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
