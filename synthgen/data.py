"""Data layer shared by every stage: in-memory labeled image sets and the prepared splits on disk.

Contract:
* images are ``uint8`` arrays of shape (N, H, W, C), channels-last, C = 1 (grey) or 3 (RGB);
* labels are ``int64`` arrays of shape (N,) with values in ``0..K-1``;
* ``data/prepared/`` holds ``train.npz``, ``val.npz``, ``test.npz`` (keys ``x``, ``y``, ``index``)
  and ``meta.json`` (class names, image shape, per-split per-class counts). ``val`` may be empty:
  by default every labeled image trains (see :mod:`synthgen.prepare`).
Models see float tensors in [-1, 1], shape (N, C, H, W): see :mod:`synthgen.tensors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synthgen.io import read_json, save_npz, write_json

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Bad input data: the message names the file, field or class at fault."""


@dataclass(frozen=True)
class LabeledImages:
    """A labeled image set held in memory."""

    x: np.ndarray  # (N, H, W, C) uint8
    y: np.ndarray  # (N,) int64
    class_names: tuple[str, ...]
    index: np.ndarray | None = None  # (N,) position in the source, for provenance
    notes: tuple[str, ...] = ()  # what loading changed (e.g. grey images converted to RGB), for the summary

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.x.shape[1:])  # type: ignore[return-value]

    def counts(self) -> np.ndarray:
        return np.bincount(self.y, minlength=self.n_classes)

    def subset(self, positions: np.ndarray) -> "LabeledImages":
        index = self.index[positions] if self.index is not None else positions
        return LabeledImages(self.x[positions], self.y[positions], self.class_names, index, self.notes)


def random_per_class(labels: np.ndarray, counts, seed: int) -> np.ndarray:
    """Sorted positions of a seeded random subset with at most ``counts[c]`` rows of each class c."""
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[: int(n)] for c, n in enumerate(counts)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


@dataclass(frozen=True)
class PreparedData:
    """The three disjoint splits every later stage reads."""

    train: LabeledImages
    val: LabeledImages
    test: LabeledImages
    meta: dict

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.train.class_names

    @property
    def n_classes(self) -> int:
        return self.train.n_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape


# -------------------------------------------------------------- prepared split I/O
def save_prepared(out_dir: str | Path, data: PreparedData) -> None:
    """Write the splits and ``meta.json`` into ``out_dir`` (caller makes it atomic)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        split: LabeledImages = getattr(data, name)
        index = split.index if split.index is not None else np.arange(len(split.y))
        save_npz(out_dir / f"{name}.npz", x=split.x, y=split.y.astype(np.int64), index=index.astype(np.int64))
    write_json(out_dir / "meta.json", data.meta)


def load_prepared(prepared_dir: str | Path) -> PreparedData:
    """Read ``data/prepared/`` as written by ``synthgen prepare``."""
    prepared_dir = Path(prepared_dir)
    meta_path = prepared_dir / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path} not found: run `synthgen prepare` first")
    meta = read_json(meta_path)
    class_names = tuple(meta["class_names"])
    splits = {}
    for name in SPLITS:
        path = prepared_dir / f"{name}.npz"
        if not path.is_file():
            raise DataError(f"{path} not found: run `synthgen prepare` first")
        with np.load(path) as arrays:
            splits[name] = LabeledImages(arrays["x"], arrays["y"].astype(np.int64), class_names, arrays["index"])
    return PreparedData(meta=meta, **splits)


def check_disjoint(prepared: PreparedData) -> None:
    """Refuse to evaluate when the test split shares source images with train.

    Indices are positions in a source, so only splits cut from the same source are compared: a
    separate ``data.test_source`` has its own positions (0, 1, ...) that say nothing about train.
    """
    sources = prepared.meta.get("split_sources", {"train": "source", "test": "test_source" if prepared.meta.get("test_source") else "source"})
    train, test = prepared.train, prepared.test
    if sources["test"] != sources["train"] or train.index is None or test.index is None:
        return
    shared = np.intersect1d(train.index, test.index)
    if len(shared):
        raise DataError(f"test split shares {len(shared)} source indices with train (e.g. {shared[:5].tolist()})")
