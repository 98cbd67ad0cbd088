"""Where shard work runs: serially, in a process pool, or on a local Dask cluster.

One function, :func:`map_shards`, maps a picklable top-level function over shard specs and
returns the results in spec order. Every shard carries its own seed, so a shard's result does
not depend on the executor (serial, ``process`` = ``concurrent.futures.ProcessPoolExecutor``,
``dask`` = ``distributed.Client(LocalCluster(...)).get_executor()``).
"""

from __future__ import annotations

import contextlib
import multiprocessing
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any, Callable, Iterator, Sequence

EXECUTORS = ("serial", "process", "dask")


@contextlib.contextmanager
def _dask_executor(workers: int, processes: bool) -> Iterator[Executor]:
    """A concurrent.futures-style executor backed by a throw-away local Dask cluster."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=processes, dashboard_address=None, silence_logs=40
    )
    try:
        with Client(cluster) as client:
            yield client.get_executor()
    finally:
        cluster.close()


@contextlib.contextmanager
def open_executor(kind: str, workers: int = 2, dask_processes: bool = False) -> Iterator[Executor | None]:
    """Yield an executor for ``kind`` (None for ``serial``); it is shut down on exit.

    Process pools use the ``spawn`` start method: forking a parent that already ran OpenMP
    regions (any torch op) can deadlock the child.
    """
    if kind not in EXECUTORS:
        raise ValueError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")
    if kind == "serial":
        yield None
    elif kind == "process":
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            yield pool
    else:
        with _dask_executor(workers, dask_processes) as pool:
            yield pool


def map_shards(
    fn: Callable[[Any], Any],
    specs: Sequence[Any],
    executor: str | Executor | None = "serial",
    workers: int = 2,
) -> list[Any]:
    """``[fn(spec) for spec in specs]``, run by ``executor`` (a kind name or an open executor)."""
    if executor is None or executor == "serial" or len(specs) == 0:
        return [fn(spec) for spec in specs]
    if isinstance(executor, str):
        with open_executor(executor, workers) as pool:
            return list(pool.map(fn, specs))
    return list(executor.map(fn, specs))
