"""Benchmark of `synthgen run`: wall time of a full pipeline run and of a second, no-op run.

Usage (from the repo root):
    nice -n 5 .venv/bin/python bench/bench_run.py                       # the embedded default params
    nice -n 5 .venv/bin/python bench/bench_run.py --set train.steps=200  # any params edits

The working tree (code, dvc.yaml, params.yaml; no outputs, no caches, no .git) is copied into a
scratch directory with a fresh git repo, so nothing is written into this checkout. Each run is
the real CLI in a subprocess, so the times include Python/torch start-up and the Prefect
ephemeral server start. Targets: first run < 5 min on CPU, no-op run < 20 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parents[1]
# paths relative to the repo root, and names skipped anywhere
SKIPPED_PATHS = {".git", ".venv", ".dvc-storage", ".dvc/cache", ".dvc/tmp", "data/prepared", "data/synthetic",
                 "models", "checkpoints", "reports", "dvc_plots", "bench", "tests"}
SKIPPED_NAMES = {"__pycache__", ".pytest_cache", "synthgen.egg-info"}

app = typer.Typer(add_completion=False)


def copy_project(destination: Path) -> Path:
    """Copy the working tree without outputs/caches and make it a fresh git repo."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        relative = Path(directory).relative_to(REPO_ROOT)
        return {name for name in names if (relative / name).as_posix() in SKIPPED_PATHS or name in SKIPPED_NAMES}

    shutil.copytree(REPO_ROOT, destination, ignore=ignore)
    identity = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
                "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.com"}
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "bench"]):
        subprocess.run(command, cwd=destination, check=True, env=dict(os.environ, **identity))
    return destination


def timed_run(project: Path, overrides: list[str]) -> tuple[float, str]:
    """`synthgen run` in ``project`` (its own copy of the code imported); returns (seconds, output)."""
    # a private Prefect home: the ephemeral server's sqlite DB is not shared with other runs on this machine
    env = dict(os.environ, PYTHONPATH=str(project), DVC_NO_ANALYTICS="1", PREFECT_HOME=str(project.parent / "prefect-home"))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    command = [str(Path(sys.executable).parent / "synthgen"), "run", *[f"--set={item}" for item in overrides]]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"synthgen run failed ({result.returncode}):\n{output[-3000:]}")
    return seconds, output


def _outcome_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("stages:")]
    return lines[-1].removeprefix("stages: ") if lines else "?"


@app.command()
def main(
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="params edit for the first run (repeatable).")] = None,
    keep: Annotated[bool, typer.Option(help="Keep the scratch project and print its path.")] = False,
) -> None:
    """Time `synthgen run` twice in a scratch copy of this project; print a table."""
    scratch = Path(tempfile.mkdtemp(prefix="synthgen-bench-run-"))
    try:
        project = copy_project(scratch / "project")
        first_seconds, first = timed_run(project, set_ or [])
        second_seconds, second = timed_run(project, [])
        table = Table(title="synthgen run (wall time, CLI subprocess, incl. Prefect ephemeral server)")
        for column in ("run", "seconds", "stages"):
            table.add_column(column)
        table.add_row("first (all stages)", f"{first_seconds:.1f}", _outcome_line(first))
        table.add_row("second (no-op)", f"{second_seconds:.1f}", _outcome_line(second))
        Console().print(table)
        Console().print(f"params edits: {set_ or 'none (params.yaml as is)'}; cpus: {os.cpu_count()}")
    finally:
        if keep:
            print(f"scratch project kept at {scratch / 'project'}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    app()
