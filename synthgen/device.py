"""Device choice, precision and seeding: one code path for CPU, CUDA and MPS."""

from __future__ import annotations

import contextlib
import functools
import random
from pathlib import Path

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


# Image pixels per forward pass on the CPU (rows = this // (H * W), 8 to 512 rows). Activations of
# a few MB stay in cache and under glibc's mmap threshold; at 1,024 rows of 28x28 every activation
# is a fresh mmap whose pages fault in on first touch. Measured on 2 cores, us/sample, generator /
# D / classifier: 28x28 at 64 rows 183 / 75 / 141, at 256 rows 470 / 127 / 143 (the unfused
# generator at 1,024 rows: 947); 64x64x3 at 16 rows 1167 / 510 / 769, at 128 rows 1927 / 871 / 1230.
CPU_INFERENCE_PIXELS = 65_536


def inference_rows(device: torch.device, batch_size: int, image_size: tuple[int, int]) -> int:
    """Rows per forward pass at inference: about ``CPU_INFERENCE_PIXELS`` of images on the CPU (83 rows of 28x28,
    16 of 64x64), the whole batch elsewhere."""
    if torch.device(device).type != "cpu":
        return batch_size
    rows = min(512, max(8, CPU_INFERENCE_PIXELS // max(1, image_size[0] * image_size[1])))
    return max(1, min(batch_size, rows))


def autocast(device: torch.device):
    """bf16 autocast on CUDA (tensor cores, no loss scaling needed); a no-op elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX), read from /proc/cpuinfo (Linux).

    Without them oneDNN emulates bf16 and a bf16 step is no faster than fp32, so ``auto`` keeps fp32 there.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_bf16_enabled(device: torch.device, setting: bool | str) -> bool:
    """Whether CPU training runs under bf16 autocast: ``setting`` true/false, or ``"auto"`` (native bf16 only)."""
    if torch.device(device).type != "cpu":
        return False
    return cpu_has_native_bf16() if setting == "auto" else bool(setting)


def training_precision(device: torch.device, cpu_bf16: bool | str) -> str:
    """"bf16" or "fp32": what a training loop on ``device`` runs in (CUDA always autocasts to bf16), for summaries."""
    return "bf16" if torch.device(device).type == "cuda" or cpu_bf16_enabled(device, cpu_bf16) else "fp32"


def cpu_autocast(device: torch.device, setting: bool | str):
    """bf16 autocast on the CPU when :func:`cpu_bf16_enabled` (weights and optimiser state stay fp32); a no-op elsewhere.

    Wraps a whole training step: the models' own :func:`autocast` is a no-op on the CPU, so this one
    stays in effect inside them. Without the weight cache: a step updates D before G's loss reads it,
    and a cached bf16 copy would be the weights before the update (training then learns nothing).
    """
    if cpu_bf16_enabled(device, setting):
        return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU ``torch.Generator`` seeded the same."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
