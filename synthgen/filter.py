"""Stage ``filter``: score the candidate pool, select per class, top up short classes.

The filters themselves (discriminator score, real-data classifier confidence, novelty) live in
:mod:`synthgen.filters`, fitted by :func:`fit_filters` on real images only. Selection keeps, per
class, the first ``quota`` candidates (in sample-id order) that pass every enabled filter; short
classes get top-up rounds sized by their measured acceptance rate. The output writing (PNG tree,
shards, manifest, figures, atomic commit) lives in :mod:`synthgen.filter_outputs`.

One selection and top-up loop, :func:`top_up`, serves two callers through a "draw more candidates
for these per-class requests" callable: :func:`run_rounds` (the stage: candidates are npz shards
written and scored by an executor) and :func:`select_candidates` (in memory, for
:mod:`synthgen.sampler`). Both keep exactly the same candidates for the same scores.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from synthgen import filter_outputs
from synthgen.artifacts import POOL_SUMMARY, read_shard, shard_paths
from synthgen.config import Config, FilterConfig, GenerateConfig
from synthgen.data import DataError, PreparedData, load_prepared
from synthgen.device import resolve_device
from synthgen.executor import map_shards, open_executor
from synthgen.filters import (
    FILTERS, SCORE_COLUMNS, ClaimFilter, ConfidenceFilter, DiscriminatorFilter, NoveltyFilter, RealnessFilter, judge_only, judged,
)
from synthgen.generate import (
    check_pool, compute_quotas, first_round_requests, generate_candidates, load_model, make_shard_specs, model_path_for,
    next_batch_start, run_shard,
)
from synthgen.io import atomic_dir, read_json
from synthgen.progress import milestones


TOPUP_SAFETY = 1.2  # ask for 20% more than the measured rate predicts
TOPUP_CAP = 10  # one round never asks for more than 10x the class's first-round request


# ------------------------------------------------------------------- fit + score
def fit_filters(config: FilterConfig, prepared: PreparedData, model, device: torch.device,
                fakes: GeneratedReference | None = None) -> dict:
    """:func:`fit_filters_on` the prepared train split, calibrated on the val split when it has images."""
    held_out = (prepared.val.x, prepared.val.y) if len(prepared.val.y) else None
    return fit_filters_on(config, prepared.train.x, prepared.train.y, model, device, held_out, prepared.n_classes, fakes)


@dataclass(frozen=True)
class GeneratedReference:
    """Generated images the posthoc discriminator learns from (``x``, ``y``), and others that no fold learns
    from (``calibration_x``, ``calibration_y``): they are scored as candidates are, so the cap on the share it
    rejects holds for candidates (DRS's burn-in samples, Azadi et al. 2019)."""

    x: np.ndarray
    y: np.ndarray
    calibration_x: np.ndarray
    calibration_y: np.ndarray


def reference_samples(model, n_classes: int, config: FilterConfig, gen: GenerateConfig, device: str,
                      latent: str) -> GeneratedReference | None:
    """``config.discriminator_samples`` generated images per class for the posthoc discriminator to learn from
    and ``config.discriminator_calibration_samples`` to calibrate its cap on, drawn as candidates are (same
    latent mode) from seeds no candidate uses; None when the posthoc discriminator is off."""
    if not (config.discriminator and config.discriminator_source == "posthoc"):
        return None

    def draw(per_class: int, *stream: int) -> dict[str, np.ndarray]:
        seed = int(np.random.SeedSequence([gen.seed, config.seed, 0x5EED, *stream]).generate_state(1)[0])
        requests = np.full(n_classes, per_class, dtype=np.int64)
        return generate_candidates(model, requests, 0, gen.model_copy(update={"seed": seed}), device, latent)

    learn, calibrate = draw(config.discriminator_samples), draw(config.discriminator_calibration_samples, 1)
    return GeneratedReference(learn["x"], learn["y"], calibrate["x"], calibrate["y"])


def fit_filters_on(config: FilterConfig, x: np.ndarray, y: np.ndarray, model, device: torch.device,
                   held_out: tuple[np.ndarray, np.ndarray] | None = None, n_classes: int | None = None,
                   fakes: GeneratedReference | None = None) -> dict:
    """Fit each enabled filter on real images (uint8 (N, H, W, C), labels 0..K-1); None marks a filter
    that is off or not applicable (``discriminator_source: model`` without a discriminator, or
    ``posthoc`` without ``fakes``, the :func:`reference_samples` it learns from).

    Held-out images (``held_out`` = (x, y), e.g. the val split) calibrate the thresholds when given;
    otherwise the filters calibrate on ``x`` itself (cross-fitting, leave-one-out: see
    :mod:`synthgen.filters`), so no labeled image is kept out of training for them.
    """
    held_x, held_y = held_out if held_out is not None else (None, None)
    n_classes = n_classes or int(np.max(y)) + 1
    filters: dict = dict.fromkeys(FILTERS)
    if config.discriminator and config.discriminator_source == "posthoc" and fakes is not None and len(fakes.y):
        filters["discriminator"] = RealnessFilter(
            n_classes, config.discriminator_quantile, config.discriminator_steps, config.calibration_folds, device=str(device),
            random_state=config.seed,
        ).fit(x, y, fakes.x, fakes.y, held_x, held_y, fakes.calibration_x, fakes.calibration_y)
    elif config.discriminator and config.discriminator_source == "model" and model is not None and model.has_discriminator:
        calibration = held_out if held_out is not None else (x, y)
        filters["discriminator"] = DiscriminatorFilter(model, config.discriminator_quantile, device=str(device)).fit(*calibration)
    if config.classifier:
        filters["classifier"] = ConfidenceFilter(
            n_classes, config.classifier_threshold, config.classifier_calibration, config.classifier_quantile,
            steps=config.classifier_steps, folds=config.calibration_folds, device=str(device), random_state=config.seed,
        ).fit(x, y, held_x, held_y)
    if config.novelty:
        filters["novelty"] = NoveltyFilter(config.novelty_threshold).fit(x, y, held_x, held_y)
    counts = np.bincount(np.asarray(y), minlength=n_classes)
    minimum = judging_minimum(config, counts)
    filters = {name: None if fitted is None else judge_only(fitted, counts, minimum[name]) for name, fitted in filters.items()}
    if filters["classifier"] is not None and config.claim_threshold is not None:  # judges what the confidence filter does not
        filters["claimed"] = ClaimFilter(filters["classifier"], config.claim_threshold).fit()
    return filters


def fitting_work(config: FilterConfig, y: np.ndarray, held_out: bool, fakes: GeneratedReference | None) -> int:
    """The network-steps :func:`fit_filters_on` trains on labels ``y`` (its progress lines' 100%): the posthoc
    discriminator's folds, the confidence filter's scoring classifier and, without held-out images, its non-empty folds."""
    work = 0
    if config.discriminator and config.discriminator_source == "posthoc" and fakes is not None and len(fakes.y):
        work += max(2, config.calibration_folds) * config.discriminator_steps
    if config.classifier:
        confidence = ConfidenceFilter(calibration=config.classifier_calibration, folds=config.calibration_folds, random_state=config.seed)
        work += (1 + len(confidence.held_out_folds(y, held_out))) * config.classifier_steps
    return work


def judging_minimum(config: FilterConfig, counts: np.ndarray) -> dict[str, int]:
    """Filter name -> the fewest real images of a class it judges: ``min_class_images``, and for the discriminator
    ``discriminator_min_class_images`` capped at the largest class (on balanced data it judges every class), never
    below ``min_class_images`` (a class smaller than that is judged by no filter but the claim filter, whatever its
    rank). The claim filter judges exactly the classes the confidence filter does not (:class:`~synthgen.filters.ClaimFilter`)."""
    minimum = {name: config.min_class_images for name in FILTERS if name != "claimed"}
    if config.discriminator_min_class_images is not None:
        capped = min(config.discriminator_min_class_images, int(np.max(counts)))
        minimum["discriminator"] = max(config.min_class_images, capped)
    return minimum


def calibration_note(prepared: PreparedData, filters: dict) -> str:
    """What the filter thresholds were calibrated on (for the summary and the report), from the fitted filters."""
    if len(prepared.val.y):
        return f"{len(prepared.val.y)} held-out real images (val split)"
    parts = []
    if filters.get("classifier") is not None:
        parts.append(f"classifier thresholds: {filters['classifier'].calibrated_on_}")
    if filters.get("novelty") is not None:
        parts.append("novelty scales: leave-one-out distances within each class")
    if isinstance(filters.get("discriminator"), RealnessFilter):
        parts.append("discriminator (posthoc) thresholds: out-of-fold scores of real images, generated images no fold learned from")
    elif filters.get("discriminator") is not None:
        parts.append("discriminator thresholds: the training images (the discriminator saw them)")
    return "no held-out images; " + ("; ".join(parts) if parts else "no filter on")


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


def scored_table(candidates: dict[str, np.ndarray], round_number: int, filters: dict, shard: str = "") -> pd.DataFrame:
    """One row per candidate (``candidates``: x, y, sample_id): ids, label, round, shard, scores, pass masks."""
    table = pd.DataFrame({"sample_id": candidates["sample_id"], "label": candidates["y"], "round": round_number, "shard": shard})
    return table.assign(**score_candidates(candidates["x"], candidates["y"], filters))


def score_shard(spec: ScoreSpec) -> pd.DataFrame:
    """Score one candidate shard (top-level, so any executor can run it)."""
    return scored_table(read_shard(spec.path), spec.round, spec.filters, Path(spec.path).name)


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


# (per-class requests (K,), round number, first sample id) -> scored rows of the new candidates
DrawScored = Callable[[np.ndarray, int, int], pd.DataFrame]


def top_up(table: pd.DataFrame, quotas: np.ndarray, gen: GenerateConfig, draw: DrawScored) -> tuple[pd.DataFrame, list[list[int]]]:
    """Select from the first-round ``table``, then top up short classes for at most ``gen.max_rounds`` rounds.

    Each round asks ``draw`` for :func:`topup_requests` more candidates with fresh batch-aligned ids.
    Returns the selected table (every candidate) and each round's requests.
    """
    first_requests = first_round_requests(quotas, gen.oversample)
    table, history = select(table, quotas), []
    for round_number in range(1, gen.max_rounds + 1):
        requests = topup_requests(table, quotas, first_requests)
        if requests.sum() == 0:
            break
        history.append(requests.tolist())
        first_id = next_batch_start(int(table["sample_id"].max()), gen.batch_size) if len(table) else 0
        table = select(pd.concat([table, draw(requests, round_number, first_id)], ignore_index=True), quotas)
    return table, history


def run_rounds(pool_dir: Path, work_dir: Path, filters: dict, quotas: np.ndarray, gen: GenerateConfig,
               model_path: Path, device: str, latent: str = "prior") -> tuple[pd.DataFrame, list[Path], list[list[int]]]:
    """The stage's rounds: score the pool's shards, then :func:`top_up` with shards written to ``work_dir``.

    Returns the selected table, every candidate shard (pool + top-ups) and each round's requests.
    """
    shards = shard_paths(pool_dir)
    with open_executor(gen.executor, gen.workers) as pool:

        def draw(requests: np.ndarray, round_number: int, first_id: int) -> pd.DataFrame:
            round_dir = work_dir / f"round-{round_number}"
            round_dir.mkdir(parents=True)
            specs = make_shard_specs(requests, first_id, gen, model_path, device, round_dir, start_index=len(shards), latent=latent)
            map_shards(run_shard, specs, pool)
            new = [Path(spec.out_path) for spec in specs]
            shards.extend(new)
            return _score_shards(new, filters, round_number, pool)

        table, history = top_up(_score_shards(shards, filters, 0, pool), quotas, gen, draw)
    return table, shards, history


def _score_shards(paths: list[Path], filters: dict, round_number: int, pool) -> pd.DataFrame:
    parts = map_shards(score_shard, [ScoreSpec(str(path), filters, round_number) for path in paths], pool)
    return pd.concat(parts, ignore_index=True) if parts else _empty_table()


def select_candidates(draw: Callable[[np.ndarray, int], dict[str, np.ndarray]], filters: dict, quotas: np.ndarray,
                      gen: GenerateConfig) -> tuple[dict[str, np.ndarray], pd.DataFrame, list[list[int]]]:
    """In memory: the first round (``gen.oversample`` x quotas) and the top-ups of :func:`top_up`.

    ``draw(requests, first_id)`` returns candidates {x uint8 (n, H, W, C), y (n,), sample_id (n,)}
    for per-class ``requests``, e.g. :func:`synthgen.generate.generate_candidates`. Returns the
    accepted candidates (same keys, sample-id order), the selected table and each round's requests.
    """
    drawn: list[dict[str, np.ndarray]] = []

    def draw_scored(requests: np.ndarray, round_number: int, first_id: int) -> pd.DataFrame:
        drawn.append(draw(requests, first_id))
        return scored_table(drawn[-1], round_number, filters)

    first = draw_scored(first_round_requests(quotas, gen.oversample), 0, 0)
    table, history = top_up(first, quotas, gen, draw_scored)
    candidates = {key: np.concatenate([batch[key] for batch in drawn]) for key in ("x", "y", "sample_id")}
    keep = np.isin(candidates["sample_id"], table.loc[table["accepted"], "sample_id"].to_numpy())
    return {key: values[keep] for key, values in candidates.items()}, table, history


def _empty_table() -> pd.DataFrame:
    columns = {"sample_id": np.int64, "label": np.int64, "round": np.int64, "shard": object}
    columns |= {SCORE_COLUMNS[n]: np.float64 for n in FILTERS} | {f"pass_{n}": bool for n in FILTERS}
    return pd.DataFrame({k: pd.Series(dtype=v) for k, v in columns.items()})


def summarize(table: pd.DataFrame, quotas: np.ndarray, filters: dict, class_names, history: list) -> dict:
    """Per-class generated / accepted counts, acceptance per filter, thresholds used, shortfalls."""
    per_class, active = {}, [fitted for fitted in filters.values() if fitted is not None]
    for label, name in enumerate(class_names):
        rows = table[table["label"] == label]
        accepted = int(rows["accepted"].sum())
        entry = {"quota": int(quotas[label]), "generated": len(rows), "accepted": accepted, "shortfall": int(quotas[label]) - accepted,
                 "judged": any(judged(fitted, label) for fitted in active) if active else True}
        for f in FILTERS:
            fitted = filters.get(f)
            entry[f"{f}_judged"] = judged(fitted, label) if fitted is not None else "n/a"
            entry[f"{f}_acceptance"] = float(rows[f"pass_{f}"].mean()) if fitted is not None and len(rows) else "n/a"
            entry[f"{f}_threshold"] = float(fitted.thresholds_[label]) if fitted is not None else "n/a"
        per_class[name] = entry
    shortfalls = {name: e["shortfall"] for name, e in per_class.items() if e["shortfall"] > 0}
    posthoc = filters.get("discriminator")
    return {
        "filters": {f: ("on" if filters.get(f) is not None else "n/a") for f in FILTERS},
        "discriminator_separation": posthoc.separation_ if isinstance(posthoc, RealnessFilter) else None,
        "generated": len(table), "accepted": int(table["accepted"].sum()), "quota": int(np.sum(quotas)),
        "topup_rounds": len(history), "topup_requests": history, "shortfalls": shortfalls, "per_class": per_class,
    }


def main(config: Config, prepared_dir: str | Path, models_root: str | Path, pool_dir: str | Path, synthetic_root: str | Path) -> dict:
    """Fit filters on real data, score the pool, top up, and commit accepted set + manifest + summary."""
    prepared = load_prepared(prepared_dir)
    pool_dir, synthetic_root = Path(pool_dir), Path(synthetic_root)
    if not (pool_dir / POOL_SUMMARY).is_file():
        raise DataError(f"{pool_dir / POOL_SUMMARY} not found: run `synthgen generate` first")
    pool_summary = read_json(pool_dir / POOL_SUMMARY)
    model_path = model_path_for(config, models_root)
    check_pool(pool_dir, pool_summary, prepared, model_path)
    device = resolve_device(config.filter.device)
    model = load_model(model_path, device)
    latent = pool_summary.get("latent", "prior")
    fakes = reference_samples(model, prepared.n_classes, config.filter, config.generate, str(device), latent)
    with milestones("filter: fitting the filters", fitting_work(config.filter, prepared.train.y, len(prepared.val.y) > 0, fakes)):
        filters = fit_filters(config.filter, prepared, model, device, fakes)
    quotas = compute_quotas(prepared.train.counts(), config.generate)
    gen_device = str(resolve_device(config.generate.device))
    with atomic_dir(synthetic_root) as work_dir:  # the previous accepted set stays whole until this block succeeds
        table, shards, history = run_rounds(pool_dir, work_dir / "topup", filters, quotas, config.generate, model_path, gen_device,
                                            latent)
        summary = summarize(table, quotas, filters, prepared.class_names, history)
        summary["config"] = {"filter": config.filter.model_dump(), "max_rounds": config.generate.max_rounds}
        summary["calibration"] = calibration_note(prepared, filters)
        filter_outputs.write_outputs(work_dir, table, shards, prepared.class_names, filters, summary, config.filter.image_folder,
                                     config.filter.write_workers)
        shutil.rmtree(work_dir / "topup", ignore_errors=True)  # top-up candidates live on in manifest.csv, not as files
    rejected = table["rejected_by"].value_counts().drop(["", "quota"], errors="ignore")  # by a filter; 'quota': passed, not needed
    print(f"filter: {summary['accepted']} of the {summary['quota']} asked accepted; of {summary['generated']} candidates "
          f"{int(rejected.sum())} rejected ({', '.join(f'{name} {n}' for name, n in rejected.items()) or 'by no filter'}), "
          f"{int((table['rejected_by'] == 'quota').sum())} passed but not needed; shortfalls: {summary['shortfalls'] or 'none'}")
    return summary
