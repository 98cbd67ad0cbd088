"""Prefect flow driving the synthgen DVC pipeline: one task per stage, DVC decides what is stale.

The flow is a thin shell over ``dvc.yaml``. It validates its parameters (a pydantic model),
writes them into ``params.yaml`` (comments kept, atomic, after validating the whole config), then
runs ``dvc repro --single-item <stage>`` for every stage in DAG order. DVC skips up-to-date
stages and caches outputs, so Prefect's own task caching is off; ``dvc repro`` after a flow run
is a no-op. Failed stages are retried with backoff, except user errors (the CLI's exit code 2).
A stage that keeps failing fails the flow with the stage's error, after its previous good
outputs are checked out again from the DVC cache. At the end the outputs are pushed to the
default DVC remote (a failed push only warns) and the report is published as Prefect artifacts.

Test hook: ``SYNTHGEN_FAIL_ONCE=<stage>:<flag file>`` makes the task of ``<stage>`` fail once
(when the flag file does not exist yet; the task creates it), to exercise the retries.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed, State
from pydantic import BaseModel, ConfigDict, Field
from yaml import safe_load

from synthgen.config import ConfigError, apply_overrides, config_from_dict, load_config
from synthgen.io import atomic_write_text, read_json

STAGES = ("prepare", "train", "generate", "filter", "evaluate", "report")
REPORT = Path("reports/REPORT.md")
FAIL_ONCE_VARIABLE = "SYNTHGEN_FAIL_ONCE"
# flow parameter -> the params.yaml key it sets (None leaves params.yaml as it is)
PARAM_KEYS = {
    "source": "data.source",
    "per_class": "data.per_class",
    "model": "train.model",
    "train_steps": "train.steps",
    "balance": "generate.balance",
    "count": "generate.count",
    "min_per_class": "generate.min_per_class",
    "discriminator_quantile": "filter.discriminator_quantile",
    "classifier_threshold": "filter.classifier_threshold",
    "novelty_threshold": "filter.novelty_threshold",
    "evaluate_seeds": "evaluate.seeds",
}


class StageFailed(RuntimeError):
    """A pipeline stage failed; ``user_error`` marks bad params/data (not worth retrying); ``params_restored``: the
    flow wrote params.yaml back as it was before the run (no stage had run with the edit)."""

    def __init__(self, stage: str, message: str, user_error: bool = False):
        super().__init__(f"stage {stage!r} failed: {message}")
        self.stage = stage
        self.message = message  # the tail of the stage's output
        self.user_error = user_error
        self.params_restored = False

    def brief(self) -> str:
        """For a user error, the stage's own ``error: ...`` lines (what was wrong with the data or params);
        otherwise the whole message, whose output tail says where it crashed."""
        lines = self.message.splitlines()
        first = next((i for i, line in enumerate(lines) if line.startswith("error:")), None)
        if not self.user_error or first is None:
            return str(self)
        # the CLI's message runs from its "error:" line to dvc's own "ERROR: failed to reproduce ..."
        reason = list(itertools.takewhile(lambda line: not line.startswith("ERROR:"), lines[first:]))
        return "\n".join([f"stage {self.stage!r} failed: {reason[0].removeprefix('error:').strip()}", *reason[1:]])


class FlowParams(BaseModel):
    """Parameters of one pipeline run; every set field becomes a params.yaml edit."""

    model_config = ConfigDict(extra="forbid")

    project_dir: str = Field(".", description="Directory holding dvc.yaml and params.yaml.")
    source: str | None = Field(None, description="data.source: 'digits', or a dataset path (ideally under data/raw/).")
    per_class: int | None = Field(None, ge=1, description="data.per_class: scarce real images per class.")
    model: Literal["cgan", "cvae", "vaegan"] | None = Field(None, description="train.model")
    train_steps: int | None = Field(None, ge=1, description="train.steps")
    balance: Literal["to_max", "to_count", "ratio"] | None = Field(None, description="generate.balance")
    count: int | None = Field(None, ge=0, description="generate.count (balance=to_count)")
    min_per_class: int | None = Field(None, ge=0, description="generate.min_per_class")
    discriminator_quantile: float | None = Field(None, ge=0, le=1, description="filter.discriminator_quantile")
    classifier_threshold: float | None = Field(None, ge=0, le=1, description="filter.classifier_threshold")
    novelty_threshold: float | None = Field(None, ge=0, description="filter.novelty_threshold")
    evaluate_seeds: int | None = Field(None, ge=2, description="evaluate.seeds")
    overrides: list[str] = Field(default_factory=list, description="Any other params, as key.sub=value.")
    push: bool = Field(True, description="`dvc push` to the default remote at the end.")
    retries: int = Field(2, ge=0, description="Retries of a failed stage.")
    retry_delay_seconds: list[float] = Field([10.0, 60.0], description="Backoff between retries.")

    def to_overrides(self) -> list[str]:
        """The params.yaml edits of this run, as ``key.sub=value`` strings (named fields first)."""
        named = [f"{key}={getattr(self, field)}" for field, key in PARAM_KEYS.items() if getattr(self, field) is not None]
        return named + list(self.overrides)


# ------------------------------------------------------------------ params and DVC
def _null_keeping_representer():
    """ruamel's round-trip representer writing None as `null` (it writes a blank), in a subclass: add_representer
    on ruamel's own class would change every round-trip dump in the process."""
    from ruamel.yaml.representer import RoundTripRepresenter

    class NullKeeping(RoundTripRepresenter):
        pass

    NullKeeping.add_representer(type(None), lambda dumper, _: dumper.represent_scalar("tag:yaml.org,2002:null", "null"))
    return NullKeeping


def apply_params(params_path: Path, overrides: list[str]) -> bool:
    """Validate ``overrides`` against the whole config, then write them into params.yaml atomically.

    Comments and key order are kept (ruamel round-trip). Returns whether the file changed.
    Raises ConfigError naming the key when the result would not validate.
    """
    from ruamel.yaml import YAML

    if not params_path.is_file():
        raise ConfigError(f"params file not found: {params_path}")
    text = params_path.read_text()
    yaml = YAML()  # round-trip mode keeps comments
    yaml.width = 4096  # long flow lists (evaluate.recipes) stay on their line
    yaml.Representer = _null_keeping_representer()
    document = yaml.load(text) or {}
    merged = apply_overrides(safe_load(text) or {}, overrides)  # plain copy, override values parsed as YAML
    config_from_dict(merged, f"{params_path} with overrides {overrides}")
    changed = False
    for item in overrides:
        key, _ = item.split("=", 1)
        parts = key.strip().split(".")
        node, plain = document, merged
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            plain = plain[part]
        if parts[-1] not in node or node[parts[-1]] != plain[parts[-1]]:
            node[parts[-1]] = plain[parts[-1]]
            changed = True
    if changed:
        buffer = io.StringIO()
        yaml.dump(document, buffer)
        atomic_write_text(params_path, buffer.getvalue())
    return changed


def _environment() -> dict[str, str]:
    """The caller's environment with this interpreter's bin dir first, so `dvc` and `synthgen` resolve."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def run_dvc(arguments: list[str], project_dir: str | Path, logger=None) -> tuple[int, str]:
    """Run ``dvc <arguments>`` in ``project_dir``, streaming its output to ``logger``; return (code, output)."""
    command = [str(Path(sys.executable).parent / "dvc"), *arguments]
    lines = []
    with subprocess.Popen(command, cwd=project_dir, env=_environment(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if logger is not None and line.strip():
                logger.info(line.rstrip())
    return process.returncode, "\n".join(lines)


def _maybe_fail_once(stage: str) -> None:
    """Test hook: SYNTHGEN_FAIL_ONCE=<stage>:<flag file> fails this stage's first attempt."""
    target, _, flag = os.environ.get(FAIL_ONCE_VARIABLE, "").partition(":")
    if target == stage and flag and not Path(flag).exists():
        Path(flag).touch()
        raise StageFailed(stage, f"injected failure ({FAIL_ONCE_VARIABLE})")


def _retry_unless_user_error(task, task_run, state) -> bool:
    error = getattr(state, "data", None)
    return not (isinstance(error, StageFailed) and error.user_error)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=_retry_unless_user_error,
      task_run_name="dvc-repro-{stage}")
def reproduce_stage(stage: str, project_dir: str) -> str:
    """``dvc repro --single-item <stage>``: returns 'ran', 'skipped' or 'run-cache'."""
    logger = get_run_logger()
    _maybe_fail_once(stage)
    code, output = run_dvc(["repro", "--single-item", stage], project_dir, logger)
    if code != 0:
        tail = "\n".join(output.splitlines()[-15:])
        raise StageFailed(stage, tail, user_error=re.search(r"exited with 2\b", output) is not None)
    if "Running stage" in output:
        return "ran"
    return "run-cache" if "is cached" in output else "skipped"


def restore_outputs(stage: str, project_dir: str | Path) -> list[str]:
    """Check the stage's last good outputs (per dvc.lock) out of the cache; persistent outs are kept."""
    from dvc.repo import Repo

    with Repo(str(project_dir)) as repo:
        (stage_object,) = repo.stage.collect(stage)
        targets = [str(Path(repo.root_dir) / out.def_path) for out in stage_object.outs if not out.persist]
        try:
            repo.checkout(targets=targets, force=True, allow_missing=True)
        except Exception as error:  # e.g. no earlier good run in dvc.lock / the cache
            get_run_logger().warning("could not restore the outputs of %s: %s", stage, error)
            return []
    return targets


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30])
def push_outputs(project_dir: str) -> None:
    code, output = run_dvc(["push"], project_dir, get_run_logger())
    if code != 0:
        raise RuntimeError(f"dvc push failed: {(output.strip().splitlines() or ['no output'])[-1]}")


# ------------------------------------------------------------------------ artifacts
def per_class_table(project_dir: Path) -> list[dict]:
    """One row per class: mean test recall of every evaluation arm (+ accepted count when known)."""
    recall_path = project_dir / "reports/evaluation/per_class_recall.csv"
    if not recall_path.is_file():
        return []
    recall = pd.read_csv(recall_path)
    table = recall.pivot_table(index="class_name", columns="arm", values="mean", sort=False).round(4)
    table.columns = [f"recall[{arm}]" for arm in table.columns]
    summary_path = project_dir / "data/synthetic/filter_summary.json"
    per_class = read_json(summary_path).get("per_class") if summary_path.is_file() else None
    if isinstance(per_class, dict):  # {class name: {quota, generated, accepted, ...}}
        for column in ("accepted", "quota"):
            table.insert(0, column, [per_class.get(str(name), {}).get(column) for name in table.index])
    return table.reset_index().to_dict(orient="records")


@task(cache_policy=NO_CACHE)
def publish_artifacts(project_dir: str) -> str | None:
    """Markdown artifact with REPORT.md, table artifact with per-class results; returns the verdict."""
    project = Path(project_dir)
    report_path = project / REPORT
    metrics_path = project / "reports/metrics.json"
    verdict = read_json(metrics_path).get("verdict") if metrics_path.is_file() else None
    markdown = report_path.read_text() if report_path.is_file() else f"No report at `{report_path}`."
    create_markdown_artifact(markdown=markdown, key="synthgen-report", description=f"{report_path} (verdict: {verdict})")
    rows = per_class_table(project)
    if rows:
        create_table_artifact(table=rows, key="synthgen-per-class", description="Per-class test recall by arm")
    return verdict if isinstance(verdict, str) else None


# ----------------------------------------------------------------------------- flow
@flow(name="synthgen-augment", validate_parameters=True)
def augment(params: FlowParams = FlowParams()) -> dict | State:
    """Apply the params, reproduce every stage in DAG order, push, publish the report."""
    logger = get_run_logger()
    project = Path(params.project_dir).resolve()
    if not (project / "dvc.yaml").is_file():
        raise ConfigError(f"no dvc.yaml in {project}: run from the synthgen project root")
    params_file = project / "params.yaml"
    before = params_file.read_text() if params_file.is_file() else None  # apply_params names a missing file
    changed = apply_params(params_file, params.to_overrides())
    if changed:
        logger.info("params.yaml updated: %s", " ".join(params.to_overrides()))
    applied = params_file.read_text()
    runner = reproduce_stage.with_options(retries=params.retries, retry_delay_seconds=params.retry_delay_seconds)
    outcomes = {}
    for stage in STAGES:
        try:
            outcomes[stage] = runner(stage, str(project))
        except StageFailed as error:
            restored = restore_outputs(stage, project)
            # params.yaml goes back only while no stage has run with the edit (else it would disagree with dvc.lock
            # and those stages' outputs), and only if nobody edited it since
            ran = {"ran", "run-cache"} & set(outcomes.values())  # stages whose outputs and dvc.lock now follow the edit
            error.params_restored = changed and not ran and params_file.read_text() == applied
            if error.params_restored:
                atomic_write_text(params_file, before)
            logger.error("stage %s failed; its previous outputs checked out again: %s; params.yaml %s", stage, restored,
                         "as it was before this run" if error.params_restored else "as this run left it")
            # a Failed state, not a raise: the caller still gets the error, without Prefect's traceback of its own
            # engine under the stage's message
            return Failed(message=str(error), data=error)
        logger.info("stage %s: %s", stage, outcomes[stage])
    pushed = False
    if params.push:
        try:
            push_outputs(str(project))
            pushed = True
        except Exception as error:  # an unreachable remote must not fail a finished pipeline
            logger.warning("dvc push failed, outputs are only in the local cache: %s", error)
    verdict = publish_artifacts(str(project))
    return {"stages": outcomes, "pushed": pushed, "verdict": verdict, "report": str(project / REPORT)}


def run_from_cli(params_path: str | Path, overrides: list[str], push: bool = True) -> dict:
    """`synthgen run`: run the flow once (ephemeral Prefect server) and print where the report is."""
    from rich.console import Console

    params_path = Path(params_path)
    if params_path.name != "params.yaml":
        raise ConfigError(f"{params_path}: `synthgen run` drives dvc.yaml, which reads params.yaml; use --set to override keys")
    load_config(params_path, list(overrides))  # fail on a bad key before the Prefect server starts
    from prefect.settings import (PREFECT_SERVER_ANALYTICS_ENABLED, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
                                  temporary_settings)

    # offline by default: no telemetry from the ephemeral server (PREFECT_SERVER_ANALYTICS_ENABLED=true opts in);
    # a first start creates and migrates the sqlite DB, which takes longer than Prefect's 20 s on a busy CPU
    updates = {
        PREFECT_SERVER_ANALYTICS_ENABLED: os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false").lower() == "true",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 180)),
    }
    params = FlowParams(project_dir=str(params_path.resolve().parent), overrides=list(overrides), push=push)
    with temporary_settings(updates=updates):
        result = augment(params)
    console = Console()
    console.print(f"stages: {', '.join(f'{s}={o}' for s, o in result['stages'].items())}")
    console.print(f"verdict: {result['verdict']}   report: {result['report']}")
    return result


def build_deployment(cron: str = "0 3 * * *", name: str = "synthgen-nightly", project_dir: str | Path | None = None):
    """The deployment `synthgen serve` serves: the flow on ``cron``, for ``project_dir`` (default: cwd).

    Returns a ``prefect.deployments.runner.RunnerDeployment`` (nothing is registered or started).
    Raises ConfigError on a cron string Prefect cannot parse.
    """
    project = Path(project_dir if project_dir is not None else Path.cwd()).resolve()
    try:
        return augment.to_deployment(name=name, cron=cron, parameters={"params": {"project_dir": str(project)}})
    except ValueError as error:  # pydantic's ValidationError of CronSchedule
        raise ConfigError(f"invalid cron schedule {cron!r} (five fields, e.g. '0 3 * * *'): {error}") from None


def serve(cron: str = "0 3 * * *", name: str = "synthgen-nightly") -> None:
    """Serve a cron-scheduled deployment of the flow for this project (needs `prefect server start`)."""
    import prefect

    deployment = build_deployment(cron, name)
    if not os.environ.get("PREFECT_API_URL"):
        print("warning: PREFECT_API_URL is not set; schedules need a running `prefect server start`", file=sys.stderr)
    prefect.serve(deployment)  # long-running: registers the deployment, then polls for its scheduled runs
