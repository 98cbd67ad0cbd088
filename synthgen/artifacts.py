"""Readers of the artifacts that stages hand each other (no stage owns them).

* the candidate pool ``data/pool/`` written by ``generate`` (``shard-*.npz`` with
  ``x`` uint8 NHWC, ``y`` int64, ``sample_id`` int64, plus ``generate_summary.json``);
* the accepted set ``data/synthetic/`` committed by ``filter`` (``accepted-shards/``,
  ``manifest.csv``, and ``filter_summary.json``, the commit marker).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from synthgen.data import DataError, LabeledImages
from synthgen.io import read_json

POOL_SUMMARY = "generate_summary.json"
FILTER_SUMMARY = "filter_summary.json"


def shard_paths(directory: str | Path, prefix: str = "shard-") -> list[Path]:
    return sorted(Path(directory).glob(f"{prefix}*.npz"))


def read_shard(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path) as arrays:
        return {key: arrays[key] for key in ("x", "y", "sample_id")}


def _concat(shards: list[dict], image_shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not shards:
        height, width, channels = image_shape
        return np.zeros((0, height, width, channels), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return tuple(np.concatenate([s[key] for s in shards]) for key in ("x", "y", "sample_id"))  # type: ignore[return-value]


def _summary(path: Path, missing: str) -> dict:
    """A stage's summary JSON (its commit marker); a DataError saying ``missing`` when absent."""
    if not path.is_file():
        raise DataError(f"{path} not found: {missing}")
    return read_json(path)


def load_pool(pool_dir: str | Path) -> LabeledImages:
    """The whole unfiltered candidate pool (``index`` = sample_id), e.g. for the unfiltered ablation arm."""
    pool_dir = Path(pool_dir)
    summary = _summary(pool_dir / POOL_SUMMARY, "run `synthgen generate` first")
    shards = [read_shard(path) for path in shard_paths(pool_dir)]
    if not shards:
        raise DataError(f"{pool_dir} holds no shard-*.npz files")
    x, y, ids = _concat(shards, summary["image_shape"])
    return LabeledImages(x, y.astype(np.int64), tuple(summary["class_names"]), ids)


def load_accepted(synthetic_root: str | Path) -> LabeledImages:
    """The committed accepted set from its npz shards (``index`` = sample_id)."""
    root = Path(synthetic_root)
    summary = _summary(root / FILTER_SUMMARY, f"`synthgen filter` has not completed for {root}")
    x, y, ids = _concat([read_shard(path) for path in shard_paths(root / "accepted-shards")], summary["image_shape"])
    if len(y) != summary["accepted"]:
        raise DataError(f"{root / 'accepted-shards'} holds {len(y)} samples but {root / FILTER_SUMMARY} says {summary['accepted']}")
    return LabeledImages(x, y.astype(np.int64), tuple(summary["class_names"]), ids)


def load_manifest(synthetic_root: str | Path) -> pd.DataFrame:
    """manifest.csv with ``rejected_by`` = '' for accepted rows (CSV reads empty cells as NaN)."""
    manifest = pd.read_csv(Path(synthetic_root) / "manifest.csv")
    return manifest.assign(rejected_by=manifest["rejected_by"].fillna(""))
