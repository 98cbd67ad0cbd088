"""Benchmark of the downstream gain on real data: does the synthetic set add to the best recipe?

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_gain.py                          # MNIST, all settings, 3 draws
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_gain.py --dataset cifar --settings 50pc,lt --draws 1
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_gain.py --settings lt --draws 1 --variant evaluate.synthetic_weight=0.5

Protocol ("every labeled image counts"): for each setting (``10pc``: 10 images per class,
``20pc`` / ``50pc``: 20 / 50 per class, ``lt``: long tail with max 50 and ratio 100) and label-subset draw
(``data.seed`` = 0, 1, ...), the scarce labeled set is drawn from the dataset and is ALL the
pipeline gets: the generator, the filters (calibrated by cross-fitting, ``data.val_per_class: 0``)
and every evaluation arm see exactly those images; the rest of the dataset is test data only
(300 per class for MNIST, all remaining for CIFAR). It runs the pipeline cores (prepare -> train
-> generate -> filter) in ``--work``, then :func:`synthgen.evaluate.run_arms` once per variant:
the params' evaluate section plus each ``--variant key=value[,key=value]``. Prints every arm, the
step budget (k-fold on the labeled images), the paired gain of recipe + synthetic over the
recipe alone, tail-class recall, the verdict, and checks the issue's targets. JSON to ``--out``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from synthgen import prepare as data_stage
from synthgen import evaluate, filter as filter_stage, generate as generate_stage, train as train_stage
from synthgen.config import load_config
from synthgen.data import load_prepared
from synthgen.artifacts import load_accepted
from synthgen.artifacts import load_pool
from synthgen.host_memory import keep_freed_memory

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS = {  # source, overrides: MNIST keeps 300 test images per class; CIFAR-3k has 300 per class in all
    "mnist": (SHARED / "mnist-t10k", ["data.test_per_class=300"]),
    "cifar": (SHARED / "cifar10-3k" / "cifar10-3k.npz", ["data.test_per_class=null"]),
}
SETTINGS = {
    "10pc": ["data.per_class=10", "data.long_tail=null"],
    "20pc": ["data.per_class=20", "data.long_tail=null"],
    "50pc": ["data.per_class=50", "data.long_tail=null"],
    "lt": ["data.per_class=null", "data.long_tail={max: 50, ratio: 100}"],
}
console = Console()


def run_pipeline(overrides: list[str], work: Path, params: Path | None, reuse: bool = False) -> tuple:
    """prepare -> train -> generate -> filter in ``work``; returns (config, prepared, accepted, pool, seconds).

    ``reuse`` skips each stage whose output is already complete in ``work``.
    """
    config = load_config(params, overrides)
    prepared, models, pool, synthetic = work / "prepared", work / "models", work / "pool", work / "synthetic"
    stages = [
        (prepared / "meta.json", lambda: data_stage.main(config, prepared, progress=False)),
        (models / config.train.model / "generator.pt", lambda: train_stage.main(config, prepared, models, work / "checkpoints")),
        (pool / "generate_summary.json", lambda: generate_stage.main(config, prepared, models, pool)),
        (synthetic / "filter_summary.json", lambda: filter_stage.main(config, prepared, models, pool, synthetic)),
    ]
    started = time.perf_counter()
    for done_marker, run in stages:
        if not (reuse and done_marker.is_file()):
            run()
    seconds = time.perf_counter() - started
    return config, load_prepared(prepared), load_accepted(synthetic), load_pool(pool), seconds


def evaluate_variant(config, prepared, accepted, pool, variant: list[str], params: Path | None, base: list[str]) -> dict:
    """One evaluation of all arms; returns a JSON-ready summary row."""
    eval_config = load_config(params, base + variant).evaluate if variant else config.evaluate
    started = time.perf_counter()
    results = evaluate.run_arms(prepared.train, prepared.test, accepted, pool, eval_config, progress=False)
    decision = results["decision"]
    gains = results["gains"]
    best = decision["best_synthetic"]
    return {
        "variant": ",".join(variant) or "params",
        "seconds": time.perf_counter() - started,
        "selection": results["selection"],
        "verdict": decision["verdict"],
        "reason": decision["reason"],
        "best_baseline": decision["best_baseline"],
        "best_synthetic": best,
        "gain": decision["gain"],
        "tail_gain": gains[best]["tail_recall"] if best else None,
        "filter_gain": results["filter_ablation"],
        "arms": results["summary"],
        "gains": gains,
        "counts": results["counts"],
    }


def _fmt(stat: dict | None, signed: bool = False) -> str:
    if not stat:
        return "n/a"
    sign = "+" if signed and stat["mean"] >= 0 else ""
    return f"{sign}{100 * stat['mean']:.2f} [{100 * stat['ci_low']:+.2f},{100 * stat['ci_high']:+.2f}]" if signed else \
        f"{100 * stat['mean']:.2f} ± {100 * (stat['ci_high'] - stat['mean']):.2f}"


def print_rows(rows: list[dict]) -> None:
    arms = list(dict.fromkeys(arm for row in rows for arm in row["arms"]))
    table = Table(title="balanced accuracy % (mean ± 95% CI half-width over classifier seeds)")
    for column in ["setting", "draw", "variant", "steps", "recipe", *arms, "gain (recipe+synthetic - recipe)", "tail-recall gain",
                   "filter gain (accepted - unfiltered)", "verdict"]:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["setting"], str(row["draw"]), row["variant"], str(row["selection"]["steps"]), row["best_baseline"],
                      *[_fmt(row["arms"].get(a, {}).get("balanced_accuracy")) for a in arms],
                      _fmt(row["gain"], True), _fmt(row["tail_gain"], True),
                      _fmt((row.get("filter_gain") or {}).get("gain"), True), row["verdict"])
    console.print(table)


def check_targets(rows: list[dict]) -> list[str]:
    """The issue's targets on the params variant: per draw, then on the mean of the draws of a setting."""
    lines, by_setting = [], {}
    for row in rows:
        if row["variant"] == "params" and row["gain"]:
            by_setting.setdefault(row["setting"], []).append(row)
    for setting, group in by_setting.items():
        gains = np.array([r["gain"]["mean"] for r in group])
        tails = np.array([r["tail_gain"]["mean"] for r in group])
        where = f"{setting} ({len(group)} draws: {', '.join(f'{100 * g:+.2f}' for g in gains)})"
        if setting == "10pc":
            ok = gains.mean() >= 0.01
            lines.append(f"{where}: mean gain >= 1.0 pt: {'MET' if ok else 'NOT MET'} ({100 * gains.mean():+.2f})")
        elif setting == "lt":
            ok = gains.mean() >= 0.03 and tails.mean() >= 0.05 and (gains > 0).all()
            lines.append(f"{where}: mean gain >= 3 pt, tail recall >= 5 pt, every draw > 0: {'MET' if ok else 'NOT MET'} "
                         f"({100 * gains.mean():+.2f}, tail {100 * tails.mean():+.2f})")
        else:
            ok = all(r["verdict"] != "recommended" or r["gain"]["ci_low"] > 0 for r in group)
            lines.append(f"{where}: never recommended without a real gain: {'MET' if ok else 'NOT MET'} "
                         f"({', '.join(r['verdict'] for r in group)}; mean {100 * gains.mean():+.2f})")
    return lines


def main(
    settings: Annotated[str, typer.Option(help="Comma-separated: 10pc, 20pc, 50pc, lt.")] = "10pc,50pc,lt",
    draws: Annotated[int, typer.Option(help="Label-subset draws (data.seed = first_draw .. first_draw+draws-1).")] = 3,
    first_draw: Annotated[int, typer.Option(help="data.seed of the first draw (to add draws to earlier results).")] = 0,
    dataset: Annotated[str, typer.Option(help="mnist (../shared/data/mnist-t10k) or cifar (../shared/data/cifar10-3k).")] = "mnist",
    params: Annotated[Optional[Path], typer.Option(help="params.yaml (default: ./params.yaml when present).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override for every run, e.g. train.model=cvae.")] = None,
    variant: Annotated[Optional[list[str]], typer.Option(help="Extra evaluation variant 'k=v[,k=v]' (repeatable).")] = None,
    work: Annotated[Path, typer.Option(help="Scratch directory for the pipeline outputs.")] = Path("/tmp/synthgen-bench-gain"),
    out: Annotated[Path, typer.Option(help="JSON results.")] = Path("/tmp/synthgen-bench-gain/results.json"),
    reuse: Annotated[bool, typer.Option(help="Reuse pipeline outputs already in --work (evaluation-only reruns).")] = False,
    evaluate_arms: Annotated[bool, typer.Option("--evaluate/--no-evaluate",
                                                help="--no-evaluate: run only the pipeline (for bench_filter_ablation.py).")] = True,
) -> None:
    keep_freed_memory()  # as the CLI runs the stages (SYNTHGEN_HOST_MEMORY=default: glibc's own malloc)
    source, dataset_overrides = DATASETS[dataset]
    if not source.exists():
        raise typer.BadParameter(f"{dataset} not found at {source}")
    params = params if params is not None else (Path("params.yaml") if Path("params.yaml").is_file() else None)
    base = [f"data.source={source}", "data.test_source=null", "data.val_source=null", "data.val_per_class=0",
            *dataset_overrides, *(set_ or [])]
    variants = [[]] + [item.split(",") for item in (variant or [])]
    rows = []
    for setting in settings.split(","):
        for draw in range(first_draw, first_draw + draws):
            overrides = base + SETTINGS[setting] + [f"data.seed={draw}"]
            config, prepared, accepted, pool, seconds = run_pipeline(overrides, work / f"{dataset}-{setting}-{draw}", params, reuse)
            console.print(f"{dataset} {setting} draw {draw}: pipeline {seconds:.0f}s, {len(accepted.y)} accepted of {len(pool.y)} candidates")
            for extra in variants if evaluate_arms else []:
                row = evaluate_variant(config, prepared, accepted, pool, extra, params, overrides)
                rows.append({"dataset": dataset, "setting": setting, "draw": draw, "pipeline_seconds": seconds, **row})
                console.print(f"  [{row['variant']}] {row['reason']} ({row['seconds']:.0f}s)")
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(rows, indent=1, default=float))
    print_rows(rows)
    for line in check_targets(rows):
        console.print(line)


if __name__ == "__main__":
    typer.run(main)
