"""Device choice, precision and seeding: one code path for CPU, CUDA and MPS."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit but missing device is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA device is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("device 'mps' was requested but MPS is not available")
    return torch.device(name)


# Rows per forward pass on the CPU. Intermediates of a few MB stay in cache and under glibc's mmap
# threshold; at 1024 rows every activation of a 28x28 generator is a fresh mmap whose pages fault
# in on first touch (bench/bench_generate.py: cGAN sampling 947 -> 296 us/sample, 2 cores).
CPU_INFERENCE_ROWS = 128


def inference_rows(device: torch.device, batch_size: int) -> int:
    """Rows per forward pass at inference: ``CPU_INFERENCE_ROWS`` on the CPU, the whole batch elsewhere."""
    return max(1, min(batch_size, CPU_INFERENCE_ROWS)) if torch.device(device).type == "cpu" else batch_size


def autocast(device: torch.device):
    """bf16 autocast on CUDA (tensor cores, no loss scaling needed); a no-op elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU ``torch.Generator`` seeded the same."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
