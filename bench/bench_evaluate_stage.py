"""The evaluate stage, whole, side by side: one model at a time, each arm's seeds batched, every arm batched, the stage's defaults.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_evaluate_stage.py                 # data/ after `make run`
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_evaluate_stage.py /tmp/bench/demo/data --params params.yaml

WORK holds ``prepared/``, ``synthetic/`` and ``pool/`` (a project's ``data/`` after ``dvc repro``).
Each way runs :func:`synthgen.evaluate.run_arms` with the params' evaluate section (every arm and
the budget search; the out-of-fold recipe selection too when ``evaluate.test_every_recipe`` is
false), on the same seeds:

* ``one at a time``: every arm's model trains alone (``evaluate.batched: false``), one after another
  with every intra-op thread: the reference path;
* ``per arm``: each call's seeds as one grouped network, arms one after another (the code before
  arms were batched together); like the next two, a group of 16+ members trains as two halves side
  by side on a 2-thread CPU (``members.spread``);
* ``every arm``: :func:`~synthgen.models.members.fit_tasks` as the stage calls it on small images
  (``evaluate.batched: true``): every baseline arm's seeds in one grouped network (halved as above),
  every synthetic arm's in one;
* ``default``: what the stage does with the params' ``evaluate.batched`` and ``evaluate.cpu_bf16``
  (``auto``: every arm batched up to 16x16 pixels, one at a time above; bf16 on CPUs with native
  bf16). The first three ways are fp32.
* ``default-unshared``: the same, but every baseline arm trains even where balanced data make two
  recipes the same network (oversampling and the logit adjustment change nothing there: the stage
  trains those once, ``synthgen.recipes.same_network``); the code before that.
* ``default-sequential``: the default, but the arms' networks of one call train one after another with
  every intra-op thread instead of side by side with one each, and a large group is not split in halves
  (``fit_tasks(concurrent=False)``); the code before that. The numbers differ by float rounding (thread
  counts round differently).

In every way the budget search (and the recipe selection, when there is one) trains as the stage runs
it: one model at a time in fp32, side by side with one intra-op thread each, so every way chooses the
same budget from the same curve.

A way named twice runs twice (interleave them: this machine's load drifts).

Prints wall seconds (and each training call's: models x steps, seconds), the speed-up over one at
a time, and whether the ways reach the same budget, recipe given the synthetic set, verdict and gain
(the numbers may differ by float rounding: grouped and plain convolutions round differently, and
bf16 rounds more).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.table import Table

from synthgen import evaluate
from synthgen.models.members import fit_members, fit_tasks


def sequential(tasks: list[dict], batched: bool | str = "auto", cpu_bf16: bool | str = False, concurrent: bool = False) -> list:
    """``fit_tasks`` with the arms' networks of a call one after another, every intra-op thread each; the budget
    search (which asks for ``concurrent``) as the stage runs it, so every way chooses the same budget."""
    return fit_tasks(tasks, batched, cpu_bf16, concurrent=concurrent)
from workdir import open_work  # bench/workdir.py: python puts the script's folder on sys.path


def per_arm(tasks: list[dict], batched: bool | str = "auto", cpu_bf16: bool | str = False, concurrent: bool = True) -> list:
    """Each task as its own grouped network, one after another (seeds batched, arms not); the budget search
    (which asks for one at a time) as the stage runs it, so every way chooses the same budget."""
    if batched is False:
        return fit_tasks(tasks, False, cpu_bf16, concurrent)
    return [fit_members(**task, batched=batched, cpu_bf16=cpu_bf16) for task in tasks]


def timed(fit, calls: list[str]):
    """``fit`` that also notes, per call, how many models of how many steps it trained and in how many seconds."""
    def call(tasks: list[dict], batched: bool | str = "auto", cpu_bf16: bool | str = False, **options) -> list:
        started = time.perf_counter()
        fitted = fit(tasks, batched, cpu_bf16, **options)
        models = sum(len(task["seeds"]) for task in tasks)
        calls.append(f"{models} x {tasks[0]['steps']} steps: {time.perf_counter() - started:.1f} s" if tasks else "none")
        return fitted
    return call


def main(
    work: Annotated[Path, typer.Argument(help="Directory holding prepared/, synthetic/ and pool/.")] = Path("data"),
    params: Annotated[Optional[Path], typer.Option(help="params.yaml (default: ./params.yaml when present).")] = None,
    ways: Annotated[str, typer.Option(help="Comma-separated: one-at-a-time, per-arm, every-arm, default, default-unshared, default-sequential.")] = "one-at-a-time,per-arm,every-arm,default",
) -> None:
    console, config, prepared = open_work(work, params)
    if prepared is None:
        return
    synthetic, unfiltered = evaluate.load_extra_sets(work / "synthetic", work / "pool")
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(prepared.train.y)} training images "
                  f"{prepared.train.x.shape[1:]}, {len(prepared.test.y)} test, {0 if synthetic is None else len(synthetic.y)} synthetic; "
                  f"{config.seeds} seeds, recipes {list(config.recipes)}", highlight=False)
    fit_members(prepared.train.x[:64], prepared.train.y[:64], [0, 1], steps=2, n_classes=prepared.n_classes, device=config.device)  # warm-up
    setups = {"one-at-a-time": (False, sequential, False, True), "per-arm": ("auto", per_arm, False, True),
              "every-arm": (True, fit_tasks, False, True), "default": (config.batched, fit_tasks, config.cpu_bf16, True),
              "default-unshared": (config.batched, fit_tasks, config.cpu_bf16, False),
              "default-sequential": (config.batched, sequential, config.cpu_bf16, True)}
    results = {}
    for run_number, way in enumerate(ways.split(",")):
        batched, fit, cpu_bf16, share = setups[way]
        way = way if way not in results else f"{way} (run {run_number + 1})"
        started, calls = time.perf_counter(), []
        outcome = evaluate.run_arms(prepared.train, prepared.test, synthetic, unfiltered, config.model_copy(update={"batched": batched, "cpu_bf16": cpu_bf16}),
                                    fit=timed(fit, calls), share_networks=share)
        results[way] = (time.perf_counter() - started, outcome)
        console.print(f"{way}: {results[way][0]:.1f} s; each training call (budget search, recipe selection if any, then the arms): {'; '.join(calls)}", highlight=False)
    reference = results[next(iter(results))][1]
    table = Table(title=f"evaluate stage ({work}): one model at a time vs batched")
    for column in ("way", "seconds", "speed-up", "budget", "recipe + synthetic", "verdict", "gain [95% CI]", "max |arm mean - first way's|"):
        table.add_column(column, justify="left" if column in ("way", "recipe + synthetic", "verdict") else "right")
    base_seconds = results[next(iter(results))][0]
    for way, (seconds, outcome) in results.items():
        gain = outcome["decision"]["gain"]
        shown = f"{100 * gain['mean']:+.2f} [{100 * gain['ci_low']:+.2f}, {100 * gain['ci_high']:+.2f}]" if gain else "n/a"
        drift = max(abs(outcome["summary"][arm]["balanced_accuracy"]["mean"] - reference["summary"][arm]["balanced_accuracy"]["mean"])
                    for arm in reference["summary"] if arm in outcome["summary"])
        table.add_row(way, f"{seconds:.1f}", f"{base_seconds / seconds:.2f}x", str(outcome["selection"]["steps"]),
                      outcome["selection"]["best_recipe"], outcome["decision"]["verdict"], shown, f"{100 * drift:.2f} pt")
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
