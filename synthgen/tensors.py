"""Tensor conversion shared by the data layer, the models and every stage.

Images live as ``uint8`` arrays (N, H, W, C); networks see float tensors (N, C, H, W) in [-1, 1].
"""

from __future__ import annotations

import numpy as np
import torch


def to_tensor(x: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1] on ``device``."""
    tensor = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    return tensor.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C) on the CPU (rounded, clamped)."""
    scaled = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round_()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
