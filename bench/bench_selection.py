"""How stable is the out-of-fold budget and recipe selection? Per selection seed, three kinds of float rounding.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_selection.py data                    # after `make run`
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_selection.py WORK --seeds 0,1,2 --ways one-at-a-time

WORK holds ``prepared/`` (a project's ``data/``). For each ``evaluate.seed`` it runs
:func:`synthgen.recipes.choose_budget` and :func:`synthgen.recipes.select_recipe` with the params'
evaluate section, their models trained one of three ways: one at a time in fp32, one after another
(the stage trains them side by side, one intra-op thread each, which rounds like one thread), as one
grouped network in fp32, or grouped in bf16. The three compute the same thing up to float rounding. Prints the budget, the selected recipe
and every recipe's out-of-fold balanced accuracy. A selection that changes with the seed or the
rounding is noise; this is why the stage skips it when every recipe is scored on test
(docs/RESULTS.md, tenth session).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from synthgen.models.members import fit_tasks
from workdir import open_work  # bench/workdir.py: python puts the script's folder on sys.path
from synthgen.recipes import choose_budget, select_recipe

WAYS = {"one-at-a-time": (False, False), "grouped": (True, False), "grouped-bf16": (True, True)}


def forced(batched: bool, cpu_bf16: bool):
    """``fit_tasks`` that trains every call the given way, whatever the caller asks for."""
    return lambda tasks, *_, **__: fit_tasks(tasks, batched, cpu_bf16=cpu_bf16, concurrent=False)  # one network after another


def main(
    work: Annotated[Path, typer.Argument(help="Directory holding prepared/.")] = Path("data"),
    params: Annotated[Optional[Path], typer.Option(help="params.yaml (default: ./params.yaml when present).")] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated evaluate.seed values.")] = "0,1,2,3",
    ways: Annotated[str, typer.Option(help=f"Comma-separated: {', '.join(WAYS)}.")] = ",".join(WAYS),
) -> None:
    console, config, prepared = open_work(work, params)
    if prepared is None:
        return
    table = Table(title=f"out-of-fold selection ({work}, {len(prepared.train.y)} training images)")
    for column in ("seed", "way", "seconds", "budget", "selected", *config.recipes):
        table.add_column(column, justify="left" if column in ("way", "selected") else "right")
    for seed in (int(value) for value in seeds.split(",")):
        seeded = config.model_copy(update={"seed": seed})
        for way in ways.split(","):
            fit, started = forced(*WAYS[way]), time.perf_counter()
            steps, curve = choose_budget(prepared.train, seeded, fit)
            best, scores = select_recipe(prepared.train, seeded, steps, curve, fit)
            table.add_row(str(seed), way, f"{time.perf_counter() - started:.1f}", str(steps), best.name,
                          *(f"{100 * scores[name]:.1f}" for name in config.recipes))
            console.print(f"seed {seed}, {way}: {steps} steps, {best.name}", highlight=False)
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
