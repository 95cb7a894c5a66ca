"""Wall time of ``normsurgeon.convert`` / ``normsurgeon.plan`` and where it goes.

    .venv/bin/python benchmarks/bench_convert.py                      # resnet50 + efficientnet_b0; every target
    .venv/bin/python benchmarks/bench_convert.py --models resnet50 --targets gn,pn --repeats 9

Every (model, target) pair is converted once as a warm-up, then ``--repeats`` times; the
pairs of one model are interleaved inside each repeat so that machine drift hits them all
alike. Reported numbers are medians over the repeats (time.perf_counter).

The breakdown comes from the same convert calls: the pipeline's stages are wrapped with
timers (a few wrapped calls per conversion, microseconds of overhead):
  deepcopy  copy.deepcopy of the input model (convert is not in place by default)
  find      the module walk that finds the norm sites (sites.find_sites)
  trace     torch.fx tracing with progressive leafing (tracing.trace)
  graph     call counts / functional norms from the graph (sites._annotate_with_graph)
  probe     one forward on meta tensors recording input shapes (probe.meta_forward; the norm
            sites check their input's channels and pass its shape on instead of running)
  functional  functional norm calls made sites: their modules traced alone (functional_sites)
  context   the graph context the targets ask for: eval-mode trace, pairings, shortcuts,
            producers (pipeline._contexts)
  build     building every new layer and transferring weights (pipeline._build_all)
  verify    each new layer alone on meta tensors, train + eval (pipeline._verify)
  install   swapping the new layers into the model (pipeline._install, all sites)
  finalize  the targets' finalize hooks, e.g. proxy's activation removal + whole-model meta run
  other     the rest: option checks, report, warnings, glue inside analyze
A stage whose function is not found (renamed upstream) is shown as "-" and lands in "other".
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib
import os
import platform
import statistics
import sys
import time
import types
import warnings
from collections import defaultdict
from contextlib import contextmanager

import torch

# Benchmark the checkout this file lives in, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import normsurgeon  # noqa: E402
from machine import add_threads_argument, apply_threads, cpu_model  # noqa: E402  (benchmarks/machine.py)
convert_mod = importlib.import_module("normsurgeon.surgery.pipeline")
sites_mod = importlib.import_module("normsurgeon.surgery.graph.sites")

FLOOR_S = 0.25  # every conversion should take at most this (issue 15: ResNet-50 and EfficientNet-B0, quiet machine)
# Targets that need an option to build (the same choices as tests/test_matrix.py).
OPTIONS = {"bgn": {"num_groups": "auto", "batch_size": 2}, "dsbn": {"domains": 3}}
STAGES = ("deepcopy", "find", "trace", "graph", "probe", "functional", "context", "build", "verify", "install",
          "finalize")


def header(title: str) -> None:
    print(f"# {title}")
    print(f"# CPU: {cpu_model()} | os.cpu_count()={os.cpu_count()} | "
          f"torch.get_num_threads()={torch.get_num_threads()}")
    print(f"# python {platform.python_version()} | torch {torch.__version__} | "
          f"timm {_version('timm')} | normsurgeon {normsurgeon.__version__}")
    try:
        print(f"# load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    except OSError:
        pass


def _version(pkg: str) -> str:
    try:
        return __import__(pkg).__version__
    except Exception:  # noqa: BLE001
        return "?"


class StageTimes:
    """Accumulates wall time per stage over one convert/plan call."""

    def __init__(self):
        self.t: dict[str, float] = defaultdict(float)
        self.missing: list[str] = []

    def wrap(self, stage: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.t[stage] += time.perf_counter() - t0
        return timed


@contextmanager
def instrumented(times: StageTimes):
    """Wrap the pipeline's stage functions (restored on exit)."""
    patches = []  # (module, attribute, original)

    def patch(mod, attr, stage):
        if not hasattr(mod, attr):
            times.missing.append(stage)
            return
        original = getattr(mod, attr)
        patches.append((mod, attr, original))
        setattr(mod, attr, times.wrap(stage, original))

    # pipeline.py calls copy.deepcopy via its module global `copy`: give it a shim module so
    # deepcopy's own recursive calls (which go through the real copy module) are not wrapped.
    if hasattr(convert_mod, "copy"):
        shim = types.SimpleNamespace(**{k: getattr(copy, k) for k in dir(copy) if not k.startswith("__")})
        shim.deepcopy = times.wrap("deepcopy", copy.deepcopy)
        patches.append((convert_mod, "copy", convert_mod.copy))
        convert_mod.copy = shim
    else:
        times.missing.append("deepcopy")
    patch(sites_mod, "find_sites", "find")
    patch(sites_mod, "trace", "trace")
    patch(sites_mod, "_annotate_with_graph", "graph")
    patch(sites_mod, "meta_forward", "probe")
    patch(convert_mod, "functional_sites", "functional")
    patch(convert_mod, "_contexts", "context")
    patch(convert_mod, "_build_all", "build")
    patch(convert_mod, "_verify", "verify")
    patch(convert_mod, "_install", "install")
    patch(convert_mod, "_finalize", "finalize")
    try:
        yield times
    finally:
        for mod, attr, original in reversed(patches):
            setattr(mod, attr, original)


def run_once(fn, model, target):
    """One timed call; returns (total seconds, stage times, result)."""
    times = StageTimes()
    with instrumented(times), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
        t0 = time.perf_counter()
        result = fn(model, to=target, **OPTIONS.get(target, {}))
        total = time.perf_counter() - t0
    return total, times, result, [str(w.message) for w in caught]


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f}"


def table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet50,efficientnet_b0",
                   help="comma-separated timm model names (created with pretrained=False)")
    p.add_argument("--targets", default="all",
                   help="comma-separated target names, or 'all' for every registered target (default)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per (model, target), >= 1")
    p.add_argument("--no-plan", action="store_true", help="skip timing normsurgeon.plan")
    add_threads_argument(p)
    args = p.parse_args(argv)
    apply_threads(p, args)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    models = [m for m in args.models.split(",") if m]
    targets = (list(normsurgeon.available_targets()) if args.targets == "all"
               else [t for t in args.targets.split(",") if t])
    for t in targets:
        normsurgeon.surgery.get_target(t)  # fail early with the registry's message

    import timm
    header("normsurgeon.convert / plan wall time")
    print(f"# models: {', '.join(models)} | targets: {', '.join(targets)} | "
          f"median of {args.repeats} repeat(s) after 1 warm-up | floor: convert <= {FLOOR_S} s\n")

    summary_rows, stage_rows, notes = [], [], []
    all_ok = True
    for name in models:
        model = timm.create_model(name, pretrained=False)
        n_params = sum(p.numel() for p in model.parameters())
        fns = [("convert", normsurgeon.convert)] + ([] if args.no_plan else [("plan", normsurgeon.plan)])
        cases = [(t, fn_name, fn) for t in targets for fn_name, fn in fns]
        samples: dict[tuple, list] = {(t, f): [] for t, f, _ in cases}
        info: dict[tuple, str] = {}
        for t, fn_name, fn in cases:  # warm-up, and the per-case facts (sites, warnings)
            _, _, result, caught = run_once(fn, model, t)
            report = result if fn_name == "plan" else result.normsurgeon_report
            info[(t, fn_name)] = f"{len(report.converted)}/{len(report.rows)}"
            if fn_name == "convert":
                for msg in dict.fromkeys(caught):
                    notes.append(f"{name} -> {t}: warning: {msg[:160]}")
            del result
        for _ in range(args.repeats):
            for t, fn_name, fn in cases:  # interleaved: every case once per repeat
                total, times, result, _ = run_once(fn, model, t)
                samples[(t, fn_name)].append((total, times))
                del result
        for t in targets:
            conv = samples[(t, "convert")]
            med = statistics.median(s for s, _ in conv)
            ok = med <= FLOOR_S
            all_ok &= ok
            plan_med = None if args.no_plan else statistics.median(s for s, _ in samples[(t, "plan")])
            summary_rows.append([name, t, info[(t, "convert")], f"{med * 1e3:.0f}",
                                 f"{min(s for s, _ in conv) * 1e3:.0f}",
                                 fmt_ms(plan_med), "ok" if ok else "SLOW"])
            missing = set(conv[0][1].missing)
            stage_med = {st: (None if st in missing else statistics.median(tm.t.get(st, 0.0) for _, tm in conv))
                         for st in STAGES}
            other = statistics.median(s - sum(tm.t.values()) for s, tm in conv)
            stage_rows.append([name, t] + [fmt_ms(stage_med[st]) for st in STAGES]
                              + [fmt_ms(other), f"{med * 1e3:.0f}"])
        print(f"# {name}: {n_params / 1e6:.1f} M parameters", flush=True)
        del model

    print()
    print(table(["model", "target", "sites", "convert ms", "min ms", "plan ms", f"<={FLOOR_S}s"],
                summary_rows, right={2, 3, 4, 5}))
    print("\nwhere convert's time goes (median ms per stage over the same repeats):")
    print(table(["model", "target"] + list(STAGES) + ["other", "total"], stage_rows,
                right=set(range(2, 2 + len(STAGES) + 2))))
    print("\nsites = converted/all normalization sites; analyze = find + trace + graph + probe")
    if notes:
        print("\n" + "\n".join(dict.fromkeys(notes)))
    print(f"\nfloor (every conversion <= {FLOOR_S} s): {'met' if all_ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
