"""The batched training loop (fit_members): batched = one at a time = lone CNNClassifier, per-seed independence,
logit adjustment, mixup, and CNNClassifier's estimator basics (tiny CPU models, a few seconds in all)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.utils.estimator_checks import check_get_params_invariance, check_no_attributes_set_in_init, check_set_params

from synthgen import progress
from synthgen.models import classifier, ensemble
from synthgen.models.classifier import CNNClassifier, fit_members

# The batched and one-at-a-time runs differ only in float rounding (grouped vs plain conv kernels), but a
# rounding-level difference can flip a max-pool tie and route one gradient elsewhere, after which Adam
# carries it: measured up to 5e-5 here (2 cores, channels_last). A wrong RNG stream or a leak between
# members moves probabilities by 1e-2 or more.
ROUNDING = 5e-4
TINY = dict(n_classes=3, width=8, steps=15, batch_size=16, device="cpu")
RECIPE = dict(TINY, augment=True, balanced=True, mixup_alpha=0.2, loss="logit_adjusted", label_smoothing=0.1)
WEIGHTS = np.linspace(0.5, 2.0, 40)


@pytest.fixture(scope="module")
def images():
    """40 random 8x8 grey images, 3 classes."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(40, 8, 8, 1), dtype=np.uint8), np.arange(40) % 3


@pytest.fixture(scope="module")
def batched(images):
    return fit_members(*images, seeds=[0, 1, 2], sample_weight=WEIGHTS, **RECIPE)


@contextlib.contextmanager
def intra_op_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def test_batched_equals_one_at_a_time_and_lone_classifiers(images, batched):
    X, y = images
    with intra_op_threads(1):  # one thread for both: the thread count changes float rounding (see the next test)
        lone = fit_members(X, y, seeds=[0, 1, 2], batched=False, sample_weight=WEIGHTS, **RECIPE)
        alone_runs = [CNNClassifier(random_state=seed, **RECIPE).fit(X, y, sample_weight=WEIGHTS) for seed in (0, 1, 2)]
    proba = batched.predict_proba(X)
    assert proba.shape == (3, 40, 3) and batched.predict(X).shape == (3, 40) and batched.seeds == [0, 1, 2]
    np.testing.assert_allclose(proba.sum(axis=2), 1.0, atol=1e-5)
    np.testing.assert_allclose(proba, lone.predict_proba(X), atol=ROUNDING, rtol=0)
    for e, alone in enumerate(alone_runs):
        for key, value in alone.model_.state_dict().items():  # the same loop with E = 1: the same weights
            torch.testing.assert_close(lone.member(e).state_dict()[key], value, atol=0, rtol=0)
        np.testing.assert_allclose(alone.predict_proba(X), proba[e], atol=ROUNDING, rtol=0)
        with torch.no_grad():  # member(e) is the grouped network's member e as a plain SmallCNN
            plain = torch.softmax(batched.member(e)(torch.from_numpy(X).permute(0, 3, 1, 2).float() / 127.5 - 1), dim=1)
        np.testing.assert_allclose(plain.numpy(), proba[e], atol=1e-5, rtol=0)


def test_tasks_with_different_recipes_and_sets_train_together_as_they_would_alone(images):
    """fit_tasks: the arms of an evaluation (other training sets, other recipes) in one grouped network give
    each member what it gets alone; a task with another budget trains in a group of its own."""
    X, y = images
    plain = dict(TINY)
    tasks = [
        dict(X=X, y=y, seeds=[0, 1], **plain),
        dict(X=X[:30], y=y[:30], seeds=[0], **dict(plain, augment=True, balanced=True)),
        dict(X=X, y=y, seeds=[2], sample_weight=WEIGHTS, **dict(plain, augment=True, mixup_alpha=0.2, loss="logit_adjusted")),
        dict(X=X[10:], y=y[10:], seeds=[3], **dict(plain, loss="logit_adjusted", logit_adjust_tau=0.5)),
        dict(X=X, y=y, seeds=[4], **dict(plain, steps=9)),
    ]
    together = classifier.fit_tasks(tasks, batched=True)
    alone = classifier.fit_tasks(tasks, batched=False)
    assert [members.seeds for members in together] == [[0, 1], [0], [2], [3], [4]]
    for task, grouped, single in zip(tasks, together, alone):
        reference = fit_members(**task, batched=True).predict_proba(X)  # the task by itself, as before
        np.testing.assert_allclose(grouped.predict_proba(X), single.predict_proba(X), atol=ROUNDING, rtol=0)
        np.testing.assert_allclose(grouped.predict_proba(X), reference, atol=ROUNDING, rtol=0)
    # different recipes really do train differently: the check above would be vacuous otherwise
    assert np.abs(together[0].predict_proba(X)[0] - together[1].predict_proba(X)[0]).max() > 1e-2


def test_networks_trained_side_by_side_are_bit_for_bit_what_one_thread_trains_one_after_another(images):
    """fit_tasks on the CPU trains one-at-a-time networks side by side, one intra-op thread each: nothing leaks
    between them (the global RNG that initialises them, the progress count) and each is what it is alone."""
    X, y = images
    tasks = [dict(X=X, y=y, seeds=[0, 1], **RECIPE), dict(X=X[:30], y=y[:30], seeds=[2], **dict(TINY, balanced=True))]
    with intra_op_threads(2):
        side_by_side = classifier.fit_tasks(tasks, batched=False)
        assert torch.get_num_threads() == 2  # given back
    with intra_op_threads(1):
        one_after_another = classifier.fit_tasks(tasks, batched=False, concurrent=False)
    for concurrent, sequential in zip(side_by_side, one_after_another):
        for key, value in sequential.model.state_dict().items():
            torch.testing.assert_close(concurrent.model.state_dict()[key], value, atol=0, rtol=0)
    stream = io.StringIO()
    with intra_op_threads(2), progress.milestones("side by side", 3 * RECIPE["steps"], stream=stream):
        classifier.fit_tasks(tasks, batched=False)
    assert stream.getvalue().splitlines()[-1].startswith(f"side by side: 100% of {3 * RECIPE['steps']} network-steps")


def test_fit_together_gives_each_estimator_what_it_gets_alone_in_order(images):
    """fit_together (the filters' cross-fitted classifiers, the quality stage's two): CNNClassifiers of other
    settings and images in one fit_tasks call, each fitted in place as by its own fit; another estimator fits alone."""
    from sklearn.linear_model import LogisticRegression

    X, y = images
    large = np.repeat(np.repeat(X, 3, axis=1), 3, axis=2)[:, :20, :20]  # another shape: trained in a call of its own
    estimators = [CNNClassifier(random_state=0, **RECIPE), CNNClassifier(random_state=1, **dict(TINY, width=4)),
                  CNNClassifier(random_state=0, **RECIPE), CNNClassifier(random_state=2, **dict(TINY, width=4))]
    sets = [(X, y), (X[:30], y[:30]), (X[10:], y[10:]), (large, y)]
    with intra_op_threads(1):
        alone = [clone(estimator).fit(*data) for estimator, data in zip(estimators, sets)]
        logistic = LogisticRegression(max_iter=200)
        fitted = classifier.fit_together([(estimator, *data) for estimator, data in zip(estimators, sets)]
                                         + [(logistic, X.reshape(40, -1), y)])
    assert fitted[:4] == estimators and fitted[4] is logistic and hasattr(logistic, "coef_")
    for together, single, (images_in, _) in zip(fitted, alone, sets):
        assert together.image_shape_ == single.image_shape_ == images_in.shape[1:]
        np.testing.assert_allclose(together.predict_proba(images_in), single.predict_proba(images_in), atol=ROUNDING, rtol=0)
    # the same settings on other images train differently: the check above would be vacuous otherwise
    assert np.abs(fitted[0].predict_proba(X) - fitted[2].predict_proba(X)).max() > 1e-2


def test_member_init_is_the_lone_classifier_init(images):
    X, y = images
    config = classifier.SmallCNNConfig(1, 3, 8)
    states = [classifier.seeded_cnn(config, (8, 8), seed).state_dict() for seed in (4, 9)]
    grouped = ensemble.GroupedCNN.from_member_states(config, (8, 8), states)
    torch.manual_seed(9)  # what CNNClassifier(random_state=9) used to do before building its CNN
    reference = classifier.SmallCNN(config, (8, 8)).state_dict()
    for key, value in grouped.member_state(1).items():
        torch.testing.assert_close(value, reference[key], atol=0, rtol=0)


def test_different_seeds_give_different_members_and_equal_seeds_equal_ones(images, batched):
    X, y = images
    proba = batched.predict_proba(X)
    assert np.abs(proba[0] - proba[1]).max() > 1e-2 and np.abs(proba[1] - proba[2]).max() > 1e-2
    twins = fit_members(X, y, seeds=[7, 7], sample_weight=WEIGHTS, **RECIPE).predict_proba(X)
    np.testing.assert_allclose(twins[0], twins[1], atol=1e-6, rtol=0)


def test_training_leaves_the_global_rng_alone(images):
    state = torch.get_rng_state()
    fit_members(*images, seeds=[0], **dict(TINY, steps=2, augment=True))
    assert torch.equal(torch.get_rng_state(), state)


def test_predict_proba_chunks_rows_without_changing_them(images, batched, monkeypatch):
    X, _ = images
    whole = batched.predict_proba(X)
    monkeypatch.setattr(classifier, "inference_rows", lambda device, n, size: 7)
    np.testing.assert_allclose(batched.predict_proba(X), whole, atol=1e-6, rtol=0)
    assert batched.predict_proba(X[:0]).shape == (3, 0, 3)


# ------------------------------------------------------------------- logit adjustment
def test_logit_adjustment_adds_the_log_training_prior():
    y = np.array([0] * 90 + [1] * 10)
    uniform_rows = np.full(100, 0.01)
    prior = ensemble.sampling_prior(y, uniform_rows, 2)
    np.testing.assert_allclose(prior, [0.9, 0.1])
    raw = torch.tensor([[2.0, -1.0], [0.5, 0.5]])
    adjusted = ensemble.adjust_logits(raw, torch.tensor(prior, dtype=torch.float32), tau=1.0)
    torch.testing.assert_close(adjusted, raw + torch.log(torch.tensor([0.9, 0.1])))
    half = ensemble.adjust_logits(raw, torch.tensor(prior, dtype=torch.float32), tau=0.5)
    torch.testing.assert_close(half, raw + 0.5 * torch.log(torch.tensor([0.9, 0.1])))
    weighted = ensemble.sampling_prior(y, uniform_rows, 2, sample_weight=np.where(y == 1, 9.0, 1.0))
    np.testing.assert_allclose(weighted, [0.5, 0.5])  # rows weighted 9x count 9x
    # a class never drawn (a fold without a one-image class) gets half the rarest class's prior, not ~0
    three = ensemble.sampling_prior(y, uniform_rows, 3)
    assert three[2] == pytest.approx(0.5 * three[1]) and three.sum() == pytest.approx(1.0)
    assert torch.isfinite(ensemble.adjust_logits(raw[:, :1].repeat(1, 3), torch.tensor([0.9, 0.1, 0.0]), 1.0)).all()


def test_balanced_sampling_makes_logit_adjustment_a_no_op():
    y = np.array([0] * 90 + [1] * 10)
    balanced_rows = 1.0 / np.bincount(y)[y] / 2
    prior = torch.tensor(ensemble.sampling_prior(y, balanced_rows, 2), dtype=torch.float32)
    torch.testing.assert_close(prior, torch.tensor([0.5, 0.5]))
    logits, targets = torch.randn(1, 6, 2), torch.eye(2)[torch.tensor([0, 1, 1, 0, 1, 0])][None]
    weights = torch.ones(1, 6)
    adjusted = ensemble.member_losses(ensemble.adjust_logits(logits, prior, 1.0), targets, weights, 0.0)
    torch.testing.assert_close(adjusted, ensemble.member_losses(logits, targets, weights, 0.0))


def test_prior_rows_set_the_logit_adjustment_prior_from_those_rows_only():
    from synthgen.models.members import training_data
    X, y = np.zeros((110, 4, 4, 1), np.uint8), np.array([0] * 90 + [1] * 10 + [1] * 10)
    real = np.arange(110) < 100  # the last 10 rows pose as synthetic samples of class 1
    every_row = training_data(X, y, 2, 8, False, None, None, "cpu").prior
    torch.testing.assert_close(every_row, torch.tensor([90 / 110, 20 / 110]))
    torch.testing.assert_close(training_data(X, y, 2, 8, False, None, None, "cpu", real).prior, torch.tensor([0.9, 0.1]))
    with pytest.raises(ValueError, match="prior_rows"):
        training_data(X, y, 2, 8, False, None, None, "cpu", real[:50])


def test_the_loop_trains_on_adjusted_logits_and_predicts_with_raw_ones():
    # random images carry no signal, so a CE model predicts the 9:1 prior; trained on logits + log(prior)
    # the raw logits forget it (Balanced Softmax) and the minority class gets about half the mass
    rng = np.random.default_rng(1)
    X, y = rng.integers(0, 256, size=(100, 8, 8, 1), dtype=np.uint8), np.array([0] * 90 + [1] * 10)
    settings = dict(TINY, n_classes=2, steps=60)
    plain = fit_members(X, y, [0], loss="ce", **settings).predict_proba(X)[0, :, 1].mean()
    adjusted = fit_members(X, y, [0], loss="logit_adjusted", **settings).predict_proba(X)[0, :, 1].mean()
    assert plain < 0.25 < adjusted
    balanced = dict(settings, balanced=True, steps=10)
    np.testing.assert_allclose(fit_members(X, y, [0], loss="logit_adjusted", **balanced).predict_proba(X),
                               fit_members(X, y, [0], loss="ce", **balanced).predict_proba(X), atol=ROUNDING, rtol=0)


def test_weighted_member_losses_are_per_member_weighted_means():
    logits, targets = torch.randn(2, 4, 3), torch.eye(3)[torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0]])]
    weights = torch.tensor([[1.0, 0.0, 2.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    per_row = -(targets * logits.log_softmax(dim=2)).sum(dim=2)
    expected = (per_row * weights).sum(dim=1) / weights.sum(dim=1)
    torch.testing.assert_close(ensemble.member_losses(logits, targets, weights, 0.0), expected)


# ------------------------------------------------------------------------------ mixup
def test_mixup_targets_are_convex_combinations_of_two_one_hot_rows():
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    one_hot = torch.eye(4)[labels]  # (E=1, B=8, K=4)
    lam, partner = (value[None] for value in ensemble.draw_mixup(8, 0.4, generator))
    assert sorted(partner[0].tolist()) == list(range(8)) and ((lam >= 0) & (lam <= 1)).all()
    assert (lam < 0.99).any() and (lam > 0.01).any()
    mixed = ensemble.mix(one_hot, lam, partner)
    torch.testing.assert_close(mixed.sum(dim=2), torch.ones(1, 8))
    low, high = torch.minimum(one_hot, one_hot[:, partner[0]]), torch.maximum(one_hot, one_hot[:, partner[0]])
    assert ((mixed >= low - 1e-6) & (mixed <= high + 1e-6)).all()
    images = torch.randn(1, 8, 1, 4, 4)  # inputs mix with the same lam and partner
    torch.testing.assert_close(ensemble.mix(images, lam, partner)[0, 3],
                               lam[0, 3] * images[0, 3] + (1 - lam[0, 3]) * images[0, partner[0, 3]])


def test_mixup_alpha_zero_means_no_mixing_and_no_draws():
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    lam, partner = ensemble.draw_mixup(8, 0.0, generator)
    assert torch.equal(generator.get_state(), state)
    one_hot = torch.eye(4)[torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])]
    assert torch.equal(ensemble.mix(one_hot, lam[None], partner[None]), one_hot)


# -------------------------------------------------------------------------- estimator
def test_cnn_classifier_fits_predicts_and_keeps_the_estimator_rules(images):
    X, y = images
    model = CNNClassifier(loss="logit_adjusted", mixup_alpha=0.2, logit_adjust_tau=0.5, **TINY)
    assert {"loss", "logit_adjust_tau", "mixup_alpha"} <= set(model.get_params())
    copy = clone(model)
    assert copy.get_params() == model.get_params() and not hasattr(copy, "model_")
    assert model.fit(X, y) is model
    assert model.predict(X).shape == (40,) and model.predict_proba(X).shape == (40, 3)
    assert model.transform(X).shape == (40, 128) and np.isfinite(model.final_loss_)
    assert model.classes_.tolist() == [0, 1, 2] and model.image_shape_ == (8, 8, 1) and model.device_.type == "cpu"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.inference_model_.modules())
    check_no_attributes_set_in_init("CNNClassifier", CNNClassifier())
    check_get_params_invariance("CNNClassifier", CNNClassifier())
    check_set_params("CNNClassifier", CNNClassifier())
    # soft targets that always say class 0 win over y (a teacher's labels for synthetic rows)
    always_zero = np.tile(np.float32([1, 0, 0]), (40, 1))
    assert (CNNClassifier(**dict(TINY, steps=30)).fit(X, y, soft_targets=always_zero).predict(X) == 0).mean() > 0.9
    with pytest.raises(ValueError, match="soft_targets must have shape"):
        CNNClassifier(**TINY).fit(X, y, soft_targets=always_zero[:, :2])
    with pytest.raises(ValueError, match="unknown loss"):
        CNNClassifier(loss="focal", **TINY).fit(X, y)
    with pytest.raises(ValueError, match="sample_weight must have shape"):
        CNNClassifier(**TINY).fit(X, y, sample_weight=np.ones(3))


def test_cpu_bf16_trains_in_bf16_and_lands_near_fp32(images, batched):
    """``cpu_bf16=True``: the forward passes run in bf16 (so the weights differ from fp32 training beyond
    rounding), yet the members learn the same function closely: bf16 is a speed option, not another model."""
    X, y = images
    half = fit_members(X, y, seeds=[0, 1, 2], cpu_bf16=True, sample_weight=WEIGHTS, **RECIPE)
    proba, reference = half.predict_proba(X), batched.predict_proba(X)
    assert np.abs(proba - reference).max() > ROUNDING  # it did change precision
    np.testing.assert_allclose(proba, reference, atol=0.05, rtol=0)
    assert (half.predict(X) == batched.predict(X)).mean() >= 0.9


def test_a_large_group_splits_across_the_cpu_threads_and_trains_as_it_would_whole(images):
    """spread: with two threads a group of 16+ members trains as two halves side by side; each member is what the
    whole group gives it, up to float rounding; small groups, one thread and concurrent=False keep groups whole."""
    from synthgen.models.members import SPLIT_MIN_MEMBERS, spread

    cpu = torch.device("cpu")
    with intra_op_threads(2):
        assert spread([list(range(30))], cpu) == [list(range(15)), list(range(15, 30))]
        assert spread([list(range(2 * SPLIT_MIN_MEMBERS - 1))], cpu) == [list(range(2 * SPLIT_MIN_MEMBERS - 1))]
        assert spread([list(range(30)), [30]], cpu) == [list(range(30)), [30]]  # already a job per thread
        assert spread([list(range(30))], cpu, allowed=False) == [list(range(30))]
        assert spread([], cpu) == []
    with intra_op_threads(1):
        assert spread([list(range(30))], cpu) == [list(range(30))]
    X, y = images
    task = dict(X=X, y=y, seeds=list(range(2 * SPLIT_MIN_MEMBERS)), **RECIPE)
    with intra_op_threads(2):
        halves = classifier.fit_tasks([task], batched=True)[0]
    whole = classifier.fit_tasks([task], batched=True, concurrent=False)[0]
    assert halves.seeds == whole.seeds == task["seeds"]
    np.testing.assert_allclose(halves.predict_proba(X), whole.predict_proba(X), atol=ROUNDING, rtol=0)
