"""Shared pytest fixtures: the real MNIST test split (when present), a tiny prepared dataset, and a tiny
real git + DVC copy of the project reproduced once per session (with ``dvc`` / ``sh`` helpers)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# /work/main/tests/conftest.py -> /work/shared/data/mnist-t10k (never copied into the repo)
MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-t10k"


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """Directory holding the real MNIST t10k IDX files, or skip the test."""
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST not found at {MNIST_DIR}")
    return MNIST_DIR


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> Path:
    """A prepared dir from sklearn digits: 8 train, 4 val, 10 test images per class (8x8x1)."""
    from synthgen import prepare
    from synthgen.config import Config, DataConfig

    config = Config(data=DataConfig(source="digits", per_class=8, val_per_class=4, test_per_class=10, seed=0))
    out_dir = tmp_path_factory.mktemp("tiny") / "prepared"
    prepare.main(config, out_dir, progress=False)
    return out_dir


# ------------------------------------------------ the tiny real git + DVC project (tests/test_pipeline_dvc.py etc.)
REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINE_FILES = ["dvc.yaml", "params.yaml", ".gitignore", ".dvcignore", "data/raw/README.md"]
TINY_PARAMS = [
    "data.source=digits", "data.test_source=null", "data.long_tail=null", "data.per_class=5", "data.val_per_class=5", "data.test_per_class=10",
    "train.steps=20", "train.batch_size=16", "train.checkpoint_every=10", "train.log_every=5",
    "train.eval_every=10", "train.device=cpu",
    "train.cgan.latent_dim=8", "train.cgan.base_channels=8", "train.cvae.latent_dim=4", "train.cvae.base_channels=8",
    "train.cvae.kl_warmup_steps=5",
    "generate.min_per_class=5", "generate.batch_size=128", "generate.shard_size=256", "generate.max_rounds=1",
    "generate.device=cpu",
    "filter.classifier_steps=20", "filter.discriminator_steps=20", "filter.discriminator_samples=20", "filter.discriminator_calibration_samples=40", "filter.device=cpu",
    "evaluate.seeds=2", "evaluate.steps=20", "evaluate.batch_size=16", "evaluate.width=8", "evaluate.device=cpu",
    "evaluate.quality=false",
]
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}


def project_env(repo: Path) -> dict[str, str]:
    """Environment for commands in a temp repo: this venv first, the repo's copy of synthgen imported."""
    env = dict(os.environ, **GIT_IDENTITY, DVC_NO_ANALYTICS="1", PYTHONPATH=str(repo))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_sh(repo: Path, *command: str, check: bool = True) -> str:
    """Run a command in ``repo``; return stdout + stderr; fail the test with the output on error."""
    result = subprocess.run(command, cwd=repo, env=project_env(repo), capture_output=True, text=True)
    output = result.stdout + result.stderr
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited with {result.returncode}:\n{output[-4000:]}")
    return output


def run_dvc(repo: Path, *arguments: str, check: bool = True) -> str:
    return run_sh(repo, str(Path(sys.executable).parent / "dvc"), *arguments, check=check)


def make_pipeline_repo(path: Path) -> Path:
    """Copy the project into ``path`` with tiny params, git+dvc init, commit, run ``dvc repro`` once.

    Idempotent (a marker file next to it holding the repro log), so it is built once per session.
    """
    from flows.augment import apply_params

    marker = path.with_name(path.name + ".reproduced")  # outside the repo: git status stays clean
    if marker.exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    for name in PIPELINE_FILES:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, path / name)
    shutil.copytree(REPO_ROOT / "synthgen", path / "synthgen", ignore=shutil.ignore_patterns("__pycache__"))
    apply_params(path / "params.yaml", TINY_PARAMS)
    run_sh(path, "git", "init", "-q", "-b", "main")
    run_dvc(path, "init", "-q")
    run_dvc(path, "config", "core.analytics", "false")
    run_dvc(path, "remote", "add", "-d", "local", ".dvc-storage")
    run_sh(path, "git", "add", "-A")
    run_sh(path, "git", "commit", "-q", "-m", "tiny synthgen project")
    output = run_dvc(path, "repro")
    run_sh(path, "git", "add", "-A")
    run_sh(path, "git", "commit", "-q", "-m", "reproduced")
    marker.write_text(output)
    return path


def restore_repo(repo: Path) -> None:
    """Undo a test's edits and outputs: git back to HEAD, outputs back to dvc.lock."""
    run_sh(repo, "git", "checkout", "-q", "--", ".")
    run_dvc(repo, "checkout", "--force", "-q")


@pytest.fixture(scope="session")
def pipeline_repo(tmp_path_factory) -> Path:
    """The tiny project, reproduced once per session; tests that edit it restore it (``restore_committed``)."""
    return make_pipeline_repo(tmp_path_factory.getbasetemp() / "pipeline-repo")


@pytest.fixture(scope="session")
def repro_log(pipeline_repo) -> str:
    """Output of the session's one full ``dvc repro`` of ``pipeline_repo``."""
    return pipeline_repo.with_name(pipeline_repo.name + ".reproduced").read_text()


@pytest.fixture(scope="session")
def dvc():
    """``dvc(repo, *arguments, check=True) -> output``: the venv's dvc in ``repo``."""
    return run_dvc


@pytest.fixture(scope="session")
def sh():
    """``sh(repo, *command, check=True) -> output``: a command in ``repo`` with the venv on PATH."""
    return run_sh


@pytest.fixture(scope="session")
def restore_committed():
    """``restore_committed(repo)``: git back to HEAD and outputs back to dvc.lock."""
    return restore_repo
