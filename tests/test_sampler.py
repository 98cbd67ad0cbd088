"""SynthgenSampler as imbalanced-learn tests its samplers: output layout, counts, determinism, Pipeline, clone."""

from __future__ import annotations

import numpy as np
import pytest
from imblearn.pipeline import make_pipeline
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import FunctionTransformer

from synthgen.config import ConfigError, GenerateConfig, TrainConfig
from synthgen.generate import compute_quotas
from synthgen.sampler import SynthgenSampler

TRAIN = {"steps": 30, "batch_size": 16, "device": "cpu", "cvae": {"base_channels": 8, "latent_dim": 4, "kl_warmup_steps": 10}}
GENERATE = {"min_per_class": 0, "batch_size": 64, "device": "cpu"}
EVERYTHING_PASSES = {"discriminator": False, "classifier": False, "novelty": False, "device": "cpu"}
FILTERED = {"classifier_steps": 40, "discriminator_steps": 40, "discriminator_samples": 20, "discriminator_calibration_samples": 40, "device": "cpu"}
TRAINED = {**TRAIN, "steps": 150, "cvae": {**TRAIN["cvae"], "kl_warmup_steps": 50, "kl_weight": 1.0}}  # samples the filters accept
COUNTS = [12, 5, 1]  # a long tail down to one image


def quadrant_images(counts, channels: int | None, labels=(0, 1, 2), seed: int = 0):
    """Class k = a bright 4x4 square in quadrant k of a dark noisy 8x8 image; (N, 8, 8) or (N, 8, 8, C)."""
    rng = np.random.default_rng(seed)
    codes = np.repeat(np.arange(len(counts)), counts)
    x = rng.integers(0, 40, size=(len(codes), 8, 8), dtype=np.uint8)
    for row, code in enumerate(codes):
        top, left = 4 * (code // 2), 4 * (code % 2)
        x[row, top : top + 4, left : left + 4] = rng.integers(200, 256, size=(4, 4), dtype=np.uint8)
    if channels is not None:
        x = np.stack([x] * channels, axis=-1) if channels == 3 else x[..., None]
        if channels == 3:
            x[..., 0] //= 2  # a colour cast, so the channels differ
    return x, np.asarray(labels)[codes]


def sampler(**changes) -> SynthgenSampler:
    return SynthgenSampler(**{"train": TRAIN, "generate": GENERATE, "filter": EVERYTHING_PASSES, **changes})


def class_counts(y, labels) -> list[int]:
    return [int(np.sum(y == label)) for label in labels]


@pytest.mark.parametrize(("channels", "labels"), [(None, (3, 7, 9)), (1, ("cat", "dog", "emu")), (3, (0, 1, 2))])
def test_real_rows_first_unchanged_then_balanced_synthetic(channels, labels):
    X, y = quadrant_images(COUNTS, channels, labels)
    fitted = sampler()
    X_res, y_res = fitted.fit_resample(X, y)
    assert X_res.dtype == np.uint8 and X_res.shape[1:] == X.shape[1:] and y_res.dtype == y.dtype
    np.testing.assert_array_equal(X_res[: len(X)], X)
    np.testing.assert_array_equal(y_res[: len(y)], y)
    assert class_counts(y_res, labels) == [12, 12, 12]  # to_max: the one-image class is topped up like any other
    assert fitted.sampling_strategy_ == {labels[0]: 0, labels[1]: 7, labels[2]: 11}
    assert list(fitted.classes_) == sorted(labels) and fitted.filter_summary_["shortfalls"] == {}
    assert not any(np.array_equal(image, real) for image in X_res[len(X) :] for real in X[y == labels[2]])


@pytest.mark.parametrize("generate", [{"balance": "to_count", "count": 8}, {"balance": "ratio", "ratio": 0.5},
                                      {"balance": "to_max", "min_per_class": 3}])
def test_counts_follow_the_generate_section(generate):
    X, y = quadrant_images(COUNTS, None)
    section = {**GENERATE, **generate}
    X_res, y_res = sampler(generate=section).fit_resample(X, y)
    expected = np.array(COUNTS) + compute_quotas(np.array(COUNTS), GenerateConfig(**section))
    assert class_counts(y_res, (0, 1, 2)) == expected.tolist() and len(X_res) == expected.sum()


def test_filtered_output_is_deterministic_with_random_state():
    X, y = quadrant_images(COUNTS, 3)
    first = sampler(train=TRAINED, filter=FILTERED, random_state=5)
    X_a, y_a = first.fit_resample(X, y)
    X_b, y_b = sampler(train=TRAINED, filter=FILTERED, random_state=5).fit_resample(X, y)
    np.testing.assert_array_equal(X_a, X_b)
    np.testing.assert_array_equal(y_a, y_b)
    X_c, _ = sampler(train=TRAINED, filter=FILTERED, random_state=6).fit_resample(X, y)
    assert X_c.shape[0] != X_a.shape[0] or not np.array_equal(X_c, X_a)
    summary = first.filter_summary_
    assert summary["filters"] == {"discriminator": "on", "classifier": "on", "claimed": "on", "novelty": "on"}  # a posthoc D for the cVAE
    accepted = [summary["per_class"][name]["accepted"] for name in ("0", "1", "2")]
    assert class_counts(y_a, (0, 1, 2)) == (np.array(COUNTS) + accepted).tolist()
    assert accepted[1] > 0 and accepted[2] > 0 and all(count <= 12 for count in class_counts(y_a, (0, 1, 2)))
    assert first.train_summary_["steps"] == 150 and first.generator_.n_classes == 3


def test_works_in_an_imblearn_pipeline():
    X, y = quadrant_images([20, 8, 3], None)
    seen = []

    def flatten(images):
        seen.append(len(images))
        return images.reshape(len(images), -1) / 255.0

    pipeline = make_pipeline(sampler(), FunctionTransformer(flatten), LogisticRegression(max_iter=500))
    pipeline.fit(X, y)
    assert seen == [60]  # the classifier was fitted on real + synthetic (3 x 20)
    predictions = pipeline.predict(X)  # the sampler only acts in fit
    assert seen == [60, len(X)] and predictions.shape == y.shape and (predictions == y).mean() > 0.5


def test_clone_and_params():
    original = SynthgenSampler(train=TrainConfig(steps=7), generate={"balance": "to_count"}, random_state=3)
    copy = clone(original)
    assert copy is not original and copy.get_params() == original.get_params()
    assert set(copy.get_params()) == {"train", "generate", "filter", "random_state"}
    X, y = quadrant_images(COUNTS, None)
    fitted = sampler()
    fitted.fit_resample(X, y)
    fresh = clone(fitted)
    assert not hasattr(fresh, "generator_") and fresh.get_params()["train"] == TRAIN
    assert fresh.set_params(random_state=None).random_state is None


def test_bad_input_is_refused_with_the_reason():
    X, y = quadrant_images(COUNTS, None)
    with pytest.raises(ValueError, match="uint8 images, got dtype float64"):
        sampler().fit_resample(X / 255.0, y)
    with pytest.raises(ValueError, match=r"shape \(N, H, W\) or \(N, H, W, C\).*\(18, 64\)"):
        sampler().fit_resample(X.reshape(len(X), -1), y)
    with pytest.raises(ConfigError, match="train=.*steps"):
        sampler(train={"steps": 0}).fit_resample(X, y)
    with pytest.raises(ValueError, match="more than 1 class"):
        sampler().fit_resample(X[:12], y[:12])


def test_nothing_to_over_sample_returns_the_input_untrained():
    X, y = quadrant_images([4, 4, 4], None)  # balanced, to_max, min_per_class 0: every quota is 0
    model = sampler()
    X_res, y_res = model.fit_resample(X, y)
    np.testing.assert_array_equal(X_res, X)
    np.testing.assert_array_equal(y_res, y)
    assert model.generator_ is None and model.filter_summary_["quota"] == 0


def test_a_numpy_integer_seed_is_the_same_seed():
    """A grid search over np.arange(...) seeds passes numpy integers: they must not be treated as a RandomState."""
    as_int, as_numpy = sampler(random_state=5)._sections(), sampler(random_state=np.int64(5))._sections()
    assert [section.seed for section in as_numpy] == [section.seed for section in as_int] == [5, 5, 5]
