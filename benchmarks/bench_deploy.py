"""Eval latency on CPU of what ``normsurgeon.deploy`` produces, at batch 1 and 8.

    .venv/bin/python benchmarks/bench_deploy.py                    # ResNet-50 at 224x224, 10 repeats
    .venv/bin/python benchmarks/bench_deploy.py --size 160 --repeats 20 --threads 1

Three tables, every one measured in this run with its reference:
  fold      ``ns.fold(model)`` against the unfolded eval model, per target (torchvision ResNet-50
            converted to each target; random weights, norm statistics re-estimated on noise
            images). Floor: resnet50 ``bn`` folded ≥ 1.15x faster, at batch 1 and 8.
  proxy     ResNet-50 ``proxy_gn`` in eval with the proxy moments cached (the layer's inference
            path) against the same model recomputing them in every forward; ``gn`` (GroupNorm
            with affine, then ReLU) is shown as the cost the cached path should approach.
  onnx      onnxruntime (CPU provider, as many threads as torch) against eager, per target, on
            one ONNX file with a dynamic batch (legacy exporter by default: it exports in seconds,
            ``--dynamo`` for the dynamo exporter). Skipped when the [export] extra is missing.
Eager runs under ``torch.inference_mode()``. After one warm-up call each, every repeat runs all
variants of a table once in a shuffled order (interleaving cancels drift); medians and minima.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import normsurgeon as ns  # noqa: E402
from machine import add_threads_argument, apply_threads, cpu_model  # noqa: E402
from normsurgeon.layers import ProxyNormAct  # noqa: E402

FOLD_TARGETS = "bn,frozen_bn,bgn,iebn,dsbn,cbn,mbn"
ONNX_TARGETS = "bn,gn,pn,proxy_gn,iebn"
OPTIONS = {"bgn": {"num_groups": 8}, "dsbn": {"domains": ["photo", "art"]}}
FOLD_FLOOR = 1.15  # resnet50 bn: unfolded / folded eval time, each batch size


def base_model(size: int) -> nn.Module:
    """torchvision ResNet-50, random weights, random γ/β, statistics re-estimated on noise images."""
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
    ns.recalibrate_bn(model, torch.randn(8, 3, size, size, generator=gen))
    return model.eval()


def convert(model: nn.Module, to: str) -> nn.Module:
    new = ns.convert(model, to=to, **OPTIONS.get(to, {})).eval()
    if to == "dsbn":
        ns.set_domain(new, "photo")
    return new


def measure(variants: dict, inputs: dict, repeats: int) -> dict:
    """{(label, batch): [seconds]} over ``repeats`` shuffled rounds after one warm-up call each."""
    keys = [(label, b) for label in variants for b in inputs]
    for label, b in keys:
        variants[label](inputs[b])
    times = {k: [] for k in keys}
    rng = random.Random(0)
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            rng.shuffle(keys)
            for label, b in keys:
                t0 = time.perf_counter()
                variants[label](inputs[b])
                times[(label, b)].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return times


def eager(model: nn.Module):
    def run(x):
        with torch.inference_mode():
            return model(x)
    return run


def table(headers, rows) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def ratio_rows(times, pairs, batches):
    """Rows (variant, batch, median ms, min ms, ref, x faster than ref (median), (min))."""
    rows = []
    for label, ref in pairs:
        for b in batches:
            t, r = times[(label, b)], times[(ref, b)] if ref else None
            rows.append([label, b, f"{statistics.median(t) * 1e3:.1f}", f"{min(t) * 1e3:.1f}", ref or "",
                         f"{statistics.median(r) / statistics.median(t):.2f}" if r else "",
                         f"{min(r) / min(t):.2f}" if r else ""])
    return rows


def fold_table(base, targets, inputs, repeats):
    variants, pairs = {}, []
    for to in targets:
        model = convert(base, to)
        folded = ns.fold(model, domain="photo" if to == "dsbn" else None)
        left = folded.normsurgeon_fold_report.norms_left
        variants[f"{to} unfolded"] = eager(model)
        variants[f"{to} folded ({left} norms left)"] = eager(folded)
        pairs += [(f"{to} folded ({left} norms left)", f"{to} unfolded")]
    times = measure(variants, inputs, repeats)
    print("\nfold: eval forward, folded vs unfolded (x = unfolded time / folded time)")
    print(table(["variant", "batch", "median ms", "min ms", "ref", "x faster", "x (min)"],
                ratio_rows(times, pairs, list(inputs))))
    if "bn" in targets:
        label = next(lab for lab, _ in pairs if lab.startswith("bn folded"))
        print("floor: resnet50 bn folded >= %.2fx faster:" % FOLD_FLOOR)
        for b in inputs:
            x = statistics.median(times[("bn unfolded", b)]) / statistics.median(times[(label, b)])
            print(f"  batch {b}: {x:.3f}x " + ("met" if x >= FOLD_FLOOR else "NOT met"))


def proxy_table(base, inputs, repeats):
    cached = convert(base, "proxy_gn")
    uncached = convert(base, "proxy_gn")
    for m in uncached.modules():
        if isinstance(m, ProxyNormAct):
            m._moment_cache_key = lambda: None  # this benchmark only: recompute in every forward
    variants = {"proxy_gn cached": eager(cached), "proxy_gn uncached": eager(uncached),
                "gn (GN + affine, ReLU)": eager(convert(base, "gn"))}
    times = measure(variants, inputs, repeats)
    print("\nproxy: ResNet-50 proxy_gn eval, proxy moments cached vs recomputed every forward")
    print(table(["variant", "batch", "median ms", "min ms", "ref", "x faster", "x (min)"],
                ratio_rows(times, [("proxy_gn cached", "proxy_gn uncached"), ("gn (GN + affine, ReLU)", "proxy_gn cached")],
                           list(inputs))))


def onnx_table(base, targets, inputs, repeats, dynamo):
    try:
        import onnxruntime as ort
    except ImportError:
        print("\nonnx: skipped (onnxruntime is not installed: pip install 'normsurgeon[export]')")
        return
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    variants, pairs = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for to in targets:
            model = convert(base, to)
            path = os.path.join(tmp, f"{to}.onnx")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ns.export_onnx(model, next(iter(inputs.values())), path, dynamo=dynamo)
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            variants[f"{to} eager"] = eager(model)
            variants[f"{to} onnxruntime"] = lambda x, s=session: s.run(None, {"input": x.numpy()})
            pairs.append((f"{to} onnxruntime", f"{to} eager"))
        times = measure(variants, inputs, repeats)
    print(f"\nonnx: onnxruntime {ort.__version__} vs eager ({'dynamo' if dynamo else 'legacy'} exporter, one file per target)")
    print(table(["variant", "batch", "median ms", "min ms", "ref", "x faster", "x (min)"],
                ratio_rows(times, pairs, list(inputs))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=224, help="input height = width (default 224)")
    p.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per variant and batch (default 10)")
    p.add_argument("--fold-targets", default=FOLD_TARGETS, help=f"default {FOLD_TARGETS}")
    p.add_argument("--onnx-targets", default=ONNX_TARGETS, help=f"default {ONNX_TARGETS}; empty to skip")
    p.add_argument("--dynamo", action="store_true", help="export with the dynamo exporter (slower to export)")
    p.add_argument("--skip", default="", help="comma-separated tables to skip: fold, proxy, onnx")
    add_threads_argument(p)
    args = p.parse_args(argv)
    apply_threads(p, args)
    skip = set(filter(None, args.skip.split(",")))
    gen = torch.Generator().manual_seed(1)
    inputs = {int(b): torch.randn(int(b), 3, args.size, args.size, generator=gen) for b in args.batches.split(",")}
    print("# normsurgeon deploy: eval latency, CPU")
    print(f"# CPU: {cpu_model()} | os.cpu_count()={os.cpu_count()} | torch.get_num_threads()={torch.get_num_threads()}")
    print(f"# python {platform.python_version()} | torch {torch.__version__} | normsurgeon {ns.__version__}")
    try:
        print(f"# load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    except OSError:
        pass
    print(f"# torchvision ResNet-50 at {args.size}x{args.size}, batches {list(inputs)} | median of {args.repeats} "
          f"repeats after 1 warm-up call, variants interleaved", flush=True)
    base = base_model(args.size)
    if "fold" not in skip:
        fold_table(base, [t for t in args.fold_targets.split(",") if t], inputs, args.repeats)
    if "proxy" not in skip:
        proxy_table(base, inputs, args.repeats)
    if "onnx" not in skip and args.onnx_targets:
        onnx_table(base, [t for t in args.onnx_targets.split(",") if t], inputs, args.repeats, args.dynamo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
