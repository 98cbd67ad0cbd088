"""glibc's malloc as it comes against :func:`synthgen.host_memory.keep_freed_memory` (what the CLI sets), side by side.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_host_memory.py
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_host_memory.py --workloads cvae --repeats 3

Each run is a fresh child process (the setting is per process and cannot be undone), the two
settings interleaved, ``--repeats`` times. Workloads:

* ``cvae``: the default generator's training, :func:`synthgen.train.fit_generator`, on MNIST 20
  per class at 28x28 (``--source``; random images when it is absent), ``--steps`` steps;
* ``grouped-cnn``: the evaluate stage's 30 baseline models as one grouped network
  (:func:`synthgen.models.members.fit_members`, 6 recipes' worth of seeds on the digits demo's
  long tail at 8x8), ``--steps`` steps;
* ``one-cnn``: one such model alone (the evaluate stage's budget search and reference path).

Prints per workload and setting: images per second (best of the repeats, and the ratio), minor
page faults per step and system CPU seconds per 100 steps (the cost the setting removes). The
numbers are identical either way: only where freed memory goes changes.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

SETTINGS = {"glibc default": {"SYNTHGEN_HOST_MEMORY": "default"}, "keep freed memory (the CLI's)": {}}
WORKLOADS = ("cvae", "grouped-cnn", "one-cnn")


def run_workload(name: str, steps: int, source: Path) -> dict:
    """In this process: the workload's images per second, with page faults and system time per step of the timed run."""
    import torch

    from synthgen.host_memory import keep_freed_memory

    applied = keep_freed_memory()
    torch.manual_seed(0)
    if name == "cvae":
        from bench_train_speed import fresh_run, scarce_mnist  # bench/: python puts the script's folder on sys.path

        from synthgen.device import cpu_has_native_bf16  # the default train.cpu_bf16: auto

        x, y = scarce_mnist(source, 20)
        fresh_run("cvae", True, cpu_has_native_bf16(), 20, x, y)  # warm-up: oneDNN primitives, first allocations
        work, images_per_step = (lambda: fresh_run("cvae", True, cpu_has_native_bf16(), steps, x, y)), 64
    else:
        from synthgen.models.members import fit_members
        from synthgen.sources import load_source

        demo = load_source("digits-long-tail")  # the built-in demo's training images
        x, y = demo.x, demo.y
        seeds = list(range(30 if name == "grouped-cnn" else 1))
        recipe = dict(n_classes=10, width=16, balanced=True, augment=True, batched=True)
        fit_members(x, y, seeds, steps=20, **recipe)
        work, images_per_step = (lambda: fit_members(x, y, seeds, steps=steps, **recipe)), 64 * len(seeds)
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    work()
    seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
    return {"applied": applied, "images_per_s": steps * images_per_step / seconds, "faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
            "system_s_per_100": 100 * (after.ru_stime - before.ru_stime) / steps}


def main(
    workloads: Annotated[str, typer.Option(help=f"Comma-separated: {', '.join(WORKLOADS)}.")] = ",".join(WORKLOADS),
    steps: Annotated[int, typer.Option(help="Timed training steps per run.")] = 150,
    repeats: Annotated[int, typer.Option(help="Runs per setting, interleaved (best is reported).")] = 2,
    source: Annotated[Path, typer.Option(help="MNIST IDX directory (cvae).")] = Path(__file__).resolve().parents[2] / "shared/data/mnist-t10k",
    child: Annotated[str, typer.Option(hidden=True)] = "",
) -> None:
    if child:
        print(json.dumps(run_workload(child, steps, source)))
        return
    console = Console(width=160)
    threads = os.environ.get("OMP_NUM_THREADS")
    console.print("$ " + (f"OMP_NUM_THREADS={threads} " if threads else "") + " ".join([sys.executable, *sys.argv]), highlight=False)
    table = Table(title=f"host memory: glibc's malloc as it comes vs kept freed memory ({steps} steps, best of {repeats})")
    for column in ("workload", "setting", "images/s", "ratio", "page faults / step", "system s / 100 steps"):
        table.add_column(column, justify="left" if column in ("workload", "setting") else "right")
    for workload in workloads.split(","):
        runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
        for _ in range(repeats):
            for name, extra in SETTINGS.items():
                command = [sys.executable, __file__, "--child", workload, "--steps", str(steps), "--source", str(source)]
                output = subprocess.run(command, env={**os.environ, **extra}, check=True, capture_output=True, text=True).stdout
                runs[name].append(json.loads(output.strip().splitlines()[-1]))
        first = max(run["images_per_s"] for run in runs["glibc default"])
        for name, results in runs.items():
            best = max(results, key=lambda run: run["images_per_s"])
            table.add_row(workload, name + ("" if best["applied"] or name == "glibc default" else " (not applied here)"),
                          f"{best['images_per_s']:.0f}", f"{best['images_per_s'] / first:.2f}x", f"{best['faults_per_step']:.0f}",
                          f"{best['system_s_per_100']:.2f}")
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
