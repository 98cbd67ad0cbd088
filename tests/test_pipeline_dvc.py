"""The DVC pipeline (dvc.yaml) end to end on a tiny config, in a temporary git + DVC repository.

One full ``dvc repro`` per session (``pipeline_repo``), reused by every test here and by
tests/test_flow.py. Tests that change params restore the committed state afterwards.
No mocks: real git, real DVC, the real ``synthgen`` CLI on sklearn digits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.augment import STAGES, apply_params

REPO_ROOT = Path(__file__).resolve().parents[1]
COPIED = ["dvc.yaml", "params.yaml", ".gitignore", ".dvcignore", "data/raw/README.md"]
TINY = [
    "data.per_class=5", "data.val_per_class=5", "data.test_per_class=10",
    "train.steps=20", "train.batch_size=16", "train.checkpoint_every=10", "train.log_every=5",
    "train.eval_every=10", "train.device=cpu",
    "train.cgan.latent_dim=8", "train.cgan.base_channels=8", "train.cvae.latent_dim=4", "train.cvae.base_channels=8",
    "train.cvae.kl_warmup_steps=5",
    "generate.min_per_class=5", "generate.batch_size=128", "generate.shard_size=256", "generate.max_rounds=1",
    "generate.device=cpu",
    "filter.classifier_steps=20", "filter.device=cpu",
    "evaluate.seeds=2", "evaluate.steps=20", "evaluate.batch_size=16", "evaluate.width=8", "evaluate.device=cpu",
    "evaluate.quality=false",
]
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}


def project_env(repo: Path) -> dict[str, str]:
    """Environment for commands in the temp repo: this venv first, the repo's copy of synthgen imported."""
    env = dict(os.environ, **GIT_IDENTITY, DVC_NO_ANALYTICS="1", PYTHONPATH=str(repo))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def sh(repo: Path, *command: str, check: bool = True) -> str:
    """Run a command in ``repo``; return stdout + stderr; fail the test with the output on error."""
    result = subprocess.run(command, cwd=repo, env=project_env(repo), capture_output=True, text=True)
    output = result.stdout + result.stderr
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited with {result.returncode}:\n{output[-4000:]}")
    return output


def dvc(repo: Path, *arguments: str, check: bool = True) -> str:
    return sh(repo, str(Path(sys.executable).parent / "dvc"), *arguments, check=check)


def make_pipeline_repo(path: Path) -> Path:
    """Copy the project into ``path`` with tiny params, git+dvc init, commit, run ``dvc repro`` once.

    Idempotent (a marker file), so test modules sharing one basetemp build it once per session.
    """
    marker = path.with_name(path.name + ".reproduced")  # outside the repo: git status stays clean
    if marker.exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    for name in COPIED:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, path / name)
    shutil.copytree(REPO_ROOT / "synthgen", path / "synthgen", ignore=shutil.ignore_patterns("__pycache__"))
    apply_params(path / "params.yaml", TINY)
    sh(path, "git", "init", "-q", "-b", "main")
    dvc(path, "init", "-q")
    dvc(path, "config", "core.analytics", "false")
    dvc(path, "remote", "add", "-d", "local", ".dvc-storage")
    sh(path, "git", "add", "-A")
    sh(path, "git", "commit", "-q", "-m", "tiny synthgen project")
    output = dvc(path, "repro")
    sh(path, "git", "add", "-A")
    sh(path, "git", "commit", "-q", "-m", "reproduced")
    marker.write_text(output)
    return path


def restore_committed(repo: Path) -> None:
    """Undo a test's params edits and outputs: git back to HEAD, outputs back to dvc.lock."""
    sh(repo, "git", "checkout", "-q", "--", ".")
    dvc(repo, "checkout", "--force", "-q")


@pytest.fixture(scope="session")
def pipeline_repo(tmp_path_factory) -> Path:
    return make_pipeline_repo(tmp_path_factory.getbasetemp() / "pipeline-repo")


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
        assert f"synthgen/{name}.py" in stage["deps"] or name == "prepare"


# -------------------------------------------------------------------- end to end
def test_repro_runs_every_stage_and_writes_the_outputs(pipeline_repo):
    log = pipeline_repo.with_name(pipeline_repo.name + ".reproduced").read_text()
    assert ran_stages(log) == list(STAGES)
    lock = yaml.safe_load((pipeline_repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    model = yaml.safe_load((pipeline_repo / "params.yaml").read_text())["train"]["model"]
    for path in ["data/prepared/meta.json", f"models/{model}/generator.pt", "data/synthetic/pool",
                 "data/synthetic/filter_summary.json", "reports/metrics.json", "reports/REPORT.md"]:
        assert (pipeline_repo / path).exists(), path
    assert (pipeline_repo / f"checkpoints/{model}").is_dir()
    metrics = json.loads(dvc(pipeline_repo, "metrics", "show", "--json"))
    files = metrics[""]["data"] if "" in metrics else next(iter(metrics.values()))["data"]
    assert {"reports/metrics.json", "data/synthetic/filter_summary.json", f"models/{model}/summary.json"} <= set(files)


def test_second_repro_runs_nothing(pipeline_repo):
    output = dvc(pipeline_repo, "repro")
    assert ran_stages(output) == []
    assert all(f"Stage '{stage}' didn't change" in output for stage in STAGES), output
    assert "up to date" in dvc(pipeline_repo, "status")


def test_filter_param_experiment_reruns_only_filter_onward_and_diffs(pipeline_repo):
    try:
        output = dvc(pipeline_repo, "exp", "run", "-S", "filter.classifier_threshold=0.9")
        ran = ran_stages(output)
        assert ran and ran[0] == "filter" and not set(ran) & {"prepare", "train", "generate"}, output
        assert all(f"Stage '{stage}' didn't change" in output for stage in ("prepare", "train", "generate"))
        diff = json.loads(dvc(pipeline_repo, "metrics", "diff", "--json"))
        changed = diff["data/synthetic/filter_summary.json"]
        assert changed["config.filter.classifier_threshold"]["new"] == 0.9, changed
        params = json.loads(dvc(pipeline_repo, "params", "diff", "--json"))["params.yaml"]
        assert set(params) == {"filter.classifier_threshold"} and params["filter.classifier_threshold"]["new"] == 0.9
        assert "up to date" in dvc(pipeline_repo, "status")
    finally:
        restore_committed(pipeline_repo)
    assert "up to date" in dvc(pipeline_repo, "status")


def test_push_then_pull_into_a_second_clone_restores_every_artifact(pipeline_repo, tmp_path):
    remote = tmp_path / "remote"  # an absolute path: both clones see the same storage, as with ~/.cache
    dvc(pipeline_repo, "remote", "add", "--local", "-f", "-d", "shared", str(remote))
    try:
        dvc(pipeline_repo, "push")
        clone = tmp_path / "clone"
        sh(tmp_path, "git", "clone", "-q", str(pipeline_repo), str(clone))
        dvc(clone, "remote", "add", "--local", "-f", "-d", "shared", str(remote))
        dvc(clone, "pull")
        assert "up to date" in dvc(clone, "status")
        for path in ["data/prepared/meta.json", "data/synthetic/accepted", "reports/metrics.json", "reports/REPORT.md"]:
            assert (clone / path).exists(), path
        assert (clone / "reports/metrics.json").read_text() == (pipeline_repo / "reports/metrics.json").read_text()
    finally:
        (pipeline_repo / ".dvc" / "config.local").unlink(missing_ok=True)
