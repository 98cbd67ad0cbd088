"""CAS against real-only: the fixed classifier trained on the accepted synthetic set alone, then on the real images alone.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_cas.py                     # data/ after `make run`
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_cas.py /tmp/bench/g20/mnist-20pc-0 --steps 1000 --seeds 5

WORK holds ``prepared/`` and ``synthetic/`` (a ``bench/bench_gain.py`` work directory, or a
project's ``data/``). Both arms train the evaluate stage's plain recipe (``real``: no augmentation,
the same width, learning rate, batch and ``--steps``) over the same ``--seeds`` and are scored on
the real test split: CAS (classification accuracy score, Ravuri & Vinyals 2019) says whether the
synthetic set alone carries the classes as well as the real images it was learned from. The last
row is CAS minus real-only, paired by seed, with its t-interval.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from synthgen.artifacts import load_accepted
from synthgen.config import EvaluateConfig
from synthgen.data import load_prepared
from synthgen.metrics import score, t_interval
from synthgen.models.classifier import fit_members
from synthgen.recipes import classifier_params, recipe_named
from synthgen.host_memory import keep_freed_memory


def main(
    work: Annotated[Path, typer.Argument(help="Directory holding prepared/ and synthetic/.")] = Path("data"),
    steps: Annotated[int, typer.Option(help="Classifier steps (the stage's budget).")] = 1000,
    seeds: Annotated[int, typer.Option(help="Classifier seeds.")] = 5,
) -> None:
    keep_freed_memory()  # as the CLI runs the stages (SYNTHGEN_HOST_MEMORY=default: glibc's own malloc)
    if not (work / "synthetic" / "filter_summary.json").is_file():
        print(f"{work} holds no accepted synthetic set: run `make run` (or bench/bench_gain.py) first, or pass a directory")
        return
    prepared, synthetic = load_prepared(work / "prepared"), load_accepted(work / "synthetic")
    params = classifier_params(recipe_named("real"), EvaluateConfig(device="cpu"), prepared.n_classes, steps)
    scores = {}
    for name, images in (("synthetic only (CAS)", synthetic), ("real only", prepared.train)):
        members = fit_members(images.x, images.y, list(range(seeds)), **params)
        scores[name] = np.array([score(prepared.test.y, p, prepared.n_classes)["balanced_accuracy"] for p in members.predict(prepared.test.x)])
    table = Table(title=f"CAS vs real-only, {steps} steps, {seeds} seeds ({work}): {len(synthetic.y)} synthetic, {len(prepared.train.y)} real")
    for column in ("trained on", "balanced accuracy % [95% CI over seeds]"):
        table.add_column(column)
    for name, values in scores.items():
        interval = t_interval(100 * values)
        table.add_row(name, f"{interval['mean']:.2f} [{interval['ci_low']:.2f}, {interval['ci_high']:.2f}]")
    gap = t_interval(100 * (scores["synthetic only (CAS)"] - scores["real only"]))
    table.add_row("CAS minus real-only (paired)", f"{gap['mean']:+.2f} [{gap['ci_low']:+.2f}, {gap['ci_high']:+.2f}]")
    Console().print(table)


if __name__ == "__main__":
    typer.run(main)
