"""Tests of quotas, reproducible sharded sampling and the atomic candidate pool (synthgen.generate)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from synthgen import artifacts
from synthgen import generate
from synthgen.config import GenerateConfig, load_config
from synthgen.data import DataError
from synthgen.io import read_json
from synthgen.models import build_generator, save_generator

LONG_TAIL = np.array([50, 20, 5, 1])


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_generator(build_generator("cgan", 10, (1, 8, 8), base_channels=8), root / "cgan" / "generator.pt")
    return root


def tiny_config(**overrides):
    defaults = {"train.model": "cgan", "generate.min_per_class": 6, "generate.batch_size": 16, "generate.shard_size": 40, "generate.device": "cpu"}
    defaults.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in defaults.items()])


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"balance": "to_max"}, [0, 30, 45, 49]),
        ({"balance": "to_max", "min_per_class": 3}, [3, 30, 45, 49]),
        ({"balance": "to_count", "count": 30}, [0, 10, 25, 29]),
        ({"balance": "to_count", "count": 30, "min_per_class": 12}, [12, 12, 25, 29]),
        # budget round(0.5 * 76) = 38: class 3 rises to 5, classes 2-3 to 20, the last 4 to the smallest (ties: lowest index)
        ({"balance": "ratio", "ratio": 0.5}, [0, 2, 16, 20]),
    ],
)
def test_quotas_exact_on_long_tail(settings, expected):
    quotas = generate.compute_quotas(LONG_TAIL, GenerateConfig(**{"min_per_class": 0, **settings}))
    assert quotas.tolist() == expected
    assert quotas.dtype == np.int64


def test_ratio_on_balanced_data_is_ratio_times_real():
    quotas = generate.compute_quotas(np.array([20, 20, 20]), GenerateConfig(balance="ratio", ratio=1.5, min_per_class=0))
    assert quotas.tolist() == [30, 30, 30]


def test_minority_classes_get_the_most_in_every_mode():
    for balance in ("to_max", "to_count", "ratio"):
        quotas = generate.compute_quotas(LONG_TAIL, GenerateConfig(balance=balance, count=40, ratio=1.0, min_per_class=0))
        assert np.all(np.diff(quotas) >= 0), (balance, quotas)


def test_first_round_requests_round_up():
    assert generate.first_round_requests(np.array([0, 3, 10]), 1.5).tolist() == [0, 5, 15]


def test_sample_reproducible_from_its_id_whatever_the_shard_size(models_root):
    path = models_root / "cgan" / "generator.pt"
    requests = np.array([7, 0, 30, 5, 0, 0, 0, 0, 0, 11])
    arrays = []
    for shard_size in (16, 40, 1000):
        config = GenerateConfig(batch_size=16, shard_size=shard_size)
        specs = generate.make_shard_specs(requests, 0, config, path, "cpu", None)
        assert all(len(s.labels) % 16 == 0 for s in specs[:-1])  # whole batches per shard
        parts = [generate.run_shard(s) for s in specs]
        arrays.append({k: np.concatenate([p[k] for p in parts]) for k in ("x", "y", "sample_id")})
    for other in arrays[1:]:
        for key in ("x", "y", "sample_id"):
            np.testing.assert_array_equal(arrays[0][key], other[key])
    # sample 37 regenerated alone from its batch (37 // 16 = 2) matches the pool
    model = generate.load_model(path, "cpu")
    labels = np.repeat(np.arange(10), requests)
    batch = generate.sample_batches(model, labels[32:48], 32, 16, 0, torch.device("cpu"))
    np.testing.assert_array_equal(batch[37 - 32], arrays[0]["x"][37])
    assert arrays[0]["x"].dtype == np.uint8 and arrays[0]["x"].shape[1:] == (8, 8, 1)
    assert not np.array_equal(arrays[0]["x"][0], arrays[0]["x"][1])  # distinct noise per sample


def test_main_writes_plan_summary_and_shards(tiny_prepared, models_root, tmp_path):
    pool = tmp_path / "pool"
    summary = generate.main(tiny_config(), tiny_prepared, models_root, pool)
    plan = pd.read_csv(pool / "plan.csv")
    assert plan["quota"].tolist() == [6] * 10 and plan["request"].tolist() == [12] * 10
    assert plan["real"].tolist() == [8] * 10
    loaded = artifacts.load_pool(pool)
    assert loaded.counts().tolist() == [12] * 10
    assert loaded.index.tolist() == list(range(120))
    assert read_json(pool / "generate_summary.json")["n_samples"] == summary["n_samples"] == 120
    assert summary["next_sample_id"] == 128 and summary["next_sample_id"] % 16 == 0
    assert len(artifacts.shard_paths(pool)) == 3  # shard_size 40 -> 48 (3 batches of 16)
    again = tmp_path / "again"
    generate.main(tiny_config(), tiny_prepared, models_root, again)
    np.testing.assert_array_equal(artifacts.load_pool(again).x, loaded.x)


def test_interrupted_generation_leaves_no_half_written_pool(tiny_prepared, models_root, tmp_path, monkeypatch):
    pool = tmp_path / "pool"
    real_save, calls = generate.save_npz, []

    def failing_save(path, **arrays):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed midway")
        return real_save(path, **arrays)

    monkeypatch.setattr(generate, "save_npz", failing_save)
    with pytest.raises(KeyboardInterrupt):
        generate.main(tiny_config(), tiny_prepared, models_root, pool)
    assert not pool.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(generate, "save_npz", real_save)
    generate.main(tiny_config(), tiny_prepared, models_root, pool)
    before = artifacts.load_pool(pool)
    calls.clear()
    monkeypatch.setattr(generate, "save_npz", failing_save)
    with pytest.raises(KeyboardInterrupt):
        generate.main(tiny_config(**{"generate.min_per_class": 9}), tiny_prepared, models_root, pool)
    after = artifacts.load_pool(pool)  # the previous complete pool, untouched
    np.testing.assert_array_equal(before.x, after.x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool"]


def test_missing_generator_is_a_clear_data_error(tiny_prepared, tmp_path):
    with pytest.raises(DataError, match="generator.pt"):
        generate.main(tiny_config(), tiny_prepared, tmp_path / "no-models", tmp_path / "pool")


def test_cli_generate_and_its_user_errors(tiny_prepared, models_root, tmp_path):
    from typer.testing import CliRunner

    from synthgen.cli import app

    sets = [arg for k, v in {"train.model": "cgan", "generate.min_per_class": 3, "generate.batch_size": 16, "generate.device": "cpu"}.items() for arg in ("--set", f"{k}={v}")]
    common = ["--prepared", str(tiny_prepared)]
    result = CliRunner().invoke(app, ["generate", *common, *sets, "--models", str(models_root), "--out", str(tmp_path / "pool")])
    assert result.exit_code == 0, result.output
    assert artifacts.load_pool(tmp_path / "pool").counts().tolist() == [6] * 10
    missing = CliRunner().invoke(app, ["generate", *common, *sets, "--models", str(tmp_path / "none"), "--out", str(tmp_path / "p2")])
    assert missing.exit_code == 2 and "generator.pt" in missing.output
    bad = CliRunner().invoke(app, ["filter", *common, "--pool", str(tmp_path / "no-pool"), "--models", str(models_root), "--out", str(tmp_path / "s")])
    assert bad.exit_code == 2 and "generate_summary.json" in bad.output
    # balanced data, to_max, no floor: nothing to generate, so nothing for filter and evaluate to judge
    nothing = [*sets, "--set", "generate.min_per_class=0"]  # the last --set of a key wins
    empty = CliRunner().invoke(app, ["generate", *common, *nothing, "--models", str(models_root), "--out", str(tmp_path / "p3")])
    assert empty.exit_code == 2 and "asks no sample of any class" in empty.output and "generate.min_per_class=0" in empty.output
    assert not (tmp_path / "p3").exists()


def test_filter_refuses_a_pool_generated_for_other_classes(tiny_prepared, models_root, tmp_path):
    """filter.main checks the pool's class names against the prepared data before fitting anything."""
    import shutil

    from synthgen import filter as filter_stage
    from synthgen.io import write_json

    pool = tmp_path / "pool"
    generate.main(tiny_config(), tiny_prepared, models_root, pool)
    renamed = tmp_path / "renamed"  # the same images, class names of another dataset
    shutil.copytree(tiny_prepared, renamed)
    meta = read_json(renamed / "meta.json")
    write_json(renamed / "meta.json", {**meta, "class_names": [f"letter-{c}" for c in meta["class_names"]]})
    out = tmp_path / "synthetic"
    with pytest.raises(DataError, match=r"was generated for classes \['0', '1'.*the prepared data has \['letter-0'"):
        filter_stage.main(tiny_config(), renamed, models_root, pool, out)
    assert not out.exists()
    reordered = tmp_path / "reordered"  # same names, other order: class k would mean another class
    shutil.copytree(tiny_prepared, reordered)
    write_json(reordered / "meta.json", {**meta, "class_names": list(reversed(meta["class_names"]))})
    with pytest.raises(DataError, match="was generated for classes"):
        filter_stage.main(tiny_config(), reordered, models_root, pool, out)
    assert not out.exists()
    retrained = tmp_path / "retrained"  # the generator changed after generate ran (trained again, by hand)
    shutil.copytree(models_root, retrained)
    save_generator(build_generator("cgan", 10, (1, 8, 8), seed=1, base_channels=8), retrained / "cgan" / "generator.pt")
    with pytest.raises(DataError, match=r"was generated by a cgan other than .*retrained/cgan/generator.pt: rerun `synthgen generate`"):
        filter_stage.main(tiny_config(), tiny_prepared, retrained, pool, out)
    assert not out.exists()


def test_latent_mode_resolution_and_interpolated_pool(tiny_prepared, models_root, tmp_path):
    gan = build_generator("cgan", 10, (1, 8, 8), base_channels=8)
    assert generate.resolve_latent("auto", gan) == "prior"
    with pytest.raises(DataError, match="latent bank"):
        generate.resolve_latent("interpolate", gan)
    vae = build_generator("cvae", 10, (1, 8, 8), base_channels=8, latent_dim=4)
    vae.latent_bank = (torch.randn(20, 4), torch.arange(10).repeat(2))
    save_generator(vae, tmp_path / "models" / "cvae" / "generator.pt")
    assert generate.resolve_latent("auto", vae) == "interpolate"
    summaries = {}
    for latent in ("auto", "prior"):
        config = tiny_config(**{"train.model": "cvae", "generate.latent": latent})
        summaries[latent] = generate.main(config, tiny_prepared, tmp_path / "models", tmp_path / f"pool-{latent}")
    assert summaries["auto"]["latent"] == "interpolate" and summaries["prior"]["latent"] == "prior"
    assert summaries["auto"]["latent_noise"] == 1.0 and summaries["prior"]["latent_noise"] is None  # the noise used, if any
    assert not np.array_equal(artifacts.load_pool(tmp_path / "pool-auto").x, artifacts.load_pool(tmp_path / "pool-prior").x)
