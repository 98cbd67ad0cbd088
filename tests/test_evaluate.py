"""Tests of the downstream harness: budgets, test-split isolation, interval math, verdict."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from synthgen import evaluate
from synthgen.config import Config, EvaluateConfig
from synthgen.data import DataError, LabeledImages, load_prepared
from synthgen.io import read_json
from synthgen.models.classifier import CNNClassifier

FAST = EvaluateConfig(steps=8, seeds=2, batch_size=16, width=8, device="cpu", quality=False)


class RecordingClassifier(CNNClassifier):
    """A real CNNClassifier that also records what it was fitted on and asked to predict."""

    log: list = []

    def fit(self, X, y, sample_weight=None, soft_targets=None):
        RecordingClassifier.log.append(("fit", self.get_params(), X, y))
        return super().fit(X, y, sample_weight, soft_targets)

    def predict(self, X):
        RecordingClassifier.log.append(("predict", self.get_params(), X, None))
        return super().predict(X)


def recording_factory(config, n_classes, spec, seed):
    params = evaluate.make_classifier(config, n_classes, spec, seed).get_params()
    return RecordingClassifier(**params)


def _row_keys(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in x}


@pytest.fixture(scope="module")
def prepared(tiny_prepared):
    return load_prepared(tiny_prepared)


def test_t_interval_matches_hand_computed_case():
    result = evaluate.t_interval([1, 2, 3, 4, 5], confidence=0.95)
    half = stats.t.ppf(0.975, 4) * np.sqrt(2.5) / np.sqrt(5)
    assert result["mean"] == pytest.approx(3.0)
    assert result["std"] == pytest.approx(np.sqrt(2.5))
    assert half == pytest.approx(2.776 * np.sqrt(2.5) / np.sqrt(5), rel=1e-3)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((3 - half, 3 + half))


def test_paired_gain_uses_per_seed_differences():
    import pandas as pd

    # arm b = arm a + seed-specific offset: the paired interval sees only the offsets
    rows = [{"arm": "real", "seed": s, **dict.fromkeys(evaluate.METRICS, 0.5 + 0.1 * s)} for s in range(5)]
    rows += [{"arm": "real+synthetic", "seed": s, **dict.fromkeys(evaluate.METRICS, 0.5 + 0.1 * s + d)} for s, d in enumerate([1, 2, 3, 4, 5])]
    gains = evaluate.paired_gains(pd.DataFrame(rows), "real", 0.95)
    expected = evaluate.t_interval([1, 2, 3, 4, 5])
    assert gains["real+synthetic"]["balanced_accuracy"]["ci_low"] == pytest.approx(expected["ci_low"])
    assert "real" not in gains


def test_arms_share_budget_and_test_split_never_reaches_fit(prepared):
    synthetic = prepared.val  # real held-out images posing as synthetic
    noise = LabeledImages(np.full_like(prepared.val.x, 7), prepared.val.y, prepared.class_names)
    RecordingClassifier.log = []
    config = FAST.model_copy(update={"soft_label_mix": 0.3})  # also exercises the real-train teacher
    results = evaluate.run_arms(prepared.train, prepared.test, synthetic, noise, config, classifier_factory=recording_factory)
    fits = [entry for entry in RecordingClassifier.log if entry[0] == "fit"]
    predicts = [entry for entry in RecordingClassifier.log if entry[0] == "predict"]
    assert len(fits) == 8 * FAST.seeds + 1 and len(predicts) == 8 * FAST.seeds
    teacher_x = fits[0][2]
    assert teacher_x is prepared.train.x
    budgets = {(p["steps"], p["batch_size"], p["lr"], p["width"], p["weight_decay"]) for _, p, _, _ in fits}
    assert budgets == {(FAST.steps, FAST.batch_size, FAST.lr, FAST.width, 5e-4)}
    allowed = _row_keys(prepared.train.x) | _row_keys(synthetic.x) | _row_keys(noise.x)
    test_only = _row_keys(prepared.test.x) - allowed
    assert test_only, "fixture must hold test images that appear nowhere else"
    for _, _, x, _ in fits:
        assert _row_keys(x) <= allowed and not (_row_keys(x) & test_only)
    assert all(x is prepared.test.x for _, _, x, _ in predicts)  # every arm scored on the same test array
    assert set(results["per_seed"]["arm"]) == set(evaluate.BASELINE_ARMS + evaluate.SYNTHETIC_ARMS + evaluate.ABLATION_ARMS)
    # the unfiltered ablation gets as many images per class as the accepted set
    n_train = results["per_seed"].groupby("arm")["n_train"].first()
    assert n_train["real+unfiltered"] == n_train["real+synthetic"] == len(prepared.train.y) + len(synthetic.y)


def test_soft_targets_blend_only_synthetic_rows():
    y = np.array([0, 1, 1])
    is_real = np.array([True, False, False])
    proba = np.array([[0.2, 0.8], [0.6, 0.4]], dtype=np.float32)
    targets = evaluate.soft_targets(y, is_real, proba, mix=0.5)
    np.testing.assert_allclose(targets, [[1, 0], [0.1, 0.9], [0.3, 0.7]])
    assert evaluate.soft_targets(y, is_real, proba, mix=0.0) is None


def test_without_synthetic_only_baselines_and_not_recommended(prepared):
    results = evaluate.run_arms(prepared.train, prepared.test, None, None, FAST)
    assert set(results["per_seed"]["arm"]) == set(evaluate.BASELINE_ARMS)
    assert results["decision"]["verdict"] == "not recommended"


def test_decide_requires_interval_above_zero():
    summary = {arm: {"balanced_accuracy": {"mean": 0.5}} for arm in evaluate.BASELINE_ARMS + evaluate.SYNTHETIC_ARMS}
    up = {"mean": 0.02, "ci_low": 0.01, "ci_high": 0.03}
    straddles = {"mean": 0.02, "ci_low": -0.01, "ci_high": 0.05}
    gains = {arm: {"balanced_accuracy": up} for arm in evaluate.SYNTHETIC_ARMS}
    assert evaluate.decide(summary, gains)["verdict"] == "recommended"
    gains = {arm: {"balanced_accuracy": straddles} for arm in evaluate.SYNTHETIC_ARMS}
    decision = evaluate.decide(summary, gains)
    assert decision["verdict"] == "not recommended" and "includes zero" in decision["reason"]


def test_check_disjoint_rejects_shared_indices(prepared):
    leaky = LabeledImages(prepared.test.x[:3], prepared.test.y[:3], prepared.class_names, prepared.train.index[:3])
    with pytest.raises(DataError, match="shares 3 source indices"):
        evaluate.check_disjoint(prepared.train, leaky)
    evaluate.check_disjoint(prepared.train, prepared.test)


def test_verdict_flips_from_held_out_real_to_noise():
    """Scarce digits (3/class) + 40/class held-out real 'synthetic' -> recommended; + uniform noise -> not."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images * 16).clip(0, 255).astype(np.uint8)[..., None]
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(0)
    parts = {"train": [], "good": [], "test": []}
    for c in range(10):
        rows = rng.permutation(np.flatnonzero(y == c))
        parts["train"].append(rows[:3]), parts["good"].append(rows[3:43]), parts["test"].append(rows[43:83])
    names = tuple(str(c) for c in range(10))
    sets = {k: LabeledImages(x[np.concatenate(v)], y[np.concatenate(v)], names, np.concatenate(v)) for k, v in parts.items()}
    noise = LabeledImages(rng.integers(0, 256, sets["good"].x.shape, dtype=np.uint8), sets["good"].y, names)
    config = EvaluateConfig(steps=60, seeds=3, batch_size=32, width=16, device="cpu", quality=False)
    good = evaluate.run_arms(sets["train"], sets["test"], sets["good"], None, config)
    bad = evaluate.run_arms(sets["train"], sets["test"], noise, None, config)
    assert good["decision"]["verdict"] == "recommended", good["decision"]["reason"]
    assert bad["decision"]["verdict"] == "not recommended", bad["decision"]["reason"]


def test_main_writes_metrics_and_tables(tiny_prepared, tmp_path):
    config = Config(evaluate=FAST)
    payload = evaluate.main(config, tiny_prepared, tmp_path / "no-synthetic", tmp_path / "no-pool", tmp_path / "reports", progress=False)
    metrics = read_json(tmp_path / "reports" / "metrics.json")
    assert metrics["verdict"] == payload["verdict"] == "not recommended"
    assert set(metrics["arms"]) == set(evaluate.BASELINE_ARMS)
    assert metrics["arms"]["real"]["balanced_accuracy"]["n"] == FAST.seeds
    assert len(metrics["per_class_recall"]["real"]) == 10
    assert (tmp_path / "reports" / "evaluation" / "per_seed.csv").is_file()
    assert (tmp_path / "reports" / "evaluation" / "per_class_recall.csv").is_file()


def test_classic_augment_is_a_per_image_affine_with_black_fill():
    import torch

    from synthgen.models.classifier import classic_augment

    images = -torch.ones(16, 1, 12, 12)
    images[:, :, 4:8, 4:8] = 1.0  # a white square on black
    torch.manual_seed(0)
    out = classic_augment(images)
    assert out.shape == images.shape and out.min() >= -1 and out.max() <= 1
    assert (out[:, :, 0, 0] == -1).all()  # borders stay black (fill -1, not 0)
    assert not torch.equal(out[0], out[1])  # independent draw per image
    assert (out.sum(dim=(1, 2, 3)) - images.sum(dim=(1, 2, 3))).abs().max() < 0.5 * 16 * 2  # mass roughly kept


def test_classifier_soft_targets_are_used(prepared):
    # soft targets that always say class 0 make the classifier predict class 0 regardless of y
    targets = np.zeros((len(prepared.train.y), 10), dtype=np.float32)
    targets[:, 0] = 1.0
    model = CNNClassifier(n_classes=10, width=8, steps=30, batch_size=16, device="cpu").fit(prepared.train.x, prepared.train.y, soft_targets=targets)
    assert (model.predict(prepared.test.x) == 0).mean() > 0.9
    with pytest.raises(ValueError, match="soft_targets must have shape"):
        CNNClassifier(n_classes=10, steps=1, device="cpu").fit(prepared.train.x, prepared.train.y, soft_targets=targets[:, :3])
