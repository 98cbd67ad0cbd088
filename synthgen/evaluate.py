"""Downstream utility harness: does adding the synthetic set help a fixed classifier?

Every arm trains the same :class:`~synthgen.models.classifier.CNNClassifier` (same architecture,
steps, batch size and learning rate) on a different training set and is scored on the same,
untouched real test split, over ``evaluate.seeds`` classifier seeds:

* baselines: ``real``, ``real+classic``, ``real+oversample``, ``real+oversample+classic``;
* treatment: ``real+synthetic``, ``real+synthetic+classic`` (the accepted, filtered set);
* ablation:  ``real+unfiltered``, ``real+unfiltered+classic`` (the raw candidate pool).

The gain is the PAIRED per-seed difference between the best synthetic arm and the best baseline
(both chosen by mean balanced accuracy), with a t-interval over the seeds. The verdict is
``recommended`` only when that interval lies above zero. The test split only ever reaches
``predict``: training sets are built from ``real_train`` plus synthetic images, and there is
no early stopping (fixed step budget), so nothing is tuned on test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score

from synthgen.config import Config, EvaluateConfig, config_to_dict
from synthgen.data import DataError, LabeledImages, load_prepared
from synthgen.io import atomic_dir, write_json
from synthgen.models.classifier import CNNClassifier

BASELINE_ARMS = ("real", "real+classic", "real+oversample", "real+oversample+classic")
SYNTHETIC_ARMS = ("real+synthetic", "real+synthetic+classic")
ABLATION_ARMS = ("real+unfiltered", "real+unfiltered+classic")
METRICS = ("balanced_accuracy", "accuracy", "macro_f1", "tail_recall")


@dataclass(frozen=True)
class ArmSpec:
    """How one arm builds its training set and samples batches."""

    name: str
    extra: str | None  # None, "synthetic" or "unfiltered": which images join the real train set
    balanced: bool  # class-balanced batch sampling (random oversampling)
    augment: bool  # classical augmentation


def arm_specs(has_synthetic: bool, has_unfiltered: bool) -> list[ArmSpec]:
    """The arms to run, in report order; treatment/ablation arms only when their images exist."""
    specs = [ArmSpec(name, None, "oversample" in name, name.endswith("classic")) for name in BASELINE_ARMS]
    if has_synthetic:
        specs += [ArmSpec(name, "synthetic", False, name.endswith("classic")) for name in SYNTHETIC_ARMS]
    if has_unfiltered:
        specs += [ArmSpec(name, "unfiltered", False, name.endswith("classic")) for name in ABLATION_ARMS]
    return specs


# ------------------------------------------------------------------- training sets
def cap_per_class(images: LabeledImages, per_class: int | None, seed: int) -> LabeledImages:
    """Keep at most ``per_class`` images of each class (a seeded random subset); None keeps all."""
    if per_class is None:
        return images
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(images.y == c))[:per_class] for c in range(images.n_classes)]
    return images.subset(np.sort(np.concatenate(keep)))


def match_counts(pool: LabeledImages, counts: np.ndarray, seed: int) -> LabeledImages:
    """A seeded per-class random subset of the unfiltered pool with the accepted set's class counts.

    The ablation then differs from the treatment only in filtering, not in how much data it adds.
    """
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(pool.y == c))[: int(n)] for c, n in enumerate(counts)]
    return pool.subset(np.sort(np.concatenate(keep)))


def training_set(real_train: LabeledImages, extra: LabeledImages | None, extra_weight: float):
    """Concatenate real and extra images -> (x, y, sample_weight, is_real mask)."""
    if extra is None or len(extra.y) == 0:
        return real_train.x, real_train.y, np.ones(len(real_train.y), np.float32), np.ones(len(real_train.y), bool)
    if extra.image_shape != real_train.image_shape:
        raise DataError(f"synthetic images have shape {extra.image_shape}, real train images {real_train.image_shape}")
    x = np.concatenate([real_train.x, extra.x])
    y = np.concatenate([real_train.y, extra.y]).astype(np.int64)
    weight = np.concatenate([np.ones(len(real_train.y)), np.full(len(extra.y), extra_weight)]).astype(np.float32)
    is_real = np.concatenate([np.ones(len(real_train.y), bool), np.zeros(len(extra.y), bool)])
    return x, y, weight, is_real


def soft_targets(y: np.ndarray, is_real: np.ndarray, teacher_proba: np.ndarray | None, mix: float) -> np.ndarray | None:
    """One-hot targets, with the non-real rows blended toward the teacher: (1 - mix) one-hot + mix p."""
    if teacher_proba is None or mix == 0:
        return None
    targets = np.eye(teacher_proba.shape[1], dtype=np.float32)[y]
    targets[~is_real] = (1 - mix) * targets[~is_real] + mix * teacher_proba
    return targets


def fit_teacher(real_train: LabeledImages, config: EvaluateConfig, factory: Callable[..., CNNClassifier]) -> CNNClassifier:
    """Real-train-only classifier (balanced, augmented) whose probabilities soften synthetic labels."""
    spec = ArmSpec("teacher", None, balanced=True, augment=True)
    return factory(config, real_train.n_classes, spec, config.seed).fit(real_train.x, real_train.y)


def make_classifier(config: EvaluateConfig, n_classes: int, spec: ArmSpec, seed: int) -> CNNClassifier:
    """The fixed downstream classifier: only sampling/augmentation and the seed vary by arm."""
    return CNNClassifier(
        n_classes=n_classes, width=config.width, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
        balanced=spec.balanced, augment=spec.augment, allow_flips=config.allow_flips,
        device=config.device, random_state=seed,
    )


# ------------------------------------------------------------------------ metrics
def tail_classes(train_counts: np.ndarray, n_tail: int = 5) -> np.ndarray:
    """The ``n_tail`` classes with the fewest real training images (at most half of the classes)."""
    n_tail = max(1, min(n_tail, len(train_counts) // 2))
    return np.sort(np.argsort(train_counts, kind="stable")[:n_tail])


def score(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, tail: np.ndarray | None = None) -> dict:
    """Accuracy, macro-F1, balanced accuracy (sklearn.metrics), per-class recall, tail-class recall."""
    labels = np.arange(n_classes)
    recall = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "tail_recall": float(recall[tail].mean()) if tail is not None else float("nan"),
        "recall": recall.astype(float),
    }


def t_interval(values, confidence: float = 0.95) -> dict:
    """Mean, std (ddof=1) and the two-sided Student-t confidence interval of the mean."""
    values = np.asarray(values, dtype=np.float64)
    n, mean = len(values), float(values.mean())
    std = float(values.std(ddof=1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * std / np.sqrt(n)) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n": n}


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


def best_baseline_arm(summary: dict) -> str:
    """The baseline arm with the highest mean balanced accuracy."""
    return max(BASELINE_ARMS, key=lambda arm: summary[arm]["balanced_accuracy"]["mean"])


def decide(summary: dict, gains: dict) -> dict:
    """Pick the best synthetic arm (mean balanced accuracy) and give the verdict vs the best baseline."""
    best_baseline = best_baseline_arm(summary)
    candidates = [arm for arm in SYNTHETIC_ARMS if arm in summary]
    if not candidates:
        return {"verdict": "not recommended", "reason": "no accepted synthetic samples to evaluate",
                "best_baseline": best_baseline, "best_synthetic": None, "gain": None}
    best = max(candidates, key=lambda arm: summary[arm]["balanced_accuracy"]["mean"])
    gain = gains[best]["balanced_accuracy"]
    points = f"{100 * gain['mean']:+.2f} points balanced accuracy (CI {100 * gain['ci_low']:+.2f} to {100 * gain['ci_high']:+.2f})"
    if gain["mean"] > 0 and gain["ci_low"] > 0:
        verdict, reason = "recommended", f"{best} beats {best_baseline} by {points}"
    elif gain["mean"] > 0:
        verdict, reason = "not recommended", f"{best} vs {best_baseline}: {points}; the interval includes zero"
    else:
        verdict, reason = "not recommended", f"{best} does not beat {best_baseline}: {points}"
    return {"verdict": verdict, "reason": reason, "best_baseline": best_baseline, "best_synthetic": best, "gain": gain}


# -------------------------------------------------------------------------- core
def run_arms(
    real_train: LabeledImages,
    test: LabeledImages,
    synthetic: LabeledImages | None,
    unfiltered: LabeledImages | None,
    config: EvaluateConfig,
    progress: bool = False,
    classifier_factory: Callable[..., CNNClassifier] = make_classifier,
) -> dict:
    """Train every arm over ``config.seeds`` seeds; score each on ``test``; return tables + verdict.

    ``test`` is only passed to ``predict``. Returns ``per_seed`` and ``per_class`` DataFrames,
    ``summary`` ({arm: {metric: interval}}), ``gains`` (paired vs the best baseline),
    ``decision`` (verdict, reason, arms compared) and ``counts``.
    """
    n_classes = real_train.n_classes
    synthetic = cap_per_class(synthetic, config.synthetic_per_class, config.seed) if synthetic is not None else None
    if unfiltered is not None and synthetic is not None:
        unfiltered = match_counts(unfiltered, np.bincount(synthetic.y, minlength=n_classes), config.seed)
    extras = {"synthetic": synthetic, "unfiltered": unfiltered}
    specs = arm_specs(*(extras[k] is not None and len(extras[k].y) > 0 for k in ("synthetic", "unfiltered")))
    teacher = fit_teacher(real_train, config, classifier_factory) if config.soft_label_mix > 0 and any(v is not None for v in extras.values()) else None
    tail = tail_classes(real_train.counts())
    seeds = [config.seed + i for i in range(config.seeds)]
    rows, recall_rows = [], []
    with _progress_bar(len(specs) * len(seeds), progress) as advance:
        for spec in specs:
            extra = extras[spec.extra] if spec.extra else None
            x, y, weight, is_real = training_set(real_train, extra, config.synthetic_weight)
            proba = teacher.predict_proba(extra.x) if teacher is not None and extra is not None else None
            targets = soft_targets(y, is_real, proba, config.soft_label_mix)
            for seed in seeds:
                model = classifier_factory(config, n_classes, spec, seed).fit(x, y, sample_weight=weight, soft_targets=targets)
                result = score(test.y, model.predict(test.x), n_classes, tail)
                recall = result.pop("recall")
                rows.append({"arm": spec.name, "seed": seed, **result, "n_train": len(y)})
                recall_rows += [{"arm": spec.name, "seed": seed, "class": c, "recall": r} for c, r in enumerate(recall)]
                advance(spec.name)
    per_seed, per_class = pd.DataFrame(rows), pd.DataFrame(recall_rows)
    summary = summarize_arms(per_seed, config.confidence)
    gains = paired_gains(per_seed, best_baseline_arm(summary), config.confidence)
    decision = decide(summary, gains)
    counts = {
        "train": int(len(real_train.y)), "test": int(len(test.y)),
        "synthetic": 0 if extras["synthetic"] is None else int(len(extras["synthetic"].y)),
        "unfiltered": 0 if extras["unfiltered"] is None else int(len(extras["unfiltered"].y)),
        "train_per_class": real_train.counts().tolist(), "tail_classes": tail.tolist(),
    }
    return {"per_seed": per_seed, "per_class": per_class, "summary": summary, "gains": gains,
            "decision": decision, "counts": counts}


class _progress_bar:
    """A rich progress bar over arms x seeds (or nothing): ``with _progress_bar(n, on) as advance``."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.bar = total, enabled, None

    def __enter__(self):
        if not self.enabled:
            return lambda name: None
        from rich.progress import Progress

        self.bar = Progress(transient=False)
        self.bar.start()
        task = self.bar.add_task("evaluate", total=self.total)
        return lambda name: self.bar.update(task, advance=1, description=f"evaluate {name}")

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def check_disjoint(train: LabeledImages, test: LabeledImages) -> None:
    """Refuse to evaluate when the prepared test split shares source indices with train."""
    if train.index is None or test.index is None:
        return
    shared = np.intersect1d(train.index, test.index)
    if len(shared):
        raise DataError(f"test split shares {len(shared)} source indices with train (e.g. {shared[:5].tolist()})")


def metrics_payload(results: dict, quality: dict | None, config: EvaluateConfig) -> dict:
    """The DVC metrics file: verdict, gain, per-arm means and intervals, counts (JSON-ready)."""
    decision = results["decision"]
    recall = results["per_class"].groupby(["arm", "class"], sort=False)["recall"].mean()
    return {
        "verdict": decision["verdict"],
        "reason": decision["reason"],
        "best_baseline": decision["best_baseline"],
        "best_synthetic": decision["best_synthetic"],
        "gain": decision["gain"],
        "arms": results["summary"],
        "gains": results["gains"],
        "counts": results["counts"],
        "per_class_recall": {arm: recall[arm].tolist() for arm in results["summary"]},
        "quality": quality,
        "evaluate": config_to_dict(config),
    }


# ---------------------------------------------------------------------------- I/O
def load_extra_sets(synthetic_root: Path, pool_dir: Path) -> tuple[LabeledImages | None, LabeledImages | None]:
    """The accepted synthetic set and the unfiltered pool (None when the stage wrote nothing)."""
    from synthgen.filter_outputs import load_accepted
    from synthgen.generate import load_pool

    synthetic = load_accepted(synthetic_root) if (Path(synthetic_root) / "filter_summary.json").is_file() else None
    unfiltered = load_pool(pool_dir) if (Path(pool_dir) / "generate_summary.json").is_file() else None
    return synthetic, unfiltered


def main(config: Config, prepared_dir, synthetic_root, pool_dir, reports_dir, progress: bool = True) -> dict:
    """Run the harness and generator-quality metrics; write metrics.json and evaluation/ tables."""
    from synthgen.quality import generator_quality

    prepared = load_prepared(prepared_dir)
    check_disjoint(prepared.train, prepared.test)
    synthetic, unfiltered = load_extra_sets(Path(synthetic_root), Path(pool_dir))
    results = run_arms(prepared.train, prepared.test, synthetic, unfiltered, config.evaluate, progress=progress)
    quality = None
    if config.evaluate.quality and synthetic is not None and len(synthetic.y):
        quality = generator_quality(prepared, synthetic, config.evaluate, config.filter.novelty_threshold)
    reports_dir = Path(reports_dir)
    with atomic_dir(reports_dir / "evaluation") as out:
        results["per_seed"].to_csv(out / "per_seed.csv", index=False)
        per_class = results["per_class"].groupby(["arm", "class"], sort=False)["recall"].agg(["mean", "std"]).reset_index()
        per_class.assign(class_name=[prepared.class_names[c] for c in per_class["class"]]).to_csv(out / "per_class_recall.csv", index=False)
        if quality is not None:
            write_json(out / "quality.json", quality)
    payload = metrics_payload(results, quality, config.evaluate)
    write_json(reports_dir / "metrics.json", payload)
    return payload
