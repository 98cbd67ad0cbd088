"""synthgen.host_memory: the CLI's malloc settings remove a training loop's page faults, and yield to the user's own."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from synthgen.host_memory import keep_freed_memory, user_configured

ROOT = Path(__file__).resolve().parents[1]

# a fresh process: 30 small CNNs as one grouped network on 8x8 images (the evaluate stage's baselines), minor page
# faults per step over 10 steps after 5 warm-up steps
LOOP = """
import json, resource, sys
import numpy as np, torch
from synthgen.host_memory import keep_freed_memory
from synthgen.models.members import fit_members
torch.set_num_threads(1)
applied = keep_freed_memory()
rng = np.random.default_rng(0)
x, y = rng.integers(0, 256, (100, 8, 8, 1), dtype=np.uint8), np.arange(100) % 10
fit_members(x, y, list(range(30)), n_classes=10, width=16, steps=5, batched=True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
fit_members(x, y, list(range(30)), n_classes=10, width=16, steps=10, batched=True)
print(json.dumps({"applied": applied, "faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10}))
"""


@pytest.mark.parametrize("environ", [
    {"SYNTHGEN_HOST_MEMORY": "default"}, {"MALLOC_MMAP_THRESHOLD_": "131072"}, {"MALLOC_TRIM_THRESHOLD_": "0"},
    {"MALLOC_TOP_PAD_": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"},
])
def test_the_users_own_malloc_settings_are_left_alone(environ):
    assert user_configured(environ)
    assert keep_freed_memory(environ) is False


def test_other_environments_are_not_user_settings():
    assert not user_configured({"SYNTHGEN_HOST_MEMORY": "", "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2", "OMP_NUM_THREADS": "2"})


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt settings of glibc on Linux")
def test_kept_freed_memory_removes_the_page_faults_of_a_grouped_training_loop():
    def faults(extra: dict) -> dict:
        env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_") and key != "GLIBC_TUNABLES"}
        result = subprocess.run([sys.executable, "-c", LOOP], env={**env, **extra, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                                capture_output=True, text=True, check=True, timeout=300)
        return json.loads(result.stdout.strip().splitlines()[-1])

    default, kept = faults({"SYNTHGEN_HOST_MEMORY": "default"}), faults({})
    assert default["applied"] is False and kept["applied"] is True
    # glibc's own behaviour maps and faults in most activations anew every step (thousands of faults here)
    assert kept["faults_per_step"] <= max(50.0, default["faults_per_step"] / 4), (default, kept)
