"""Tests of the filters' calibration without held-out images (cross-fitting, leave-one-out) and of
style borrowing for rare classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from synthgen.filters import ClaimFilter, ConfidenceFilter, NoveltyFilter, RealnessFilter, judge_only, per_class_quantile
from synthgen.metrics import stratified_folds
from synthgen.models import interpolate_codes


class MemorisingClassifier:
    """A fake estimator: certain of the label of every image it was fitted on, 0.5/0.5 otherwise
    (two classes). Records the rows it saw, so the test can tell which model scored what."""

    fitted_rows: list = []

    def get_params(self, deep=True):
        return {}

    def set_params(self, **params):
        return self

    def fit(self, X, y):
        self.known_ = {row.tobytes(): int(label) for row, label in zip(X, y)}
        MemorisingClassifier.fitted_rows.append(len(X))
        return self

    def predict_proba(self, X):
        proba = np.full((len(X), 2), 0.5)
        for i, row in enumerate(X):
            label = self.known_.get(row.tobytes())
            if label is not None:
                proba[i] = np.eye(2)[label]
        return proba


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 4, 4, 1), dtype=np.uint8)


def test_stratified_folds_spread_every_class_over_the_folds():
    y = np.repeat([0, 1, 2], [9, 3, 1])
    folds = stratified_folds(y, 3, seed=0)
    for c in (0, 1):
        assert sorted(np.bincount(folds[y == c], minlength=3)) == ([3, 3, 3] if c == 0 else [1, 1, 1])
    assert np.array_equal(folds, stratified_folds(y, 3, seed=0)) and not np.array_equal(folds, stratified_folds(y, 3, seed=5))


def test_per_class_quantile_gives_classes_without_scores_the_median_of_the_others():
    scores = np.array([1.0, 2.0, 3.0, 10.0, np.inf])
    y = np.array([0, 0, 1, 2, 3])  # class 3 has only a non-finite score, class 4 none
    values = per_class_quantile(scores, y, 5, 0.5)
    assert values[:3].tolist() == [1.5, 3.0, 10.0]
    assert values[3] == values[4] == 3.0  # median of 1.5, 3, 10


def test_confidence_filter_calibrates_on_out_of_fold_probabilities_not_on_what_it_memorised():
    X, y = _images(12), np.repeat([0, 1], 6)
    MemorisingClassifier.fitted_rows = []
    fitted = ConfidenceFilter(2, threshold=0.9, quantile=0.1, classifier=MemorisingClassifier(), folds=3).fit(X, y)
    # the scoring classifier saw all 12 images; 3 fold models saw 8 each
    assert sorted(MemorisingClassifier.fitted_rows) == [8, 8, 8, 12]
    # out of fold the fake is unsure (0.5), so the thresholds drop to 0.5; in-sample it would say 1.0
    assert fitted.thresholds_.tolist() == [0.5, 0.5]
    assert fitted.calibrated_on_.startswith("out-of-fold")
    held_out = ConfidenceFilter(2, threshold=0.9, classifier=MemorisingClassifier()).fit(X, y, X[:4], y[:4])
    assert held_out.thresholds_.tolist() == [0.9, 0.9] and held_out.calibrated_on_ == "held-out images"


def test_a_one_image_class_takes_the_median_threshold_of_the_others():
    X, y = _images(13), np.repeat([0, 1, 2], [6, 6, 1])

    class ThreeClass(MemorisingClassifier):
        def predict_proba(self, X):
            proba = np.full((len(X), 3), 0.1)
            proba[:, 0] = 0.8  # class 0 always confident, others not
            return proba

    fitted = ConfidenceFilter(3, threshold=0.95, quantile=0.5, classifier=ThreeClass(), folds=3).fit(X, y)
    assert fitted.thresholds_[0] == pytest.approx(0.8) and fitted.thresholds_[1] == pytest.approx(0.1)
    assert fitted.thresholds_[2] == pytest.approx(np.median([0.8, 0.1]))


def test_novelty_scale_is_leave_one_out_within_the_class():
    X = np.zeros((4, 1, 2, 1), np.uint8)
    X[:, 0, 0, 0] = [0, 51, 0, 255]  # class 0: two images 0.2 apart; class 1: two images 1.0 apart
    y = np.array([0, 0, 1, 1])
    fitted = NoveltyFilter(threshold=0.5).fit(X, y)
    np.testing.assert_allclose(fitted.scales_, [0.2, 1.0], atol=1e-6)
    np.testing.assert_allclose(fitted.thresholds_, [0.1, 0.5], atol=1e-6)
    lone = NoveltyFilter(threshold=0.5).fit(np.concatenate([X, X[:1]]), np.array([0, 0, 1, 1, 2]))
    assert lone.scales_[2] == pytest.approx(np.median([0.2, 1.0]))  # a one-image class: median of the others
    assert not lone.keep(X[:1], np.array([0]))[0]  # an exact copy is rejected


def test_judge_only_passes_every_sample_of_a_class_with_too_few_real_images():
    X, y = _images(9), np.repeat([0, 1], [6, 3])
    fitted = NoveltyFilter(threshold=0.5).fit(X, y)
    copies, labels = X[[0, 1, 6, 7]], np.array([0, 0, 1, 1])  # exact copies: rejected in every judged class
    assert not fitted.keep(copies, labels).any()
    judge_only(fitted, np.bincount(y), min_images=5)
    assert fitted.judged_.tolist() == [True, False]
    assert fitted.keep(copies, labels).tolist() == [False, False, True, True]  # class 1 has 3 < 5 images
    assert not judge_only(fitted, np.bincount(y), min_images=1).keep(copies, labels).any()  # 1: every class judged


def test_rare_classes_borrow_codes_of_every_class_and_common_ones_keep_their_own():
    codes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    code_labels = torch.tensor([0, 0, 0, 1])  # class 0 has three codes, class 1 one
    labels = torch.tensor([0] * 200 + [1] * 200)
    noise = torch.zeros(400, 2)
    generator = torch.Generator().manual_seed(0)
    z = interpolate_codes((codes, code_labels), labels, noise, 0.0, generator, borrow_below=2)
    common, rare = z[:200], z[200:]
    assert (common.sum(1) <= 1.0 + 1e-6).all() and (common >= 0).all()  # inside class 0's triangle
    own = torch.tensor([5.0, 5.0])
    # every rare row lies on a segment from its own code to some bank code, and some reach other classes' codes
    directions = own - rare
    assert (directions.norm(dim=1) > 1.0).sum() > 50
    prior = interpolate_codes((codes, code_labels), labels, torch.ones(400, 2), 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(prior[200:], torch.ones(200, 2))  # borrow_below=0: a one-code class keeps prior draws


def _digits(per_class: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = np.concatenate([np.flatnonzero(digits.target == c)[offset : offset + per_class] for c in range(3)])
    return (digits.images[rows] * 255 / 16).astype(np.uint8)[..., None], digits.target[rows]


def _blurred(x: np.ndarray, seed: int) -> np.ndarray:
    """'Generated' images: the real ones smeared over their neighbours plus noise (what a blurry generator makes)."""
    smooth = (x.astype(float) + np.roll(x, 1, 1) + np.roll(x, 1, 2) + np.roll(x, -1, 1) + np.roll(x, -1, 2)) / 5
    noisy = smooth + np.random.default_rng(seed).normal(0, 20, x.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def test_posthoc_discriminator_tells_real_from_generated_and_drops_only_the_least_real():
    x, y = _digits(20)
    fake_x, fake_y = _blurred(_digits(20, 20)[0], 0), y
    realness = RealnessFilter(3, quantile=0.1, steps=150, folds=2, width=8, device="cpu").fit(x, y, fake_x, fake_y)
    assert realness.separation_ > 0.8  # out-of-fold: it learned the difference, not the images
    np.testing.assert_array_equal(realness.thresholds_, np.fmin(realness.real_thresholds_, realness.fake_thresholds_))
    unseen_real, unseen_y = _digits(20, 60)
    unseen_fake = _blurred(_digits(20, 80)[0], 1)
    real_scores, fake_scores = realness.score(unseen_real, unseen_y), realness.score(unseen_fake, unseen_y)
    assert real_scores.mean() > fake_scores.mean()
    assert realness.keep(unseen_real, unseen_y).mean() >= 0.8
    # the cut follows the generated images' own out-of-fold scores: most samples stay, the least real go
    assert 0.5 <= realness.keep(unseen_fake, unseen_y).mean() < 1.0


def test_posthoc_discriminator_caps_its_rejections_on_generated_images_no_fold_learned_from():
    """The cap is calibrated on scores of the kind candidates get (the mean over the fold models), not on one fold model's."""
    x, y = _digits(20)
    fake_x, fake_y = _blurred(_digits(20, 20)[0], 0), y
    calibration_x = _blurred(_digits(20, 40)[0], 2)
    realness = RealnessFilter(3, quantile=0.1, steps=150, folds=2, width=8, device="cpu").fit(
        x, y, fake_x, fake_y, X_fake_val=calibration_x, y_fake_val=y)
    expected = per_class_quantile(realness.score(calibration_x, y), y, 3, 0.1)
    np.testing.assert_allclose(realness.fake_thresholds_, expected)
    assert realness.keep(calibration_x, y).mean() >= 0.85  # at most about the quantile's share of each class
    unseen_fake = _blurred(_digits(20, 80)[0], 1)
    assert realness.keep(unseen_fake, y).mean() >= 0.7


def test_claim_filter_rejects_a_rare_class_sample_that_reads_as_a_judged_class():
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)[..., None]
    zeros, ones, eights = (np.nonzero(digits.target == d)[0] for d in (0, 1, 8))
    X = np.concatenate([images[zeros[:40]], images[ones[:40]], images[eights[:1]]])
    y = np.repeat([0, 1, 2], [40, 40, 1])  # class 2: one image, too few for the confidence filter to judge
    confidence = judge_only(ConfidenceFilter(3, steps=150, folds=0, random_state=0).fit(X, y), np.bincount(y), min_images=5)
    candidates = np.concatenate([images[zeros[40:50]], images[eights[:1]], images[zeros[40:45]]])
    labels = np.array([2] * 11 + [0] * 5)  # ten zeros labelled as the rare class, its own image, five zeros labelled 0
    rejected = {}
    for threshold in (0.2, 0.5, 0.9):
        claim = ClaimFilter(confidence, threshold).fit()
        assert claim.judged_.tolist() == [False, False, True]  # exactly what the confidence filter does not judge
        scores = claim.score(candidates, labels)
        assert np.isnan(scores[11:]).all() and claim.passes(scores, labels)[10:].all()  # its own image and class 0 pass
        rejected[threshold] = int((~claim.passes(scores, labels)).sum())
    assert rejected[0.5] >= 8  # zeros called the rare class read as zeros
    assert rejected[0.2] >= rejected[0.5] >= rejected[0.9]  # a higher threshold rejects fewer
    nothing_judged = judge_only(ConfidenceFilter(3, steps=20, folds=0).fit(X, y), np.bincount(y), min_images=50)
    assert not ClaimFilter(nothing_judged).fit().judged_.any()  # no judged class: nothing can claim a sample
