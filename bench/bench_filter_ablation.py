"""Which filter costs or earns downstream accuracy? Matched ablation on a finished pipeline run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_filter_ablation.py            # bench_gain.py's default work dir, MNIST lt draw 0
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_filter_ablation.py /tmp/bench/lt0/mnist-lt-0
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_filter_ablation.py WORK --recipe real+classic --steps 500

WORK is a directory with ``prepared/``, ``pool/`` and ``synthetic/`` (what ``bench/bench_gain.py``
leaves in ``--work``, or a project's ``data/`` after ``dvc repro`` with those names). For each
variant the training set is the real images plus, per class, the first ``quota`` pool candidates
in sample-id order that pass the named filters under the stage's own thresholds (the filter
stage's selection rule), so variants share every candidate both let through. Two disjoint
unfiltered halves of the pool measure how much the choice of samples alone moves the score.
Prints balanced accuracy and tail-5 recall over ``--seeds`` classifier seeds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from synthgen.artifacts import load_manifest, load_pool
from synthgen.config import EvaluateConfig
from synthgen.data import load_prepared
from synthgen.evaluate import tail_classes
from synthgen.filters import FILTERS, SCORE_COLUMNS
from synthgen.metrics import score
from synthgen.models.classifier import fit_members
from synthgen.recipes import classifier_params, recipe_named


def first_passing(labels: np.ndarray, mask: np.ndarray, quotas: np.ndarray, skip: np.ndarray | None = None) -> np.ndarray:
    """Rows of the first ``quotas[c]`` rows of class c with ``mask`` set (after skipping ``skip[c]`` of them)."""
    skip = np.zeros(len(quotas), int) if skip is None else skip
    return np.concatenate([np.flatnonzero(mask & (labels == c))[skip[c] : skip[c] + quotas[c]] for c in range(len(quotas))])


def main(
    work: Annotated[Path, typer.Argument(help="Directory holding prepared/, pool/ and synthetic/.")] = Path("/tmp/synthgen-bench-gain/mnist-lt-0"),
    recipe: Annotated[str, typer.Option(help="Downstream recipe.")] = "real+logit_adjust+classic",
    steps: Annotated[int, typer.Option(help="Classifier steps.")] = 500,
    seeds: Annotated[int, typer.Option(help="Classifier seeds.")] = 5,
) -> None:
    if not (work / "synthetic" / "filter_summary.json").is_file():
        print(f"{work} holds no finished run: run bench/bench_gain.py first (its --work), or pass a directory")
        return
    prepared, pool = load_prepared(work / "prepared"), load_pool(work / "pool")
    manifest = load_manifest(work / "synthetic").set_index("sample_id").loc[pool.index]
    summary = json.loads((work / "synthetic" / "filter_summary.json").read_text())
    names = list(prepared.class_names)
    quotas = np.array([summary["per_class"][name]["quota"] for name in names])
    passes = {}
    for name in FILTERS:
        thresholds = [summary["per_class"][c][f"{name}_threshold"] for c in names]
        on = "n/a" not in thresholds
        passes[name] = manifest[SCORE_COLUMNS[name]].to_numpy() >= np.array(thresholds, float)[pool.y] if on else np.ones(len(pool.y), bool)
    everything = np.ones(len(pool.y), bool)
    variants = {
        "all filters (the accepted set)": passes["discriminator"] & passes["classifier"] & passes["novelty"],
        "discriminator only": passes["discriminator"],
        "confidence only": passes["classifier"],
        "novelty only": passes["novelty"],
        "no filter, first quota per class": everything,
    }
    rows = {name: first_passing(pool.y, mask, quotas) for name, mask in variants.items()}
    rows["no filter, the next quota per class"] = first_passing(pool.y, everything, quotas, skip=quotas)
    config, tail = EvaluateConfig(device="cpu"), tail_classes(prepared.train.counts())
    table = Table(title=f"filter ablation, {recipe}, {steps} steps, {seeds} seeds ({work})")
    for column in ("candidates", "n", "balanced accuracy %", "tail-5 recall %"):
        table.add_column(column, justify="right")
    results = {}
    for name, chosen in rows.items():
        x, y = np.concatenate([prepared.train.x, pool.x[chosen]]), np.concatenate([prepared.train.y, pool.y[chosen]])
        members = fit_members(x, y, list(range(seeds)), **classifier_params(recipe_named(recipe), config, prepared.n_classes, steps))
        scores = [score(prepared.test.y, predicted, prepared.n_classes, tail) for predicted in members.predict(prepared.test.x)]
        results[name] = {key: float(np.mean([s[key] for s in scores])) for key in ("balanced_accuracy", "tail_recall")}
        table.add_row(name, str(len(chosen)), f"{100 * results[name]['balanced_accuracy']:.2f}", f"{100 * results[name]['tail_recall']:.2f}")
    Console().print(table)
    print(json.dumps(results))


if __name__ == "__main__":
    typer.run(main)
