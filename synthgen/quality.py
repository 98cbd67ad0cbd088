"""Generator quality of the accepted synthetic set, independent of the downstream gain.

* CAS (classification accuracy score): the fixed classifier trained on synthetic images only,
  scored on the real test split.
* Frechet distance and k-NN precision/recall (Kynkaenniemi et al., 2019), overall and per class,
  in the penultimate-feature space of a :class:`CNNClassifier` trained on real ``train + val``
  of the same domain (never on test). The real reference set is the held-out test split.
* Near-copy fraction: accepted samples the novelty filter's rule would reject (pixel-L2 distance
  to the nearest real train image below ``filter.novelty_threshold`` x the class's typical real
  nearest-neighbour distance), computed with :class:`synthgen.filters.NoveltyFilter`.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg

from synthgen.config import EvaluateConfig
from synthgen.data import LabeledImages, PreparedData
from synthgen.models.classifier import CNNClassifier, fit_together
from synthgen.filters import NoveltyFilter
from synthgen.metrics import pairwise_distances, score


# ------------------------------------------------------------------ distances
def knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row to its k-th nearest other row (the k-NN manifold radius)."""
    distances = pairwise_distances(features, features)
    np.fill_diagonal(distances, np.inf)
    k = min(k, len(features) - 1)
    return np.sort(distances, axis=1)[:, k - 1]


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall: fake inside the real k-NN manifold, real inside the fake one."""
    if len(real) < 2 or len(fake) < 2:
        return float("nan"), float("nan")
    cross = pairwise_distances(fake, real)  # (n_fake, n_real)
    precision = (cross <= knn_radii(real, k)[None, :]).any(axis=1).mean()
    recall = (cross.T <= knn_radii(fake, k)[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (the FID formula)."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eps = 1e-6 * np.eye(len(cov_a))  # few samples per class make the covariances singular
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    trace = np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(np.real(root))
    return float(((mean_a - mean_b) ** 2).sum() + trace)  # not clamped: a negative value flags numerical failure


def near_copy_mask(candidates: LabeledImages, prepared: PreparedData, threshold: float) -> np.ndarray:
    """True for near-copies, by the novelty filter's own rule (:class:`synthgen.filter.NoveltyFilter`).

    A candidate is a near-copy when its pixel-L2 distance to the nearest real train image is below
    ``threshold`` x the class's typical real nearest-neighbour distance (see :class:`NoveltyFilter`).
    """
    val = prepared.val if len(prepared.val.y) else None
    novelty = NoveltyFilter(threshold=threshold).fit(prepared.train.x, prepared.train.y, *((val.x, val.y) if val else ()))
    return ~novelty.keep(candidates.x, candidates.y)


# --------------------------------------------------------------------- metrics
def feature_classifier(prepared: PreparedData, config: EvaluateConfig, steps: int) -> tuple[CNNClassifier, np.ndarray, np.ndarray]:
    """(unfitted CNNClassifier, X, y): its images are real train + val (never test); fitted, its features are the
    space of FD and precision/recall."""
    x = np.concatenate([prepared.train.x, prepared.val.x])
    y = np.concatenate([prepared.train.y, prepared.val.y])
    model = CNNClassifier(n_classes=prepared.n_classes, width=config.width, steps=steps, batch_size=config.batch_size,
                          lr=config.lr, augment=True, allow_flips=config.allow_flips, device=config.device, random_state=config.seed)
    return model, x, y


def cas_classifier(synthetic: LabeledImages, config: EvaluateConfig, steps: int) -> tuple[CNNClassifier, np.ndarray, np.ndarray]:
    """(unfitted CNNClassifier, X, y) of CAS: the fixed classifier on the synthetic images only."""
    model = CNNClassifier(n_classes=synthetic.n_classes, width=config.width, steps=steps, batch_size=config.batch_size,
                          lr=config.lr, device=config.device, random_state=config.seed)
    return model, synthetic.x, synthetic.y


def classification_accuracy_score(model: CNNClassifier, test: LabeledImages) -> dict:
    """CAS: the classifier trained on synthetic images only (:func:`cas_classifier`), scored on real test."""
    result = score(test.y, model.predict(test.x), len(model.classes_))
    return {key: result[key] for key in ("accuracy", "balanced_accuracy", "macro_f1")}


def feature_metrics(real: np.ndarray, real_y: np.ndarray, fake: np.ndarray, fake_y: np.ndarray, n_classes: int, k: int) -> dict:
    """Frechet distance and precision/recall overall and for each class."""
    precision, recall = precision_recall(real, fake, k)
    per_class = []
    for c in range(n_classes):
        p, r = precision_recall(real[real_y == c], fake[fake_y == c], k)
        per_class.append({"class": c, "frechet": frechet_distance(real[real_y == c], fake[fake_y == c]),
                          "precision": p, "recall": r, "n_synthetic": int((fake_y == c).sum())})
    return {"frechet": frechet_distance(real, fake), "precision": precision, "recall": recall, "per_class": per_class}


def generator_quality(prepared: PreparedData, synthetic: LabeledImages, config: EvaluateConfig, novelty_threshold: float,
                      steps: int) -> dict:
    """All generator-quality numbers for the accepted set (JSON-ready dict)."""
    # both classifiers in one call: grouped on small images, side by side on larger ones
    extractor, cas_model = fit_together([feature_classifier(prepared, config, steps), cas_classifier(synthetic, config, steps)])
    real_features, fake_features = extractor.transform(prepared.test.x), extractor.transform(synthetic.x)
    features = feature_metrics(real_features, prepared.test.y, fake_features, synthetic.y, prepared.n_classes, config.quality_k)
    copies = near_copy_mask(synthetic, prepared, novelty_threshold)
    for row in features["per_class"]:
        in_class = synthetic.y == row["class"]
        row["near_copy_fraction"] = float(copies[in_class].mean()) if in_class.any() else float("nan")
    return {
        "cas": classification_accuracy_score(cas_model, prepared.test),
        "frechet": features["frechet"],
        "precision": features["precision"],
        "recall": features["recall"],
        "near_copy_fraction": float(copies.mean()),
        "near_copy_threshold": novelty_threshold,
        "feature_space": "CNNClassifier penultimate features, trained on real train+val; reference = real test split",
        "per_class": features["per_class"],
    }
