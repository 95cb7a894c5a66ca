"""Load a folder of images as a normalized batch (for ``normsurgeon diagnose --data DIR``).

    x, paths = load_image_folder("photos/", size=224, mean=cfg["mean"], std=cfg["std"])

Every image file under the folder (recursively, so ImageNet-style class folders work) is
read with PIL, converted to RGB and preprocessed like timm's eval transform: bicubic resize
of the shorter side to ``floor(size / crop_pct)``, center crop ``size x size``, scale to
[0, 1], normalize with ``mean``/``std``. Pass the model's normalization (e.g. from
``timm.data.resolve_data_config(model=model)``); the default is ImageNet's.

``load_domain_folder("PACS/")`` reads the domain-generalization layout ``root/domain/class/image``
into images, class labels and domain labels (for ``convert(model, to="dsbn", domains=...)``).
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "find_images", "load_image_folder",
           "DomainFolder", "load_domain_folder"]

#: File extensions (lower case) taken as images; matched case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def find_images(path) -> list[Path]:
    """Image files under ``path`` (recursive), sorted by their path relative to ``path``.

    Raises FileNotFoundError (missing), NotADirectoryError (a file), ValueError (no images).
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"data path is not a folder: {root}")
    files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        what = "is empty" if not any(root.iterdir()) else "contains no image files"
        raise ValueError(f"no images found in {root} ({what}; looked for "
                         f"{', '.join(IMAGE_EXTENSIONS)}, case-insensitive, in subfolders too)")
    return files


def _transform(size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float, interpolation: str):
    from torchvision import transforms as T

    modes = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
             "nearest": T.InterpolationMode.NEAREST}
    if interpolation not in modes:
        raise ValueError(f"interpolation must be one of {', '.join(modes)}, got {interpolation!r}")
    return T.Compose([
        T.Resize(math.floor(size / crop_pct), interpolation=modes[interpolation]),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(mean=[float(m) for m in mean], std=[float(s) for s in std]),
    ])


def load_image_folder(path, size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                      std: Sequence[float] = IMAGENET_STD, limit: int | None = None, *,
                      crop_pct: float = 0.875, interpolation: str = "bicubic",
                      progress=None, skip_bad: bool = False) -> tuple[torch.Tensor, list[str]]:
    """All images under ``path`` as a float32 ``(N, 3, size, size)`` batch and their relative paths.

    ``limit``: keep only the first ``limit`` images (in sorted path order). ``progress``: an
    optional callable ``progress(done, total)`` called after each image. ``skip_bad``: leave out
    files that cannot be decoded, with a warning that names them (the returned paths are the
    images kept), instead of stopping at the first one.
    Raises FileNotFoundError / NotADirectoryError for a bad path, ValueError for a folder
    without images, bad arguments, or a file that cannot be decoded (named in the message).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    if len(mean) != 3 or len(std) != 3 or any(float(s) <= 0 for s in std):
        raise ValueError(f"mean and std need 3 values (RGB), std positive; got mean={mean!r}, std={std!r}")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    files = find_images(root)
    if limit is not None:
        files = files[:limit]
    transform = _transform(size, mean, std, crop_pct, interpolation)
    tensors, names, bad = [], [], []
    for i, file in enumerate(files):
        rel = file.relative_to(root).as_posix()
        try:
            with Image.open(file) as img:
                img = img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            if not skip_bad:
                raise ValueError(f"cannot decode image {os.fspath(file)}: {err}. Remove or fix the file, or skip "
                                 f"undecodable files with skip_bad=True (--skip-bad-images)") from err
            bad.append(rel)
            continue
        tensors.append(transform(img))
        names.append(rel)
        if progress is not None:
            progress(i + 1, len(files))
    if bad:
        if not names:
            raise ValueError(f"none of the {len(files)} image files in {root} could be decoded "
                             f"(e.g. {bad[0]})")
        warnings.warn(f"skipped {len(bad)} undecodable image file(s) in {root}: {', '.join(bad)}", UserWarning,
                      stacklevel=2)
    return torch.stack(tensors).to(torch.float32), names


@dataclass
class DomainFolder:
    """Images of a ``root/domain/class/image`` tree: ``images`` (N, 3, size, size) float32,
    ``labels`` and ``domains`` (N,) long indices into ``classes`` and ``domain_names``
    (both sorted), ``paths`` relative to root."""

    images: torch.Tensor
    labels: torch.Tensor
    domains: torch.Tensor
    classes: list[str]
    domain_names: list[str]
    paths: list[str]


def load_domain_folder(path, size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD, limit: int | None = None, **kwargs) -> DomainFolder:
    """A domain-generalization tree ``root/domain/class/image`` (the PACS and Office-31 layout).

    Every subfolder of ``path`` is a domain, every subfolder of a domain a class; classes are
    the sorted union over domains (a class may be missing from some domain). ``limit`` caps the
    images per domain; other keyword arguments and the preprocessing are ``load_image_folder``'s.
    Raises ValueError for an image that is not inside a class folder or a domain with no images.
    """
    root = Path(path)
    find_images(root)  # the same errors as load_image_folder for a missing/empty root
    domain_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    stray = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if stray or not domain_dirs:
        raise ValueError(f"{root} is not a root/domain/class/image tree: images directly under the root "
                         f"({', '.join(stray[:3]) or 'no domain folders'}); put each domain's class "
                         f"folders in a folder named after the domain")
    per_domain = []
    for folder in domain_dirs:
        try:
            images, names = load_image_folder(folder, size, mean, std, limit, **kwargs)
        except ValueError as err:
            raise ValueError(f"domain {folder.name!r}: {err}") from err
        outside = [n for n in names if "/" not in n]
        if outside:
            raise ValueError(f"domain {folder.name!r} has images outside class folders ({', '.join(outside[:3])}); "
                             f"expected {root}/{folder.name}/<class>/<image>")
        per_domain.append((folder.name, images, [n.split("/", 1)[0] for n in names], names))
    classes = sorted({c for _, _, cls, _ in per_domain for c in cls})
    index = {c: i for i, c in enumerate(classes)}
    return DomainFolder(
        images=torch.cat([images for _, images, _, _ in per_domain]),
        labels=torch.tensor([index[c] for _, _, cls, _ in per_domain for c in cls], dtype=torch.long),
        domains=torch.cat([torch.full((len(names),), k, dtype=torch.long)
                           for k, (_, _, _, names) in enumerate(per_domain)]),
        classes=classes, domain_names=[name for name, _, _, _ in per_domain],
        paths=[f"{name}/{n}" for name, _, _, names in per_domain for n in names])
