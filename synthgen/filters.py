"""The candidate filters, scikit-learn style, each fitted on REAL images only.

``fit`` returns self, ``score(X, y)`` gives per-sample scores, ``keep(X, y)`` a bool mask and
``passes(scores, y)`` the same mask from precomputed scores; ``thresholds_`` holds one cut per class.

Calibration needs real images the filter did not learn from. The user's labeled images are all they
have, so none is held out by default (``data.val_per_class: 0``; with held-out ``X_val`` every
filter calibrates on those instead); each filter then calibrates without taking images from training:

* :class:`ConfidenceFilter` cross-fits: ``folds`` classifiers, each trained on the other folds, give
  every real image an out-of-fold probability of its class; the per-class threshold is a quantile of
  those. The classifier that scores candidates is then trained on every image. :class:`ClaimFilter`
  uses it on the classes too small to judge: a sample it gives to a judged class (p > 0.5) is rejected.
* :class:`NoveltyFilter` takes each class's scale from leave-one-out nearest-neighbour distances
  within the class (a one-image class has none and uses the median scale of the others).
* :class:`RealnessFilter` (the default discriminator filter, for any generator) is a discriminator
  trained after the generator on real vs generated images and cross-fitted the same way, so its
  thresholds come from real and generated images it did not train on.
* :class:`DiscriminatorFilter` (``filter.discriminator_source: model``) scores with the generator's
  own discriminator, which saw every training image (never the held-out ones).
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, clone
from sklearn.metrics import roc_auc_score

from synthgen.device import autocast
from synthgen.metrics import flat_pixels, nearest_distance, stratified_folds
from synthgen.models.classifier import CNNClassifier, fit_together
from synthgen.tensors import to_tensor

FILTERS = ("discriminator", "classifier", "claimed", "novelty")
SCORE_COLUMNS = {"discriminator": "d_score", "classifier": "classifier_prob", "claimed": "unclaimed", "novelty": "nn_distance"}


def per_class_quantile(scores: np.ndarray, y: np.ndarray, n_classes: int, q: float, min_count: int = 1) -> np.ndarray:
    """q-quantile of ``scores`` per class; classes with fewer than ``min_count`` finite scores get
    the median of the other classes' quantiles, or NaN when no class has any (the caller decides)."""
    scores, y = np.asarray(scores, dtype=np.float64), np.asarray(y)
    finite = np.isfinite(scores)
    overall = float(np.quantile(scores[finite], q)) if finite.any() else np.nan
    values = np.full(n_classes, np.nan)
    for c in range(n_classes):
        members = scores[(y == c) & finite]
        if len(members) >= min_count:
            values[c] = float(np.quantile(members, q))
    fallback = float(np.median(values[~np.isnan(values)])) if (~np.isnan(values)).any() else overall
    return np.where(np.isnan(values), fallback, values)


class _Filter(BaseEstimator):
    """Shared ``keep`` / ``passes``: a sample passes when its score clears its class threshold
    (or when its class is not judged: :func:`judge_only`)."""

    def passes(self, scores: np.ndarray, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y)
        cleared = np.asarray(scores) >= self.thresholds_[y]
        judged = getattr(self, "judged_", None)
        return cleared if judged is None else cleared | ~judged[y]

    def keep(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.passes(self.score(X, y), y)


def judge_only(fitted: _Filter, train_counts: np.ndarray, min_images: int) -> _Filter:
    """Let ``fitted`` judge only classes with at least ``min_images`` real training images; it passes every
    sample of the others (``judged_``, a bool per class). Returns ``fitted``.

    A filter knows a class only through its real images. With fewer than about five (the number below
    which the cVAE borrows style from other classes, on purpose) "least real", "least confident" and
    "closest to a training image" all mean "least like those few images", and those are the samples
    that teach a classifier the class's variation. On two MNIST long tails the three filters together
    cost about a point of balanced accuracy against the unfiltered candidates, where rejecting as many
    at random cost nothing; judging only the larger classes cut that cost by a half and by a fifth,
    not to zero (bench/bench_filter_ablation.py, docs/RESULTS.md). The discriminator gets its own,
    larger minimum (``filter.discriminator_min_class_images``: 20 by default, capped at the largest
    class so that balanced data keep it on every class), measured the same way.
    """
    fitted.judged_ = np.asarray(train_counts) >= min_images
    return fitted


def judged(fitted: _Filter, label: int) -> bool:
    """Whether filter ``fitted`` judges class ``label`` (:func:`judge_only`; True when it was never restricted)."""
    mask = getattr(fitted, "judged_", None)
    return True if mask is None else bool(mask[label])


class DiscriminatorFilter(_Filter):
    """Keep when D(x, y) >= the ``quantile`` of D on real images of class y."""

    def __init__(self, model=None, quantile: float = 0.1, batch_size: int = 1024, device: str = "cpu"):
        self.model = model
        self.quantile = quantile
        self.batch_size = batch_size
        self.device = device

    def fit(self, X: np.ndarray, y: np.ndarray) -> "DiscriminatorFilter":
        if self.model is None or not self.model.has_discriminator:
            raise ValueError("DiscriminatorFilter needs a generator with a discriminator (the cGAN)")
        self.thresholds_ = per_class_quantile(self.score(X, y), np.asarray(y), self.model.n_classes, self.quantile)
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


class RealnessFilter(_Filter):
    """A discriminator trained after the generator (discriminator rejection sampling, Azadi et al. 2019).

    A CNN over 2K classes, real class c (label c) against generated class c (label K + c), learns
    from the real images and ``X_fake``, generated images drawn the way candidates are but with other
    seeds. Batches are class-balanced, so s(x, y) = log p(real y | x) - log p(generated y | x)
    estimates the log density ratio of real to generated images of class y. It is cross-fitted over
    ``folds``: each real and generated image gets an out-of-fold score, and a candidate (which no fold
    saw) gets the mean over the fold models. The threshold of class c is the smaller of

    * the ``quantile`` of the out-of-fold scores of real images of c (``X_val`` when given): a
      candidate less real than the least real 2 % (the default) of real images is rejected, and
    * the ``quantile`` of the scores of generated images of c that no fold learned from
      (``X_fake_val``, scored as candidates are: the mean over the fold models), so that at most
      about that share of a class's candidates is rejected. On scarce data a discriminator tells
      most samples from real images, so the first rule alone would reject nearly all of them; like
      DRS, the filter then drops the least real samples and keeps the rest, not only the most
      typical ones. Without ``X_fake_val`` the out-of-fold scores of ``X_fake`` stand in; they are
      one fold model's, not the mean of all, and on an MNIST long tail the cut they gave rejected
      up to 8.5% of a class's candidates at ``quantile`` 0.02.

    The default share is small on purpose: the least real samples are also the least typical; on MNIST
    long tails cutting 10 % of them cost about a point against the unfiltered candidates, while 2 %
    guards against broken samples at a cost within the noise (bench/bench_filter_ablation.py).

    ``separation_`` is the out-of-fold ROC AUC of real against generated (0.5: indistinguishable).
    """

    def __init__(self, n_classes: int | None = None, quantile: float = 0.02, steps: int = 300, folds: int = 3, width: int = 16,
                 device: str = "auto", random_state: int | None = 0):
        self.n_classes = n_classes
        self.quantile = quantile
        self.steps = steps
        self.folds = folds
        self.width = width
        self.device = device
        self.random_state = random_state

    def _log_ratio(self, model, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        proba = np.clip(model.predict_proba(X), 1e-12, None)
        rows = np.arange(len(y))
        return np.log(proba[rows, y]) - np.log(proba[rows, self.n_classes_ + y])

    def fit(self, X: np.ndarray, y: np.ndarray, X_fake: np.ndarray, y_fake: np.ndarray,
            X_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
            X_fake_val: np.ndarray | None = None, y_fake_val: np.ndarray | None = None) -> "RealnessFilter":
        y, y_fake = np.asarray(y, dtype=np.int64), np.asarray(y_fake, dtype=np.int64)
        self.n_classes_ = k = self.n_classes or int(max(y.max(), y_fake.max())) + 1
        images, labels = np.concatenate([X, X_fake]), np.concatenate([y, k + y_fake])  # real c -> c, generated c -> K + c
        is_real = np.arange(len(labels)) < len(y)
        n_folds, seed = max(2, self.folds), 0 if self.random_state is None else int(self.random_state)
        folds = stratified_folds(labels, n_folds, seed)
        base = CNNClassifier(n_classes=2 * k, width=self.width, steps=self.steps, balanced=True, augment=True, device=self.device,
                             random_state=seed)
        held_out, out_of_fold = [folds == fold for fold in range(n_folds)], np.full(len(labels), np.nan)
        self.members_ = fit_together([(clone(base), images[~held], labels[~held]) for held in held_out])  # one call: grouped or side by side
        for model, held in zip(self.members_, held_out):
            out_of_fold[held] = self._log_ratio(model, images[held], labels[held] % k)
        real_scores, real_y = out_of_fold[is_real], y
        if X_val is not None and len(X_val):
            real_scores, real_y = self.score(X_val, y_val), np.asarray(y_val)
        self.real_thresholds_ = per_class_quantile(real_scores, real_y, k, self.quantile, min_count=2)
        fake_scores, fake_y = out_of_fold[~is_real], y_fake
        if X_fake_val is not None and len(X_fake_val):
            fake_scores, fake_y = self.score(X_fake_val, y_fake_val), np.asarray(y_fake_val)
        self.fake_thresholds_ = per_class_quantile(fake_scores, fake_y, k, self.quantile)
        self.thresholds_ = np.fmin(self.real_thresholds_, self.fake_thresholds_)
        finite = np.isfinite(out_of_fold)
        self.separation_ = float(roc_auc_score(is_real[finite], out_of_fold[finite])) if len(set(is_real[finite])) == 2 else float("nan")
        self.calibrated_on_ = ("held-out images" if X_val is not None and len(X_val) else f"out-of-fold scores ({n_folds} folds)")
        return self

    def score(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        if len(X) == 0:
            return np.zeros(0, dtype=np.float64)
        y = np.asarray(y, dtype=np.int64)
        return np.mean([self._log_ratio(model, X, y) for model in self.members_], axis=0)


class ConfidenceFilter(_Filter):
    """Keep when the real-data classifier gives the conditioned class p >= t_c.

    ``classifier`` (an unfitted estimator, default a class-balanced augmented CNNClassifier) is
    cloned and fitted on the real training images. ``calibration="per_class"`` lowers each class's
    threshold to the ``quantile`` of p_c on real images the classifier did not see (``X_val``, or
    out-of-fold over ``folds`` cross-fitted classifiers): a global threshold removes exactly the
    minority classes that a scarce classifier is unsure of. A class with fewer than two images has
    no out-of-fold probability worth the name (no fold model saw the class) and takes the median
    threshold of the other classes.
    """

    def __init__(self, n_classes: int | None = None, threshold: float = 0.5, calibration: str = "per_class",
                 quantile: float = 0.1, classifier=None, steps: int = 300, folds: int = 3, device: str = "auto",
                 random_state: int | None = 0):
        self.n_classes = n_classes
        self.threshold = threshold
        self.calibration = calibration
        self.quantile = quantile
        self.classifier = classifier
        self.steps = steps
        self.folds = folds
        self.device = device
        self.random_state = random_state

    def _base(self, n_classes: int):
        if self.classifier is not None:
            return self.classifier
        return CNNClassifier(n_classes=n_classes, steps=self.steps, balanced=True, augment=True, device=self.device,
                             random_state=self.random_state)

    def held_out_folds(self, y: np.ndarray, has_val: bool = False) -> list[np.ndarray]:  # of the fold models fit trains
        if self.calibration != "per_class" or has_val or self.folds < 2:  # calibrated on held-out images, or not per class
            return []
        folds = stratified_folds(np.asarray(y), self.folds, 0 if self.random_state is None else int(self.random_state))
        return [held for held in (folds == fold for fold in range(self.folds)) if held.any() and not held.all()]

    def out_of_fold_proba(self, fold_models: list, folds: list[np.ndarray], X: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
        """p(true class) of each real image from the classifier trained on the other folds (``fold_models[i]`` never
        saw the images of mask ``folds[i]``); NaN for a class with fewer than two images: no fold model saw it."""
        proba = np.full(len(y), np.nan)
        for model, held in zip(fold_models, folds, strict=True):
            proba[held] = model.predict_proba(X[held])[np.arange(held.sum()), y[held]]
        proba[np.bincount(y, minlength=n_classes)[y] < 2] = np.nan
        return proba

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None = None, y_val: np.ndarray | None = None) -> "ConfidenceFilter":
        X, y = np.asarray(X), np.asarray(y).astype(np.int64)
        n_classes, has_val = self.n_classes or int(np.max(y)) + 1, X_val is not None and len(X_val) > 0
        folds = self.held_out_folds(y, has_val)  # the scorer and the fold models in one call: grouped or side by side
        fitted = fit_together([(clone(self._base(n_classes)), X, y)] + [(clone(self._base(n_classes)), X[~h], y[~h]) for h in folds])
        self.classifier_, self._last_proba = fitted[0], None
        self.n_fit_samples_ = len(X)  # what the scoring classifier saw: the real training images, nothing else
        self.thresholds_ = np.full(n_classes, float(self.threshold))
        self.calibrated_on_ = "none (the global threshold)"
        if self.calibration != "per_class":
            return self
        if has_val:
            y_val = np.asarray(y_val)
            held_out, held_y = self.score(X_val, y_val), y_val
            self.calibrated_on_ = "held-out images"
        elif self.folds >= 2:
            held_out, held_y = self.out_of_fold_proba(fitted[1:], folds, X, y, n_classes), y
            self.calibrated_on_ = f"out-of-fold probabilities ({self.folds} folds)"
        else:
            return self
        # fmin: a class nothing calibrates (every class a single image) keeps the global threshold
        self.thresholds_ = np.fmin(self.thresholds_, per_class_quantile(held_out, held_y, n_classes, self.quantile))
        return self

    def score(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        if len(X) == 0:
            return np.zeros(0, dtype=np.float32)
        return self.proba(X)[np.arange(len(X)), np.asarray(y)]

    def proba(self, X: np.ndarray) -> np.ndarray:
        """(N, K) scoring-classifier probabilities; the last array's are kept, so the claim filter reuses them."""
        last = getattr(self, "_last_proba", None)
        if last is None or last[0] is not X:
            last = self._last_proba = (X, self.classifier_.predict_proba(X))
        return last[1]

    def __getstate__(self):  # the kept batch is not shipped to executor workers
        return {key: value for key, value in super().__getstate__().items() if key != "_last_proba"}


class ClaimFilter(_Filter):
    """For a class too small to judge: reject a candidate that the real-data classifier gives to a class it judges.

    Trained on one or two images of a class, the confidence filter's classifier cannot tell a new style
    of it from a broken sample, but it can tell a sample that reads as a class it knows well. Such a
    class borrows every class's style, and some samples become one of them (one MNIST image beside
    1,000 of another: 38% read as another digit), teaching the wrong label. So a candidate of a class
    the confidence filter does not judge is rejected when its classifier gives a judged class
    p > ``threshold`` (docs/RESULTS.md). ``score`` is 1 - that largest p ("unclaimed", NaN for judged
    classes); a candidate passes when it is at least 1 - ``threshold``.
    """

    def __init__(self, confidence: ConfidenceFilter | None = None, threshold: float = 0.5):
        self.confidence = confidence
        self.threshold = threshold

    def fit(self, X: np.ndarray | None = None, y: np.ndarray | None = None) -> "ClaimFilter":
        """Reads which classes the fitted ``confidence`` filter judges (:func:`judge_only`): it judges the others."""
        claimants = getattr(self.confidence, "judged_", None)
        if claimants is None:
            raise ValueError("ClaimFilter needs a fitted ConfidenceFilter restricted by judge_only")
        self.claimants_ = np.asarray(claimants, bool)
        self.judged_ = ~self.claimants_ & self.claimants_.any()  # no class judged: nothing can claim, nothing is judged
        self.thresholds_ = np.full(len(self.claimants_), 1.0 - float(self.threshold))
        return self

    def score(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, dtype=np.int64)
        scores = np.full(len(y), np.nan)
        rows = np.nonzero(self.judged_[y])[0] if len(y) else np.zeros(0, np.int64)
        if len(rows):
            proba = self.confidence.proba(X)[rows]  # a copy: the cached probabilities stay as they are
            proba[np.arange(len(rows)), y[rows]] = 0.0
            scores[rows] = 1.0 - proba[:, self.claimants_].max(axis=1)
        return scores


class NoveltyFilter(_Filter):
    """Reject near-copies: nearest real training image closer than ``threshold`` x the class's typical
    nearest-neighbour distance between real images (the class's scale, ``scales_``)."""

    def __init__(self, threshold: float = 0.5, batch_size: int = 1024):
        self.threshold = threshold
        self.batch_size = batch_size

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None = None, y_val: np.ndarray | None = None) -> "NoveltyFilter":
        y = np.asarray(y)
        self.reference_ = flat_pixels(X)
        n_classes = int(np.max(y)) + 1 if y_val is None or not len(y_val) else max(int(np.max(y)), int(np.max(y_val))) + 1
        typical, typical_y = np.full(0, np.nan), np.zeros(0, np.int64)
        for c in range(n_classes):
            members = self.reference_[y == c]
            if X_val is not None and len(X_val):  # a real unseen image of the class -> the class's train images
                queries = flat_pixels(np.asarray(X_val)[np.asarray(y_val) == c])
                distances = nearest_distance(queries, members, self.batch_size) if len(members) else np.full(len(queries), np.inf)
            else:  # leave-one-out within the class; a one-image class gets inf (no scale of its own)
                distances = nearest_distance(members, members, self.batch_size, exclude_self=True)
            typical = np.concatenate([typical, distances])
            typical_y = np.concatenate([typical_y, np.full(len(distances), c)])
        self.scales_ = per_class_quantile(typical, typical_y, n_classes, 0.5)
        if np.isnan(self.scales_).any():  # every class a single image: the leave-one-out scale across classes
            across = nearest_distance(self.reference_, self.reference_, self.batch_size, exclude_self=True)
            self.scales_ = np.full(n_classes, float(np.median(across[np.isfinite(across)])) if np.isfinite(across).any() else 0.0)
        self.thresholds_ = self.threshold * self.scales_
        return self

    def score(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        return nearest_distance(flat_pixels(X), self.reference_, self.batch_size)
