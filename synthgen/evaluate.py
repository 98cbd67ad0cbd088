"""Stage ``evaluate``: does adding the synthetic set to the best recipe a team could use without it help?

Every arm trains the same small CNN (:func:`synthgen.models.members.fit_tasks`: same architecture,
step budget, batch size and learning rate; every baseline arm's seeds in one call, then every
synthetic arm's, grouped where that pays: ``evaluate.batched``; bf16 on CPUs that have it:
``evaluate.cpu_bf16``), scored on the same, untouched real test split over ``evaluate.seeds`` seeds:

* baselines: the non-generative recipes of :mod:`synthgen.recipes` (real, classical augmentation,
  oversampling, logit-adjusted loss, mixup): every one (``evaluate.test_every_recipe``, the
  default), or ``real`` and the one selected out-of-fold. On balanced data oversampling and the
  logit adjustment change nothing: those arms share the first listed one's network (``same_network``);
* treatments: ``<recipe>+synthetic``, the accepted synthetic set added to the strongest recipe on
  test, to the out-of-fold selected one when there is one, and to ``real``;
* ablation: ``<first recipe>+unfiltered`` (the first raw candidates of each class, as many as were
  accepted: :func:`first_candidates`), the first recipe being the selected one, or the strongest on
  test; ``filter_gain`` in metrics.json is ``<first>+synthetic`` minus it, paired by seed.

The step budget is chosen on the real training images alone (k-fold, :mod:`synthgen.recipes`), and
so is the recipe when only one is tested. The verdict compares the strongest treatment with the
strongest baseline, both by mean test balanced accuracy, paired by seed, with a t-interval over the
seeds: ``recommended`` only when the interval lies above zero (as an independent scorer compares).
When every recipe is tested none is selected out-of-fold (a coin toss on scarce data: docs/RESULTS.md).
The test split only ever reaches ``predict``; its scores decide which recipe gets the synthetic set
(and trains the soft-label teacher, when ``evaluate.soft_label_mix`` > 0), as they decide the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from rich.progress import Progress

from synthgen.artifacts import FILTER_SUMMARY, POOL_SUMMARY, load_accepted, load_pool
from synthgen.config import Config, EvaluateConfig, config_to_dict
from synthgen.data import DataError, LabeledImages, check_disjoint, load_prepared, random_per_class
from synthgen.device import resolve_device, training_precision
from synthgen.io import atomic_dir, read_json, write_json
from synthgen.metrics import score, t_interval, tail_classes
from synthgen.models.classifier import fit_tasks
from synthgen.quality import generator_quality
from synthgen.progress import milestones
from synthgen.recipes import Recipe, budget_work, choose_budget, classifier_params, recipe_named, select_recipe, shared_networks

METRICS = ("balanced_accuracy", "accuracy", "macro_f1", "tail_recall")


@dataclass(frozen=True)
class Arm:
    """One training set + recipe: ``extra`` says which images join the real ones (None, synthetic, unfiltered)."""

    name: str
    recipe: Recipe
    extra: str | None = None


def baseline_arms(best: Recipe | None, config: EvaluateConfig) -> list[Arm]:
    """The non-generative arms: every recipe, or ``real`` and the selected one (``best``; None when every recipe is tested)."""
    names = list(config.recipes) if config.test_every_recipe else list(dict.fromkeys(["real", best.name]))
    return [Arm(name, recipe_named(name)) for name in names]


def synthetic_arms(recipes: list[Recipe], has_synthetic: bool, has_unfiltered: bool) -> list[Arm]:
    """``<recipe>+synthetic`` for each recipe given, ``real+synthetic`` as a row, and the ablation
    ``<first recipe given>+unfiltered``; only for the images that exist."""
    arms = []
    if has_synthetic:
        names = dict.fromkeys([recipe.name for recipe in recipes] + ["real"])
        arms += [Arm(f"{name}+synthetic", recipe_named(name), "synthetic") for name in names]
    if has_unfiltered:
        arms.append(Arm(f"{recipes[0].name}+unfiltered", recipes[0], "unfiltered"))
    return arms


# ------------------------------------------------------------------- training sets
def training_set(real_train: LabeledImages, extra: LabeledImages | None, extra_weight: float):
    """Concatenate real and extra images -> (x, y, sample_weight, is_real mask)."""
    n_real = len(real_train.y)
    if extra is None or len(extra.y) == 0:
        return real_train.x, real_train.y, np.ones(n_real, np.float32), np.ones(n_real, bool)
    if extra.image_shape != real_train.image_shape or extra.class_names != real_train.class_names:  # stale: prepare reran alone
        raise DataError(f"synthetic images of classes {list(extra.class_names)} and shape {extra.image_shape}, real train images of "
                        f"{list(real_train.class_names)} and {real_train.image_shape}: rerun generate and filter (dvc repro)")
    x = np.concatenate([real_train.x, extra.x])
    y = np.concatenate([real_train.y, extra.y]).astype(np.int64)
    weight = np.concatenate([np.ones(n_real), np.full(len(extra.y), extra_weight)]).astype(np.float32)
    is_real = np.concatenate([np.ones(n_real, bool), np.zeros(len(extra.y), bool)])
    return x, y, weight, is_real


def soft_targets(y: np.ndarray, is_real: np.ndarray, teacher_proba: np.ndarray | None, mix: float) -> np.ndarray | None:
    """One-hot targets, with the non-real rows blended toward the teacher: (1 - mix) one-hot + mix p."""
    if teacher_proba is None or mix == 0:
        return None
    targets = np.eye(teacher_proba.shape[1], dtype=np.float32)[y]
    targets[~is_real] = (1 - mix) * targets[~is_real] + mix * teacher_proba
    return targets


def extra_sets(real_train: LabeledImages, synthetic, unfiltered, config: EvaluateConfig) -> dict:
    """{'synthetic': capped accepted set, 'unfiltered': the first pool candidates with the accepted set's class counts}."""
    n_classes = real_train.n_classes
    if synthetic is not None and config.synthetic_per_class is not None:
        synthetic = synthetic.subset(random_per_class(synthetic.y, [config.synthetic_per_class] * n_classes, config.seed))
    if synthetic is None:  # no accepted set (filter not run): the ablation has no counts to match
        unfiltered = None
    if unfiltered is not None:
        unfiltered = unfiltered.subset(first_candidates(unfiltered, np.bincount(synthetic.y, minlength=n_classes)))
    return {"synthetic": synthetic, "unfiltered": unfiltered}


def first_candidates(pool: LabeledImages, counts: np.ndarray) -> np.ndarray:
    """Rows of the first ``counts[c]`` candidates of each class c in sample-id order: the filter stage keeps the
    first that pass in the same order, so this shares every candidate the filters let through (a random subset
    would differ in half its samples, which alone moves balanced accuracy about a point: docs/RESULTS.md)."""
    order = np.argsort(pool.index, kind="stable") if pool.index is not None else np.arange(len(pool.y))
    rows = [order[pool.y[order] == c][: int(n)] for c, n in enumerate(counts)]
    return np.sort(np.concatenate(rows)) if rows else np.zeros(0, np.int64)


def differing_samples(synthetic: LabeledImages | None, unfiltered: LabeledImages | None) -> int | None:
    """How many accepted samples the unfiltered ablation lacks (by sample id): the filters' rejections among the
    first candidates, each replaced by a later one (and the random pick of synthetic_per_class). None without ids."""
    if synthetic is None or unfiltered is None or synthetic.index is None or unfiltered.index is None:
        return None
    return int(len(np.setdiff1d(synthetic.index, unfiltered.index)))


# ------------------------------------------------------------------------ tables
def summarize_arms(per_seed: pd.DataFrame, confidence: float) -> dict:
    """{arm: {metric: t_interval}} from the per-seed table."""
    return {
        arm: {metric: t_interval(rows[metric], confidence) for metric in METRICS}
        for arm, rows in per_seed.groupby("arm", sort=False)
    }


def paired_gains(per_seed: pd.DataFrame, baseline: str, confidence: float) -> dict:
    """{arm: {metric: t_interval of per-seed (arm - baseline)}} for every other arm (paired by seed)."""
    table = {metric: per_seed.pivot(index="seed", columns="arm", values=metric) for metric in METRICS}
    arms = [arm for arm in per_seed["arm"].unique() if arm != baseline]
    return {
        arm: {metric: t_interval(table[metric][arm] - table[metric][baseline], confidence) for metric in METRICS}
        for arm in arms
    }


def strongest(summary: dict, arms: list[str]) -> str:
    """The arm with the highest mean test balanced accuracy (ties: the first listed)."""
    return max(arms, key=lambda arm: (summary[arm]["balanced_accuracy"]["mean"], -arms.index(arm)))


def decide(summary: dict, gains: dict, baseline: str, treatments: list[str]) -> dict:
    """Verdict of the strongest ``+synthetic`` arm against the strongest baseline (both by test mean).

    Both chosen on test, as an independent scorer would; the side without is the best of more arms
    and the test winner's luck is given back by the paired gain: conservative (the report says so).
    ``gains`` are paired per seed against ``baseline``.
    """
    if not treatments:
        return {"verdict": "not recommended", "reason": "no accepted synthetic samples to evaluate",
                "best_baseline": baseline, "best_synthetic": None, "gain": None}
    treatment = strongest(summary, treatments)
    gain = gains[treatment]["balanced_accuracy"]
    points = f"{100 * gain['mean']:+.2f} points balanced accuracy (CI {100 * gain['ci_low']:+.2f} to {100 * gain['ci_high']:+.2f})"
    if gain["mean"] > 0 and gain["ci_low"] > 0:
        verdict, reason = "recommended", f"{treatment} beats {baseline} by {points}"
    elif gain["mean"] > 0:
        verdict, reason = "not recommended", f"{treatment} vs {baseline}: {points}; the interval includes zero"
    else:
        verdict, reason = "not recommended", f"{treatment} does not beat {baseline}: {points}"
    return {"verdict": verdict, "reason": reason, "best_baseline": baseline, "best_synthetic": treatment, "gain": gain}


# -------------------------------------------------------------------------- core
def run_arms(
    real_train: LabeledImages,
    test: LabeledImages,
    synthetic: LabeledImages | None,
    unfiltered: LabeledImages | None,
    config: EvaluateConfig,
    progress: bool = False,
    fit: Callable = fit_tasks,
    share_networks: bool = True,
) -> dict:
    """Choose the budget (and, unless every recipe is tested, the recipe) on ``real_train``, train every
    arm over the seeds, score on ``test``.

    ``test`` is only passed to ``predict``. ``share_networks`` False trains every baseline arm even where
    balanced data make two the same network (the path before sharing; bench/bench_evaluate_stage.py). Returns ``per_seed`` and ``per_class`` DataFrames,
    ``summary`` ({arm: {metric: interval}}), ``gains`` (paired vs the strongest baseline),
    ``decision``, ``selection`` (budget curve, recipe scores, the recipe given the synthetic set and
    ``chosen_by``: ``test`` or ``out-of-fold``) and ``counts``.
    """
    with milestones("evaluate: the step budget, out-of-fold", budget_work(config, real_train), enabled=progress):
        steps, curve = choose_budget(real_train, config, fit)
    # every recipe scored on test: the out-of-fold pick adds nothing the verdict uses, and on scarce data it is a coin toss
    chosen, recipe_scores = (None, {}) if config.test_every_recipe else select_recipe(real_train, config, steps, curve, fit)
    extras = extra_sets(real_train, synthetic, unfiltered, config)
    present = {key: value is not None and len(value.y) > 0 for key, value in extras.items()}
    tail, seeds = tail_classes(real_train.counts()), [config.seed + i for i in range(config.seeds)]
    rows, recall_rows, teacher = [], [], None

    def run(arms: list[Arm], bar, task, label: str, shared: dict[str, str] | None = None) -> None:
        """Every arm's seeds in one fit_tasks call: one grouped network where that pays (``config.batched``),
        in bf16 on CPUs that have it (``config.cpu_bf16``). An arm that ``shared`` maps to an earlier one
        (the same network on these data) takes that arm's predictions instead of training."""
        shared = shared or {}
        trained = [arm for arm in arms if shared.get(arm.name, arm.name) == arm.name]
        tasks, sizes = [], []
        for arm in trained:
            extra = extras[arm.extra] if arm.extra else None
            x, y, weight, is_real = training_set(real_train, extra, config.synthetic_weight)
            proba = teacher.predict_proba(extra.x)[0] if teacher is not None and extra is not None else None
            prior_rows = None if is_real.all() or config.logit_adjust_prior == "all" else is_real  # "real": the real class counts
            tasks.append(dict(X=x, y=y, seeds=seeds, sample_weight=weight, soft_targets=soft_targets(y, is_real, proba, config.soft_label_mix),
                              prior_rows=prior_rows, **classifier_params(arm.recipe, config, real_train.n_classes, steps)))
            sizes.append(len(y))
        with milestones(f"evaluate: {len(trained)} {label} x {len(seeds)} seeds, {steps} steps", len(tasks) * len(seeds) * steps, progress):
            fitted = {arm.name: (n_train, members.predict(test.x))
                      for arm, n_train, members in zip(trained, sizes, fit(tasks, config.batched, cpu_bf16=config.cpu_bf16))}
        for arm in arms:
            n_train, predictions = fitted[shared.get(arm.name, arm.name)]
            for seed, predicted in zip(seeds, predictions):
                result = score(test.y, predicted, real_train.n_classes, tail)
                recall = result.pop("recall")
                rows.append({"arm": arm.name, "seed": seed, **result, "n_train": n_train})
                recall_rows.extend({"arm": arm.name, "seed": seed, "class": c, "recall": r} for c, r in enumerate(recall))
            bar.update(task, advance=1, description=f"evaluate {arm.name}")

    baselines = baseline_arms(chosen, config)
    # on balanced data oversampling and the logit adjustment change nothing: those arms train once (recipes.same_network)
    shared = shared_networks([arm.recipe for arm in baselines], real_train.counts()) if share_networks else {}
    with Progress(disable=not progress, transient=False) as bar:
        task = bar.add_task("evaluate", total=len(baselines) + 3)  # + at most 3 synthetic arms
        run(baselines, bar, task, "recipes without synthetic images", shared)
        # the strongest recipe on test (as the verdict ranks them) gets the synthetic set; the out-of-fold choice too
        leader = recipe_named(strongest(summarize_arms(pd.DataFrame(rows), config.confidence), [arm.name for arm in baselines]))
        best = chosen if chosen is not None else leader  # gets the synthetic set first, and the unfiltered ablation
        if config.soft_label_mix > 0 and any(present.values()):  # its teacher on real images, one seed
            params = classifier_params(best, config, real_train.n_classes, steps)
            teacher = fit([dict(X=real_train.x, y=real_train.y, seeds=[config.seed], **params)], config.batched, cpu_bf16=config.cpu_bf16)[0]
        arms = synthetic_arms(list({best.name: best, leader.name: leader}.values()), present["synthetic"], present["unfiltered"])
        bar.update(task, total=len(baselines) + len(arms))
        run(arms, bar, task, "arms with synthetic or unfiltered images")
    per_seed, per_class = pd.DataFrame(rows), pd.DataFrame(recall_rows)
    summary = summarize_arms(per_seed, config.confidence)
    baseline = strongest(summary, [arm.name for arm in baselines])
    gains = paired_gains(per_seed, baseline, config.confidence)
    treatments = [arm for arm in summary if arm.endswith("+synthetic")]
    counts = {
        "train": int(len(real_train.y)), "test": int(len(test.y)),
        **{key: 0 if value is None else int(len(value.y)) for key, value in extras.items()},
        "train_per_class": real_train.counts().tolist(), "tail_classes": tail.tolist(),
        "filter_differing": differing_samples(extras["synthetic"], extras["unfiltered"]),
    }
    selection = {"steps": steps, "budget_curve": curve, "recipe_scores": recipe_scores, "best_recipe": best.name,
                 "chosen_by": "test" if chosen is None else "out-of-fold", "folds": config.selection_folds,
                 "same_network": {name: first for name, first in shared.items() if name != first}}
    precision = training_precision(resolve_device(config.device), config.cpu_bf16)  # the arms'; the selection: fp32
    return {"per_seed": per_seed, "per_class": per_class, "summary": summary, "gains": gains,
            "decision": decide(summary, gains, baseline, treatments), "selection": selection, "counts": counts,
            "filter_ablation": filter_ablation(per_seed, best.name, config.confidence), "precision": precision}


def filter_ablation(per_seed: pd.DataFrame, recipe: str, confidence: float) -> dict | None:
    """Does filtering pay? ``<recipe>+synthetic`` minus ``<recipe>+unfiltered`` (same class counts),
    paired by seed, in balanced accuracy; None when either arm is missing."""
    filtered, unfiltered = f"{recipe}+synthetic", f"{recipe}+unfiltered"
    if not {filtered, unfiltered} <= set(per_seed["arm"]):
        return None
    gain = paired_gains(per_seed, unfiltered, confidence)[filtered]["balanced_accuracy"]
    return {"filtered": filtered, "unfiltered": unfiltered, "gain": gain}


def details_payload(results: dict, quality: dict | None, config: EvaluateConfig) -> dict:
    """Everything evaluate measured (reports/evaluation/details.json, what REPORT.md is built from)."""
    recall = results["per_class"].groupby(["arm", "class"], sort=False)["recall"].mean()
    return {
        **{key: results["decision"][key] for key in ("verdict", "reason", "best_baseline", "best_synthetic", "gain")},
        "selection": results["selection"],
        "filter_ablation": results["filter_ablation"],
        "arms": results["summary"],
        "gains": results["gains"],
        "counts": results["counts"],
        "precision": results["precision"],
        "per_class_recall": {arm: recall[arm].tolist() for arm in results["summary"]},
        "quality": quality,
        "evaluate": config_to_dict(config),
    }


def metrics_payload(details: dict, filter_summary: dict | None) -> dict:
    """The few numbers a person compares across experiments (the DVC metrics file, ``dvc exp show``)."""
    gain, treatment = details["gain"], details["best_synthetic"]
    quality = details["quality"] or {}
    tail = details["gains"].get(treatment, {}).get("tail_recall") if treatment else None
    ablation = details.get("filter_ablation")
    return {
        "verdict": details["verdict"],
        "recipe": details["best_baseline"],
        "steps": details["selection"]["steps"],
        "gain": None if gain is None else {key: gain[key] for key in ("mean", "ci_low", "ci_high")},
        "tail_recall_gain": None if tail is None else tail["mean"],
        "filter_gain": None if ablation is None else {key: ablation["gain"][key] for key in ("mean", "ci_low", "ci_high")},
        "balanced_accuracy": {arm: stats["balanced_accuracy"]["mean"] for arm, stats in details["arms"].items()},
        "accepted": None if filter_summary is None else filter_summary["accepted"],
        "quota": None if filter_summary is None else filter_summary["quota"],
        "cas": quality.get("cas", {}).get("balanced_accuracy"),
        "frechet": quality.get("frechet"),
    }


# ---------------------------------------------------------------------------- I/O
def load_extra_sets(synthetic_root: Path, pool_dir: Path) -> tuple[LabeledImages | None, LabeledImages | None]:
    """The accepted synthetic set and the unfiltered pool (None when the stage wrote nothing)."""
    synthetic = load_accepted(synthetic_root) if (synthetic_root / FILTER_SUMMARY).is_file() else None
    unfiltered = load_pool(pool_dir) if (pool_dir / POOL_SUMMARY).is_file() else None
    return synthetic, unfiltered


def main(config: Config, prepared_dir, synthetic_root, pool_dir, reports_dir, progress: bool = True) -> dict:
    """Run the harness and generator-quality metrics; write metrics.json and evaluation/ tables."""
    prepared = load_prepared(prepared_dir)
    check_disjoint(prepared)
    synthetic_root, pool_dir, reports_dir = Path(synthetic_root), Path(pool_dir), Path(reports_dir)
    synthetic, unfiltered = load_extra_sets(synthetic_root, pool_dir)
    results = run_arms(prepared.train, prepared.test, synthetic, unfiltered, config.evaluate, progress=progress)
    quality = None
    if config.evaluate.quality and synthetic is not None and len(synthetic.y):
        steps = results["selection"]["steps"]
        quality = generator_quality(prepared, synthetic, config.evaluate, config.filter.novelty_threshold, steps)
    details = details_payload(results, quality, config.evaluate)
    with atomic_dir(reports_dir / "evaluation") as out:
        results["per_seed"].to_csv(out / "per_seed.csv", index=False)
        per_class = results["per_class"].groupby(["arm", "class"], sort=False)["recall"].agg(["mean", "std"]).reset_index()
        per_class.assign(class_name=[prepared.class_names[c] for c in per_class["class"]]).to_csv(out / "per_class_recall.csv", index=False)
        write_json(out / "details.json", details)
    filter_summary = read_json(synthetic_root / FILTER_SUMMARY) if (synthetic_root / FILTER_SUMMARY).is_file() else None
    metrics = metrics_payload(details, filter_summary)
    write_json(reports_dir / "metrics.json", metrics)
    return details
