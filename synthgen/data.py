"""Data layer: in-memory labeled image sets, the prepared train/val/test splits, tensor conversion.

Contract shared by every stage:
* images are ``uint8`` arrays of shape (N, H, W, C), channels-last, C = 1 (grey) or 3 (RGB);
* labels are ``int64`` arrays of shape (N,) with values in ``0..K-1``;
* ``data/prepared/`` holds ``train.npz``, ``val.npz``, ``test.npz`` (keys ``x``, ``y``, ``index``)
  and ``meta.json`` (class names, image shape, per-split per-class counts).
Models see float tensors in [-1, 1], shape (N, C, H, W): see :func:`to_tensor` / :func:`to_uint8`.

The ``prepare`` stage lives here too: :func:`load_source` (loaders in :mod:`synthgen.sources`),
:func:`make_splits` (pure, seeded) and :func:`main` (writes ``data/prepared/`` atomically).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from synthgen.config import Config, ConfigError, DataConfig
from synthgen.io import atomic_dir, read_json, save_npz, write_json

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
        return LabeledImages(self.x[positions], self.y[positions], self.class_names, index)


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


# ------------------------------------------------------------------ tensor conversion
def to_tensor(x: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1] on ``device``."""
    tensor = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    return tensor.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C) on the CPU (rounded, clamped)."""
    scaled = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round_()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


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


# ------------------------------------------------------------------------- loaders
def load_source(source: str, image_size: int | None = None, progress: bool = False) -> LabeledImages:
    """Load ``'digits'``, an ImageFolder dir, an ``.npz`` or IDX files (see :func:`synthgen.sources.load_source`)."""
    from synthgen import sources  # sources imports this module's containers

    return sources.load_source(source, image_size, progress)


# ------------------------------------------------------------------------- splits
def train_counts(config: DataConfig, n_classes: int) -> list[int] | None:
    """Scarce train images per class index: ``per_class``, the long tail, or None (all remaining).

    Long tail: class c gets ``floor(max * ratio ** (-c / (K - 1)) + 0.5)``, at least 1.
    """
    if config.per_class is not None:
        return [config.per_class] * n_classes
    if config.long_tail is not None:
        tail = config.long_tail
        return [max(1, math.floor(tail.max * tail.ratio ** (-c / (n_classes - 1)) + 0.5)) for c in range(n_classes)]
    return None


def _class_rng(seed: int, *key: int) -> np.random.Generator:
    """Independent stream per (seed, class[, purpose]): one class's draw never shifts another's."""
    return np.random.default_rng([seed % 2**64, *key])


def _split_class(positions: np.ndarray, n_train: int | None, config: DataConfig, own_test: bool, name: str, rng):
    """Shuffle one class's positions and cut them into (train, val, test) position arrays.

    Order of the cuts: val first, then train, then test, so the train split of a seed does not
    depend on ``test_per_class`` (nor on ``test_source``). When train takes "all remaining"
    (per_class and long_tail null) the order is val, test, train.
    """
    order = rng.permutation(positions)
    n_val, n_test, n = config.val_per_class, config.test_per_class, len(order)
    need_train = n_train if n_train is not None else 1
    need_test = (n_test or 1) if own_test else 0
    if n < n_val + need_train + need_test:
        rule = f"per-class train {n_train}" if n_train is not None else "at least 1 train image"
        test_part = f" + test {n_test or 'at least 1'}" if own_test else ""
        raise DataError(
            f"class {name!r} has {n} images, too few for val_per_class={n_val} + {rule}{test_part} "
            f"(= {n_val + need_train + need_test})"
        )
    val, rest = order[:n_val], order[n_val:]
    if n_train is None:
        test = rest[: (n_test or 0)] if own_test else rest[:0]
        return rest[len(test):], val, test
    train, rest = rest[:n_train], rest[n_train:]
    if not own_test:
        return train, val, rest[:0]
    return train, val, (rest[:n_test] if n_test is not None else rest)


def _align_test(test_images: LabeledImages, images: LabeledImages) -> LabeledImages:
    """Relabel the separate test set by class name so its labels match the source's."""
    if test_images.image_shape != images.image_shape:
        raise DataError(f"test_source images have shape {test_images.image_shape}, source images {images.image_shape}")
    names = list(test_images.class_names)
    unknown = [name for name in names if name not in images.class_names]
    missing = [name for name in images.class_names if name not in names]
    if unknown or missing:
        raise DataError(f"test_source classes differ from source: extra {unknown}, missing {missing}")
    mapping = np.array([images.class_names.index(name) for name in names], dtype=np.int64)
    return LabeledImages(test_images.x, mapping[test_images.y], images.class_names, test_images.index)


def make_splits(images: LabeledImages, config: DataConfig, test_images: LabeledImages | None = None) -> PreparedData:
    """Draw disjoint train/val/test splits per class, deterministically from ``config.seed``.

    val = ``val_per_class``; train = ``per_class``, the long tail (:func:`train_counts`) or all
    remaining images; test = the rest of the source (or ``test_per_class`` of it), or
    ``test_images`` (optionally subsampled to ``test_per_class``) when given. A class too small for
    its cuts is a DataError naming the class and the numbers.
    """
    own_test = test_images is None
    counts = train_counts(config, images.n_classes) or [None] * images.n_classes
    if own_test and counts[0] is None and config.test_per_class is None:
        raise ConfigError(
            "data.per_class and data.long_tail are null (train takes all remaining images): "
            "set data.test_source or data.test_per_class"
        )
    if not own_test:
        test_images = _align_test(test_images, images)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for label, name in enumerate(images.class_names):
        positions = np.flatnonzero(images.y == label)
        cuts = _split_class(positions, counts[label], config, own_test, name, _class_rng(config.seed, label))
        if not own_test:
            cuts = (*cuts[:2], _test_source_positions(test_images, label, name, config))
        for split, cut in zip(SPLITS, cuts):
            parts[split].append(cut)
    splits = {}
    for split in SPLITS:
        source = images if own_test or split != "test" else test_images
        splits[split] = source.subset(np.concatenate(parts[split]))
    _check_disjoint(splits, own_test)
    return PreparedData(meta=_meta(images, config, splits), **splits)


def _test_source_positions(test_images: LabeledImages, label: int, name: str, config: DataConfig) -> np.ndarray:
    """All of the class in the separate test set, or a seeded subsample of ``test_per_class``."""
    positions = np.flatnonzero(test_images.y == label)
    if config.test_per_class is None:
        return positions
    if len(positions) < config.test_per_class:
        raise DataError(
            f"class {name!r} has {len(positions)} test_source images, fewer than test_per_class={config.test_per_class}"
        )
    return np.sort(_class_rng(config.seed, label, 1).permutation(positions)[: config.test_per_class])


def _check_disjoint(splits: dict[str, LabeledImages], own_test: bool) -> None:
    """Invariant (not a user error): no index twice; test indexes another source when not own_test."""
    names = SPLITS if own_test else SPLITS[:2]
    seen: set[int] = set()
    for name in names:
        index = set(splits[name].index.tolist())
        if len(index) != len(splits[name].index) or seen & index:
            raise AssertionError(f"split {name!r} overlaps another split or repeats an index")
        seen |= index


def _meta(images: LabeledImages, config: DataConfig, splits: dict[str, LabeledImages]) -> dict:
    rule = "all_remaining"
    if config.per_class is not None or config.long_tail is not None:
        rule = "per_class" if config.per_class is not None else "long_tail"
    return {
        "source": config.source,
        "test_source": config.test_source,
        "class_names": list(images.class_names),
        "image_shape": list(images.image_shape),
        "counts": {name: dict(zip(images.class_names, split.counts().tolist())) for name, split in splits.items()},
        "source_counts": dict(zip(images.class_names, images.counts().tolist())),
        "split": {
            "rule": rule,
            "per_class": config.per_class,
            "long_tail": config.long_tail.model_dump() if config.long_tail is not None else None,
            "val_per_class": config.val_per_class,
            "test_per_class": config.test_per_class,
            "image_size": config.image_size,
            "order": "val, train, test" if rule != "all_remaining" else "val, test, train",
        },
        "seed": config.seed,
    }


# --------------------------------------------------------------------------- main
def summarize(data: PreparedData) -> dict:
    """Per-class count table plus totals (what ``summary.json`` holds)."""
    counts = data.meta["counts"]
    rows = [{"class": name, **{split: counts[split][name] for split in SPLITS}} for name in data.class_names]
    train = [row["train"] for row in rows]
    return {
        "n_classes": data.n_classes,
        "image_shape": list(data.image_shape),
        "classes": rows,
        "totals": {split: sum(row[split] for row in rows) for split in SPLITS},
        "train_imbalance_ratio": max(train) / max(1, min(train)),
    }


def _print_table(summary: dict) -> None:
    height, width, channels = summary["image_shape"]
    table = Table(title=f"prepared splits, {height}x{width}x{channels}")
    for column in ("class", *SPLITS):
        table.add_column(column, justify="right")
    for row in summary["classes"]:
        table.add_row(row["class"], *(str(row[split]) for split in SPLITS))
    table.add_row("total", *(str(summary["totals"][split]) for split in SPLITS), style="bold")
    Console().print(table)


def main(config: Config, out_dir: Path, progress: bool = True) -> PreparedData:
    """Load ``data.source`` (+ ``data.test_source``), split, write ``out_dir`` atomically, print counts.

    Nothing is written when anything fails: the splits are built in memory first and the
    directory is swapped in by :func:`synthgen.io.atomic_dir` only after every file is written.
    """
    data_config = config.data
    images = load_source(data_config.source, data_config.image_size, progress=progress)
    test_images = None
    if data_config.test_source is not None:
        test_images = load_source(data_config.test_source, data_config.image_size, progress=progress)
    prepared = make_splits(images, data_config, test_images)
    summary = summarize(prepared)
    with atomic_dir(out_dir) as tmp_dir:
        save_prepared(tmp_dir, prepared)
        write_json(tmp_dir / "summary.json", summary)
    _print_table(summary)
    return prepared
