"""The ``normsurgeon`` command line.

    normsurgeon targets
    normsurgeon plan    [MODEL] --to gn [--include PAT ...] [--exclude PAT ...] [--option num_groups=8] [--json FILE]
    normsurgeon convert [MODEL] --to gn -o gn.pt [same selection and option flags]
    normsurgeon diagnose [MODEL] [--to gn] [--data DIR] [--batch-sizes 2,8,32] -o diag/
    normsurgeon finetune [MODEL] --to proxy_gn [--calibrate] [--data DIR] [--steps N] [--minutes M] -o ft.pt
    normsurgeon demo [--to proxy_gn] [--steps 250] [--output demo_output/]

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
import re
import sys
import time
import warnings

from . import __version__
from .console import out, wrap
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


def _positive(convert, noun: str):
    """An argparse type: ``convert(text)`` that must be finite and > 0, else "expected a positive {noun}"."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"expected a positive {noun}, got {text!r}")
        return value
    return parse


_positive_int = _positive(int, "integer")
_positive_float = _positive(float, "number")


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
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse reads "-1e-3" as an option (its negative-number pattern has no exponent), so
        # "--lr -1e-3" failed with "expected one argument" instead of reaching the value check
        self._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.?\d+(?:[eE][-+]?\d+)?$")

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

    ft = sub.add_parser("finetune", parents=[model], help="convert, calibrate and distill from the original",
                        description="Convert MODEL, optionally calibrate it, fine-tune it by distillation from "
                                    "the original (unlabeled images: the original's predictions are the "
                                    "targets) and save it. Prints top-1 agreement and KL with the original on "
                                    "held-out images before and after. Re-running the same command with "
                                    "--checkpoint-dir resumes the run.")
    g = ft.add_argument_group("conversion")
    g.add_argument("--to", required=True, metavar="TARGET",
                   help="target name (see 'normsurgeon targets'), e.g. proxy_gn, gn, ln")
    _add_site_selection(g)
    g.add_argument("--calibrate", action="store_true",
                   help="normsurgeon.calibrate on (up to 64) training images before fine-tuning")
    g = ft.add_argument_group("data")
    g.add_argument("--data", metavar="DIR",
                   help="folder of images (.jpg/.png/..., subfolders too; labels are not used): every "
                        "5th image is held out, to measure agreement and to choose what is kept; default: random "
                        "crops of the offline photos (normsurgeon.photo_crops): training photos, validation photos "
                        "that choose what is kept, and held-out crops and photos that measure it")
    g.add_argument("--eval-data", metavar="DIR",
                   help="folder of held-out images (with --data: then all of --data trains)")
    g.add_argument("--size", type=_positive_int, metavar="PX",
                   help="input size in pixels (default: the model's, else 224)")
    g.add_argument("--eval-images", type=_positive_int, default=96, metavar="N",
                   help="crops per validation and held-out set with the default data (default 96)")
    g = ft.add_argument_group("training")
    g.add_argument("--steps", type=_positive_int, metavar="N",
                   help="optimizer steps (default 100; with --minutes alone: until the time is spent)")
    g.add_argument("--minutes", type=_positive_float, metavar="M",
                   help="stop after M minutes of process CPU time spent training (evaluation excluded)")
    g.add_argument("--lr", type=float, default=3e-4, metavar="LR", help="peak learning rate (default 3e-4)")
    g.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="default adamw")
    g.add_argument("--scheduler", choices=("constant", "cosine"), default="constant",
                   help="learning-rate schedule after the warm-up (default constant)")
    g.add_argument("--warmup-steps", type=int, default=20, metavar="N", help="linear warm-up (default 20)")
    g.add_argument("--batch-size", type=_positive_int, default=16, metavar="N", help="default 16")
    g.add_argument("--seed", type=int, default=0, help="data order seed (default 0)")
    g.add_argument("--eval-every", type=_positive_int, default=25, metavar="N",
                   help="steps between evaluations on the validation images (default 25); the best evaluated "
                        "state, the start included, is kept")
    g.add_argument("--keep-last", action="store_true", help="keep the last state instead of the best evaluated one")
    g.add_argument("--train-statistics", action="store_true",
                   help="train with batch statistics and update the running estimates (default: BatchNorm-type "
                        "layers keep their population statistics)")
    g.add_argument("--trainable", default="all", metavar="WHICH",
                   help="what trains: all (default), norm, head, norm+head")
    g.add_argument("--checkpoint-dir", metavar="DIR",
                   help="write resumable checkpoints here; the same command again resumes from them")
    g.add_argument("--checkpoint-every", type=_positive_int, default=50, metavar="N",
                   help="steps between checkpoints (default 50; one is always written at the end)")
    ft.add_argument("-o", "--output", required=True, metavar="FILE",
                    help="where to save the fine-tuned model (normsurgeon.save); FILE's stem + "
                         ".history.json / .history.csv are written next to it")

    demo = sub.add_parser("demo", help="fine-tune a pretrained EfficientNet-Lite0 at batch 2: plain BN against normsurgeon",
                          description="The embedded EfficientNet-Lite0 (real ImageNet weights) gets a new head and is "
                                      "fine-tuned with labels at batch 2 on the offline photo task: BatchNorm as a "
                                      "plain loop trains it, normsurgeon's default (population statistics kept), and "
                                      "the conversion --to; then diagnose says why.")
    demo.add_argument("--to", default="proxy_gn", metavar="TARGET",
                      help="the conversion compared with BatchNorm (default proxy_gn)")
    demo.add_argument("--steps", type=_positive_int, default=250, metavar="N",
                      help="optimizer steps of each fine-tuning run (default 250)")
    demo.add_argument("--output", default="demo_output", metavar="DIR",
                      help="folder for the diagnostics report (default demo_output/)")
    return parser


# ----------------------------------------------------------------------------- helpers
def _warn_to_stderr(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


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
        out(text)
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
        out(f"{name.ljust(width)}  {summary}")
        opts = list(get_target(name).options) + [o for o in COMMON_OPTIONS if o not in get_target(name).options]
        out(f"{''.ljust(width)}  options: {', '.join(opts)}")
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
    out(f"model: {_model_label(args.model)}")
    out(report.table())
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
    out(f"model: {_model_label(args.model)}")
    out(report.table())
    if args.json:
        _write_json(report, args.json)
    ns.save(new, args.output)
    imports, expr = _base_expression(args.model, args.num_classes)
    out("")
    out(f"saved to {args.output} (state_dict + conversion recipe; loads with torch.load(weights_only=True))")
    out("load it onto a freshly built base model (same architecture, any weights):")
    out(f"    {imports}")
    out(f"    model = normsurgeon.load({args.output!r}, {expr})")
    return 0


# ----------------------------------------------------------------------------- finetune / demo helpers
CALIBRATION_IMAGES = 64
UNLIMITED_STEPS = 1_000_000


class _Agreement:
    """Top-1 agreement and KL(original ‖ model) on fixed held-out sets; the original's logits are
    computed once per set and reused at every stage."""

    def __init__(self, original, sets: dict, batch_size: int = 48):
        self.original, self.sets, self.batch_size = original, sets, batch_size
        self.caches: dict = {name: {} for name in sets}

    def __call__(self, model) -> dict:
        from .training import evaluate

        self.last = {name: evaluate(model, x, self.original, self.batch_size, self.caches[name])
                     for name, x in self.sets.items()}
        return self.last

    def line(self, metrics: dict) -> str:
        return "; ".join(f"{name} ({len(self.sets[name])}): top-1 agreement {m['eval_agreement']:.1%}, "
                         f"KL {m['eval_kl']:.3g}" for name, m in metrics.items())


class _CpuTimeProgress:
    """A progress display in CPU seconds for a run bounded by time (its step count is open-ended):
    a forward hook on the student counts training steps and advances by the process CPU time spent."""

    def __init__(self, model, seconds: float):
        self.bar = Progress("finetune", total=max(1, round(seconds)), unit="CPU s")
        self.start, self.steps = time.process_time(), 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        if not module.training:
            return
        self.steps += 1
        spent = min(int(time.process_time() - self.start), self.bar.total)
        self.bar.update(spent - self.bar.n, step=self.steps)

    def close(self) -> None:
        self.handle.remove()
        spent = min(int(time.process_time() - self.start), self.bar.total)
        self.bar.enabled = False  # advance to the end without printing a line for it
        self.bar.update(max(0, spent - self.bar.n))
        self.bar.enabled = True
        self.bar.close()


def _held_out_split(n: int) -> list[int]:
    """Indices held out of an image folder: every 5th image (at least one, never all)."""
    held = list(range(4, n, 5)) or [n - 1]
    return held


def _save_history(history, output: str) -> list[str]:
    """``<stem>.history.json`` / ``.csv`` next to ``output``."""
    import shutil
    import tempfile

    stem = os.path.splitext(output)[0]
    paths = []
    with tempfile.TemporaryDirectory() as tmp:
        history.save(tmp)
        for ext in ("json", "csv"):
            path = f"{stem}.history.{ext}"
            shutil.move(os.path.join(tmp, f"history.{ext}"), path)
            paths.append(path)
    return paths


def cmd_finetune(args) -> int:
    import torch

    import normsurgeon as ns

    from .data import find_images, load_image_folder
    from .photo_crops import HELDOUT_PHOTOS, TRAIN_PHOTOS, VALIDATION_PHOTOS, PhotoCrops

    options = _check_selection(args)
    if not (args.lr > 0 and args.lr < float("inf")):
        raise ValueError(f"--lr must be a positive number, got {args.lr:g}")
    if args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be ≥ 0, got {args.warmup_steps}")
    if args.eval_data is not None and args.data is None:
        raise ValueError("--eval-data needs --data (the default data has its own held-out photos)")
    _check_writable(args.output)
    n_train = n_eval = 0
    if args.data is not None:  # fail on a bad folder before building the model
        n_train = len(find_images(args.data))
        if args.eval_data is not None:
            n_eval = len(find_images(args.eval_data))
        elif n_train < 2:
            raise ValueError(f"{args.data} holds {n_train} image: need at least 2 (every 5th, at least one, is "
                             f"held out to measure agreement), or give --eval-data DIR")
    steps = args.steps or (UNLIMITED_STEPS if args.minutes is not None else 100)

    start = time.perf_counter()
    model = _create(args).eval()
    cfg = _data_config(model)
    size = args.size or int(cfg["input_size"][-1])
    mean, std = tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    if args.data is not None:
        def folder(path, count):
            bar = Progress(f"loading {path}", total=count, unit="img")
            try:
                return load_image_folder(path, size=size, mean=mean, std=std, interpolation=cfg["interpolation"],
                                         progress=lambda done, total: bar.update())[0]
            finally:
                bar.close()
        x = folder(args.data, n_train)
        if args.eval_data is not None:
            train, sets = x, {"held-out images": folder(args.eval_data, n_eval)}
        else:
            held = _held_out_split(len(x))
            keep = torch.ones(len(x), dtype=torch.bool)
            keep[held] = False
            train, sets = x[keep], {"held-out images": x[held]}
        validation = sets["held-out images"]  # also decides what is kept: the reported numbers are optimistic
        calibration = list(train[:CALIBRATION_IMAGES].split(args.batch_size))
        source = (f"{len(train)} images from {args.data}, {size} px (the same each epoch); the held-out images also "
                  f"decide which calibration and which training state are kept")
    else:
        print("cropping the offline photos ...", file=sys.stderr, flush=True)
        crops = dict(size=size, mean=mean, std=std)
        train = PhotoCrops(TRAIN_PHOTOS, UNLIMITED_STEPS, seed=10, **crops)
        sets = {"new crops of the training photos": PhotoCrops(TRAIN_PHOTOS, args.eval_images, seed=3, **crops).batch(),
                "crops of held-out photos": PhotoCrops(HELDOUT_PHOTOS, args.eval_images, seed=2, **crops).batch()}
        calibration = list(PhotoCrops(TRAIN_PHOTOS, CALIBRATION_IMAGES, seed=1, **crops).batch().split(args.batch_size))
        validation = PhotoCrops(VALIDATION_PHOTOS, args.eval_images, seed=4, **crops).batch()
        source = (f"random crops of {len(TRAIN_PHOTOS)} offline photos (normsurgeon.photo_crops), {size} px; "
                  f"crops of {len(VALIDATION_PHOTOS)} other photos decide which calibration and which training state "
                  f"are kept; held out: other crops of the training photos and crops of {len(HELDOUT_PHOTOS)} "
                  f"photos used nowhere else")
    out(f"model: {_model_label(args.model)}, converted to {args.to!r}, distilled from the original")
    out(f"data: {source}")
    converted = ns.convert(model, args.to, include=args.include, exclude=args.exclude, **options)
    measure = _Agreement(model, sets, batch_size=2 * args.batch_size)
    out(f"before (converted): {measure.line(measure(converted))}")
    if args.calibrate:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a rejection is reported below
            converted = ns.calibrate(converted, model, calibration, inplace=True, holdout=validation)
        check = converted.normsurgeon_calibration_check
        images = sum(len(b) for b in calibration)
        if check["kept"]:
            out(f"after calibrate ({images} training images): {measure.line(measure(converted))}")
        else:
            out(wrap(f"calibrate ({images} training images): rejected, the fit would lower agreement on the "
                       f"{check['held_out']} validation images ({check['agreement_before']:.1%} → "
                       f"{check['agreement_after']:.1%}, KL {check['kl_before']:.3g} → {check['kl_after']:.3g}); "
                       f"fine-tuning starts from the converted model"))
    keep_best = not args.keep_last and len(validation) >= 8
    if not args.keep_last and not keep_best:
        out(f"note: {len(validation)} validation images are too few to rank training states (8 needed): the last "
             f"state is kept")
    by_time = steps == UNLIMITED_STEPS  # no step count to show progress against: show CPU time
    bar = _CpuTimeProgress(converted, 60 * args.minutes) if by_time else None
    try:
        history = ns.finetune(converted, train, teacher=model, steps=steps, lr=args.lr, optimizer=args.optimizer,
                              batch_size=args.batch_size, scheduler=args.scheduler,
                              warmup_steps=args.warmup_steps, seed=args.seed, checkpoint_dir=args.checkpoint_dir,
                              checkpoint_every=args.checkpoint_every,
                              max_seconds=None if args.minutes is None else 60 * args.minutes, clock="cpu",
                              progress=not by_time, eval_data=validation if keep_best else None,
                              eval_every=args.eval_every, keep_best=keep_best,
                              train_statistics=args.train_statistics, trainable=args.trainable)
    finally:
        if bar is not None:
            bar.close()
    done = max((r["step"] for r in history if "step" in r), default=0)
    cpu = max((r.get("cpu_s", 0.0) for r in history), default=0.0)
    stopped = next((r["stopped"] for r in reversed(history) if "stopped" in r), None)
    restored = next((r for r in history if "restored_best_step" in r), None)
    kept = (f"; kept the state of step {restored['restored_best_step']}, the best on the validation images"
            if restored else "")
    out(f"after fine-tuning ({done} steps, {cpu / 60:.2f} CPU minutes"
         f"{', stopped: ' + stopped if stopped else ''}{kept}): {measure.line(measure(converted))}")
    ns.save(converted, args.output)
    written = [args.output] + _save_history(history, args.output)
    imports, expr = _base_expression(args.model, args.num_classes)
    out("")
    out(f"done in {time.perf_counter() - start:.1f} s; written: {', '.join(written)}")
    if args.checkpoint_dir:
        out(f"checkpoints in {args.checkpoint_dir}: the same command again resumes an interrupted run"
             + ("; a larger --minutes continues this one" if args.steps is None and args.minutes else ""))
    out("load it onto a freshly built base model:")
    out(f"    {imports}")
    out(f"    model = normsurgeon.load({args.output!r}, {expr})")
    return 0


def cmd_demo(args) -> int:
    from .demo import run

    return run(to=args.to, output=args.output, steps=args.steps)


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
    out(f"model: {_model_label(args.model)}" + (f", converted to {args.to!r} (compared with the original)"
                                                  if reference is not None else ""))
    out(f"data: {source}, {size} px, mean={_fmt(mean)}, std={_fmt(std)}")

    bar = Progress("diagnose: forward passes", unit="batch")
    hooks = [m.register_forward_hook(lambda *_: bar.update()) for m in (model, reference) if m is not None]
    try:
        report = ns.diagnose(model, x, batch_sizes=args.batch_sizes, reference=reference,
                             batch_size=args.batch_size, max_batches=args.max_batches)
    finally:
        for h in hooks:
            h.remove()
        bar.close()
    out("")
    out(report.summary())
    before = _listing(out_dir)
    html_path = report.save(out_dir)
    after = _listing(out_dir)
    written = {n for n, stamp in after.items() if before.get(n) != stamp and n.endswith(".png")}
    written |= {html_path.name, "report.json"}
    out("")
    out(f"written to {args.output} in {time.perf_counter() - start:.1f} s:")
    for name in sorted(written, key=lambda n: (n != "report.html", n != "report.json", n)):
        out(f"    {os.path.join(args.output, name)}")
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


COMMANDS = {"targets": cmd_targets, "plan": cmd_plan, "convert": cmd_convert, "diagnose": cmd_diagnose,
            "finetune": cmd_finetune, "demo": cmd_demo}


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
