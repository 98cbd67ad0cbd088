"""Shard work gives identical results on every executor: serial, process pool, local Dask cluster."""

from __future__ import annotations

import numpy as np
import pytest

from synthgen import artifacts
from synthgen import generate
from synthgen.config import GenerateConfig
from synthgen.executor import map_shards, open_executor
from synthgen.filter import NoveltyFilter, ScoreSpec, score_shard
from synthgen.models import build_generator, save_generator


def _square(value: int) -> int:
    return value * value


@pytest.fixture(scope="module")
def generator_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "generator.pt"
    save_generator(build_generator("cgan", 4, (1, 8, 8), base_channels=8), path)
    return path


def _generate_and_score(executor, generator_path, out_dir):
    """Generate shards to ``out_dir`` and score them with a novelty filter, on ``executor``."""
    config = GenerateConfig(batch_size=8, shard_size=16, seed=3)
    specs = generate.make_shard_specs(np.array([9, 4, 0, 13]), 0, config, generator_path, "cpu", out_dir)
    rng = np.random.default_rng(0)
    novelty = NoveltyFilter(0.5).fit(rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8), np.repeat(np.arange(4), 3))
    with open_executor(executor, 2) if isinstance(executor, str) else executor as pool:
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


def test_serial_process_and_dask_give_identical_shards(generator_path, tmp_path):
    from synthgen.executor import _dask_executor

    results = {}
    for name in ("serial", "process", "dask"):
        out_dir = tmp_path / name
        out_dir.mkdir()
        executor = _dask_executor(2, processes=False) if name == "dask" else name
        results[name] = _generate_and_score(executor, generator_path, out_dir)
    written, shards, scores = results["serial"]
    assert [w["n"] for w in written] == [16, 10]  # 26 samples, shards of 2 batches of 8
    for name in ("process", "dask"):
        assert results[name][0] == written
        for mine, theirs in zip(shards, results[name][1]):
            for key in ("x", "y", "sample_id"):
                np.testing.assert_array_equal(mine[key], theirs[key])
        for mine, theirs in zip(scores, results[name][2]):
            np.testing.assert_array_equal(mine["nn_distance"].to_numpy(), theirs["nn_distance"].to_numpy())
