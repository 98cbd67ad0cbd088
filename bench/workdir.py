"""What the benchmarks that read a project's ``data/`` share: echo the command, load the params and ``prepared/``."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from rich.console import Console

from synthgen.config import EvaluateConfig, load_config
from synthgen.data import PreparedData, load_prepared
from synthgen.host_memory import keep_freed_memory


def open_work(work: Path, params: Path | None) -> tuple[Console, EvaluateConfig | None, PreparedData | None]:
    """(console, the params' evaluate section, ``work/prepared``), the command echoed first; None and None when
    ``work`` holds no prepared data (and it says so). ``params`` None reads ./params.yaml when present, else the defaults."""
    console = Console(width=180)
    threads = os.environ.get("OMP_NUM_THREADS")
    console.print("$ " + (f"OMP_NUM_THREADS={threads} " if threads else "") + shlex.join([sys.executable, *sys.argv]), highlight=False)
    # as the CLI runs the stages (SYNTHGEN_HOST_MEMORY=default measures glibc's own malloc)
    console.print(f"freed host memory kept for reuse (synthgen/host_memory.py): {keep_freed_memory()}", highlight=False)
    if not (work / "prepared" / "meta.json").is_file():
        console.print(f"{work} holds no prepared data: run `make run` (or dvc repro) first, or pass a directory")
        return console, None, None
    params = params if params is not None else (Path("params.yaml") if Path("params.yaml").is_file() else None)
    return console, load_config(params).evaluate, load_prepared(work / "prepared")
