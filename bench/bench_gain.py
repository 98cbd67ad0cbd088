"""Benchmark of the downstream gain on real MNIST: does the synthetic set beat the best baseline?

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/bench_gain.py                       # all settings, 3 draws
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/bench_gain.py --settings 10pc --draws 1 \
        --set train.model=cvae --set train.steps=1500 --variant evaluate.synthetic_weight=0.5

For every setting (``10pc``: 10 images per class, ``50pc``: 50 per class, ``lt``: long tail with
max 50 and ratio 100) and every label-subset draw (``data.seed`` = 0, 1, ...), it runs the real
pipeline cores (prepare -> train -> generate -> filter) in ``--work``, then the evaluation harness
(:func:`synthgen.evaluate.run_arms`) once per variant: the params' evaluate section, plus each
``--variant key=value[,key=value]`` (evaluation-only ablations such as the synthetic loss weight or
mixing cap, reusing the same generator and accepted set). Prints every arm's mean and 95% CI, the
paired gain of the best synthetic arm over the best baseline, tail-class recall, the verdict, and
checks the issue's targets. Results go to ``--out`` as JSON.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from synthgen import data as data_stage
from synthgen import evaluate, filter as filter_stage, generate as generate_stage, train as train_stage
from synthgen.config import load_config
from synthgen.data import load_prepared
from synthgen.filter_outputs import load_accepted
from synthgen.generate import load_pool

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-t10k"
SETTINGS = {
    "10pc": ["data.per_class=10", "data.long_tail=null"],
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
        "verdict": decision["verdict"],
        "reason": decision["reason"],
        "best_baseline": decision["best_baseline"],
        "best_synthetic": best,
        "gain": decision["gain"],
        "tail_gain": gains[best]["tail_recall"] if best else None,
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
    arms = list(rows[0]["arms"])
    table = Table(title="balanced accuracy % (mean ± 95% CI half-width over classifier seeds)")
    for column in ["setting", "draw", "variant", *arms, "gain (best synth - best base)", "tail-recall gain", "verdict"]:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["setting"], str(row["draw"]), row["variant"],
                      *[_fmt(row["arms"].get(a, {}).get("balanced_accuracy")) for a in arms],
                      _fmt(row["gain"], True), _fmt(row["tail_gain"], True), row["verdict"])
    console.print(table)


def check_targets(rows: list[dict]) -> list[str]:
    """The issue's targets, per setting, on the params variant, over draws."""
    lines = []
    for row in rows:
        gain, tail = row["gain"] or {"mean": float("nan"), "ci_low": float("nan")}, row["tail_gain"] or {"mean": float("nan")}
        where = f"{row['setting']} draw {row['draw']} [{row['variant']}]"
        if row["setting"] == "10pc":
            ok = gain["mean"] >= 0.01 and gain["ci_low"] > 0
            lines.append(f"{where}: gain >= 1.0 pt with CI > 0: {'MET' if ok else 'NOT MET'} ({100 * gain['mean']:+.2f}, low {100 * gain['ci_low']:+.2f})")
        elif row["setting"] == "lt":
            ok = gain["mean"] >= 0.03 and tail["mean"] >= 0.05
            lines.append(f"{where}: gain >= 3 pt and tail recall >= 5 pt: {'MET' if ok else 'NOT MET'} "
                         f"({100 * gain['mean']:+.2f}, tail {100 * tail['mean']:+.2f})")
        else:
            ok = row["verdict"] != "recommended" or gain["ci_low"] > 0
            lines.append(f"{where}: never recommended without a real gain: {'MET' if ok else 'NOT MET'} ({row['verdict']})")
    return lines


def main(
    settings: Annotated[str, typer.Option(help="Comma-separated: 10pc, 50pc, lt.")] = "10pc,50pc,lt",
    draws: Annotated[int, typer.Option(help="Label-subset draws (data.seed = first_draw .. first_draw+draws-1).")] = 3,
    first_draw: Annotated[int, typer.Option(help="data.seed of the first draw (to add draws to earlier results).")] = 0,
    source: Annotated[Path, typer.Option(help="MNIST IDX directory.")] = MNIST,
    params: Annotated[Optional[Path], typer.Option(help="params.yaml (default: ./params.yaml when present).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override for every run, e.g. train.model=cvae.")] = None,
    variant: Annotated[Optional[list[str]], typer.Option(help="Extra evaluation variant 'k=v[,k=v]' (repeatable).")] = None,
    work: Annotated[Path, typer.Option(help="Scratch directory for the pipeline outputs.")] = Path("/tmp/synthgen-bench-gain"),
    out: Annotated[Path, typer.Option(help="JSON results.")] = Path("/tmp/synthgen-bench-gain/results.json"),
    reuse: Annotated[bool, typer.Option(help="Reuse pipeline outputs already in --work (evaluation-only reruns).")] = False,
) -> None:
    if not (source / "t10k-images-idx3-ubyte.gz").is_file():
        raise typer.BadParameter(f"MNIST IDX files not found in {source}")
    params = params if params is not None else (Path("params.yaml") if Path("params.yaml").is_file() else None)
    base = [f"data.source={source}", "data.test_per_class=300", "data.val_per_class=10"] + list(set_ or [])
    variants = [[]] + [item.split(",") for item in (variant or [])]
    rows = []
    for setting in settings.split(","):
        for draw in range(first_draw, first_draw + draws):
            overrides = base + SETTINGS[setting] + [f"data.seed={draw}"]
            config, prepared, accepted, pool, seconds = run_pipeline(overrides, work / f"{setting}-{draw}", params, reuse)
            console.print(f"{setting} draw {draw}: pipeline {seconds:.0f}s, {len(accepted.y)} accepted of {len(pool.y)} candidates")
            for extra in variants:
                row = evaluate_variant(config, prepared, accepted, pool, extra, params, overrides)
                rows.append({"setting": setting, "draw": draw, "pipeline_seconds": seconds, **row})
                console.print(f"  [{row['variant']}] {row['reason']} ({row['seconds']:.0f}s)")
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(rows, indent=1, default=float))
    print_rows(rows)
    for line in check_targets(rows):
        console.print(line)


if __name__ == "__main__":
    typer.run(main)
