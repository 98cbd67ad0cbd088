"""Benchmark of the evaluation harness's training loop: E seeds one at a time against E seeds as one grouped network.

Usage (from the repo root):
    OMP_NUM_THREADS=2 nice -n 5 .venv/bin/python bench/bench_evaluate.py

For 8x8 (sklearn digits) and 28x28 (MNIST t10k from ``--mnist``; skipped with a message when
absent), each with ``--per-class`` training images per class, trains ``--seeds`` CNNs of
``--steps`` steps with :func:`synthgen.models.classifier.fit_members`, ``batched=False`` then
``batched=True``, and prints wall seconds, the speed-up and the largest difference between the
two runs' predicted probabilities on ``--eval-rows`` other images of the same source (and how
often their predicted classes agree). Both paths
are warmed up first (a 2-step run each), so one-time kernel set-up is charged to neither.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from synthgen.models.classifier import fit_members
from synthgen.host_memory import keep_freed_memory

app = typer.Typer(add_completion=False)


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1797 digits as uint8 (N, 8, 8, 1), 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None], digits.target.astype(np.int64)


def split(x: np.ndarray, y: np.ndarray, per_class: int, eval_rows: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """``per_class`` training images of every class, and up to ``eval_rows`` of the rest for scoring."""
    rng = np.random.default_rng(seed)
    train = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)])
    rest = rng.permutation(np.setdiff1d(np.arange(len(y)), train))[:eval_rows]
    return x[train], y[train], x[rest], y[rest]


def compare(name: str, x: np.ndarray, y: np.ndarray, args: dict) -> tuple:
    """One table row: seconds one at a time, seconds batched, ratio, max |p_batched - p_alone|, the fraction of
    (member, image) predictions that agree, and the mean accuracy of each run."""
    train_x, train_y, eval_x, eval_y = split(x, y, args.pop("per_class"), args.pop("eval_rows"))
    seeds = list(range(args.pop("n_seeds")))
    for batched in (False, True):  # warm-up: kernel selection and allocator pools for both layouts
        fit_members(train_x, train_y, seeds, **dict(args, steps=2), batched=batched)
    timings, probas = {}, {}
    for batched in (False, True):
        start = time.perf_counter()
        members = fit_members(train_x, train_y, seeds, **args, batched=batched)
        timings[batched] = time.perf_counter() - start
        probas[batched] = members.predict_proba(eval_x)
    accuracy = {batched: (proba.argmax(axis=2) == eval_y).mean() for batched, proba in probas.items()}
    difference = float(np.abs(probas[True] - probas[False]).max())
    agree = float((probas[True].argmax(axis=2) == probas[False].argmax(axis=2)).mean())
    return (name, len(train_y), timings[False], timings[True], timings[False] / timings[True], difference, agree,
            accuracy[False], accuracy[True])


@app.command()
def main(
    mnist: Annotated[Path, typer.Option(help="Directory with the MNIST t10k IDX files.")] = Path("../shared/data/mnist-t10k"),
    seeds: Annotated[int, typer.Option(help="Members (seeds) trained per run.")] = 5,
    steps: Annotated[int, typer.Option(help="Training steps per member.")] = 300,
    width: Annotated[int, typer.Option(help="CNN width (evaluate.width defaults to 16).")] = 16,
    per_class: Annotated[int, typer.Option(help="Training images per class.")] = 10,
    eval_rows: Annotated[int, typer.Option(help="Held-out images whose probabilities are compared.")] = 1000,
    augment: Annotated[bool, typer.Option(help="Classical augmentation (the real+classic recipe).")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
) -> None:
    keep_freed_memory()  # as the CLI runs the stages (SYNTHGEN_HOST_MEMORY=default: glibc's own malloc)
    console = Console(width=160)
    threads = os.environ.get("OMP_NUM_THREADS")
    console.print("$ " + (f"OMP_NUM_THREADS={threads} " if threads else "") + shlex.join([sys.executable, *sys.argv]), highlight=False)
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {seeds} seeds x {steps} steps, width {width}, "
                  f"batch 64, augment={augment}, device={device}", highlight=False)
    settings = dict(n_seeds=seeds, steps=steps, width=width, per_class=per_class, eval_rows=eval_rows, augment=augment, device=device)
    rows = [compare("digits 8x8", *digits_images(), dict(settings))]
    if (mnist / "t10k-images-idx3-ubyte.gz").is_file() or (mnist / "t10k-images-idx3-ubyte").is_file():
        from synthgen.sources import load_source

        images = load_source(str(mnist))
        rows.append(compare("MNIST 28x28", images.x, images.y, dict(settings)))
    else:
        console.print(f"MNIST not found at {mnist}: 28x28 row skipped")
    table = Table(title="fit_members: one at a time vs batched")
    columns = ("images", "train images", "one at a time s", "batched s", "speed-up", "max |dp|", "same argmax", "acc alone", "acc batched")
    for column in columns:
        table.add_column(column, justify="left" if column == "images" else "right")
    for name, n_train, alone, together, ratio, difference, agree, acc_alone, acc_batched in rows:
        table.add_row(name, str(n_train), f"{alone:.1f}", f"{together:.1f}", f"{ratio:.2f}x", f"{difference:.1e}",
                      f"{agree:.3f}", f"{acc_alone:.3f}", f"{acc_batched:.3f}")
    console.print(table)


if __name__ == "__main__":
    app()
