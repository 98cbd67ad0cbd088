"""Shared pytest fixtures: the real MNIST test split (when present) and a tiny prepared dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

# /work/main/tests/conftest.py -> /work/shared/data/mnist-t10k (never copied into the repo)
MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-t10k"


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """Directory holding the real MNIST t10k IDX files, or skip the test."""
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST not found at {MNIST_DIR}")
    return MNIST_DIR


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> Path:
    """A prepared dir from sklearn digits: 8 train, 4 val, 10 test images per class (8x8x1)."""
    from synthgen import data
    from synthgen.config import Config, DataConfig

    config = Config(data=DataConfig(source="digits", per_class=8, val_per_class=4, test_per_class=10, seed=0))
    out_dir = tmp_path_factory.mktemp("tiny") / "prepared"
    data.main(config, out_dir, progress=False)
    return out_dir
