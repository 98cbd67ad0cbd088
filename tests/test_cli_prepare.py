"""``synthgen prepare`` through the real CLI: success, and user errors as exit code 2 with no output dir."""

from __future__ import annotations

import numpy as np
from typer.testing import CliRunner

from synthgen.cli import app
from synthgen.data import load_prepared

runner = CliRunner()


def prepare(tmp_path, *overrides: str):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  per_class: 3\n  val_per_class: 2\n  test_per_class: 4\n")
    args = ["prepare", "--params", str(params), "--out", str(tmp_path / "out")]
    for item in overrides:
        args += ["--set", item]
    return runner.invoke(app, args)


def test_prepare_writes_splits(tmp_path):
    result = prepare(tmp_path, "data.seed=3")
    assert result.exit_code == 0, result.output
    prepared = load_prepared(tmp_path / "out")
    assert prepared.train.counts().tolist() == [3] * 10 and prepared.test.counts().tolist() == [4] * 10
    assert prepared.meta["seed"] == 3 and "total" in result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "meta.json", "summary.json", "test.npz", "train.npz", "val.npz"]


def test_prepare_bad_source_exits_2_and_writes_nothing(tmp_path):
    result = prepare(tmp_path, f"data.source={tmp_path / 'nowhere'}")
    assert result.exit_code == 2
    assert "nowhere" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_prepare_bad_data_names_field(tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.full((4, 2, 2), np.nan), y=np.array([0, 1, 0, 1]))
    result = prepare(tmp_path, f"data.source={tmp_path / 'bad.npz'}")
    assert result.exit_code == 2 and "'x' has 16 NaN/inf" in result.output
    assert not (tmp_path / "out").exists()


def test_prepare_class_too_small_and_bad_param(tmp_path):
    result = prepare(tmp_path, "data.per_class=400")
    assert result.exit_code == 2 and "class '0'" in result.output
    result = prepare(tmp_path, "data.bogus=1")
    assert result.exit_code == 2 and "data.bogus" in result.output
    assert not (tmp_path / "out").exists()
