"""Benchmark of the data layer: IDX parsing, ImageFolder decoding, split drawing, the full prepare.

Usage (from the repo root):
    nice -n 5 .venv/bin/python bench/bench_data.py --mnist ../shared/data/mnist-t10k --n-files 5000

Prints one table row per operation: images, wall seconds, images per second and the process's
peak resident memory after the step (ru_maxrss, so it only grows).
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
from PIL import Image
from rich.console import Console
from rich.table import Table

from synthgen import data
from synthgen.sources import load_source
from synthgen.config import Config, DataConfig
from synthgen.sources import load_image_folder

app = typer.Typer(add_completion=False)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(rows: list, name: str, n_images: int | None, fn):
    """Run ``fn`` once; ``n_images=None`` counts the images of the LabeledImages it returns."""
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    n_images = len(result.y) if n_images is None else n_images
    rows.append((name, n_images, seconds, n_images / seconds, _peak_mib()))
    return result


def _write_folder(root: Path, images: data.LabeledImages, n_files: int) -> None:
    for i in range(n_files):
        folder = root / images.class_names[images.y[i]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images.x[i, ..., 0]).save(folder / f"{i:06d}.png")


@app.command()
def main(
    mnist: Annotated[Path, typer.Option(help="Directory with MNIST t10k IDX files.")] = Path("../shared/data/mnist-t10k"),
    n_files: Annotated[int, typer.Option(help="PNG files written for the ImageFolder benchmark.")] = 5000,
) -> None:
    rows: list = []
    source = str(mnist) if mnist.exists() else "digits"
    images = _timed(rows, f"load_source({Path(source).name})", None, lambda: load_source(source))
    config = DataConfig(source=source, per_class=20, val_per_class=10)
    _timed(rows, "make_splits (per_class=20)", len(images.y), lambda: prepare.make_splits(images, config))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "folder"
        n_files = min(n_files, len(images.y))
        _timed(rows, "write PNGs (PIL)", n_files, lambda: _write_folder(root, images, n_files))
        _timed(rows, "load_image_folder", None, lambda: load_image_folder(root, progress=False))
        _timed(rows, "load_image_folder, image_size=32", None, lambda: load_image_folder(root, 32, progress=False))
        prepare = Config(data=config)
        _timed(rows, "prepare main (load+split+write)", len(images.y),
               lambda: prepare.main(prepare, Path(tmp) / "prepared", progress=False))
    table = Table(title=f"data layer benchmark ({source})")
    for column in ("operation", "images", "seconds", "images/s", "peak RSS MiB"):
        table.add_column(column, justify="right" if column != "operation" else "left")
    for name, n_images, seconds, rate, peak in rows:
        table.add_row(name, str(n_images), f"{seconds:.3f}", f"{rate:,.0f}", f"{peak:.0f}")
    Console().print(table)


if __name__ == "__main__":
    app()
