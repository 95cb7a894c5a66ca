"""Helpers the commands share: building MODEL, naming it, its preprocessing, checking outputs."""
from __future__ import annotations

import json
import os
import sys

from ..console import out


def create(args):
    """The model MODEL names, with random initialisation seeded (``models.create``)."""
    from ..models import create as create_model

    return create_model(args.model, pretrained=args.pretrained, weights=args.weights, num_classes=args.num_classes)


def model_label(args) -> str:
    """What MODEL is, weights included: a newcomer must see when they are random."""
    from ..models import DEFAULT_SPECS, has_random_weights

    if args.model in DEFAULT_SPECS:
        return "embedded EfficientNet-Lite0 (real ImageNet weights)" + (
            f" with weights from {args.weights}" if args.weights else "")
    if args.weights:
        return f"{args.model} (weights from {args.weights})"
    if args.pretrained:
        return f"{args.model} (pretrained weights)"
    assert has_random_weights(args.model, args.pretrained, args.weights)
    return f"{args.model} (random weights, seed 0: pass --pretrained or --weights FILE for trained ones)"


def base_expression(spec: str | None, num_classes: int | None) -> tuple[str, str]:
    """(imports, Python expression) that builds a fresh base model of ``spec`` for load()."""
    from ..models import DEFAULT_SPECS, TORCHVISION_PREFIX

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


def print_load_hint(path: str, args) -> None:
    imports, expr = base_expression(args.model, args.num_classes)
    out("load it onto a freshly built base model (same architecture, any weights):")
    out(f"    {imports}")
    out(f"    model = normsurgeon.load({path!r}, {expr})")


def data_config(model) -> dict:
    """The model's preprocessing (timm's resolve_data_config), else ImageNet defaults."""
    from ..data import IMAGENET_MEAN, IMAGENET_STD

    cfg = {"input_size": (3, 224, 224), "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bicubic"}
    try:
        from timm.data import resolve_data_config

        cfg.update({k: v for k, v in resolve_data_config(model=model).items() if k in cfg})
    except Exception:  # noqa: BLE001 - no timm, or a model timm cannot describe: keep the defaults
        pass
    if cfg["interpolation"] not in ("bicubic", "bilinear", "nearest"):
        cfg["interpolation"] = "bicubic"
    return cfg


def check_selection(args) -> dict:
    """Validate the target and options before building the model (fast failure on typos)."""
    from ..surgery import get_target
    from .options import options

    opts = options(args.option)
    get_target(args.to).check_options(opts)
    return opts


def check_writable(path: str) -> None:
    """An output file name: not an existing folder, and no file where a folder of it must be (missing
    folders are created when the file is written)."""
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise IsADirectoryError(f"{path} is a folder: give a file name for the output, e.g. {os.path.join(path, 'model.pt')}")
    folder = os.path.dirname(full)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"cannot write {path}: {folder} is a file, not a folder; choose another output path")


def write_json(report, path: str) -> None:
    text = json.dumps(report.to_dict(), indent=2, default=repr)
    if path == "-":
        out(text)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"report written to {path}", file=sys.stderr)


def check_enough(n: int, what: str, batch_sizes) -> None:
    """Every sweep batch size needs at least that many images."""
    big = [b for b in batch_sizes or [] if b > n]
    if not big:
        return
    given = ",".join(map(str, batch_sizes))
    if big[0] == batch_sizes[0]:
        raise ValueError(f"{what}: fewer than the smallest batch size {big[0]} (--batch-sizes {given})")
    raise ValueError(f"{what}: fewer than the batch sizes {', '.join(map(str, big))} (--batch-sizes {given}); "
                     f"every batch size needs at least that many images")


def load_folder(path: str, size: int, cfg: dict, limit: int | None = None, skip_bad: bool = False):
    """(images, names) of an image folder, with a progress display on stderr."""
    from ..data import find_images, load_image_folder
    from ..progress import Progress

    total = len(find_images(path))
    bar = Progress(f"loading {path}", total=min(total, limit) if limit else total, unit="img")
    try:
        return load_image_folder(path, size=size, mean=tuple(float(v) for v in cfg["mean"]),
                                 std=tuple(float(v) for v in cfg["std"]), limit=limit,
                                 interpolation=cfg["interpolation"], skip_bad=skip_bad,
                                 progress=lambda done, total: bar.update())
    finally:
        bar.close()
