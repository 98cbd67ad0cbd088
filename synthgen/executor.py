"""Where shard work runs: serially, in a process pool, or on a Dask cluster.

One function, :func:`map_shards`, maps a picklable top-level function over shard specs and
returns the results in spec order. Every shard carries its own seed, so a shard's result does
not depend on the executor:

* ``serial``: a list comprehension in this process;
* ``process``: ``concurrent.futures.ProcessPoolExecutor`` with ``workers`` spawned processes;
* ``dask``: ``distributed.Client(...).get_executor()`` on a throw-away
  ``LocalCluster(n_workers=workers, processes=True, threads_per_worker=1)`` (worker processes
  spawned by a nanny, which sets ``OMP_NUM_THREADS=1`` in them), or, when the environment
  variable ``SYNTHGEN_DASK_ADDRESS`` is set (e.g. ``tcp://scheduler:8786``), on that running
  cluster, whose workers must be able to import ``synthgen`` and read the shard paths.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any, Callable, Iterator, Sequence

EXECUTORS = ("serial", "process", "dask")
DASK_ADDRESS_VARIABLE = "SYNTHGEN_DASK_ADDRESS"


@contextlib.contextmanager
def _dask_executor(workers: int, address: str | None = None) -> Iterator[Executor]:
    """A concurrent.futures-style executor on the Dask cluster at ``address``, else on a local one.

    The local cluster has ``workers`` worker processes of one thread each (``processes=True``:
    the GIL-bound parts of a shard, numpy outside torch ops and PNG/npz writing, run in parallel),
    and is closed on exit. A cluster given by address is only connected to, never closed.
    """
    from distributed import Client, LocalCluster

    if address:
        with Client(address) as client:
            yield client.get_executor()
        return
    cluster = LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40
    )
    try:
        with Client(cluster) as client:
            yield client.get_executor()
    finally:
        cluster.close()


@contextlib.contextmanager
def open_executor(kind: str, workers: int = 2) -> Iterator[Executor | None]:
    """Yield an executor for ``kind`` (None for ``serial``); it is shut down on exit.

    Process pools use the ``spawn`` start method: forking a parent that already ran OpenMP
    regions (any torch op) can deadlock the child (Dask's nanny spawns its workers too).
    ``dask`` connects to ``$SYNTHGEN_DASK_ADDRESS`` when it is set (``workers`` is then the
    cluster's business), else starts a local cluster of ``workers`` processes.
    """
    if kind not in EXECUTORS:
        raise ValueError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")
    if kind == "serial":
        yield None
    elif kind == "process":
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            yield pool
    else:
        with _dask_executor(workers, os.environ.get(DASK_ADDRESS_VARIABLE) or None) as pool:
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
