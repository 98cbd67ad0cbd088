"""What calibrating the filters without held-out images costs, against the old single held-out split.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_calibration.py [--per-class 10] [--repeats 3]

On MNIST (``../shared/data/mnist-t10k``), ``--per-class`` training images per class. Two ways to
fit the confidence and novelty filters (:func:`synthgen.filter.fit_filters`), side by side:

* held-out (the old default): 10 extra real images per class calibrate the thresholds;
* cross-fitted (the new default, ``data.val_per_class: 0``): out-of-fold probabilities of
  ``filter.calibration_folds`` classifiers and leave-one-out novelty scales, no extra images.

Prints the median seconds of each and their ratio, and the per-class classifier thresholds both
give (how much the calibration moves).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from synthgen.config import load_config
from synthgen.data import LabeledImages, PreparedData
from synthgen.filter import fit_filters
from synthgen.prepare import make_splits
from synthgen.sources import load_source
from synthgen.host_memory import keep_freed_memory

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-t10k"


def _timed(config, prepared: PreparedData, repeats: int) -> tuple[float, dict]:
    seconds, filters = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        filters = fit_filters(config.filter, prepared, None, torch.device("cpu"))
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), filters


def main(per_class: int = 10, repeats: int = 3, source: Path = MNIST) -> None:
    keep_freed_memory()  # as the CLI runs the stages (SYNTHGEN_HOST_MEMORY=default: glibc's own malloc)
    if not (source / "t10k-images-idx3-ubyte.gz").is_file():
        raise typer.BadParameter(f"MNIST not found at {source}")
    console = Console()
    console.print(f"command: OMP_NUM_THREADS={torch.get_num_threads()} python bench/bench_calibration.py --per-class {per_class} --repeats {repeats}")
    images = load_source(str(source))
    held = load_config(None, [f"data.per_class={per_class}", "data.val_per_class=10", "data.test_per_class=10", "filter.device=cpu"])
    split = make_splits(images, held.data)
    empty = LabeledImages(split.val.x[:0], split.val.y[:0], split.class_names, split.val.index[:0])
    crossfit = PreparedData(split.train, empty, split.test, split.meta)  # the same training images, nothing held out
    rows = [("held-out (10 extra per class)", *_timed(held, split, repeats)),
            (f"cross-fitted ({held.filter.calibration_folds} folds, no extra images)", *_timed(held, crossfit, repeats))]
    table = Table(title=f"filter calibration, MNIST {per_class}/class, classifier_steps={held.filter.classifier_steps}, median of {repeats}")
    for column in ("calibration", "seconds", "ratio", "classifier thresholds per class", "novelty scales per class"):
        table.add_column(column)
    for name, seconds, filters in rows:
        table.add_row(name, f"{seconds:.1f}", f"{seconds / rows[0][1]:.2f}x",
                      " ".join(f"{t:.2f}" for t in filters["classifier"].thresholds_),
                      " ".join(f"{s:.2f}" for s in np.asarray(filters["novelty"].scales_)))
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
