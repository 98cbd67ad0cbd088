"""Filtering of generated candidates and bounded top-up rounds (stage ``filter``).

Three scikit-learn-style filters, each fitted on REAL data only (``fit`` returns self,
``score(x, y)`` gives per-sample scores, ``keep(x, y)`` a bool mask, ``passes(scores, y)`` the
same mask from precomputed scores):

* :class:`DiscriminatorFilter` keeps D >= the q-quantile of D on the real val images of the class;
* :class:`ConfidenceFilter` keeps p(conditioned class) >= t_c from a CNN trained on the real train
  split (class-balanced, augmented), t_c calibrated per class on val;
* :class:`NoveltyFilter` rejects near-copies: pixel-L2 distance to the nearest real train image
  below ``threshold`` x the class's median real (val -> train) nearest-neighbour distance.

Selection keeps, per class, the first ``quota`` candidates (in sample-id order) that pass every
enabled filter; short classes get top-up rounds sized by their measured acceptance rate. The
output writing (PNG tree, shards, manifest, figures, atomic commit) lives in
:mod:`synthgen.filter_outputs`; ``load_accepted`` / ``load_pool`` are re-exported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, clone

from synthgen.config import Config, FilterConfig, GenerateConfig
from synthgen.data import DataError, PreparedData, load_prepared, to_tensor
from synthgen.device import autocast, resolve_device
from synthgen import filter_outputs
from synthgen.executor import map_shards, open_executor
from synthgen.generate import (
    SUMMARY_NAME, compute_quotas, first_round_requests, load_model, make_shard_specs, model_path_for, next_batch_start,
    read_shard, run_shard, shard_paths,
)
from synthgen.filter_outputs import load_accepted, load_manifest  # noqa: F401  (re-exported for evaluate/report)
from synthgen.generate import load_pool  # noqa: F401
from synthgen.io import read_json
from synthgen.models.classifier import CNNClassifier

FILTERS = ("discriminator", "classifier", "novelty")
SCORE_COLUMNS = {"discriminator": "d_score", "classifier": "classifier_prob", "novelty": "nn_distance"}
TOPUP_SAFETY = 1.2  # ask for 20% more than the measured rate predicts
TOPUP_CAP = 10  # one round never asks for more than 10x the class's first-round request


def _per_class_quantile(scores: np.ndarray, y: np.ndarray, n_classes: int, q: float) -> np.ndarray:
    """q-quantile of ``scores`` per class; classes without samples fall back to the global quantile."""
    overall = float(np.quantile(scores, q)) if len(scores) else -np.inf
    return np.array([float(np.quantile(scores[y == c], q)) if np.any(y == c) else overall for c in range(n_classes)])


class _Filter(BaseEstimator):
    """Shared ``keep`` / ``passes``: a sample passes when its score clears its class threshold."""

    def passes(self, scores: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.asarray(scores) >= self.thresholds_[np.asarray(y)]

    def keep(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.passes(self.score(X, y), y)


class DiscriminatorFilter(_Filter):
    """Keep when D(x, y) >= the ``quantile`` of D on real (validation) images of class y."""

    def __init__(self, model=None, quantile: float = 0.1, batch_size: int = 1024, device: str = "cpu"):
        self.model = model
        self.quantile = quantile
        self.batch_size = batch_size
        self.device = device

    def fit(self, X: np.ndarray, y: np.ndarray) -> "DiscriminatorFilter":
        if self.model is None or not self.model.has_discriminator:
            raise ValueError("DiscriminatorFilter needs a generator with a discriminator (the cGAN)")
        self.thresholds_ = _per_class_quantile(self.score(X, y), np.asarray(y), self.model.n_classes, self.quantile)
        return self

    @torch.inference_mode()
    def score(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        device = torch.device(self.device)
        scores = []
        for start in range(0, len(X), self.batch_size):
            images = to_tensor(X[start : start + self.batch_size], device)
            labels = torch.as_tensor(y[start : start + self.batch_size], dtype=torch.long, device=device)
            with autocast(device):
                scores.append(self.model.discriminator_score(images, labels).float().cpu())
        return torch.cat(scores).numpy() if scores else np.zeros(0, dtype=np.float32)


class ConfidenceFilter(_Filter):
    """Keep when the real-data classifier gives the conditioned class p >= t_c.

    ``classifier`` (an unfitted estimator, default a class-balanced augmented CNNClassifier) is
    cloned and fitted on the real TRAIN split only. ``calibration="per_class"`` lowers each
    class's threshold to the ``quantile`` of p_c on real val images of class c when that is lower:
    a global threshold removes exactly the minority classes that a scarce classifier is unsure of.
    """

    def __init__(self, n_classes: int | None = None, threshold: float = 0.5, calibration: str = "per_class",
                 quantile: float = 0.1, classifier=None, steps: int = 300, device: str = "auto", random_state: int | None = 0):
        self.n_classes = n_classes
        self.threshold = threshold
        self.calibration = calibration
        self.quantile = quantile
        self.classifier = classifier
        self.steps = steps
        self.device = device
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None = None, y_val: np.ndarray | None = None) -> "ConfidenceFilter":
        n_classes = self.n_classes or int(np.max(y)) + 1
        base = self.classifier if self.classifier is not None else CNNClassifier(
            n_classes=n_classes, steps=self.steps, balanced=True, augment=True, device=self.device, random_state=self.random_state
        )
        self.classifier_ = clone(base).fit(X, y)
        self.n_fit_samples_ = len(X)  # what the classifier saw: the real train split, nothing else
        self.thresholds_ = np.full(n_classes, float(self.threshold))
        if self.calibration == "per_class" and X_val is not None and len(X_val):
            y_val = np.asarray(y_val)
            calibrated = _per_class_quantile(self.score(X_val, y_val), y_val, n_classes, self.quantile)
            self.thresholds_ = np.minimum(self.thresholds_, calibrated)
        return self

    def score(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        if len(X) == 0:
            return np.zeros(0, dtype=np.float32)
        return self.classifier_.predict_proba(X)[np.arange(len(X)), np.asarray(y)]


def _flat(X: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(X).reshape(len(X), -1)).float().div_(255.0)


def _nearest_distance(queries: torch.Tensor, reference: torch.Tensor, batch_size: int, exclude_self: bool = False) -> np.ndarray:
    """Pixel-L2 distance of each query to its nearest reference row, chunked (memory: batch x N_ref)."""
    out = []
    for start in range(0, len(queries), batch_size):
        distances = torch.cdist(queries[start : start + batch_size], reference)
        if exclude_self:  # leave-one-out: the query set is the reference set
            rows = torch.arange(distances.shape[0])
            distances[rows, rows + start] = math.inf
        out.append(distances.min(dim=1).values)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


class NoveltyFilter(_Filter):
    """Reject near-copies: nearest real train image closer than ``threshold`` x the class's typical NN distance."""

    def __init__(self, threshold: float = 0.5, batch_size: int = 1024):
        self.threshold = threshold
        self.batch_size = batch_size

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None = None, y_val: np.ndarray | None = None) -> "NoveltyFilter":
        self.reference_ = _flat(X)
        n_classes = int(np.max(y)) + 1 if y_val is None or not len(y_val) else max(int(np.max(y)), int(np.max(y_val))) + 1
        if X_val is not None and len(X_val):  # typical distance of a real unseen image to the train set
            typical, typical_y = _nearest_distance(_flat(X_val), self.reference_, self.batch_size), np.asarray(y_val)
        else:
            typical, typical_y = _nearest_distance(self.reference_, self.reference_, self.batch_size, exclude_self=True), np.asarray(y)
        self.scales_ = _per_class_quantile(typical, typical_y, n_classes, 0.5)
        self.thresholds_ = self.threshold * self.scales_
        return self

    def score(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        return _nearest_distance(_flat(X), self.reference_, self.batch_size)


# ------------------------------------------------------------------- fit + score
def fit_filters(config: FilterConfig, prepared: PreparedData, model, device: torch.device) -> dict:
    """Fit each enabled filter on real data; None marks a filter that is off or not applicable."""
    train, val, n_classes = prepared.train, prepared.val, prepared.n_classes
    filters: dict = dict.fromkeys(FILTERS)
    if config.discriminator and model is not None and model.has_discriminator:
        filters["discriminator"] = DiscriminatorFilter(model, config.discriminator_quantile, device=str(device)).fit(val.x, val.y)
    if config.classifier:
        filters["classifier"] = ConfidenceFilter(
            n_classes, config.classifier_threshold, config.classifier_calibration, config.classifier_quantile,
            steps=config.classifier_steps, device=str(device), random_state=config.seed,
        ).fit(train.x, train.y, val.x, val.y)
    if config.novelty:
        filters["novelty"] = NoveltyFilter(config.novelty_threshold).fit(train.x, train.y, val.x, val.y)
    return filters


def score_candidates(x: np.ndarray, y: np.ndarray, filters: dict) -> dict[str, np.ndarray]:
    """Scores (NaN when a filter is off) and pass masks (True when off) for a batch of candidates."""
    columns: dict[str, np.ndarray] = {}
    for name in FILTERS:
        fitted = filters.get(name)
        scores = fitted.score(x, y) if fitted is not None else np.full(len(y), np.nan)
        columns[SCORE_COLUMNS[name]] = np.asarray(scores, dtype=np.float64)
        columns[f"pass_{name}"] = fitted.passes(scores, y) if fitted is not None else np.ones(len(y), dtype=bool)
    return columns


@dataclass(frozen=True)
class ScoreSpec:
    path: str
    filters: dict
    round: int


def score_shard(spec: ScoreSpec) -> pd.DataFrame:
    """Score one candidate shard: one row per candidate (top-level, so any executor can run it)."""
    shard = read_shard(spec.path)
    table = pd.DataFrame({"sample_id": shard["sample_id"], "label": shard["y"], "round": spec.round, "shard": Path(spec.path).name})
    for key, values in score_candidates(shard["x"], shard["y"], spec.filters).items():
        table[key] = values
    return table


# ---------------------------------------------------------------------- selection
def select(table: pd.DataFrame, quotas: np.ndarray) -> pd.DataFrame:
    """Add ``accepted`` and ``rejected_by`` (first failing filter, or 'quota' past the class's quota)."""
    table = table.sort_values("sample_id", kind="stable").reset_index(drop=True)
    rejected_by = np.full(len(table), "", dtype=object)
    for name in reversed(FILTERS):  # reversed, so the FIRST failing filter in FILTERS order wins
        rejected_by[~table[f"pass_{name}"].to_numpy(bool)] = name
    passed = rejected_by == ""
    rank = pd.Series(passed.astype(int)).groupby(table["label"].to_numpy()).cumsum().to_numpy()  # 1-based among passed
    over_quota = passed & (rank > np.asarray(quotas)[table["label"].to_numpy()])
    rejected_by[over_quota] = "quota"
    table["accepted"] = rejected_by == ""
    table["rejected_by"] = rejected_by
    return table


def topup_requests(table: pd.DataFrame, quotas: np.ndarray, first_requests: np.ndarray) -> np.ndarray:
    """Candidates to draw per short class, from its MEASURED acceptance rate (Laplace-smoothed, capped)."""
    n_classes = len(quotas)
    labels = table["label"].to_numpy()
    generated = np.bincount(labels, minlength=n_classes)
    passed = np.bincount(labels[table["rejected_by"].isin(["", "quota"]).to_numpy()], minlength=n_classes)
    deficit = np.maximum(np.asarray(quotas) - passed, 0)
    rate = (passed + 1) / (generated + 2)  # never 0, so a class that rejected everything asks for a bounded amount
    requests = np.ceil(TOPUP_SAFETY * deficit / rate).astype(np.int64)
    return np.where(deficit > 0, np.minimum(requests, TOPUP_CAP * np.maximum(first_requests, 1)), 0)


def run_rounds(pool_dir: Path, work_dir: Path, filters: dict, quotas: np.ndarray, gen: GenerateConfig,
               model_path: Path, device: str, first_id: int, latent: str = "prior") -> tuple[pd.DataFrame, list[Path], list[list[int]]]:
    """Score the pool, then top up short classes for at most ``gen.max_rounds`` rounds.

    Returns the selected table, every candidate shard (pool + top-ups) and each round's requests.
    """
    shards = shard_paths(pool_dir)
    first_requests = first_round_requests(quotas, gen.oversample)
    with open_executor(gen.executor, gen.workers) as pool:
        parts = map_shards(score_shard, [ScoreSpec(str(p), filters, 0) for p in shards], pool)
        table = select(pd.concat(parts, ignore_index=True) if parts else _empty_table(), quotas)
        history = []
        for round_number in range(1, gen.max_rounds + 1):
            requests = topup_requests(table, quotas, first_requests)
            if requests.sum() == 0:
                break
            history.append(requests.tolist())
            round_dir = work_dir / f"round-{round_number}"
            round_dir.mkdir(parents=True)
            specs = make_shard_specs(requests, first_id, gen, model_path, device, round_dir, start_index=len(shards), latent=latent)
            map_shards(run_shard, specs, pool)
            new = [Path(spec.out_path) for spec in specs]
            parts = map_shards(score_shard, [ScoreSpec(str(p), filters, round_number) for p in new], pool)
            table = select(pd.concat([table, *parts], ignore_index=True), quotas)
            shards += new
            first_id = next_batch_start(int(table["sample_id"].max()), gen.batch_size)
    return table, shards, history


def _empty_table() -> pd.DataFrame:
    columns = {"sample_id": np.int64, "label": np.int64, "round": np.int64, "shard": object}
    columns |= {SCORE_COLUMNS[n]: np.float64 for n in FILTERS} | {f"pass_{n}": bool for n in FILTERS}
    return pd.DataFrame({k: pd.Series(dtype=v) for k, v in columns.items()})


def summarize(table: pd.DataFrame, quotas: np.ndarray, filters: dict, class_names, history: list) -> dict:
    """Per-class generated / accepted counts, acceptance per filter, thresholds used, shortfalls."""
    per_class = {}
    for label, name in enumerate(class_names):
        rows = table[table["label"] == label]
        accepted = int(rows["accepted"].sum())
        entry = {"quota": int(quotas[label]), "generated": len(rows), "accepted": accepted, "shortfall": int(quotas[label]) - accepted}
        for f in FILTERS:
            fitted = filters.get(f)
            entry[f"{f}_acceptance"] = float(rows[f"pass_{f}"].mean()) if fitted is not None and len(rows) else "n/a"
            entry[f"{f}_threshold"] = float(fitted.thresholds_[label]) if fitted is not None else "n/a"
        per_class[name] = entry
    shortfalls = {name: e["shortfall"] for name, e in per_class.items() if e["shortfall"] > 0}
    return {
        "filters": {f: ("on" if filters.get(f) is not None else "n/a") for f in FILTERS},
        "generated": len(table), "accepted": int(table["accepted"].sum()), "quota": int(np.sum(quotas)),
        "topup_rounds": len(history), "topup_requests": history, "shortfalls": shortfalls, "per_class": per_class,
    }


def main(config: Config, prepared_dir: str | Path, models_root: str | Path, pool_dir: str | Path, synthetic_root: str | Path) -> dict:
    """Fit filters on real data, score the pool, top up, and commit accepted set + manifest + summary."""
    prepared = load_prepared(prepared_dir)
    pool_dir, synthetic_root = Path(pool_dir), Path(synthetic_root)
    if not (pool_dir / SUMMARY_NAME).is_file():
        raise DataError(f"{pool_dir / SUMMARY_NAME} not found: run `synthgen generate` first")
    pool_summary = read_json(pool_dir / SUMMARY_NAME)
    if list(pool_summary["class_names"]) != list(prepared.class_names):
        raise DataError(f"{pool_dir} was generated for classes {pool_summary['class_names']}, the prepared data has {list(prepared.class_names)}")
    device = resolve_device(config.filter.device)
    model_path = model_path_for(config, models_root)
    model = load_model(model_path, device)
    filters = fit_filters(config.filter, prepared, model, device)
    quotas = compute_quotas(prepared.train.counts(), config.generate)
    gen_device = str(resolve_device(config.generate.device))
    with filter_outputs.staging(synthetic_root) as work_dir:
        table, shards, history = run_rounds(pool_dir, work_dir / "topup", filters, quotas, config.generate, model_path, gen_device,
                                            int(pool_summary["next_sample_id"]), pool_summary.get("latent", "prior"))
        summary = summarize(table, quotas, filters, prepared.class_names, history)
        summary["config"] = {"filter": config.filter.model_dump(), "max_rounds": config.generate.max_rounds}
        filter_outputs.write_outputs(work_dir, table, shards, prepared.class_names, filters, summary, config.filter.image_folder)
        filter_outputs.commit(work_dir, synthetic_root)
    print(f"filter: {summary['accepted']}/{summary['quota']} accepted from {summary['generated']} candidates; shortfalls: {summary['shortfalls'] or 'none'}")
    return summary
