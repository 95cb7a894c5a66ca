"""Random crops of the offline photos: an unlabeled dataset for calibration and distillation.

Item i of ``PhotoCrops(names, count, size, seed)`` is a deterministic function of (seed, i):
photo ``names[i % len(names)]``, a random box of area fraction in ``scale`` and aspect ratio
in ``ratio`` (log-uniform), a horizontal flip with probability 1/2, a bicubic resize to
size×size, then (x − mean)/std. Deterministic items make fine-tuning resumable exactly and
let held-out crops be fixed.

The photos are split for the studies and ``normsurgeon finetune``'s default data:
``TRAIN_PHOTOS`` for calibration and distillation, ``VALIDATION_PHOTOS`` for deciding what to
keep (calibrate's held-out check, fine-tuning's best state) and ``HELDOUT_PHOTOS`` for
measuring agreement with the original — three sets of different photos, not only different
crops. ``motorcycle_right`` is left out (it is nearly ``motorcycle_left``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .photo_task import load_photo, random_box
from .zoo import LITE0_MEAN, LITE0_STD

TRAIN_PHOTOS: tuple[str, ...] = ("chelsea", "astronaut", "rocket", "motorcycle_left", "hubble_deep_field",
                                 "immunohistochemistry", "camera", "grass", "brick", "clock")
VALIDATION_PHOTOS: tuple[str, ...] = ("grace_hopper", "cell", "coins", "china")
HELDOUT_PHOTOS: tuple[str, ...] = ("coffee", "flower", "retina", "moon", "gravel", "page")


class PhotoCrops(Dataset):
    """``count`` random crops (3, size, size) of ``names``; item i depends only on (seed, i)."""

    def __init__(self, names: Sequence[str] = TRAIN_PHOTOS, count: int = 256, size: int = 224, seed: int = 0,
                 scale: tuple[float, float] = (0.1, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 mean: Sequence[float] = LITE0_MEAN, std: Sequence[float] = LITE0_STD):
        if not names:
            raise ValueError("PhotoCrops needs at least one photo name")
        if count < 1 or size < 8:
            raise ValueError(f"PhotoCrops: count must be ≥ 1 and size ≥ 8, got count={count}, size={size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"PhotoCrops: scale must satisfy 0 < min ≤ max ≤ 1, got {scale}")
        self.names, self.count, self.size, self.seed = list(names), count, size, seed
        self.scale, self.ratio = scale, ratio
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        for name in self.names:
            load_photo(name)  # fail now on an unknown name

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        if not 0 <= index < self.count:
            raise IndexError(f"PhotoCrops index {index} out of range [0, {self.count})")
        rng = np.random.default_rng([self.seed, index])
        photo = load_photo(self.names[index % len(self.names)])
        top, left, h, w = random_box(rng, *photo.shape[:2], self.scale, self.ratio)
        image = Image.fromarray(photo[top:top + h, left:left + w]).resize((self.size, self.size), Image.BICUBIC)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)
        return (x - self.mean) / self.std

    def batch(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Items start..stop-1 stacked: (n, 3, size, size)."""
        return torch.stack([self[i] for i in range(start, self.count if stop is None else stop)])
