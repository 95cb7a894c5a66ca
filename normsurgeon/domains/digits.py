"""A small offline domain-generalization test bed: scikit-learn's 1,797 handwritten digits under
real image transformations, one per domain.

Each digit (8×8, values 0..16) is scaled to [0, 1] and upsampled bilinearly to ``size``×``size``,
then every domain transforms every digit (independent random parameters per image):
  clean     unchanged
  rotated   rotated by ±(30°..50°) (sign at random), bilinear, zero fill
  inverted  1 − x (white strokes become dark on a white ground)
  blurred   Gaussian blur, σ = 1.5 px at 32 px (scaled with size)
  noisy     + N(0, 0.3²) pixel noise, clipped to [0, 1]
  elastic   elastic distortion (Simard et al. 2003): a random displacement field smoothed by a
            Gaussian (σ = 3 px at 32 px), largest displacement 6 px at 32 px
Milder shifts (``MILD_DOMAINS``, the kind a scanner or pen change makes):
  tilted    rotated by ±(10°..20°)
  faded     partial contrast loss: 0.25 + 0.5·x (grey paper, lighter ink)
  soft      Gaussian blur, σ = 1 px at 32 px
  grainy    + N(0, 0.15²) pixel noise, clipped to [0, 1]
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DOMAINS = ("clean", "rotated", "inverted", "blurred", "noisy", "elastic")
MILD_DOMAINS = ("clean", "tilted", "faded", "soft", "grainy", "elastic")


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    from torchvision.transforms.functional import gaussian_blur

    k = 2 * math.ceil(3 * sigma) + 1
    return gaussian_blur(x, [k, k], [sigma, sigma])


def _warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _rotate(x: torch.Tensor, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    """Each image rotated by ±(low..high) degrees, sign at random."""
    n = x.shape[0]
    sign = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
    angle = torch.deg2rad(sign * (low + (high - low) * torch.rand(n, generator=gen)))
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], -1),
                         torch.stack([sin, cos, torch.zeros(n)], -1)], 1)
    return _warp(x, F.affine_grid(theta, list(x.shape), align_corners=False))


def transform(x: torch.Tensor, name: str, gen: torch.Generator) -> torch.Tensor:
    """Apply domain ``name`` to images ``x`` (N, 1, S, S) in [0, 1]."""
    n, size = x.shape[0], x.shape[-1]
    if name == "clean":
        return x.clone()
    if name == "inverted":
        return 1.0 - x
    if name == "blurred":
        return _blur(x, 1.5 * size / 32)
    if name == "noisy":
        return (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    if name == "rotated":
        return _rotate(x, 30, 50, gen)
    if name == "tilted":
        return _rotate(x, 10, 20, gen)
    if name == "faded":
        return 0.25 + 0.5 * x
    if name == "soft":
        return _blur(x, 1.0 * size / 32)
    if name == "grainy":
        return (x + 0.15 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    if name == "elastic":
        field = torch.rand((n, 2, size, size), generator=gen) * 2 - 1
        field = _blur(field, 3 * size / 32)
        field = field / field.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
        displacement = field * (2 * 6 / 32)  # 6 px at 32 px, in normalized coordinates ([-1, 1] spans the image)
        theta = torch.eye(2, 3).expand(n, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False) + displacement.permute(0, 2, 3, 1)
        return _warp(x, grid)
    raise ValueError(f"unknown digit domain {name!r}; domains: "
                     f"{', '.join(dict.fromkeys(DOMAINS + MILD_DOMAINS))}")


def digit_domains(domains=DOMAINS, size: int = 32, seed: int = 0):
    """Every digit in every domain: images (K, 1797, 1, size, size) float32 in [0, 1], labels (1797,)
    long, and the domain names (K,). Deterministic for a given seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    gen = torch.Generator().manual_seed(seed)
    images = torch.stack([transform(x, name, gen) for name in domains])
    return images, torch.tensor(digits.target, dtype=torch.long), tuple(domains)
