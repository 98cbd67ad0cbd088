"""Stage ``prepare``: load the user's labeled images and cut the train / val / test splits.

Pure core :func:`make_splits` (seeded, per class) plus :func:`main`, which loads
``data.source`` (and ``data.test_source`` / ``data.val_source``) through :mod:`synthgen.sources`
and writes ``data/prepared/`` atomically.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from synthgen.config import Config, ConfigError, DataConfig
from synthgen.data import SPLITS, DataError, LabeledImages, PreparedData, save_prepared
from synthgen.io import atomic_dir, write_json
from synthgen.sources import load_source


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

    Order of the cuts: val first (none by default), then train, then test, so the train split of a
    seed does not depend on ``test_per_class`` (nor on ``test_source``). When train takes "all
    remaining" (per_class and long_tail null) the order is val, test, train. A class needs one
    training image, plus its val and (own) test cuts: a one-image class is fine.
    """
    order = rng.permutation(positions)
    n_val, n_test, n = config.val_per_class, config.test_per_class, len(order)
    need_train = n_train if n_train is not None else 1
    need_test = (n_test or 1) if own_test else 0
    if n < n_val + need_train + need_test:
        rule = f"per-class train {n_train}" if n_train is not None else "at least 1 train image"
        test_part = f" + test {n_test or 'at least 1'}" if own_test else ""
        hint = " (set data.val_per_class: 0 to keep every image for training)" if n_val else ""
        raise DataError(
            f"class {name!r} has {n} images, too few for val_per_class={n_val} + {rule}{test_part} "
            f"(= {n_val + need_train + need_test}){hint}"
        )
    val, rest = order[:n_val], order[n_val:]
    if n_train is None:
        test = rest[: (n_test or 0)] if own_test else rest[:0]
        return rest[len(test):], val, test
    train, rest = rest[:n_train], rest[n_train:]
    if not own_test:
        return train, val, rest[:0]
    return train, val, (rest[:n_test] if n_test is not None else rest)


def match_channels(sets: dict[str, LabeledImages | None]) -> tuple[dict[str, LabeledImages | None], list[str]]:
    """Grey sets become RGB (R = G = B) when another set is RGB; returns the sets and one note per conversion.

    ``sets`` maps the params field ('source', 'test_source', 'val_source') to its images (or None).
    Same rule as inside one ImageFolder (see :mod:`synthgen.image_folder`): converting grey loses nothing.
    """
    present = {field: images for field, images in sets.items() if images is not None}
    if len({images.image_shape[-1] for images in present.values()}) < 2:
        return sets, []
    converted, notes = dict(sets), []
    for field, images in present.items():
        if images.image_shape[-1] == 1:
            converted[field] = dataclasses.replace(images, x=np.repeat(images.x, 3, axis=-1))
            notes.append(f"data.{field}: converted its {len(images.y)} grey images to RGB (another source is RGB)")
    return converted, notes


def align_classes(other: LabeledImages, images: LabeledImages, field: str, where: str = "") -> LabeledImages:
    """Relabel a separate labeled set (``field``: 'test_source' or 'val_source') by class name so its
    labels match the source's; its classes and image shape must equal the source's. ``where`` names
    the two paths in the error."""
    if other.image_shape != images.image_shape:
        raise DataError(
            f"data.{field} images have shape {other.image_shape} (H, W, C), data.source images {images.image_shape}: "
            "set data.image_size to resize both, or convert them to the same size"
        )
    names = list(other.class_names)
    unknown = [name for name in names if name not in images.class_names]
    missing = [name for name in images.class_names if name not in names]
    if unknown or missing:
        raise DataError(f"data.{field} classes differ from data.source: extra {unknown}, missing {missing}{where}")
    mapping = np.array([images.class_names.index(name) for name in names], dtype=np.int64)
    return LabeledImages(other.x, mapping[other.y], images.class_names, other.index)


def combine_sources(images: LabeledImages, test_images: LabeledImages | None, val_images: LabeledImages | None,
                    paths: dict[str, str | None] | None = None):
    """(source, test, val, notes): one channel count for all, the separate sets' labels aligned to the
    source's by class name, and every loading note (those of test/val prefixed with their field)."""
    sets, notes = match_channels({"source": images, "test_source": test_images, "val_source": val_images})
    images, aligned = sets["source"], {}
    for field in ("test_source", "val_source"):
        other = sets[field]
        if other is not None:
            notes += [f"data.{field}: {note}" for note in other.notes]
            where = f" ({paths[field]} against {paths['source']})" if paths else ""
            other = align_classes(other, images, field, where)
        aligned[field] = other
    return images, aligned["test_source"], aligned["val_source"], [*images.notes, *notes]


def make_splits(images: LabeledImages, config: DataConfig, test_images: LabeledImages | None = None,
                val_images: LabeledImages | None = None) -> PreparedData:
    """Draw disjoint train/val/test splits per class, deterministically from ``config.seed``.

    val = ``val_per_class`` images per class (0 by default: nothing is held out), or all of
    ``val_images`` (``data.val_source``); train = ``per_class``, the long tail
    (:func:`train_counts`) or all remaining images; test = the rest of the source (or
    ``test_per_class`` of it), or ``test_images`` (optionally subsampled to ``test_per_class``).
    A class too small for its cuts is a DataError naming the class and the numbers.
    """
    own_test = test_images is None
    counts = train_counts(config, images.n_classes) or [None] * images.n_classes
    if own_test and counts[0] is None and config.test_per_class is None:
        raise ConfigError(
            "data.per_class and data.long_tail are null (train takes all remaining images): "
            "set data.test_source or data.test_per_class"
        )
    paths = {"source": config.source, "test_source": config.test_source, "val_source": config.val_source}
    images, test_images, val_images, notes = combine_sources(images, test_images, val_images, paths)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for label, name in enumerate(images.class_names):
        positions = np.flatnonzero(images.y == label)
        cuts = _split_class(positions, counts[label], config, own_test, name, _class_rng(config.seed, label))
        if not own_test:
            cuts = (*cuts[:2], _test_source_positions(test_images, label, name, config))
        for split, cut in zip(SPLITS, cuts):
            parts[split].append(cut)
    origin = {"train": images, "val": images if val_images is None else val_images, "test": images if own_test else test_images}
    splits = {split: origin[split].subset(np.concatenate(parts[split])) for split in SPLITS}
    if val_images is not None:
        splits["val"] = val_images
    _check_disjoint(splits, [split for split in SPLITS if origin[split] is images])
    notes += _check_copies(splits, [split for split in ("test", "val") if origin[split] is not images])
    return PreparedData(meta=_meta(images, config, splits, notes), **splits)


def _check_copies(splits: dict[str, LabeledImages], separate: list[str]) -> list[str]:
    """Notes on the ``separate`` splits' images (test / val from their own source) identical to a training image;
    a DataError when they are most of the split.

    A separate source is not disjoint images: ``data.test_source`` may be ``data.source`` under another
    name (``./x.npz``, an absolute path, a link) or a copy of it, and then every arm would be scored on
    its own training images (or the filters calibrated on them). Splits cut from ``data.source`` are
    disjoint by index; files duplicated within it are the user's data, not checked here.
    """
    train = {image.tobytes() for image in splits["train"].x}
    notes = []
    for name in separate:
        split = splits[name]
        copies = sum(image.tobytes() in train for image in split.x)
        if copies * 2 > len(split.y):
            raise DataError(f"{copies} of the {len(split.y)} {name} images are identical to training images: the {name} set "
                            f"must be other images (is data.{name}_source data.source under another name, or a copy of it?)")
        if copies:
            notes.append(f"{copies} of the {len(split.y)} {name} images are identical to a training image")
    return notes


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


def _check_disjoint(splits: dict[str, LabeledImages], same_source: list[str]) -> None:
    """Invariant (not a user error): the splits cut from ``data.source`` share no index and repeat none."""
    seen: set[int] = set()
    for name in same_source:
        index = set(splits[name].index.tolist())
        if len(index) != len(splits[name].index) or seen & index:
            raise AssertionError(f"split {name!r} overlaps another split or repeats an index")
        seen |= index


def _meta(images: LabeledImages, config: DataConfig, splits: dict[str, LabeledImages], notes: list[str]) -> dict:
    rule = "all_remaining"
    if config.per_class is not None or config.long_tail is not None:
        rule = "per_class" if config.per_class is not None else "long_tail"
    return {
        "source": config.source,
        "test_source": config.test_source,
        "val_source": config.val_source,
        # which source each split's `index` points into (provenance checks compare like with like)
        "split_sources": {
            "train": "source",
            "val": "val_source" if config.val_source is not None else "source",
            "test": "test_source" if config.test_source is not None else "source",
        },
        "notes": notes,  # what loading changed, e.g. grey images converted to RGB
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
        "notes": data.meta.get("notes", []),
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
    for note in summary.get("notes", []):
        Console().print(f"note: {note}")


def main(config: Config, out_dir: Path, progress: bool = True) -> PreparedData:
    """Load ``data.source`` (+ ``test_source``, ``val_source``), split, write ``out_dir`` atomically, print counts.

    Nothing is written when anything fails: the splits are built in memory first and the
    directory is swapped in by :func:`synthgen.io.atomic_dir` only after every file is written.
    """
    data_config = config.data
    images = load_source(data_config.source, data_config.image_size, progress=progress)
    test_images, val_images = (
        None if path is None else load_source(path, data_config.image_size, progress=progress)
        for path in (data_config.test_source, data_config.val_source)
    )
    prepared = make_splits(images, data_config, test_images, val_images)
    summary = summarize(prepared)
    with atomic_dir(out_dir) as tmp_dir:
        save_prepared(tmp_dir, prepared)
        write_json(tmp_dir / "summary.json", summary)
    _print_table(summary)
    return prepared
