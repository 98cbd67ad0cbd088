"""Training throughput before/after in one run: NCHW fp32, channels-last fp32, channels-last with CPU bf16 autocast,
each with the generator's upsampling as one transposed conv (now) or as nearest upsampling + 3x3 conv (before).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_train_speed.py                # MNIST 20/class, every model
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_train_speed.py --models cvae --steps 200

Trains each model with :func:`synthgen.train.fit_generator` (the stage's own loop) on scarce
28x28 MNIST (``--source``; random images when it is absent) for ``--steps`` steps in each
setting, ``--repeats`` times interleaved, and prints real images per second (best of the
repeats), the ratio to the first setting (NCHW fp32, what the issue measured), and the final loss
of each. channels-last is the same function (losses differ by float rounding); bf16 autocast
(``train.cpu_bf16``, fp32 weights) rounds activations to 8 bits of mantissa, so its loss differs
more: compare the curves over a whole run with ``--steps 2000``. Machines here are shared and
noisy, so read the ratio. bf16 is only fast on CPUs with native bf16 (AVX512-BF16 / AMX); the
table says whether this one has it, and without it the bf16 settings are left out unless named.
The "upsample+conv" settings run :func:`synthgen.models.cgan.upsample_conv_reference` in the
generator (the code before the transposed form), the same function up to float rounding.
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest.mock import patch
from typing import Annotated

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from synthgen import train as train_stage
from synthgen.config import load_config
from synthgen.data import random_per_class
from synthgen.device import cpu_has_native_bf16
from synthgen.host_memory import keep_freed_memory
from synthgen.models import cgan
from synthgen.sources import load_source

SETTINGS = {  # name -> (channels_last, cpu_bf16, the generator's upsampling)
    "NCHW fp32 (upsample+conv)": (False, False, cgan.upsample_conv_reference),  # the path
    "channels-last fp32 (upsample+conv)": (True, False, cgan.upsample_conv_reference),
    "channels-last fp32": (True, False, cgan.upsample_conv),  # the default without native bf16
    "channels-last bf16 (upsample+conv)": (True, True, cgan.upsample_conv_reference),
    "channels-last bf16": (True, True, cgan.upsample_conv),  # the default with it
}


def scarce_mnist(source: Path, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    if not source.exists():
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (10 * per_class, 28, 28, 1), dtype=np.uint8), np.repeat(np.arange(10), per_class)
    images = load_source(str(source))
    rows = random_per_class(images.y, [per_class] * images.n_classes, 0)
    return images.x[rows], images.y[rows]


def throughput(model: str, channels_last: bool, bf16: bool, upsampling, steps: int, x: np.ndarray, y: np.ndarray) -> tuple[float, float, list]:
    """(real images per second, final logged loss, the loss curve) of one fresh training run on the CPU."""
    with patch.object(cgan, "upsample_conv", upsampling):  # Generator.forward looks the function up per call
        return fresh_run(model, channels_last, bf16, steps, x, y)


def fresh_run(model: str, channels_last: bool, bf16: bool, steps: int, x: np.ndarray, y: np.ndarray) -> tuple[float, float, list]:
    log_every = max(1, steps // 20)
    config = load_config(None, [f"train.model={model}", f"train.steps={steps}", f"train.channels_last={str(channels_last).lower()}",
                                f"train.cpu_bf16={str(bf16).lower()}", "train.device=cpu", f"train.log_every={log_every}",
                                f"train.checkpoint_every={steps}"]).train
    _, state, summary = train_stage.fit_generator(config, x, y)
    key = "loss" if "loss" in summary["final_losses"] else "loss_g"
    return summary["images_per_s"], float(summary["final_losses"][key]), [round(row[key], 3) for row in state.history]


def main(
    source: Annotated[Path, typer.Option(help="MNIST IDX directory.")] = Path(__file__).resolve().parents[2] / "shared/data/mnist-t10k",
    per_class: Annotated[int, typer.Option(help="Training images per class.")] = 20,
    models: Annotated[str, typer.Option(help="Comma-separated models.")] = "cvae,vaegan,cgan",
    steps: Annotated[int, typer.Option(help="Training steps per run.")] = 60,
    repeats: Annotated[int, typer.Option(help="Interleaved runs per setting (best is reported).")] = 2,
    settings: Annotated[str, typer.Option(help="Comma-separated settings (default: every one; the bf16 ones only with native bf16): "
                                               + ", ".join(SETTINGS))] = "",
) -> None:
    console = Console()
    # as `synthgen train` runs (bench/bench_host_memory.py measures this setting; SYNTHGEN_HOST_MEMORY=default turns it off)
    kept = keep_freed_memory()
    x, y = scarce_mnist(source, per_class)
    chosen = [name.strip() for name in settings.split(",")] if settings else [name for name in SETTINGS if "bf16" not in name or cpu_has_native_bf16()]
    table = Table(title=f"train throughput, {len(y)} images {x.shape[1:]}, {steps} steps, {torch.get_num_threads()} threads, "
                        f"native CPU bf16: {cpu_has_native_bf16()}, freed host memory kept: {kept} (`bench/bench_train_speed.py`)")
    for column in ("model", "setting", "img/s", "vs first", "final loss"):
        table.add_column(column, justify="right")
    results = {}
    for model in models.split(","):
        runs = {name: [] for name in chosen}
        for _ in range(repeats):
            for name in chosen:
                runs[name].append(throughput(model, *SETTINGS[name], steps, x, y))
        best = {name: max(run[0] for run in runs[name]) for name in chosen}
        results[model] = {name: {"images_per_s": best[name], "ratio": best[name] / best[chosen[0]], "final_loss": runs[name][0][1],
                                 "curve": runs[name][0][2]} for name in chosen}
        for name in chosen:
            table.add_row(model, name, f"{best[name]:.0f}", f"{best[name] / best[chosen[0]]:.2f}x", f"{runs[name][0][1]:.3f}")
    console.print(table)
    console.print(json.dumps(results))


if __name__ == "__main__":
    typer.run(main)
