"""Training throughput before/after in one run: contiguous (NCHW) vs channels-last (NHWC) tensors.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_train_speed.py                # MNIST 20/class, every model
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_train_speed.py --models cvae --steps 200

Trains each model with :func:`synthgen.train.fit_generator` (the stage's own loop) on scarce
28x28 MNIST (``--source``; random images when it is absent) for ``--steps`` steps with
``train.channels_last`` false, then true, ``--repeats`` times interleaved, and prints real images
per second (best of the repeats), the ratio, and the final loss of each layout (the same function:
the losses differ only by float rounding). Machines here are shared and noisy, so read the ratio.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from synthgen import train as train_stage
from synthgen.config import load_config
from synthgen.data import random_per_class
from synthgen.sources import load_source


def scarce_mnist(source: Path, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    if not source.exists():
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (10 * per_class, 28, 28, 1), dtype=np.uint8), np.repeat(np.arange(10), per_class)
    images = load_source(str(source))
    rows = random_per_class(images.y, [per_class] * images.n_classes, 0)
    return images.x[rows], images.y[rows]


def throughput(model: str, channels_last: bool, steps: int, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(real images per second, final logged loss) of one fresh training run on the CPU."""
    config = load_config(None, [f"train.model={model}", f"train.steps={steps}", f"train.channels_last={str(channels_last).lower()}",
                                "train.device=cpu", f"train.log_every={steps}"]).train
    _, _, summary = train_stage.fit_generator(config, x, y)
    losses = summary["final_losses"]
    return summary["images_per_s"], float(losses.get("loss", losses.get("loss_g", float("nan"))))


def main(
    source: Annotated[Path, typer.Option(help="MNIST IDX directory.")] = Path(__file__).resolve().parents[2] / "shared/data/mnist-t10k",
    per_class: Annotated[int, typer.Option(help="Training images per class.")] = 20,
    models: Annotated[str, typer.Option(help="Comma-separated models.")] = "cvae,vaegan,cgan",
    steps: Annotated[int, typer.Option(help="Training steps per run.")] = 60,
    repeats: Annotated[int, typer.Option(help="Interleaved runs per layout (best is reported).")] = 2,
) -> None:
    console = Console()
    x, y = scarce_mnist(source, per_class)
    table = Table(title=f"train throughput, {len(y)} images {x.shape[1:]}, {steps} steps, {torch.get_num_threads()} threads (`bench/bench_train_speed.py`)")
    for column in ("model", "NCHW img/s", "channels-last img/s", "ratio", "final loss NCHW / NHWC"):
        table.add_column(column, justify="right")
    results = {}
    for model in models.split(","):
        runs = {False: [], True: []}
        for _ in range(repeats):
            for layout in (False, True):
                runs[layout].append(throughput(model, layout, steps, x, y))
        before, after = max(r[0] for r in runs[False]), max(r[0] for r in runs[True])
        results[model] = {"nchw": before, "channels_last": after, "ratio": after / before,
                          "loss": [runs[False][0][1], runs[True][0][1]]}
        table.add_row(model, f"{before:.0f}", f"{after:.0f}", f"{after / before:.2f}x", f"{runs[False][0][1]:.3f} / {runs[True][0][1]:.3f}")
    console.print(table)
    console.print(json.dumps(results))


if __name__ == "__main__":
    typer.run(main)
