"""Host memory for the training loops: glibc malloc kept from handing freed activations back to the OS.

glibc serves a block above its mmap threshold (128 KiB at start, raised only as such blocks are
freed) with a fresh ``mmap`` and unmaps it on ``free``. A training step allocates activations and
gradients of 0.2-8 MB and frees them by the next step, so each step mapped them anew and faulted
every page in on first touch: 1,500-7,000 page faults per step of the cVAE at 28x28 and of the
30-member grouped classifier, measured on a 2-core VM (bench/bench_host_memory.py has the before /
after). :func:`keep_freed_memory` serves blocks of up to 32 MiB from the heap and keeps freed heap
memory for reuse (no trimming below 1 GiB), so the next step reuses the same pages. Peak memory
grows little (the demo's stages: 1% for train and filter, 5% for evaluate); a process keeps its
peak heap until it exits, which a stage process does.

The CLI calls it once at start (``synthgen <stage>``); importing this module changes nothing, and
the library (e.g. ``SynthgenSampler`` in a notebook) does not change its host process's malloc: call
it there yourself. Settings a user gave (``MALLOC_*_`` variables or a ``glibc.malloc`` tunable) are
left alone, and ``SYNTHGEN_HOST_MEMORY=default`` keeps glibc's own behaviour.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit (half its heap size)
TRIM_THRESHOLD = 1 << 30
OPT_OUT = "SYNTHGEN_HOST_MEMORY"
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def user_configured(environ: Mapping[str, str]) -> bool:
    """Whether the environment already sets glibc's malloc, or opts out of this module."""
    return (environ.get(OPT_OUT, "").lower() == "default" or any(name in environ for name in USER_SETTINGS)
            or "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""))


def keep_freed_memory(environ: Mapping[str, str] | None = None) -> bool:
    """Set glibc's mmap threshold to 32 MiB and its trim threshold to 1 GiB for this process.

    Returns True when both settings took effect; False (and changes nothing) on a C library
    that does not take glibc's ``mallopt`` settings (macOS, musl, Windows), or when the environment
    configures malloc itself.
    """
    if user_configured(os.environ if environ is None else environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the running process's own symbols: glibc's on Linux
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
