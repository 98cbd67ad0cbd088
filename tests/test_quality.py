"""Tests of the generator-quality metrics: distances on known cases, near-copies, CAS end to end."""

from __future__ import annotations

import numpy as np
import pytest

from synthgen import quality
from synthgen.config import EvaluateConfig
from synthgen.data import LabeledImages, load_prepared


def test_frechet_distance_known_cases():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    assert quality.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-4)
    # same covariance, mean shifted by 3 along one axis -> distance = 3 ** 2
    shifted = a + np.array([3.0, 0, 0, 0])
    assert quality.frechet_distance(a, shifted) == pytest.approx(9.0, rel=1e-3)


def test_precision_recall_identical_and_disjoint_sets():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(200, 8))
    assert quality.precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    far = real + 100.0
    assert quality.precision_recall(real, far, k=3) == (0.0, 0.0)
    # fakes collapsed onto one real point: precise but no recall
    collapsed = np.repeat(real[:1], 50, axis=0) + 1e-6 * rng.normal(size=(50, 8))
    precision, recall = quality.precision_recall(real, collapsed, k=3)
    assert precision == 1.0 and recall < 0.1


def test_near_copy_mask_flags_copies_not_novel_images(tiny_prepared):
    prepared = load_prepared(tiny_prepared)
    copies = prepared.train.subset(np.arange(10))
    novel = prepared.test.subset(np.arange(10))
    candidates = LabeledImages(np.concatenate([copies.x, novel.x]), np.concatenate([copies.y, novel.y]), prepared.class_names)
    mask = quality.near_copy_mask(candidates, prepared, threshold=0.5)
    assert mask[:10].all()
    assert mask[10:].mean() < 0.5


def test_generator_quality_on_held_out_real(tiny_prepared):
    prepared = load_prepared(tiny_prepared)
    config = EvaluateConfig(steps=40, batch_size=32, width=8, device="cpu")
    result = quality.generator_quality(prepared, prepared.val, config, novelty_threshold=0.5, steps=40)
    assert {"cas", "frechet", "precision", "recall", "near_copy_fraction", "per_class"} <= set(result)
    assert result["cas"]["balanced_accuracy"] > 0.2 and result["cas"]["accuracy"] > 0.2  # chance is 0.1
    assert len(result["per_class"]) == prepared.n_classes
    assert result["near_copy_fraction"] == 0.0  # val images are real but not copies of train
    noise = LabeledImages(np.random.default_rng(0).integers(0, 256, prepared.val.x.shape, dtype=np.uint8), prepared.val.y, prepared.class_names)
    worse = quality.generator_quality(prepared, noise, config, novelty_threshold=0.5, steps=40)
    assert worse["frechet"] > result["frechet"]
    assert worse["cas"]["accuracy"] < result["cas"]["accuracy"]
