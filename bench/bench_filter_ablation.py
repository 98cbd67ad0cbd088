"""Which filter costs or earns downstream accuracy? Paired ablation on a finished pipeline run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_filter_ablation.py            # bench_gain.py's default work dir, MNIST lt draw 0
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_filter_ablation.py /tmp/bench/lt0/mnist-lt-0 --orders 4
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_filter_ablation.py WORK --recipe real+classic --steps 500 --quantiles 0.1,0.02

WORK is a directory with ``prepared/``, ``pool/`` and ``synthetic/`` (what ``bench/bench_gain.py``
leaves in ``--work``, or a project's ``data/`` after ``dvc repro`` with those names). Each variant's
training set is the real images plus, per class, the first ``quota`` pool candidates that pass the
variant's filters, taken in one candidate order (the stage's rule; order 0 is sample-id order, the
stage's own). Every variant of one order shares every candidate both let through, so the paired
difference to "no filter" in the same order measures the filter, not which samples a classifier
happened to get (two disjoint unfiltered sets differ by about a point on scarce data). ``--orders``
repeats it over random candidate orders; the table gives the mean over orders x seeds and the
paired difference to "no filter" with its t interval over orders.

Variants: the stage's filters with its thresholds, each alone; the discriminator cut at other
rejection rates (``--quantiles``: the q-quantile of the class's candidate scores, which is what the
stage's cap on the generated quantile rejects), alone and with the confidence and novelty filters;
the same filters on classes with at least ``--judge-min`` real images only (on a smaller class
they can only say how far a sample is from those few images), and the stage's own thresholds with the discriminator
on those classes only, or with every filter on those classes only; the same share cut from the top instead (the most real-looking, most typical samples); and the
confidence filter at fixed cuts (``--probabilities``: only samples the real-data classifier gives
less than p for their class), alone and as the stage's cut lowered to p with the other two filters
(what ``filter.classifier_threshold: p`` selects); instead of the first candidates, a spread-out subset (greedy k-center
in pixel space, per class); a placebo that rejects as many candidates per class as the first
``--quantiles`` cut with confidence and novelty does (or as the stage's accepted set), at random
(redrawn per order); the novelty filter at other multiples of each class's scale
(``--novelty``: near-copies of a training image, by pixel distance); the stage's filters plus, in each class of
fewer than ``--judge-min`` real images, the confidence filter's lowest ``--tail-quantiles`` of its candidates (a
cut no real image calibrates: the classifier saw 1-4 of that class); and with ``--oracle``, the
ceiling of any filter: the stage's accepted set minus every candidate that a CNN trained on the test
images reads as another class (cached in WORK/classifier-800.pkl, as ``bench_train.py`` caches it).

The arms train as the evaluate stage trains them: the logit adjustment's prior from the real images'
counts (``evaluate.logit_adjust_prior: real``) and bf16 on CPUs that have it (``evaluate.cpu_bf16``).
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
from synthgen.filters import FILTERS, SCORE_COLUMNS, per_class_quantile
from synthgen.metrics import score, t_interval, tail_classes
from synthgen.models.classifier import fit_members
from synthgen.recipes import classifier_params, recipe_named
from synthgen.host_memory import keep_freed_memory

from bench_train import held_out_classifier


def first_passing(labels: np.ndarray, mask: np.ndarray, quotas: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Rows of the first ``quotas[c]`` rows of class c with ``mask`` set, walking rows in ``order``."""
    walked = order[mask[order]]
    return np.concatenate([walked[labels[walked] == c][: quotas[c]] for c in range(len(quotas))])


def k_center(x: np.ndarray, rows: np.ndarray, count: int) -> np.ndarray:
    """Greedy k-center: ``count`` of ``rows`` (x: uint8 images), each the one farthest in pixel space from
    those already taken, starting from the first row (the most spread-out subset, not the most typical)."""
    if len(rows) <= count:
        return rows
    flat = x[rows].reshape(len(rows), -1).astype(np.float32) / 255.0
    taken, nearest = [0], np.linalg.norm(flat - flat[0], axis=1)
    while len(taken) < count:
        pick = int(np.argmax(nearest))
        taken.append(pick)
        nearest = np.minimum(nearest, np.linalg.norm(flat - flat[pick], axis=1))
    return rows[np.array(taken)]


def spread_out(x: np.ndarray, labels: np.ndarray, mask: np.ndarray, quotas: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Per class, the k-center subset of size ``quotas[c]`` of the rows with ``mask`` set, from the first in ``order``."""
    walked = order[mask[order]]
    return np.concatenate([k_center(x, walked[labels[walked] == c], quotas[c]) for c in range(len(quotas))])


PLACEBO = "random rejection (placebo: per class as many as the first cut + confidence + novelty)"
STAGE_PLACEBO = "random rejection (placebo: per class as many as the stage's accepted set)"
ORACLE = "the stage's accepted set minus what a CNN trained on the test images reads as another class (oracle)"


def random_rejection(labels: np.ndarray, rejected: np.ndarray, seed: int) -> np.ndarray:
    """A placebo for a filter: per class, reject as many rows as ``rejected`` does, chosen at random.

    Replacing a few samples changes every classifier seed's trajectory, so "filter minus no filter"
    carries the noise of any change at all; a filter earns or costs something only where it differs
    from this placebo."""
    rng, keep = np.random.default_rng(seed), np.ones(len(labels), bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        keep[rng.choice(rows, int(rejected[rows].sum()), replace=False)] = False
    return keep


def filter_masks(pool_y: np.ndarray, manifest, summary: dict, names: list[str], quantiles: list[float],
                 probabilities: list[float], novelty: list[float], novelty_threshold: float,
                 train_counts: np.ndarray | None = None, judge_min: int = 5) -> dict[str, np.ndarray]:
    """Name -> bool mask over the pool: the stage's filters (alone and together) and other discriminator cuts."""
    passes = {}
    for name in FILTERS:  # a filter an older run's summary does not know (the claim filter) counts as off
        thresholds = [summary["per_class"][c].get(f"{name}_threshold", "n/a") for c in names]
        on = "n/a" not in thresholds
        passes[name] = manifest[SCORE_COLUMNS[name]].to_numpy() >= np.array(thresholds, float)[pool_y] if on else np.ones(len(pool_y), bool)
    entries = [summary["per_class"][c] for c in names]
    for name in FILTERS:  # the stage passes every sample of a class a filter does not judge (filter.min_class_images)
        passes[name] |= np.array([entry.get(f"{name}_judged", entry.get("judged", True)) is False for entry in entries])[pool_y]
    masks = {
        "no filter": np.ones(len(pool_y), bool),
        "all filters (the stage's accepted set)": passes["discriminator"] & passes["classifier"] & passes["claimed"] & passes["novelty"],
        "discriminator only": passes["discriminator"],
        "confidence only": passes["classifier"],
        "novelty only": passes["novelty"],
        "confidence + novelty": passes["classifier"] & passes["novelty"],
        "spread-out (k-center in pixels) with no filter": np.ones(len(pool_y), bool),
    }
    d_scores = manifest[SCORE_COLUMNS["discriminator"]].to_numpy()
    for q in quantiles:
        cut = per_class_quantile(d_scores, pool_y, len(names), q)
        masks[f"discriminator rejects {q:.0%} + confidence + novelty"] = (d_scores >= cut[pool_y]) & passes["classifier"] & passes["novelty"]
        if train_counts is not None:  # a class with few real images: the filters only know how far a sample is from those
            unjudged = train_counts[pool_y] < judge_min
            masks[f"discriminator rejects {q:.0%} + confidence + novelty on classes of >= {judge_min} real images"] = (
                masks[f"discriminator rejects {q:.0%} + confidence + novelty"] | unjudged)
        masks[f"discriminator rejects {q:.0%}"] = d_scores >= cut[pool_y]
        top = per_class_quantile(d_scores, pool_y, len(names), 1 - q)
        masks[f"discriminator rejects its most real {q:.0%}"] = d_scores <= top[pool_y]
        masks[f"spread-out (k-center in pixels) after the discriminator rejects {q:.0%}"] = d_scores >= cut[pool_y]
    if train_counts is not None:  # the stage's thresholds, but the discriminator only where a class has judge_min real images
        small = train_counts[pool_y] < judge_min
        masks[f"the stage's filters with the discriminator only on classes of >= {judge_min} real images"] = (
            (passes["discriminator"] | small) & passes["classifier"] & passes["novelty"])
        masks[f"the stage's filters only on classes of >= {judge_min} real images"] = (
            (passes["discriminator"] & passes["classifier"] & passes["novelty"]) | small)
    if quantiles:  # the placebo rejects as many as the first cut with the other two filters (redrawn per order)
        masks[PLACEBO] = masks[f"discriminator rejects {quantiles[0]:.0%} + confidence + novelty"]
    masks[STAGE_PLACEBO] = masks["all filters (the stage's accepted set)"]
    # the stage's novelty threshold is novelty_threshold x the class's scale; other multiples of the same scale
    scales = np.array([summary["per_class"][c]["novelty_threshold"] for c in names], float) / novelty_threshold
    distances = manifest[SCORE_COLUMNS["novelty"]].to_numpy()
    for multiple in novelty:
        masks[f"novelty rejects NN distance < {multiple:g} x scale"] = distances >= multiple * scales[pool_y]
    confidence = manifest[SCORE_COLUMNS["classifier"]].to_numpy()
    for p in probabilities:
        masks[f"confidence rejects p(y) < {p:g}"] = confidence >= p
        # the stage's filters, but the confidence filter rejects only the samples it also gives less than p for their class
        masks[f"the stage's filters with the confidence cut lowered to p(y) < {p:g}"] = (
            passes["discriminator"] & (passes["classifier"] | (confidence >= p)) & passes["novelty"])
    return masks


def main(
    work: Annotated[Path, typer.Argument(help="Directory holding prepared/, pool/ and synthetic/.")] = Path("/tmp/synthgen-bench-gain/mnist-lt-0"),
    recipe: Annotated[str, typer.Option(help="Downstream recipe.")] = "real+logit_adjust+classic",
    steps: Annotated[int, typer.Option(help="Classifier steps.")] = 500,
    seeds: Annotated[int, typer.Option(help="Classifier seeds.")] = 5,
    orders: Annotated[int, typer.Option(help="Candidate orders (0: sample-id order; more: random).")] = 3,
    quantiles: Annotated[str, typer.Option(help="Other discriminator rejection rates, comma-separated.")] = "0.02,0.05",
    probabilities: Annotated[str, typer.Option(help="Confidence cuts: reject p(conditioned class) below each, comma-separated.")] = "0.01",
    novelty: Annotated[str, typer.Option(help="Novelty cuts: reject NN distance below each multiple of the class's scale.")] = "0.3",
    stage_novelty: Annotated[float, typer.Option(help="The run's filter.novelty_threshold (to recover each class's scale).")] = 0.1,
    judge_min: Annotated[int, typer.Option(help="A variant filters only classes with at least this many real images.")] = 5,
    only: Annotated[str, typer.Option(help="Comma-separated variant names to run (default: all).")] = "",
    first_order: Annotated[int, typer.Option(help="Skip the orders before this one (they are drawn all the same, so a run can be resumed).")] = 0,
    tail_quantiles: Annotated[str, typer.Option(help="The stage's filters + reject this quantile of confidence in classes below --judge-min, comma-separated.")] = "",
    oracle: Annotated[bool, typer.Option(help="Add the stage's set minus what a CNN trained on the test images reads as another class.")] = False,
) -> None:
    keep_freed_memory()  # as the CLI runs the stages (SYNTHGEN_HOST_MEMORY=default: glibc's own malloc)
    if not (work / "synthetic" / "filter_summary.json").is_file():
        print(f"{work} holds no finished run: run bench/bench_gain.py first (its --work), or pass a directory")
        return
    prepared, pool = load_prepared(work / "prepared"), load_pool(work / "pool")
    manifest = load_manifest(work / "synthetic").set_index("sample_id").loc[pool.index]
    summary = json.loads((work / "synthetic" / "filter_summary.json").read_text())
    names = list(prepared.class_names)
    quotas = np.array([summary["per_class"][name]["quota"] for name in names])
    counts = prepared.train.counts()  # real training images per class
    masks = filter_masks(pool.y, manifest, summary, names, [float(q) for q in quantiles.split(",") if q],
                         [float(p) for p in probabilities.split(",") if p], [float(k) for k in novelty.split(",") if k], stage_novelty,
                         counts, judge_min)
    stage = masks["all filters (the stage's accepted set)"]
    confidence, small = manifest[SCORE_COLUMNS["classifier"]].to_numpy(), counts[pool.y] < judge_min
    for q in [float(q) for q in tail_quantiles.split(",") if q]:
        cut = per_class_quantile(confidence, pool.y, len(names), q)
        masks[f"the stage's filters + confidence rejects its lowest {q:.0%} in classes of < {judge_min} real images"] = stage & ~(small & (confidence < cut[pool.y]))
    if oracle:  # not a filter anyone can run: it reads the test images
        read_as = held_out_classifier(prepared, 800, work / "classifier-800.pkl").predict(pool.x)
        masks[ORACLE] = stage & (read_as == pool.y)
    if only:
        masks = {name: mask for name, mask in masks.items() if name == "no filter" or name in only.split(",")}
    config, tail = EvaluateConfig(device="cpu"), tail_classes(counts)
    params = classifier_params(recipe_named(recipe), config, prepared.n_classes, steps)
    rng = np.random.default_rng(0)
    order_list = ([np.arange(len(pool.y))] + [rng.permutation(len(pool.y)) for _ in range(orders - 1)])[first_order:]
    accuracy = {name: [] for name in masks}  # name -> per order, the mean over seeds
    tail_recall = {name: [] for name in masks}
    for order in order_list:
        for name, mask in masks.items():
            if name in (PLACEBO, STAGE_PLACEBO):
                mask = random_rejection(pool.y, ~mask, seed=first_order + len(accuracy[name]))
            chosen = (spread_out(pool.x, pool.y, mask, quotas, order) if name.startswith("spread-out")
                      else first_passing(pool.y, mask, quotas, order))
            x, y = np.concatenate([prepared.train.x, pool.x[chosen]]), np.concatenate([prepared.train.y, pool.y[chosen]])
            real = np.arange(len(y)) < len(prepared.train.y)  # the stage's prior_rows (logit_adjust_prior: real)
            members = fit_members(x, y, list(range(seeds)), cpu_bf16=config.cpu_bf16,
                                  prior_rows=None if config.logit_adjust_prior == "all" else real, **params)
            scores = [score(prepared.test.y, predicted, prepared.n_classes, tail) for predicted in members.predict(prepared.test.x)]
            accuracy[name].append(float(np.mean([s["balanced_accuracy"] for s in scores])))
            tail_recall[name].append(float(np.mean([s["tail_recall"] for s in scores])))
            print(f"order {first_order + len(accuracy[name]) - 1}: {name}: {100 * accuracy[name][-1]:.2f}", flush=True)
    table = Table(title=f"filter ablation, {recipe}, {steps} steps, {seeds} seeds x {orders} orders ({work})")
    for column in ("candidates", "kept of pool", "balanced accuracy %", "minus no filter [95% CI over orders]", "tail-5 recall %"):
        table.add_column(column, justify="right")
    results = {}
    for name in masks:
        gain = t_interval(100 * (np.array(accuracy[name]) - np.array(accuracy["no filter"])))
        results[name] = {"balanced_accuracy": accuracy[name], "tail_recall": tail_recall[name], "minus_no_filter": gain}
        interval = f"{gain['mean']:+.2f} [{gain['ci_low']:+.2f}, {gain['ci_high']:+.2f}]" if len(order_list) > 1 else f"{gain['mean']:+.2f}"
        table.add_row(name, f"{masks[name].mean():.1%}", f"{100 * np.mean(accuracy[name]):.2f}", interval, f"{100 * np.mean(tail_recall[name]):.2f}")
    Console().print(table)
    print(json.dumps(results))


if __name__ == "__main__":
    typer.run(main)
