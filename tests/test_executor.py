"""Shard work gives identical results on every executor: serial, process pool, Dask cluster of processes."""

from __future__ import annotations

import os

import numpy as np
import pytest

from synthgen import artifacts
from synthgen import generate
from synthgen.config import GenerateConfig
from synthgen.executor import DASK_ADDRESS_VARIABLE, map_shards, open_executor
from synthgen.filter import NoveltyFilter, ScoreSpec, score_shard
from synthgen.models import build_generator, save_generator


def _square(value: int) -> int:
    return value * value


def _whereami(_) -> tuple[int, int]:
    """(pid, parent pid) of the process that ran this task."""
    return os.getpid(), os.getppid()


@pytest.fixture(scope="module")
def generator_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "generator.pt"
    save_generator(build_generator("cgan", 4, (1, 8, 8), base_channels=8), path)
    return path


def _generate_and_score(pool, generator_path, out_dir):
    """Generate shards to ``out_dir`` and score them with a novelty filter, on the open executor ``pool``."""
    config = GenerateConfig(batch_size=8, shard_size=16, seed=3)
    specs = generate.make_shard_specs(np.array([9, 4, 0, 13]), 0, config, generator_path, "cpu", out_dir)
    rng = np.random.default_rng(0)
    novelty = NoveltyFilter(0.5).fit(rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8), np.repeat(np.arange(4), 3))
    written = map_shards(generate.run_shard, specs, pool)
    scores = map_shards(score_shard, [ScoreSpec(s.out_path, {"novelty": novelty}, 0) for s in specs], pool)
    shards = [artifacts.read_shard(s.out_path) for s in specs]
    return written, shards, scores


def test_map_shards_keeps_spec_order():
    assert map_shards(_square, [3, 1, 2]) == [9, 1, 4]
    assert map_shards(_square, []) == []


def test_unknown_executor_is_rejected():
    with pytest.raises(ValueError, match="unknown executor"):
        with open_executor("spark"):
            pass


def test_serial_process_and_dask_give_identical_shards_dask_in_worker_processes(generator_path, tmp_path, monkeypatch):
    """One cluster per executor kind (starting them is the slow part); dask runs in local worker processes."""
    from distributed import get_client

    monkeypatch.delenv(DASK_ADDRESS_VARIABLE, raising=False)
    results = {}
    for name in ("serial", "process", "dask"):
        out_dir = tmp_path / name
        out_dir.mkdir()
        with open_executor(name, 2) as pool:
            results[name] = _generate_and_score(pool, generator_path, out_dir)
            if name == "dask":
                workers = get_client().run(os.getpid)  # {worker address: pid}
                where = map_shards(_whereami, range(8), pool)
    written, shards, scores = results["serial"]
    assert [w["n"] for w in written] == [16, 10]  # 26 samples, shards of 2 batches of 8
    for name in ("process", "dask"):
        assert results[name][0] == written
        for mine, theirs in zip(shards, results[name][1]):
            for key in ("x", "y", "sample_id"):
                np.testing.assert_array_equal(mine[key], theirs[key])
        for mine, theirs in zip(scores, results[name][2]):
            np.testing.assert_array_equal(mine["nn_distance"].to_numpy(), theirs["nn_distance"].to_numpy())
    # generate.executor: dask = `workers` worker processes, spawned by nannies in this process
    assert len(workers) == 2 and os.getpid() not in workers.values()
    assert {pid for pid, _ in where} <= set(workers.values()), (where, workers)
    assert {parent for _, parent in where} == {os.getpid()}


def test_dask_connects_to_the_cluster_named_by_the_environment(monkeypatch):
    """With SYNTHGEN_DASK_ADDRESS set, the work goes to that cluster's workers and no cluster is started."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=40) as cluster, Client(cluster) as client:
        (worker_pid,) = client.run(os.getpid).values()
        monkeypatch.setenv(DASK_ADDRESS_VARIABLE, cluster.scheduler_address)
        with open_executor("dask", workers=4) as pool:
            where = map_shards(_whereami, range(4), pool)
        assert {pid for pid, _ in where} == {worker_pid} != {os.getpid()}
        assert len(cluster.workers) == 1  # still the external cluster's one worker; it was not closed
        assert client.submit(_square, 7).result() == 49
