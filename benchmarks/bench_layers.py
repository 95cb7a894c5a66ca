"""Forward + backward time of each normsurgeon target layer next to native torch layers.

    .venv/bin/python benchmarks/bench_layers.py                       # (8, 256, 56, 56), every target
    .venv/bin/python benchmarks/bench_layers.py --shape 8,256,7,7 --repeats 50 --targets gn,pn

Each target layer is built the way the converter builds it: from a native
``nn.BatchNorm2d(C)`` with random running statistics and affine, via
``get_target(name).build(match_source(bn).reader(bn), SiteInfo('x', shape), options).module``
(``options`` from TARGET_OPTIONS: ``bgn`` gets a row with num_groups=32 and one with 'auto' at
batch_size=8, ``dsbn`` one with 2 domains, routed to domain 0; other targets ``{}``). FLOORS are checked at the end (median / median of ref).

One timed call = ``y = layer(x)`` then ``torch.autograd.grad(y, [x] + trainable params, g)``
with a fixed random ``g`` of y's memory format (so the input gradient is computed, as inside a
network, and nothing accumulates into ``.grad``). A layer whose output is channels-last strided for
an NCHW input (``pn``: it normalizes in (N, H, W, C) and hands that layout on) gets its gradient in
that layout too, as the conv after it would return it. All layers are in train mode. After two
warm-up calls per variant, every repeat runs every variant once in a freshly shuffled order
(interleaving cancels drift and order effects); the tables show the median over repeats.

Columns:
  median ms   median wall time of one forward + backward call
  p25-p75     spread of the repeats (interquartile range, ms)
  min ms      fastest repeat (least disturbed by other processes)
  x BN        median / median of native nn.BatchNorm2d on the same input (contiguous NCHW)
  ref         the native layer this one should be compared with, measured in the same run
  x ref       median / median of that reference
  x ref(min)  min / min of that reference (steadier than the medians on a busy machine)
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

# Benchmark the checkout this file lives in, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import normsurgeon  # noqa: E402
from machine import add_threads_argument, apply_threads, cpu_model  # noqa: E402  (benchmarks/machine.py)
from normsurgeon.surgery.graph.pairing import activation_context  # noqa: E402
from normsurgeon.surgery.targets.registry import SiteInfo, get_target  # noqa: E402
from normsurgeon.surgery.sources import match_source  # noqa: E402

# What each target should be compared with (a native layer computing the same thing).
NATIVE_MATCH = {
    "bn": "nn.BatchNorm2d",
    "frozen_bn": "tv FrozenBatchNorm2d",
    "gn": "nn.GroupNorm(32)",
    "ln": "nn.GroupNorm(1)",
    "in": "nn.InstanceNorm2d",
    "pn": "timm LayerNorm2d",
    "proxy_gn": "nn.BatchNorm2d+ReLU",
    "proxy_ln": "nn.BatchNorm2d+ReLU",
    "bgn": "nn.BatchNorm2d",
    "iebn": "nn.BatchNorm2d",
    "dsbn": "nn.BatchNorm2d",
}

# Targets whose build needs options: one row per entry, (row tag, options). A target not listed
# gets one row built with no options.
TARGET_OPTIONS = {
    "bgn": [(None, {"num_groups": 32}), ("auto B=8", {"num_groups": "auto", "batch_size": 8})],
    "dsbn": [("2 domains", {"domains": 2})],  # routed to domain 0 (build_target)
}

# Floors: forward + backward median of the target / median of its ref, same run.
FLOORS = {"bgn": 1.3, "iebn": 1.6, "pn+relu": 1.25}


@dataclass
class Variant:
    label: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    params: list[torch.Tensor]
    fmt: str  # "nchw", "cl" (NCHW logical shape, channels_last memory format), "nhwc"
    ref: str | None = None  # label of the reference row
    times: list[float] = field(default_factory=list)
    grad: torch.Tensor | None = None  # g in the memory format of this variant's output (set at warm-up)


class Permuted(nn.Module):
    """Apply a channels-last layer (nn.LayerNorm(C)) to an NCHW tensor via permute."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def random_bn(c: int, gen: torch.Generator) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
        bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.weight.copy_(1 + 0.1 * torch.randn(c, generator=gen))
        bn.bias.copy_(0.1 * torch.randn(c, generator=gen))
        bn.num_batches_tracked.fill_(1000)
    return bn


def randomize_affine(m: nn.Module, gen: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for name in ("weight", "bias"):
            t = getattr(m, name, None)
            if isinstance(t, torch.Tensor):
                t.copy_((name == "weight") + 0.1 * torch.randn(t.shape, generator=gen))
    return m


def build_target(name: str, bn: nn.BatchNorm2d, shape: tuple[int, ...], channels_last: bool = False,
                 options: dict | None = None):
    """The converter's way: reader(source module) -> target.build(...).module; or (None, why)."""
    target = get_target(name)
    if target.context is activation_context:
        # Proxy Norm fuses the activation after the norm: start from a BN with a fused ReLU
        # (timm BatchNormAct2d), which brings its own φ, as a converted model would have.
        # (Targets with a shortcut context, iebn, start from the plain BN; SiteInfo.context
        # None = not a shortcut norm.)
        import timm.layers as tl
        fused = tl.BatchNormAct2d(bn.num_features, act_layer=nn.ReLU)
        fused.load_state_dict(bn.state_dict())
        bn = fused
    match = match_source(bn)
    source = match.reader(bn)
    if channels_last:
        source.channels_last = True
    try:
        built = target.build(source, SiteInfo("x", tuple(shape)), dict(options or {}))
    except Exception as exc:  # noqa: BLE001  (reported as a skipped row)
        return None, f"build needs more: {type(exc).__name__}: {exc}"
    if normsurgeon.domains.domain_layers(built.module):  # dsbn: every forward needs a domain
        normsurgeon.set_domain(built.module, 0)
    return built.module, None


def describe(m: nn.Module) -> str:
    """Options of a built layer worth showing in its row label."""
    return f" G={m.num_groups}" if isinstance(m, normsurgeon.layers.BatchGroupNorm) else ""


def trainable(m: nn.Module) -> list[torch.Tensor]:
    return [p for p in m.parameters() if p.requires_grad]


def time_call(v: Variant, x: torch.Tensor, g: torch.Tensor) -> float:
    inputs = [x] + v.params
    t0 = time.perf_counter()
    y = v.fn(x)
    if v.grad is None:  # first (warm-up) call: g laid out like y
        v.grad = torch.empty_like(y).copy_(g)
    torch.autograd.grad(y, inputs, v.grad)
    return time.perf_counter() - t0


def table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="8,256,56,56", help="N,C,H,W of the input (default 8,256,56,56)")
    p.add_argument("--repeats", type=int, default=30, help="timed repeats per variant (>= 10 advised)")
    p.add_argument("--targets", default="all",
                   help="comma-separated target names, or 'all' (default) for available_targets()")
    p.add_argument("--no-nhwc", action="store_true",
                   help="skip the section with layers built for channels-last *layout* (N, H, W, C)")
    p.add_argument("--no-model-step", dest="model_step", action="store_false",
                   help="skip the ResNet-50 train-step comparison at the end")
    add_threads_argument(p)
    args = p.parse_args(argv)
    apply_threads(p, args)
    shape = tuple(int(s) for s in args.shape.split(","))
    if len(shape) != 4:
        p.error("--shape takes N,C,H,W")
    n, c, h, w = shape
    targets = (list(normsurgeon.available_targets()) if args.targets == "all"
               else [t for t in args.targets.split(",") if t])
    for t in targets:
        get_target(t)  # fail early with the registry's message

    import timm.layers as tl
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    bn_source = random_bn(c, gen)
    groups = 32 if c % 32 == 0 else normsurgeon.surgery.targets.groups.default_groups(c)

    # Native references (only those needed by the chosen targets, plus nn.BatchNorm2d).
    natives: dict[str, nn.Module] = {"nn.BatchNorm2d": random_bn(c, gen)}
    wanted = {NATIVE_MATCH.get(t) for t in targets}
    factories = {
        "nn.GroupNorm(32)": lambda: nn.GroupNorm(groups, c),
        "nn.GroupNorm(1)": lambda: nn.GroupNorm(1, c),
        "nn.LayerNorm permute": lambda: Permuted(nn.LayerNorm(c)),
        "timm LayerNorm2d": lambda: tl.LayerNorm2d(c, eps=1e-5),
        "nn.InstanceNorm2d": lambda: nn.InstanceNorm2d(c, affine=True),
        "tv FrozenBatchNorm2d": lambda: FrozenBatchNorm2d(c),
        "nn.GroupNorm(G=C)": lambda: nn.GroupNorm(c, c),
        "nn.BatchNorm2d+ReLU": lambda: nn.Sequential(nn.BatchNorm2d(c), nn.ReLU()),
    }
    # Always shown when their family is benchmarked: alternatives worth comparing against.
    if "timm LayerNorm2d" in wanted:
        wanted.add("nn.LayerNorm permute")
    if "nn.InstanceNorm2d" in wanted:
        wanted.add("nn.GroupNorm(G=C)")
    if "nn.GroupNorm(32)" in wanted or not targets:
        wanted.add("nn.GroupNorm(32)")
    for label, make in factories.items():
        if label in wanted:
            natives[label] = randomize_affine(make(), gen)
    if groups != 32 and "nn.GroupNorm(32)" in natives:
        natives[f"nn.GroupNorm({groups})"] = natives.pop("nn.GroupNorm(32)")
    gn_label = f"nn.GroupNorm({groups})"

    def ref_of(t):
        r = NATIVE_MATCH.get(t, "nn.BatchNorm2d+ReLU" if t == "pn+relu" else None)
        return gn_label if r == "nn.GroupNorm(32)" else r

    variants: list[Variant] = []
    skipped: list[str] = []
    for label, m in natives.items():
        m.train()
        variants.append(Variant(label, m, trainable(m), "nchw"))
    ours: dict[str, nn.Module] = {}  # row key ("bgn", "bgn auto B=8", ...) -> module
    row_specs: dict[str, tuple[str, dict]] = {}  # row key -> (target, options)
    labels: dict[str, str] = {}  # row key -> NCHW row label
    for t in targets:
        for tag, options in TARGET_OPTIONS.get(t, [(None, {})]):
            key = f"{t} {tag}" if tag else t
            module, why = build_target(t, bn_source, shape, options=options)
            if module is None:
                skipped.append(f"{key}: {why}")
                continue
            module.train()
            ours[key], row_specs[key] = module, (t, options)
            labels[key] = f"ns {key} ({type(module).__name__}{describe(module)})"
            variants.append(Variant(labels[key], module, trainable(module), "nchw", ref_of(t)))
            if t == "pn":  # the pair pn → ReLU of a converted network, against BN → ReLU
                if "nn.BatchNorm2d+ReLU" not in natives:
                    natives["nn.BatchNorm2d+ReLU"] = randomize_affine(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU()), gen)
                    natives["nn.BatchNorm2d+ReLU"].train()
                    variants.append(Variant("nn.BatchNorm2d+ReLU", natives["nn.BatchNorm2d+ReLU"],
                                            trainable(natives["nn.BatchNorm2d+ReLU"]), "nchw"))
                pair = nn.Sequential(module, nn.ReLU())
                labels["pn+relu"] = "ns pn + ReLU"
                row_specs["pn+relu"] = ("pn+relu", {})
                variants.append(Variant("ns pn + ReLU", pair, trainable(pair), "nchw", "nn.BatchNorm2d+ReLU"))

    # channels_last memory format (same NCHW logical shape): BN and GN, native and ours; and
    # PositionalNorm, whose permute to (N, H, W, C) is free on such an input.
    cl_pairs = [("nn.BatchNorm2d", "bn"), (gn_label, "gn"), ("timm LayerNorm2d", "pn")]
    for native_label, t in cl_pairs:
        if native_label in natives:
            m = natives[native_label]
            variants.append(Variant(f"{native_label} [cl]", m, trainable(m), "cl"))
        if t in ours:
            variants.append(Variant(f"{labels[t]} [cl]", ours[t], trainable(ours[t]),
                                    "cl", f"{native_label} [cl]" if native_label in natives else None))

    # Layers built for channels-last *layout*: input (N, H, W, C), as after converting a
    # transformer / ConvNeXt nn.LayerNorm(C) source. Reference: the same target, NCHW.
    if not args.no_nhwc:
        ln_native = randomize_affine(nn.LayerNorm(c), gen)
        variants.append(Variant("nn.LayerNorm [nhwc]", ln_native, trainable(ln_native), "nhwc"))
        for key, (t, options) in row_specs.items():
            if t == "pn+relu":
                continue
            module, why = build_target(t, bn_source, (n, h, w, c), channels_last=True, options=options)
            if module is None:
                skipped.append(f"{key} [nhwc]: {why}")
                continue
            module.train()
            ref = "nn.LayerNorm [nhwc]" if t == "pn" else labels[key]
            variants.append(Variant(f"ns {key} ({type(module).__name__}{describe(module)}) [nhwc]", module,
                                    trainable(module), "nhwc", ref))

    x_nchw = torch.randn(shape, generator=gen)
    inputs = {
        "nchw": x_nchw,
        "cl": x_nchw.contiguous(memory_format=torch.channels_last),
        "nhwc": x_nchw.permute(0, 2, 3, 1).contiguous(),
    }
    for x in inputs.values():
        x.requires_grad_(True)
    grads = {}
    for fmt, x in inputs.items():
        g = torch.randn(x.shape, generator=gen)
        grads[fmt] = g.contiguous(memory_format=torch.channels_last) if fmt == "cl" else g

    print("# normsurgeon layers: forward + backward, train mode")
    print(f"# CPU: {cpu_model()} | os.cpu_count()={os.cpu_count()} | "
          f"torch.get_num_threads()={torch.get_num_threads()}")
    print(f"# python {platform.python_version()} | torch {torch.__version__} | normsurgeon {normsurgeon.__version__}")
    try:
        print(f"# load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    except OSError:
        pass
    print(f"# input {shape} float32 | {len(variants)} variants interleaved | median of {args.repeats} "
          f"repeats after 2 warm-up calls each", flush=True)

    for v in variants:  # warm-up (also checks output memory formats)
        for _ in range(2):
            time_call(v, inputs[v.fmt], grads[v.fmt])
    rng = random.Random(0)
    order = list(range(len(variants)))
    gc.collect()
    gc.disable()
    try:
        for _ in range(args.repeats):
            rng.shuffle(order)
            for i in order:
                v = variants[i]
                v.times.append(time_call(v, inputs[v.fmt], grads[v.fmt]))
    finally:
        gc.enable()

    med = {v.label: statistics.median(v.times) for v in variants}
    low = {v.label: min(v.times) for v in variants}
    base = med["nn.BatchNorm2d"]
    sections = [("contiguous NCHW input", "nchw"),
                ("channels_last memory format input (same NCHW shape)", "cl"),
                ("layers built with channels_last=True layout, input (N, H, W, C) contiguous", "nhwc")]
    noisy = 0
    for title, fmt in sections:
        rows = []
        for v in variants:
            if v.fmt != fmt:
                continue
            q = statistics.quantiles(v.times, n=4) if len(v.times) >= 2 else [v.times[0]] * 3
            noisy += q[2] > 1.3 * q[0]
            rows.append([v.label, f"{med[v.label] * 1e3:.2f}", f"{q[0] * 1e3:.2f}-{q[2] * 1e3:.2f}",
                         f"{min(v.times) * 1e3:.2f}", f"{med[v.label] / base:.2f}", v.ref or "",
                         f"{med[v.label] / med[v.ref]:.2f}" if v.ref in med else "",
                         f"{low[v.label] / low[v.ref]:.2f}" if v.ref in low else ""])
        if rows:
            print(f"\n{title}:")
            print(table(["variant", "median ms", "p25-p75", "min ms", "x BN", "ref", "x ref", "x ref(min)"],
                        rows, right={1, 2, 3, 4, 6, 7}))
    floor_lines = []
    for key, (t, _) in row_specs.items():
        ref = ref_of(t)
        if t in FLOORS and ref in med:
            ratio, ratio_min = med[labels[key]] / med[ref], low[labels[key]] / low[ref]
            floor_lines.append(f"  {key}: x {ref} = {ratio:.2f} (min/min {ratio_min:.2f}), floor <= {FLOORS[t]}: "
                               + ("met" if ratio <= FLOORS[t] else "NOT met"))
    if floor_lines:
        print("\nfloors (forward + backward, NCHW, median / median of ref, same run):")
        print("\n".join(floor_lines))
    if skipped:
        print("\nskipped: " + "; ".join(skipped))
    if noisy:
        print(f"\nnote: {noisy} of {len(variants)} rows have p75 > 1.3 x p25: the machine was busy "
              f"(other processes, or threads waiting for a core); ratios are only indicative. "
              f"--threads 1 and more --repeats help; min ms is the least disturbed call.")
    print("\nx BN: ratio to nn.BatchNorm2d on contiguous NCHW input; x ref: ratio to the 'ref' row "
          "(same run). [cl] = torch.channels_last memory format; [nhwc] = (N, H, W, C) layout; "
          "ns = normsurgeon.")
    if args.model_step:
        model_train_step(args.repeats)
    return 0


def model_train_step(repeats: int, batch: int = 8, size: int = 112) -> None:
    """torchvision ResNet-50 SGD train step (forward, backward, step): original BN vs its ``pn``
    and proxy conversions, interleaved in the same run (NCHW input, default memory format), and BN
    and ``pn`` with the model and input in ``torch.channels_last`` memory format ("cl")."""
    import copy

    import torchvision

    torch.manual_seed(0)
    original = torchvision.models.resnet50()
    models = {"ResNet-50 (BatchNorm)": original}
    for t in ("pn", "proxy_gn", "proxy_ln"):
        models[f"ResNet-50 {t}"] = normsurgeon.convert(original, to=t)
    cl = torch.channels_last
    models["ResNet-50 (BatchNorm) cl"] = copy.deepcopy(original).to(memory_format=cl)
    models["ResNet-50 pn cl"] = copy.deepcopy(models["ResNet-50 pn"]).to(memory_format=cl)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    steps = {}
    for label, m in models.items():
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)

        def step(m=m, opt=opt, x=x.contiguous(memory_format=cl) if label.endswith(" cl") else x):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        steps[label] = step
        step()
    times = {label: [] for label in steps}
    for _ in range(max(3, repeats // 6)):
        for label, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[label].append(time.perf_counter() - t0)
    base = statistics.median(times["ResNet-50 (BatchNorm)"])
    rows = [[label, f"{statistics.median(v) * 1e3:.0f}", f"{min(v) * 1e3:.0f}",
             f"{statistics.median(v) / base:.2f}"] for label, v in times.items()]
    print(f"\nResNet-50 train step, batch {batch} at {size}x{size} (SGD; forward + backward + step):")
    print(table(["model", "median ms", "min ms", "x original"], rows, right={1, 2, 3}))


if __name__ == "__main__":
    sys.exit(main())
