"""The Prefect flow (flows/augment.py) on the tiny DVC project (``pipeline_repo`` in tests/conftest.py).

Flow runs go through a real (test-harness) Prefect server and real DVC; one harness per session.
The repo is reproduced once per session, so flow runs here mostly find stages up to date.
"""

from __future__ import annotations

import hashlib
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from flows.augment import FAIL_ONCE_VARIABLE, STAGES, FlowParams, StageFailed, apply_params, augment, build_deployment
from synthgen.config import ConfigError, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
FAST_RETRIES = {"retries": 2, "retry_delay_seconds": [0.1]}


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One Prefect test server for the session, with Prefect's home in a temp dir, analytics off."""
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings(updates={PREFECT_HOME: str(home), PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture(scope="session")
def flow_repo(pipeline_repo) -> Path:
    return pipeline_repo


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------- no server needed
def test_flow_params_are_validated_and_mapped_to_params_keys():
    with pytest.raises(ValidationError, match="classifier_threshold"):
        FlowParams(classifier_threshold=1.5)
    with pytest.raises(ValidationError, match="not_a_field"):
        FlowParams(not_a_field=1)
    params = FlowParams(model="cvae", count=30, classifier_threshold=0.7, overrides=["train.steps=5"])
    assert params.to_overrides() == ["train.model=cvae", "generate.count=30", "filter.classifier_threshold=0.7",
                                     "train.steps=5"]
    for kind in typing.get_args(TrainConfig.model_fields["model"].annotation):  # the flow offers every model train does
        assert FlowParams(model=kind).to_overrides() == [f"train.model={kind}"]


def test_apply_params_keeps_comments_and_rejects_bad_keys(tmp_path):
    params_path = tmp_path / "params.yaml"
    params_path.write_text((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    before = params_path.read_text()
    with pytest.raises(ConfigError, match="filter.clasifier_threshold"):
        apply_params(params_path, ["filter.clasifier_threshold=0.9"])
    with pytest.raises(ConfigError, match="train.steps"):
        apply_params(params_path, ["train.steps=-3"])
    assert params_path.read_text() == before  # nothing written on error
    assert apply_params(params_path, ["filter.classifier_threshold=0.9", "data.source=data/raw/x"]) is True
    text = params_path.read_text()
    comments = [line[line.index("#"):].strip() for line in before.splitlines() if "#" in line]
    assert len(comments) > 10 and [c for c in comments if c not in text] == []  # every comment kept, verbatim
    loaded = yaml.safe_load(text)
    assert loaded["filter"]["classifier_threshold"] == 0.9 and loaded["data"]["source"] == "data/raw/x"
    assert apply_params(params_path, ["filter.classifier_threshold=0.9"]) is False
    changed = [(old, new) for old, new in zip(before.splitlines(), text.splitlines()) if old != new]
    assert len(before.splitlines()) == len(text.splitlines()) and len(changed) == 2  # the two edited lines and no other:
    assert all(old.split(":")[0] == new.split(":")[0] for old, new in changed)  # nulls stay `null`, lists stay on their line


def test_serve_builds_a_cron_deployment_of_the_flow_for_this_project(tmp_path, monkeypatch):
    """`synthgen serve` hands prefect.serve a deployment of `augment` on the cron, for the cwd; nothing is started."""
    from typer.testing import CliRunner

    import prefect
    from synthgen.cli import app

    served = []
    monkeypatch.setattr(prefect, "serve", lambda *deployments, **kwargs: served.extend(deployments))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["serve", "--cron", "15 2 * * 1", "--name", "weekly-test"])
    assert result.exit_code == 0, result.output
    (deployment,) = served
    assert deployment.name == "weekly-test" and deployment.flow_name == "synthgen-augment"
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "15 2 * * 1" and schedule.active
    path, _, function = deployment.entrypoint.rpartition(":")
    assert function == "augment" and (tmp_path / path).resolve() == ROOT / "flows" / "augment.py"
    assert deployment.parameters == {"params": {"project_dir": str(tmp_path.resolve())}}
    FlowParams(**deployment.parameters["params"])  # what a scheduled run will validate
    assert build_deployment().schedules[0].schedule.cron == "0 3 * * *"  # the CLI's default: nightly at 03:00

    bad = CliRunner().invoke(app, ["serve", "--cron", "every night"])
    assert bad.exit_code == 2 and "invalid cron schedule 'every night'" in bad.output and len(served) == 1


# ------------------------------------------------------------------ flow runs
def _artifact_keys(flow_run_id) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {artifact.key for artifact in artifacts}


def _task_run_counts(flow_run_id) -> dict[str, int]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run.run_count for run in runs}


def test_flow_on_an_up_to_date_project_skips_every_stage_pushes_and_publishes(prefect_server, flow_repo, dvc):
    state = augment(FlowParams(project_dir=str(flow_repo), **FAST_RETRIES), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["stages"] == {stage: "skipped" for stage in STAGES}
    assert result["pushed"] and any((flow_repo / ".dvc-storage").rglob("*"))
    assert result["report"].endswith("reports/REPORT.md")
    assert {"synthgen-report", "synthgen-per-class"} <= _artifact_keys(state.state_details.flow_run_id)
    assert "up to date" in dvc(flow_repo, "status")


def test_flow_retries_a_stage_that_fails_once(prefect_server, flow_repo, tmp_path, monkeypatch):
    flag = tmp_path / "generate-failed-once"
    monkeypatch.setenv(FAIL_ONCE_VARIABLE, f"generate:{flag}")
    state = augment(FlowParams(project_dir=str(flow_repo), push=False, **FAST_RETRIES), return_state=True)
    assert flag.exists(), "the injected failure never fired"
    assert state.is_completed(), state.message
    counts = _task_run_counts(state.state_details.flow_run_id)
    assert counts["dvc-repro-generate"] == 2 and counts["dvc-repro-filter"] == 1


def test_a_user_error_is_told_in_the_stage_s_own_words_and_a_crash_with_its_output_tail():
    output = ("Running stage 'filter':\n> synthgen filter\nerror: data/pool: no candidates\n  run generate first\n"
              "ERROR: failed to reproduce 'filter': failed to run: synthgen filter, exited with 2")
    assert StageFailed("filter", output, user_error=True).brief() == \
        "stage 'filter' failed: data/pool: no candidates\n  run generate first"
    crash = StageFailed("filter", output.replace("exited with 2", "exited with 1"))
    assert crash.brief() == str(crash) and "failed to reproduce" in crash.brief()


def test_flow_with_a_failing_stage_fails_and_keeps_the_previous_outputs(prefect_server, flow_repo, tmp_path, dvc,
                                                                        restore_committed):
    from typer.testing import CliRunner

    from synthgen.cli import app

    prepared = flow_repo / "data/prepared/train.npz"
    before = digest(prepared)
    missing = tmp_path / "no-such-dataset"
    params_before = (flow_repo / "params.yaml").read_text()
    try:
        state = augment(FlowParams(project_dir=str(flow_repo), source=str(missing), push=False, **FAST_RETRIES),
                        return_state=True)
        assert state.is_failed()
        error = state.result(raise_on_failure=False)
        assert isinstance(error, StageFailed) and error.stage == "prepare"
        assert "no-such-dataset" in str(error)  # the stage's own error message
        counts = _task_run_counts(state.state_details.flow_run_id)
        assert error.user_error and counts == {"dvc-repro-prepare": 1}  # a bad data.source is not retried
        assert digest(prepared) == before  # DVC deleted it before running; the flow checked it out again
        assert (flow_repo / "reports/REPORT.md").is_file()
        assert (flow_repo / "params.yaml").read_text() == params_before  # the failed run's data.source is not left behind
        result = CliRunner().invoke(app, ["run", "--params", str(flow_repo / "params.yaml"), "--set", f"data.source={missing}",
                                          "--no-push"])
        assert result.exit_code == 2 and "no-such-dataset" in result.output  # a user error, as every stage's CLI says
        assert "stage 'prepare' failed: data source not found" in " ".join(result.output.split())  # the stage's reason
        assert "params.yaml is as it was before this run" in " ".join(result.output.split())
        assert (flow_repo / "params.yaml").read_text() == params_before
    finally:
        restore_committed(flow_repo)
    assert "up to date" in dvc(flow_repo, "status")


def test_a_failure_after_a_stage_ran_keeps_the_set_values_that_stage_ran_with(prefect_server, flow_repo, tmp_path, monkeypatch,
                                                                              restore_committed):
    monkeypatch.setenv(FAIL_ONCE_VARIABLE, f"generate:{tmp_path / 'generate-failed'}")
    try:
        state = augment(FlowParams(project_dir=str(flow_repo), overrides=["train.seed=5"], push=False, retries=0), return_state=True)
        assert state.is_failed()
        error = state.result(raise_on_failure=False)
        assert isinstance(error, StageFailed) and error.stage == "generate" and not error.params_restored
        assert yaml.safe_load((flow_repo / "params.yaml").read_text())["train"]["seed"] == 5  # as dvc.lock's train stage says
    finally:
        restore_committed(flow_repo)
