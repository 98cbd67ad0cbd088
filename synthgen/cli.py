"""The ``synthgen`` command line: one command per pipeline stage, plus ``run`` and ``serve``.

Every stage command reads ``params.yaml`` (``--params``), accepts ``--set key.sub=value``
overrides, and delegates to the stage module's ``main``. Heavy modules (torch, prefect) are
imported inside the commands so ``synthgen --help`` stays fast. Errors in the user's data or
params exit with status 2 and a one-line message naming the culprit, not a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="synthgen",
    help="Synthetic data augmentation for scarce or imbalanced labeled image datasets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to read.")]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override one key, e.g. --set train.steps=200 (repeatable)."),
]
PREPARED = Path("data/prepared")
MODELS = Path("models")
CHECKPOINTS = Path("checkpoints")
POOL = Path("data/pool")
SYNTHETIC = Path("data/synthetic")
REPORTS = Path("reports")


@app.callback()
def _start() -> None:
    """Runs before every command: training loops reuse freed host memory (synthgen/host_memory.py)."""
    from synthgen.host_memory import keep_freed_memory

    keep_freed_memory()


def _config(params: Path, overrides: list[str] | None):
    from synthgen.config import ConfigError, load_config

    try:
        return load_config(params if params.exists() or str(params) != "params.yaml" else None, overrides or [])
    except ConfigError as error:
        _fail(error)


def _fail(error: Exception) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _user_errors() -> tuple[type[Exception], ...]:
    from synthgen.config import ConfigError
    from synthgen.data import DataError

    return (ConfigError, DataError, FileNotFoundError)


def _workers(value: str) -> int | str:
    """``--workers``: a positive number or ``auto``; anything else exits 2 naming the option."""
    if value == "auto" or (value.isdigit() and int(value) >= 1):
        return value if value == "auto" else int(value)
    _fail(ValueError(f"--workers must be a positive number or auto, got {value!r}"))


def _run(fn, *args, **kwargs):
    """Call a stage's main, turning user errors into a clean non-zero exit."""
    try:
        return fn(*args, **kwargs)
    except _user_errors() as error:
        _fail(error)


@app.command()
def prepare(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
    out: Annotated[Path, typer.Option(help="Output directory.")] = PREPARED,
) -> None:
    """Load `data.source`, draw the scarce train split plus disjoint val and test splits.

    Reads: params `data.*` and the source dataset. Writes: OUT/{train,val,test}.npz,
    OUT/meta.json (class names, per-split per-class counts) and OUT/summary.json.
    """
    from synthgen import prepare as prepare_stage

    # _config inside _run: a bad params file or --set is a user error too (exit 2, no traceback)
    _run(lambda: prepare_stage.main(_config(params, set_), out))


@app.command()
def train(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
    prepared: Annotated[Path, typer.Option(help="Prepared splits.")] = PREPARED,
    out: Annotated[Path, typer.Option(help="Model output root; the model goes to OUT/<train.model>/.")] = MODELS,
    checkpoints: Annotated[Path, typer.Option(help="Resumable checkpoints root.")] = CHECKPOINTS,
) -> None:
    """Train the conditional generator (`train.model`: cvae, vaegan or cgan), resuming from the last checkpoint.

    Reads: PREPARED/, params `train.*`. Writes: OUT/<model>/ (weights with their config,
    summary.json, losses.csv, sample grids) and CHECKPOINTS/<model>/last.pt. Data-parallel:
    `torchrun --nproc_per_node N -m synthgen.cli train ...` (gloo on CPU, NCCL on CUDA).
    """
    from synthgen import train as train_stage

    try:
        _run(train_stage.main, _config(params, set_), prepared, out, checkpoints)
    except train_stage.TrainingError as error:  # diverged: exit 2 naming the step, no traceback
        _fail(error)


@app.command()
def generate(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
    prepared: Annotated[Path, typer.Option(help="Prepared splits.")] = PREPARED,
    models: Annotated[Path, typer.Option(help="Model root written by `train`.")] = MODELS,
    out: Annotated[Path, typer.Option(help="Candidate pool directory.")] = POOL,
) -> None:
    """Plan per-class quotas and sample an over-generated candidate pool in large batches.

    Reads: PREPARED/, MODELS/<train.model>/, params `generate.*`. Writes: OUT/shard-*.npz
    (x, y, sample_id), OUT/plan.csv, OUT/generate_summary.json (atomically, as one directory).
    """
    from synthgen import generate as generate_stage

    _run(generate_stage.main, _config(params, set_), prepared, models, out)


@app.command(name="filter")
def filter_(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
    prepared: Annotated[Path, typer.Option(help="Prepared splits.")] = PREPARED,
    models: Annotated[Path, typer.Option(help="Model root written by `train`.")] = MODELS,
    pool: Annotated[Path, typer.Option(help="Candidate pool written by `generate`.")] = POOL,
    out: Annotated[Path, typer.Option(help="Synthetic output root.")] = SYNTHETIC,
) -> None:
    """Score candidates (discriminator, classifier confidence, novelty), keep each class's quota.

    Short classes get at most `generate.max_rounds` top-up rounds sized by their measured
    acceptance rate. Reads: PREPARED/, MODELS/, POOL/, params `filter.*` and `generate.*`.
    Writes (committed together; filter_summary.json last): OUT/accepted/<class>/<sample_id>.png
    (ImageFolder), OUT/accepted-shards/*.npz, OUT/manifest.csv, OUT/filter_summary.json, OUT/figures/.
    """
    from synthgen import filter as filter_stage

    _run(filter_stage.main, _config(params, set_), prepared, models, pool, out)


@app.command()
def export(
    synthetic: Annotated[Path, typer.Option(help="Synthetic root written by `filter`.")] = SYNTHETIC,
    out: Annotated[Path, typer.Option(help="Directory for the ImageFolder tree: new, empty or an earlier export (replaced "
                                           "whole).")] = Path("synthetic-imagefolder"),
    workers: Annotated[str, typer.Option(help="Processes writing PNGs: a number, or auto (every core from 10,000 images on).")] = "auto",
) -> None:
    """Write the accepted set as an ImageFolder tree OUT/<class>/<sample_id>.png from its npz shards.

    For large sets run with `filter.image_folder: false` (DVC then tracks only the shards); this
    writes the PNG view on demand. Reads: SYNTHETIC/accepted-shards, SYNTHETIC/filter_summary.json.
    """
    from synthgen.filter_outputs import export_image_folder

    written = _run(export_image_folder, synthetic, out, _workers(workers))
    typer.echo(f"exported {written} images to {out}/<class>/")


@app.command()
def evaluate(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
    prepared: Annotated[Path, typer.Option(help="Prepared splits.")] = PREPARED,
    synthetic: Annotated[Path, typer.Option(help="Synthetic output root written by `filter`.")] = SYNTHETIC,
    pool: Annotated[Path, typer.Option(help="Unfiltered candidate pool (ablation arms).")] = POOL,
    out: Annotated[Path, typer.Option(help="Reports directory.")] = REPORTS,
) -> None:
    """Train the fixed downstream classifier on every arm over several seeds; score on the test split.

    Reads: PREPARED/, SYNTHETIC/, POOL/, params `evaluate.*`. Writes: OUT/metrics.json (verdict,
    gains, counts) and OUT/evaluation/ (per-arm, per-seed, per-class results).
    """
    from synthgen import evaluate as evaluate_stage

    _run(evaluate_stage.main, _config(params, set_), prepared, synthetic, pool, out)


@app.command()
def report(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
    prepared: Annotated[Path, typer.Option(help="Prepared splits.")] = PREPARED,
    models: Annotated[Path, typer.Option(help="Model root written by `train`.")] = MODELS,
    synthetic: Annotated[Path, typer.Option(help="Synthetic output root written by `filter`.")] = SYNTHETIC,
    out: Annotated[Path, typer.Option(help="Reports directory.")] = REPORTS,
) -> None:
    """Write REPORT.md (a data card for the synthetic set) and its plots.

    Reads: everything the earlier stages wrote. Writes: OUT/REPORT.md and OUT/figures/*.png.
    """
    from synthgen import report as report_stage

    _run(report_stage.main, _config(params, set_), prepared, models, synthetic, out)


@app.command()
def run(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
    push: Annotated[bool, typer.Option(help="`dvc push` at the end.")] = True,
) -> None:
    """Run the whole pipeline as a Prefect flow (ephemeral server; DVC decides what is stale).

    --set edits are validated, then written into params.yaml (comments kept), so a later
    `dvc repro` is a no-op. Writes what the stages write; prints where REPORT.md is.
    """
    from flows import augment

    try:
        _run(augment.run_from_cli, params, set_ or [], push)
    except augment.StageFailed as error:  # the stage's own output was logged above
        kept = "as it was before this run" if getattr(error, "params_restored", False) else "with this run's --set values"
        typer.secho(f"error: {error.brief()}\n(params.yaml is {kept})", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2 if error.user_error else 1)


@app.command()
def serve(
    cron: Annotated[str, typer.Option(help="Cron schedule, e.g. '0 3 * * *'.")] = "0 3 * * *",
    name: Annotated[str, typer.Option(help="Deployment name.")] = "synthgen-nightly",
) -> None:
    """Register a scheduled deployment of the flow and serve it (needs `prefect server start`)."""
    from flows import augment

    _run(augment.serve, cron=cron, name=name)


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
