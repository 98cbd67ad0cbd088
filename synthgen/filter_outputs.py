"""The filter stage's outputs, built in a temp directory and swapped in whole (:func:`synthgen.io.atomic_dir`).

Layout of the synthetic root (``data/synthetic/``, the filter stage's one DVC output)::

    accepted/<class_name>/<sample_id>.png   ImageFolder view (grey 'L' or RGB, real image size)
    accepted-shards/shard-00000.npz         the same samples as npz shards (x, y, sample_id): fast to load
    manifest.csv                            one row per candidate, every rejection explained
    figures/                                score_histograms.png (thresholds drawn), accepted_vs_rejected.png
    filter_summary.json                     per-class counts, acceptance per filter, thresholds, shortfalls

A killed or failed run leaves the previous root exactly as it was; :func:`load_accepted` also
checks that the shards agree with the summary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from synthgen.artifacts import FILTER_SUMMARY, load_accepted, read_shard, shard_paths
from synthgen.data import DataError
from synthgen.filters import FILTERS, SCORE_COLUMNS, judged
from synthgen.grids import save_labeled_grid
from synthgen.io import atomic_dir, atomic_write_text, read_json, save_npz, write_json
from synthgen.png_tree import write_tree

MANIFEST_COLUMNS = ["sample_id", "class", "label", "round", *(SCORE_COLUMNS[name] for name in FILTERS), "accepted", "rejected_by"]
GRID_PER_CLASS = 8
EXPORT_MARK = ".synthgen-export"  # marks a folder export may replace; ImageFolder ignores files beside the class folders


def manifest_table(table: pd.DataFrame, class_names) -> pd.DataFrame:
    manifest = table.assign(**{"class": np.asarray(class_names, dtype=object)[table["label"].to_numpy()]})
    return manifest[MANIFEST_COLUMNS]


IMAGE_FOLDER_OFF_NOTE = (
    "filter.image_folder is false: the accepted samples are only in ../accepted-shards/ (npz: x, y, sample_id).\n"
    "Write them as an ImageFolder tree with:  synthgen export --synthetic data/synthetic --out <dir>\n"
)


def _write_accepted(work_dir: Path, table: pd.DataFrame, shards: list[Path], class_names, image_folder: bool = True,
                    workers: int | str = "auto") -> dict:
    """Pass over the candidate shards writing the accepted shards, then their PNG tree (if ``image_folder``:
    :func:`synthgen.png_tree.write_tree`, ``workers`` processes); returns grid examples per class."""
    accepted_ids = table.loc[table["accepted"], "sample_id"].to_numpy()
    rejected_ids = table.loc[~table["accepted"], "sample_id"].to_numpy()
    image_dir, shard_dir = work_dir / "accepted", work_dir / "accepted-shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    examples: dict = {(c, kind): [] for c in range(len(class_names)) for kind in ("accepted", "rejected")}
    written = 0
    for path in shards:
        shard = read_shard(path)
        mask = np.isin(shard["sample_id"], accepted_ids)
        if mask.any():
            save_npz(shard_dir / f"shard-{written:05d}.npz", x=shard["x"][mask], y=shard["y"][mask], sample_id=shard["sample_id"][mask])
            written += 1
        for kind, kind_mask in (("accepted", mask), ("rejected", np.isin(shard["sample_id"], rejected_ids))):
            for image, label in zip(shard["x"][kind_mask], shard["y"][kind_mask]):
                if len(examples[label, kind]) < GRID_PER_CLASS:
                    examples[label, kind].append(image)
    if image_folder:
        write_tree(shard_paths(shard_dir), image_dir, class_names, workers)
    else:  # the DVC out still exists, and says where the samples are
        image_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(image_dir / "README.txt", IMAGE_FOLDER_OFF_NOTE)
    return examples


def _grid_figure(examples: dict, class_names, image_shape, path: Path) -> None:
    """One row per class, its name beside it: up to 8 accepted samples, then up to 8 rejected (blank where missing)."""
    rows = []
    for label in range(len(class_names)):
        accepted = examples[label, "accepted"][:GRID_PER_CLASS]
        rows.append(accepted + [np.full(image_shape, 128, np.uint8)] * (GRID_PER_CLASS - len(accepted)) + examples[label, "rejected"])
    save_labeled_grid(rows, class_names, path, image_shape, 2 * GRID_PER_CLASS, ("accepted", "rejected"))


def _histogram_figure(table: pd.DataFrame, filters: dict, class_names, path: Path) -> None:
    """One panel per active filter: candidate scores, each class's threshold drawn as a vertical line."""
    active = [name for name in FILTERS if filters.get(name) is not None]
    figure = Figure(figsize=(4.5 * max(len(active), 1), 3.2))
    for position, name in enumerate(active):
        axis = figure.add_subplot(1, len(active), position + 1)
        scores = table[SCORE_COLUMNS[name]].to_numpy()
        axis.hist(scores[np.isfinite(scores)], bins=40, color="0.6")
        for label, class_name in enumerate(class_names):  # per-class thresholds (calibrated) of the judged classes
            if not judged(filters[name], label):
                continue
            axis.axvline(filters[name].thresholds_[label], color=f"C{label % 10}", linewidth=0.8, label=str(class_name))
        axis.set_title(f"{SCORE_COLUMNS[name]} (lines: class thresholds)", fontsize=9)
    if active and figure.axes[-1].get_legend_handles_labels()[1]:  # no lines when that filter judges no class
        figure.axes[-1].legend(fontsize=6, ncol=2, loc="upper right")
    figure.savefig(path, dpi=80)


def write_outputs(work_dir: Path, table: pd.DataFrame, shards: list[Path], class_names, filters: dict, summary: dict,
                  image_folder: bool = True, workers: int | str = "auto") -> None:
    """Write every output into ``work_dir`` (the temp dir that becomes the root); nothing outside it is touched."""
    class_names = list(class_names)
    first = read_shard(shards[0])["x"] if shards else None
    image_shape = list(first.shape[1:]) if first is not None else summary.get("image_shape", [1, 1, 1])
    examples = _write_accepted(work_dir, table, shards, class_names, image_folder, workers)
    atomic_write_text(work_dir / "manifest.csv", manifest_table(table, class_names).to_csv(index=False))
    figures = work_dir / "figures"
    figures.mkdir()
    _histogram_figure(table, filters, class_names, figures / "score_histograms.png")
    _grid_figure(examples, class_names, image_shape, figures / "accepted_vs_rejected.png")
    write_json(work_dir / FILTER_SUMMARY, {"class_names": class_names, "image_shape": image_shape, **summary})


def export_image_folder(synthetic_root: str | Path, out_dir: str | Path, workers: int | str = "auto") -> int:
    """Write the committed accepted set as ``out_dir/<class_name>/<sample_id>.png`` from its shards, by
    ``workers`` processes (:func:`synthgen.png_tree.write_tree`).

    Built in a temp sibling and swapped in at the end (:func:`synthgen.io.atomic_dir`), so an
    interrupted export leaves no half-written tree. Returns the number of images written.
    """
    root, out_dir = Path(synthetic_root), Path(out_dir)
    load_accepted(root)  # refuses a root without a committed summary, or whose shards disagree with it
    check_export_target(root, out_dir)
    class_names = read_json(root / FILTER_SUMMARY)["class_names"]
    with atomic_dir(out_dir) as tmp:
        atomic_write_text(tmp / EXPORT_MARK, "an ImageFolder tree written by `synthgen export`; the next export replaces it\n")
        return write_tree(shard_paths(root / "accepted-shards"), tmp, class_names, workers)


def check_export_target(synthetic_root: Path, out_dir: Path) -> None:
    """The export replaces ``out_dir`` whole: refuse one that holds anything but an earlier export, or overlaps the
    synthetic root (``.`` or ``data/`` would take the project with it)."""
    out, root = out_dir.resolve(), synthetic_root.resolve()
    if out == root or out in root.parents or root in out.parents:
        raise DataError(f"--out {out_dir} overlaps the synthetic root {synthetic_root}: export to a folder of its own")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out_dir} is a file: export to a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_MARK).is_file():
        raise DataError(f"--out {out_dir} holds files that are not an earlier export, and the export would replace them: "
                        f"choose a new or empty folder")
