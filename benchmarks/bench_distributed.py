"""Synchronized statistics on gloo/CPU: step time of 2 ranks against 1, and collectives per layer.

    .venv/bin/python benchmarks/bench_distributed.py                      # all targets, 10 repeats
    .venv/bin/python benchmarks/bench_distributed.py --targets bn,cbn --repeats 5 --size 64

Model: timm resnet10t (5 classes) at ``--size`` px, converted to each target (dsbn: 2 domains, the
batch routed to domain 0); one timed train step = forward, loss, backward, SGD step,
``normsurgeon.after_step`` (MBN's double forward included). Per target:
  1 rank       one process, local layers, batch B (``--batch``)
  1 synced     one process in a gloo group of one, ``sync_statistics``: the synchronized layers'
               own cost (their unfused autograd path and the collectives' overhead), no second rank
  2 ranks      two processes (gloo, one thread each), ``sync_statistics``, batch B each: the same
               work per process plus the collectives (so the ratio is the cost of syncing; on a
               machine with fewer free cores than ranks it also includes their competition)
Collectives are counted by wrapping ``torch.distributed.all_gather`` / ``all_reduce`` during one
step, split into forward, backward and after-step, divided by the number of synchronized layers.
The floor is 1 per layer in the forward (all-gather of the moments) and 1 in the backward (all-
reduce of the two gradient sums); CBN adds one all-reduce of the window entry's derivatives in a
forward that pushes an entry, MBN one all-gather per layer in the double forward. Medians of
``--repeats`` steps after 2 warm-up steps.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import normsurgeon as ns  # noqa: E402
from machine import cpu_model  # noqa: E402
from normsurgeon.distributed import synced_layers  # noqa: E402

TARGETS = ("bn", "bgn", "iebn", "dsbn", "cbn", "mbn")
OPTIONS = {"bgn": {"num_groups": 4}, "dsbn": {"domains": 2}, "cbn": {"window": 4}, "mbn": {"memory": 4}}


def build(target: str, size: int):
    import timm
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5)
    return ns.convert(model, to=target, input_size=(3, size, size), **OPTIONS.get(target, {})).train()


class Counter:
    """Counts calls of the wrapped torch.distributed collectives."""

    def __init__(self):
        self.calls = {"all_gather": 0, "all_reduce": 0}
        self.originals = {name: getattr(dist, name) for name in self.calls}
        for name in self.calls:
            setattr(dist, name, self._wrap(name))

    def _wrap(self, name):
        original = self.originals[name]

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return original(*args, **kwargs)
        return counted

    def total(self) -> int:
        return sum(self.calls.values())


def step(model, opt, x, y, target):
    route = ns.domain(model, 0) if target == "dsbn" else None
    if route is not None:
        route.__enter__()
    try:
        phases = {}
        counter = getattr(dist, "_bench_counter", None)
        mark = counter.total() if counter else 0
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        if counter:
            phases["forward"], mark = counter.total() - mark, counter.total()
        opt.zero_grad()
        loss.backward()
        if counter:
            phases["backward"], mark = counter.total() - mark, counter.total()
        opt.step()
        ns.after_step(model, x)
        if counter:
            phases["after_step"] = counter.total() - mark
        return phases
    finally:
        if route is not None:
            route.__exit__(None, None, None)


def measure(rank, world, init_file, args, results, sync=True):
    torch.set_num_threads(1)
    sync = sync and init_file is not None
    if sync:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    rows = {}
    try:
        for target in args.targets:
            model = build(target, args.size)
            layers = 0
            if sync:
                model = ns.sync_statistics(model)
                layers = len(synced_layers(model))
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            gen = torch.Generator().manual_seed(rank)
            x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
            y = torch.randint(0, 5, (args.batch,), generator=gen)
            for _ in range(2):
                step(model, opt, x, y, target)
            phases = {}
            if sync:
                dist._bench_counter = Counter()
                phases = step(model, opt, x, y, target)
                for name, original in dist._bench_counter.originals.items():
                    setattr(dist, name, original)
                del dist._bench_counter
            times = []
            for _ in range(args.repeats):
                if world > 1:
                    dist.barrier()
                start = time.perf_counter()
                step(model, opt, x, y, target)
                times.append(time.perf_counter() - start)
            rows[target] = {"ms": 1000 * statistics.median(times), "layers": layers, **phases}
    finally:
        if sync:
            dist.destroy_process_group()
    if rank == 0:
        torch.save(rows, results)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8, help="per process (default 8)")
    parser.add_argument("--size", type=int, default=64, help="input size in px (default 64)")
    args = parser.parse_args()
    args.targets = [t for t in args.targets.split(",") if t]
    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown targets {unknown}; choose from {', '.join(TARGETS)}")
    with tempfile.TemporaryDirectory() as tmp:
        one, solo, two = (os.path.join(tmp, f"{n}.pt") for n in ("one", "solo", "two"))
        measure(0, 1, None, args, one)
        measure(0, 1, os.path.join(tmp, "init1"), args, solo)
        mp.spawn(measure, args=(2, os.path.join(tmp, "init2"), args, two), nprocs=2, join=True)
        single, synced_one, double = torch.load(one), torch.load(solo), torch.load(two)
    print(f"# bench_distributed: resnet10t {args.size}px, batch {args.batch} per process, {args.repeats} repeats, "
          f"gloo, 1 thread per process, torch {torch.__version__}, {cpu_model()}, {os.cpu_count()} cores")
    print(f"# load average: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'target':<7}{'1 rank ms':>11}{'1 synced ms':>13}{'2 ranks ms':>12}{'ratio':>7}{'layers':>8}"
          f"{'fwd/layer':>11}{'bwd/layer':>11}{'after_step/layer':>18}")
    for target in args.targets:
        a, b = single[target], double[target]
        n = max(b["layers"], 1)
        print(f"{target:<7}{a['ms']:>11.1f}{synced_one[target]['ms']:>13.1f}{b['ms']:>12.1f}{b['ms'] / a['ms']:>7.2f}{b['layers']:>8}"
              f"{b['forward'] / n:>11.2f}{b['backward'] / n:>11.2f}{b['after_step'] / n:>18.2f}")
    at_floor = [t for t in args.targets if double[t]["forward"] == double[t]["layers"] == double[t]["backward"]]
    print(f"at the floor (1 collective per layer in the forward, 1 in the backward): {', '.join(at_floor) or 'none'}"
          f"; above it: {', '.join(t for t in args.targets if t not in at_floor) or 'none'} (cbn: + the "
          f"derivatives' all-reduce when it pushes an entry)")


if __name__ == "__main__":
    main()
