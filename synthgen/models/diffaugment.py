"""Differentiable augmentation (DiffAugment, Zhao et al. 2020) for data-efficient GAN training.

The discriminator sees every image, real and fake, through the same random policy, and the
ops are differentiable so the generator learns through them. With only tens of real images
per class this is what keeps the discriminator from memorising the training set.

All random draws come from an explicit CPU ``torch.Generator`` (then move to the images'
device) so training is reproducible and resumable bit for bit on the CPU.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

POLICIES = ("color", "translation", "cutout")


def parse_policy(policy: str) -> tuple[str, ...]:
    """'translation,cutout' -> ('translation', 'cutout'); '' -> (); unknown names are an error."""
    names = tuple(name.strip() for name in policy.split(",") if name.strip())
    unknown = [name for name in names if name not in POLICIES]
    if unknown:
        raise ValueError(f"unknown DiffAugment op(s) {unknown}; choose from {list(POLICIES)}")
    return names


def _uniform(shape: tuple[int, ...], rng: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=rng).to(device)


def color(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Random brightness, saturation (RGB only) and contrast, one draw per image."""
    n = x.shape[0]
    x = x + (_uniform((n, 1, 1, 1), rng, x.device) - 0.5)
    if x.shape[1] > 1:
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (_uniform((n, 1, 1, 1), rng, x.device) * 2) + mean
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (_uniform((n, 1, 1, 1), rng, x.device) + 0.5) + mean


def translation(x: torch.Tensor, rng: torch.Generator, ratio: float = 0.125, fill: float = -1.0) -> torch.Tensor:
    """Shift each image by up to ``ratio`` of its size; uncovered pixels get ``fill`` (the usual background)."""
    n, _, height, width = x.shape
    shift_h, shift_w = int(height * ratio + 0.5), int(width * ratio + 0.5)
    dy = torch.randint(-shift_h, shift_h + 1, (n, 1, 1), generator=rng).to(x.device)
    dx = torch.randint(-shift_w, shift_w + 1, (n, 1, 1), generator=rng).to(x.device)
    rows = torch.arange(height, device=x.device).view(1, height, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, width)
    # Index into a 1-pixel padded copy: out-of-range positions land on the padding.
    rows = (rows + dy + 1).clamp(0, height + 1)  # (N, H, 1)
    cols = (cols + dx + 1).clamp(0, width + 1)  # (N, 1, W)
    padded = F.pad(x, [1, 1, 1, 1], value=fill).permute(0, 2, 3, 1)  # (N, H+2, W+2, C)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def cutout(x: torch.Tensor, rng: torch.Generator, ratio: float = 0.5) -> torch.Tensor:
    """Zero (mid-grey in [-1, 1]) one random square of ``ratio`` x the image size per image."""
    n, _, height, width = x.shape
    cut_h, cut_w = int(height * ratio + 0.5), int(width * ratio + 0.5)
    top = torch.randint(0, height + (1 - cut_h % 2), (n, 1, 1), generator=rng).to(x.device)
    left = torch.randint(0, width + (1 - cut_w % 2), (n, 1, 1), generator=rng).to(x.device)
    rows = torch.arange(height, device=x.device).view(1, height, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, width)
    row_offset, col_offset = rows - top + cut_h // 2, cols - left + cut_w // 2  # (N, H, 1), (N, 1, W)
    inside = (row_offset >= 0) & (row_offset < cut_h) & (col_offset >= 0) & (col_offset < cut_w)
    mask = (~inside).to(x.dtype).unsqueeze(1)  # (N, 1, H, W)
    return x * mask


OPS = {"color": color, "translation": translation, "cutout": cutout}


def diff_augment(x: torch.Tensor, policy: tuple[str, ...], rng: torch.Generator) -> torch.Tensor:
    """Apply the ops of ``policy`` in order; an empty policy returns ``x`` unchanged."""
    for name in policy:
        x = OPS[name](x, rng)
    return x
