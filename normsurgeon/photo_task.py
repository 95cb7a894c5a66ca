"""A labeled offline task made of real photos: which photo does a crop come from?

Each photo is one class. The photo is cut into a ``grid × grid`` array of tiles, and a seeded
permutation per photo gives ``tiles[0]`` tiles to the training split, ``tiles[1]`` to the
validation split and ``tiles[2]`` to the test split (10 / 2 / 4 of 16 by default). Every crop
lies inside one tile of its split, so the three splits come from disjoint regions of each
photo: a test crop shows a part of the photo that no training crop contains, and the model
has to recognise the photo from its colours, textures and objects elsewhere in it.

A crop is a random box inside its tile (area fraction ``scale`` of the tile, aspect ratio
log-uniform in ``ratio``), resized bicubically to ``size × size`` and normalized with
``(x − mean)/std``. Crop k of class c in split s depends only on (seed, c, s, k).

Why it is a harder fine-tuning task than sklearn's digits: tens of classes with few images
each, natural-image statistics far from a separable toy, and at the default 128 px an
EfficientNet-Lite0's last stage has 4 × 4 positions, so a BatchNorm statistic there pools
only 2 · 16 = 32 values at batch 2 (digits at 32 px in the small_batch study: 128 and more).

Photos (``available_photos()``):
- always, from pip packages: 19 photos of scikit-image, scikit-learn and matplotlib
  (``PIP_PHOTOS``; the README's demo and the tests use only these);
- when installed (``apt-get install mate-backgrounds plasma-workspace-wallpapers
  ukui-wallpapers``): 36 more Debian wallpaper photos (``SYSTEM_PHOTOS``), 55 classes in all;
- or your own: ``photo_task("my_photos/")`` takes every image under a folder, one class each.

    task = photo_task(size=128)                       # PhotoTask: .train .val .test (x, y), .classes
    model.reset_classifier(len(task.classes))
    ns.finetune(model, task.train, steps=300, eval_data=task.val, batch_size=2, ...)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .zoo import LITE0_MEAN, LITE0_STD, load_skimage_photo

#: Photos that ship with pip packages: ``skimage.data`` (colour and grayscale), scikit-learn's
#: two sample images and matplotlib's sample photo. Left out: photos with a side under 256 px
#: (page, text, microaneurysms), synthetic images, and ``motorcycle_right`` (nearly
#: ``motorcycle_left``).
PIP_PHOTOS: tuple[str, ...] = (
    "chelsea", "coffee", "astronaut", "rocket", "motorcycle_left", "hubble_deep_field",
    "immunohistochemistry", "retina", "camera", "coins", "moon", "clock", "grass", "gravel", "brick",
    "cell", "china", "flower", "grace_hopper")

_PLASMA = "/usr/share/wallpapers/{}/contents/images"
#: Photos among Debian's desktop wallpapers, by package: (class name, file or folder). A plasma
#: wallpaper folder holds one photo at several resolutions; the one nearest 1920 px wide is used.
SYSTEM_PHOTOS: dict[str, tuple[tuple[str, str], ...]] = {
    "mate-backgrounds": tuple(
        (name, f"/usr/share/backgrounds/mate/nature/{name}.jpg") for name in (
            "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops",
            "Storm", "TwoWings", "Wood", "YellowFlower")),
    "plasma-workspace-wallpapers": tuple(
        (name, _PLASMA.format(name)) for name in (
            "BytheWater", "ColdRipple", "ColorfulCups", "EveningGlow", "FallenLeaf", "Grey", "OneStandsOut",
            "Path", "Volna", "summer_1am")),
    "ukui-wallpapers": tuple(
        (name.split("_by_")[0], f"/usr/share/backgrounds/{name}.jpg") for name in (
            "Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Kleiber_by_Lukas_Baubkus",
            "Picture_0B_by_freespace", "Picture_1A_by_freespace", "Wine_by_Jakkub_Mede",
            "aitzgorri_by_Aitzol_Berasategi", "free_by_Peter_Nerlich", "friends_by_Aitzol_Berasategi",
            "greentock_by_Peter_Nerlich", "life_by_Aitzol_Berasategi", "picosdeeuropa_by_Aitzol_Berasategi",
            "seeding_by_Clements_Engelhardt", "sunset_by_Aitzol_Berasategi")),
}
MAX_SIDE = 1024  # photos are downscaled on load so that their longer side is at most this


def _system_file(path: str) -> Path | None:
    """The image file of a SYSTEM_PHOTOS entry (a file, or a plasma folder of resolutions), or None."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        files = [f for f in p.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png")]
        width = lambda f: int(f.stem.split("x")[0]) if f.stem.split("x")[0].isdigit() else 0  # noqa: E731
        return min(files, key=lambda f: abs(width(f) - 1920), default=None)
    for f in p.parent.glob(p.stem + ".*"):  # ukui ships some as .png, some as .jpg
        return f
    return None


def available_photos(system: bool = True) -> list[tuple[str, str]]:
    """(class name, source) of every photo found: ``PIP_PHOTOS`` (source = the name), then, with
    ``system``, each installed ``SYSTEM_PHOTOS`` file (source = its path)."""
    photos = [(name, name) for name in PIP_PHOTOS]
    if system:
        for entries in SYSTEM_PHOTOS.values():
            for name, path in entries:
                found = _system_file(path)
                if found is not None:
                    photos.append((name, str(found)))
    return photos


def load_photo(source: str | Path, max_side: int = MAX_SIDE) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of a pip photo name (``PIP_PHOTOS``) or an image file, its longer
    side downscaled to at most ``max_side``."""
    from PIL import Image

    if isinstance(source, str) and source == "grace_hopper":
        import matplotlib.cbook

        source = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    if isinstance(source, str) and not Path(source).suffix:
        image = Image.fromarray(load_skimage_photo(source))
    else:
        try:
            image = Image.open(source)
            image.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale, much faster
            image = image.convert("RGB")
        except OSError as err:
            raise ValueError(f"cannot read the image {source}: {err}") from err
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


@dataclass
class PhotoTask:
    """Train / val / test splits as (x (N, 3, size, size) float32, y (N,) int64), class names, and
    where each crop came from: ``boxes[split]`` (N, 4) int64 rows (top, left, height, width) in
    the pixels of the loaded photo (``load_photo(sources[y])``)."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    classes: list[str]
    sources: list[str]
    boxes: dict[str, torch.Tensor]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> str:
        size = self.train[0].shape[-1]
        return (f"{self.num_classes} photos (classes), {size} px crops from disjoint tiles of each photo: "
                f"{len(self.train[1])} train, {len(self.val[1])} val, {len(self.test[1])} test")


def random_box(rng: np.random.Generator, height: int, width: int, scale, ratio) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a box inside a height × width tile: area fraction in ``scale``,
    log-uniform aspect ratio in ``ratio``; the central square when ten draws do not fit."""
    for _ in range(10):
        area = height * width * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def _resolve_photos(photos) -> list[tuple[str, str]]:
    if photos is None:
        return available_photos()
    if isinstance(photos, (str, Path)) and Path(photos).is_dir():
        from .data import find_images

        root = Path(photos)
        return [(p.relative_to(root).with_suffix("").as_posix(), str(p)) for p in find_images(root)]
    if isinstance(photos, (str, Path)):
        raise FileNotFoundError(f"photo_task: {photos} is not a folder; give a folder of photos, a list of "
                                f"photo names/paths, or None for the offline photos")
    out = []
    for p in photos:
        if isinstance(p, tuple):  # (class name, source), as available_photos() gives
            out.append((str(p[0]), str(p[1])))
        else:
            out.append((str(p) if isinstance(p, str) and not Path(p).suffix else Path(p).stem, str(p)))
    return out


def photo_task(photos: str | Path | Sequence[str | Path] | None = None, *, size: int = 128,
               train_per_class: int = 16, val_per_class: int = 4, test_per_class: int = 8, seed: int = 0,
               grid: int = 4, tiles: tuple[int, int, int] = (10, 2, 4), scale: tuple[float, float] = (0.5, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3), mean: Sequence[float] = LITE0_MEAN,
               std: Sequence[float] = LITE0_STD) -> PhotoTask:
    """Build the photo-recognition task (see the module docstring).

    ``photos``: None (every photo ``available_photos()`` finds), a folder (every image under it,
    one class each) or a list of ``PIP_PHOTOS`` names, image paths or (class name, source)
    pairs. Needs at least 2 photos.
    """
    from PIL import Image

    sources = _resolve_photos(photos)
    if len(sources) < 2:
        raise ValueError(f"photo_task needs at least 2 photos (one class each), got {len(sources)}"
                         + (f" in {photos}" if isinstance(photos, (str, Path)) else "")
                         + "; add photos, or pass photos=None for the offline ones")
    names = [name for name, _ in sources]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"photo_task: two photos share the class name(s) {twice}; rename the files")
    counts = (train_per_class, val_per_class, test_per_class)
    if any(not isinstance(c, int) or c < 0 for c in counts) or train_per_class < 1 or test_per_class < 1:
        raise ValueError(f"photo_task: train_per_class and test_per_class must be ≥ 1 and val_per_class ≥ 0, "
                         f"got {counts}")
    if len(tiles) != 3 or min(tiles[0], tiles[2]) < 1 or tiles[1] < int(val_per_class > 0) or sum(tiles) > grid * grid:
        raise ValueError(f"photo_task: tiles (train, val, test) = {tiles} must give train and test ≥ 1 tile, val ≥ 1 "
                         f"when val_per_class > 0, and at most grid² = {grid * grid} in all")
    if not (isinstance(size, int) and size >= 8 and 0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"photo_task: size must be an int ≥ 8 and 0 < scale[0] ≤ scale[1] ≤ 1, got size={size}, "
                         f"scale={scale}")
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    splits: list[tuple[list, list, list]] = [([], [], []), ([], [], []), ([], [], [])]
    for label, (name, source) in enumerate(sources):
        photo = load_photo(source)
        th, tw = photo.shape[0] // grid, photo.shape[1] // grid
        if min(th, tw) < 16:
            raise ValueError(f"photo_task: {source} is too small ({photo.shape[1]}×{photo.shape[0]} px) for a "
                             f"{grid}×{grid} grid of tiles; use photos of at least {16 * grid} px a side")
        order = np.random.default_rng([seed, label]).permutation(grid * grid)
        bounds = np.cumsum((0,) + tuple(tiles))
        for split, count in enumerate(counts):
            owned = order[bounds[split]:bounds[split + 1]]
            for k in range(count):
                rng = np.random.default_rng([seed, label, split, k])
                tile = int(owned[k % len(owned)])
                row, col = divmod(tile, grid)
                top, left, h, w = random_box(rng, th, tw, scale, ratio)
                y0, x0 = row * th + top, col * tw + left
                crop = Image.fromarray(photo[y0:y0 + h, x0:x0 + w]).resize((size, size), Image.BICUBIC)
                x = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)
                splits[split][0].append((x - mean_t) / std_t)
                splits[split][1].append(label)
                splits[split][2].append((y0, x0, h, w))

    def stack(xs, ys, boxes):
        if not xs:
            return torch.empty(0, 3, size, size), torch.empty(0, dtype=torch.long), torch.empty(0, 4, dtype=torch.long)
        return torch.stack(xs), torch.tensor(ys, dtype=torch.long), torch.tensor(boxes, dtype=torch.long)

    (*train, b_train), (*val, b_val), (*test, b_test) = (stack(*s) for s in splits)
    return PhotoTask(tuple(train), tuple(val), tuple(test), names, [s for _, s in sources],
                     {"train": b_train, "val": b_val, "test": b_test})
