"""The DVC pipeline (dvc.yaml) end to end on a tiny config, in a temporary git + DVC repository.

One full ``dvc repro`` per session (the ``pipeline_repo`` fixture of tests/conftest.py), reused by
every test here, tests/test_flow.py and tests/test_house.py. Tests that change params restore the
committed state afterwards.
No mocks: real git, real DVC, the real ``synthgen`` CLI on sklearn digits.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from flows.augment import STAGES

REPO_ROOT = Path(__file__).resolve().parents[1]


def ran_stages(output: str) -> list[str]:
    return [stage for stage in STAGES if f"Running stage '{stage}'" in output]


# ------------------------------------------------------------------ static checks
def test_dvc_yaml_declares_the_flow_stages_with_only_their_params():
    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    assert tuple(spec["stages"]) == STAGES
    params = {name: stage.get("params", []) for name, stage in spec["stages"].items()}
    assert params["prepare"] == ["data"] and params["train"] == ["train"] and params["generate"] == ["generate"]
    # REPORT.md quotes the filter params and the sampling mode, nothing else
    assert params["evaluate"][0] == "evaluate" and params["report"] == ["filter", "generate.latent", "generate.latent_noise"]
    # a filter threshold change must not re-generate, and where generation runs must not re-filter
    assert "filter" in params["filter"] and "generate" not in params["filter"]
    assert {"generate.executor", "generate.workers"}.isdisjoint(params["filter"])
    assert {"generate.balance", "generate.count", "generate.min_per_class"} <= set(params["filter"])
    for name, stage in spec["stages"].items():
        assert stage["cmd"].startswith(f"synthgen {name}")
        assert f"synthgen/{name}.py" in stage["deps"]  # the rest of its code deps: tests/test_house.py


# -------------------------------------------------------------------- end to end
def test_repro_runs_every_stage_and_writes_the_outputs(pipeline_repo, repro_log, dvc):
    assert ran_stages(repro_log) == list(STAGES)
    lock = yaml.safe_load((pipeline_repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    model = yaml.safe_load((pipeline_repo / "params.yaml").read_text())["train"]["model"]
    for path in ["data/prepared/meta.json", f"models/{model}/generator.pt", "data/pool",
                 "data/synthetic/filter_summary.json", "reports/metrics.json", "reports/REPORT.md"]:
        assert (pipeline_repo / path).exists(), path
    assert (pipeline_repo / f"checkpoints/{model}").is_dir()
    metrics = json.loads(dvc(pipeline_repo, "metrics", "show", "--json"))
    files = metrics[""]["data"] if "" in metrics else next(iter(metrics.values()))["data"]
    # filter_summary.json (hundreds of per-class fields) is an out of filter, not a metric
    assert set(files) == {"reports/metrics.json", f"models/{model}/summary.json"}
    summary = json.loads((pipeline_repo / "data/synthetic/filter_summary.json").read_text())
    assert summary["filters"]["discriminator"] == "on"  # every default run has one, whatever the generator
    assert "filter_gain" in json.loads((pipeline_repo / "reports/metrics.json").read_text())
    filter_outs = {out["path"] for out in lock["stages"]["filter"]["outs"]}
    assert filter_outs == {"data/synthetic"}  # one directory, swapped in whole by the filter stage


def test_second_repro_runs_nothing(pipeline_repo, dvc):
    output = dvc(pipeline_repo, "repro")
    assert ran_stages(output) == []
    assert all(f"Stage '{stage}' didn't change" in output for stage in STAGES), output
    assert "up to date" in dvc(pipeline_repo, "status")


def test_filter_param_experiment_reruns_only_filter_onward_and_diffs(pipeline_repo, dvc, restore_committed):
    summary_path = pipeline_repo / "data/synthetic/filter_summary.json"
    before = json.loads(summary_path.read_text())
    assert before["config"]["filter"]["classifier_threshold"] != 0.9
    try:
        output = dvc(pipeline_repo, "exp", "run", "-S", "filter.classifier_threshold=0.9")
        ran = ran_stages(output)
        assert ran == ["filter", "evaluate", "report"], output
        assert all(f"Stage '{stage}' didn't change" in output for stage in ("prepare", "train", "generate"))
        assert json.loads(summary_path.read_text())["config"]["filter"]["classifier_threshold"] == 0.9
        diff = json.loads(dvc(pipeline_repo, "metrics", "diff", "--json"))
        assert "data/synthetic/filter_summary.json" not in diff
        params = json.loads(dvc(pipeline_repo, "params", "diff", "--json"))["params.yaml"]
        assert set(params) == {"filter.classifier_threshold"} and params["filter.classifier_threshold"]["new"] == 0.9
        assert "up to date" in dvc(pipeline_repo, "status")
    finally:
        restore_committed(pipeline_repo)
    assert "up to date" in dvc(pipeline_repo, "status")
    assert json.loads(summary_path.read_text()) == before


def test_push_then_pull_into_a_second_clone_restores_every_artifact(pipeline_repo, tmp_path, dvc, sh):
    remote = tmp_path / "remote"  # an absolute path: both clones see the same storage, as with ~/.cache
    dvc(pipeline_repo, "remote", "add", "--local", "-f", "-d", "shared", str(remote))
    try:
        dvc(pipeline_repo, "push")
        clone = tmp_path / "clone"
        sh(tmp_path, "git", "clone", "-q", str(pipeline_repo), str(clone))
        dvc(clone, "remote", "add", "--local", "-f", "-d", "shared", str(remote))
        dvc(clone, "pull")
        assert "up to date" in dvc(clone, "status")
        for path in ["data/prepared/meta.json", "data/synthetic/manifest.csv", "data/synthetic/filter_summary.json",
                     "reports/metrics.json", "reports/REPORT.md"]:
            assert (clone / path).exists(), path
        for path in ["reports/metrics.json", "data/synthetic/filter_summary.json", "dvc.lock"]:
            assert (clone / path).read_text() == (pipeline_repo / path).read_text(), path
    finally:
        (pipeline_repo / ".dvc" / "config.local").unlink(missing_ok=True)
