"""Tests of the downstream harness: recipes, budget and recipe selection, test-split isolation, verdict."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from synthgen import data, evaluate, recipes
from synthgen.config import Config, EvaluateConfig
from synthgen.data import DataError, LabeledImages, PreparedData, load_prepared
from synthgen.io import read_json
from synthgen.metrics import t_interval
from synthgen.models.classifier import fit_tasks

FAST = EvaluateConfig(steps=8, seeds=2, batch_size=16, width=8, device="cpu", quality=False)


def each_task(fit_one):
    """A ``fit_tasks`` stand-in that fits the tasks one by one with ``fit_one`` (fit_members' signature)."""
    return lambda tasks, batched="auto", concurrent=True: [fit_one(**task) for task in tasks]


class SpyFit:
    """The real ``fit_tasks`` that also records what every model was fitted on and asked to predict."""

    def __init__(self):
        self.fits, self.predicts = [], []

    def __call__(self, tasks, batched="auto", cpu_bf16=False, concurrent=True):
        self.fits.extend({**task, "seeds": list(task["seeds"])} for task in tasks)
        return [self.recorded(members) for members in fit_tasks(tasks, batched, cpu_bf16, concurrent)]

    def recorded(self, members):
        spy = self

        class Recorded:
            def predict(self, data):
                spy.predicts.append(data)
                return members.predict(data)

            def predict_proba(self, data):
                spy.predicts.append(data)
                return members.predict_proba(data)

        return Recorded()


def _row_keys(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in x}


@pytest.fixture(scope="module")
def prepared(tiny_prepared):
    return load_prepared(tiny_prepared)


def test_t_interval_matches_hand_computed_case():
    result = t_interval([1, 2, 3, 4, 5], confidence=0.95)
    half = 2.7764451051977987 * np.sqrt(2.5) / np.sqrt(5)  # t(0.975, 4), from tables
    assert result["mean"] == pytest.approx(3.0)
    assert result["std"] == pytest.approx(np.sqrt(2.5))
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((3 - half, 3 + half))


def test_paired_gain_uses_per_seed_differences():
    # arm b = arm a + seed-specific offset: the paired interval sees only the offsets
    rows = [{"arm": "real", "seed": s, **dict.fromkeys(evaluate.METRICS, 0.5 + 0.1 * s)} for s in range(5)]
    rows += [{"arm": "real+synthetic", "seed": s, **dict.fromkeys(evaluate.METRICS, 0.5 + 0.1 * s + d)} for s, d in enumerate([1, 2, 3, 4, 5])]
    gains = evaluate.paired_gains(pd.DataFrame(rows), "real", 0.95)
    expected = t_interval([1, 2, 3, 4, 5])
    assert gains["real+synthetic"]["balanced_accuracy"]["ci_low"] == pytest.approx(expected["ci_low"])
    assert "real" not in gains


@pytest.mark.parametrize("every_recipe", [True, False], ids=["every-recipe-on-test", "out-of-fold-selection"])
def test_selection_and_every_arm_never_see_the_test_split(prepared, every_recipe):
    synthetic = prepared.val  # real held-out images posing as synthetic
    noise = LabeledImages(np.full_like(prepared.val.x, 7), prepared.val.y, prepared.class_names)
    spy = SpyFit()
    config = FAST.model_copy(update={"steps": "auto", "min_steps": 4, "max_steps": 8, "soft_label_mix": 0.3,
                                     "test_every_recipe": every_recipe})
    results = evaluate.run_arms(prepared.train, prepared.test, synthetic, noise, config, fit=spy)
    allowed = _row_keys(prepared.train.x) | _row_keys(synthetic.x) | _row_keys(noise.x)
    test_only = _row_keys(prepared.test.x) - allowed
    assert test_only, "fixture must hold test images that appear nowhere else"
    for call in spy.fits:  # budget curve, recipe selection, teacher and every arm
        assert not (_row_keys(call["X"]) & test_only)
    selection_predicts = [x for x in spy.predicts if x is not prepared.test.x]
    assert selection_predicts and all(not (_row_keys(x) & test_only) for x in selection_predicts)
    steps = results["selection"]["steps"]
    arm_fits = [call for call in spy.fits if len(call["seeds"]) == FAST.seeds]
    assert {(c["steps"], c["batch_size"], c["lr"], c["width"]) for c in arm_fits} == {(steps, FAST.batch_size, FAST.lr, FAST.width)}
    best = results["selection"]["best_recipe"]
    strongest = results["decision"]["best_baseline"]
    single_seed = [call for call in spy.fits if call["seeds"] == [config.seed]]
    budget_fits = 2 * config.selection_folds  # 4 and 8 steps, each fold
    if every_recipe:  # no out-of-fold recipe selection: the strongest recipe on test gets the synthetic set
        assert results["selection"]["chosen_by"] == "test" and results["selection"]["recipe_scores"] == {}
        assert best == strongest and len(single_seed) == budget_fits + 1  # + the soft-label teacher
        baselines = set(FAST.recipes)
    else:
        assert results["selection"]["chosen_by"] == "out-of-fold" and set(results["selection"]["recipe_scores"]) == set(FAST.recipes)
        assert len(single_seed) == budget_fits + config.selection_folds * (len(FAST.recipes) - 1) + 1  # real+classic reused
        baselines = {"real", best}
    expected = baselines | {f"{best}+synthetic", f"{strongest}+synthetic", f"{best}+unfiltered", "real+synthetic"}
    assert set(results["per_seed"]["arm"]) == expected
    n_train = results["per_seed"].groupby("arm")["n_train"].first()  # the ablation adds as many images as the treatment
    assert n_train[f"{best}+unfiltered"] == n_train[f"{best}+synthetic"] == len(prepared.train.y) + len(synthetic.y)
    ablation = results["filter_ablation"]  # filtered minus unfiltered, paired by seed
    assert (ablation["filtered"], ablation["unfiltered"]) == (f"{best}+synthetic", f"{best}+unfiltered")
    per_seed = results["per_seed"].pivot(index="seed", columns="arm", values="balanced_accuracy")
    assert ablation["gain"]["mean"] == pytest.approx((per_seed[f"{best}+synthetic"] - per_seed[f"{best}+unfiltered"]).mean())


def test_budget_doubles_until_the_out_of_fold_curve_flattens():
    """A fake classifier whose out-of-fold accuracy is a known function of its step budget."""
    accuracy_at = {10: 0.5, 20: 0.7, 40: 0.8, 80: 0.802, 160: 0.9}

    def fake_fit(X, y, seeds, steps, **params):
        class Model:
            def predict(self, data):
                truth = data[:, 0, 0, 0].astype(np.int64)  # the label is written into pixel (0, 0)
                right = np.arange(len(truth)) < round(accuracy_at[steps] * len(truth))
                return np.where(right, truth, (truth + 1) % 2)[None]
        return Model()

    y = np.repeat([0, 1], 20)
    x = np.zeros((40, 4, 4, 1), np.uint8)
    x[:, 0, 0, 0] = y
    images = LabeledImages(x, y, ("a", "b"))
    config = FAST.model_copy(update={"steps": "auto", "min_steps": 10, "max_steps": 160, "budget_tolerance": 0.005})
    steps, curve = recipes.choose_budget(images, config, each_task(fake_fit))
    assert steps == 40  # 40 -> 80 gains 0.2 points: converged, though 160 would jump again
    assert [row["steps"] for row in curve] == [10, 20, 40, 80]
    assert recipes.choose_budget(images, config.model_copy(update={"steps": 33}), each_task(fake_fit)) == (33, [])


def test_recipe_selection_picks_the_best_out_of_fold_recipe():
    def fake_fit(X, y, seeds, loss, mixup_alpha, **params):
        class Model:
            def predict(self, data):  # only the logit-adjusted recipe without mixup gets it right
                truth = data[:, 0, 0, 0].astype(np.int64)
                good = loss == "logit_adjusted" and params["augment"]
                return (truth if good else 1 - truth)[None]
        return Model()

    y = np.repeat([0, 1], 6)
    x = np.zeros((12, 4, 4, 1), np.uint8)
    x[:, 0, 0, 0] = y
    best, scores = recipes.select_recipe(LabeledImages(x, y, ("a", "b")), FAST, 8, fit=each_task(fake_fit))
    assert best.name == "real+logit_adjust+classic" and scores[best.name] == 1.0
    assert set(scores) == set(FAST.recipes)


def test_selection_trains_one_model_at_a_time_in_fp32_even_when_the_arms_are_batched_in_bf16(prepared):
    """Grouped and plain convolutions round differently; the selection's single-seed models must not
    let that change the chosen recipe, so they never train grouped (side by side, one thread each). The arms do, when asked."""
    modes = []

    def spy(tasks, batched="auto", cpu_bf16=False, concurrent=True):
        modes.append((len(tasks), batched, cpu_bf16, concurrent))
        return fit_tasks(tasks, batched, cpu_bf16, concurrent)

    config = FAST.model_copy(update={"batched": True, "cpu_bf16": True, "recipes": ["real", "real+classic"]})
    best, scores = recipes.select_recipe(prepared.train, config, 4, fit=spy)
    assert modes == [(2 * config.selection_folds, False, False, True)] and set(scores) == {"real", "real+classic"}
    modes.clear()
    results = evaluate.run_arms(prepared.train, prepared.test, None, None, config.model_copy(update={"test_every_recipe": False}), fit=spy)
    # the selection one at a time in fp32, then the baseline arms (real and the selected one) in one batched call, in bf16 as asked
    assert modes[:2] == [(2 * config.selection_folds, False, False, True), (len({"real", results["selection"]["best_recipe"]}), True, True, True)]
    assert results["precision"] == "bf16"  # what details.json reports
    assert evaluate.run_arms(prepared.train, prepared.test, None, None, config.model_copy(update={"cpu_bf16": False}))["precision"] == "fp32"


def test_soft_targets_blend_only_synthetic_rows():
    y = np.array([0, 1, 1])
    is_real = np.array([True, False, False])
    proba = np.array([[0.2, 0.8], [0.6, 0.4]], dtype=np.float32)
    targets = evaluate.soft_targets(y, is_real, proba, mix=0.5)
    np.testing.assert_allclose(targets, [[1, 0], [0.1, 0.9], [0.3, 0.7]])
    assert evaluate.soft_targets(y, is_real, proba, mix=0.0) is None


def test_without_synthetic_only_baselines_and_not_recommended(prepared):
    results = evaluate.run_arms(prepared.train, prepared.test, None, None, FAST)
    assert set(results["per_seed"]["arm"]) == set(FAST.recipes)
    assert results["decision"]["reason"] == "no accepted synthetic samples to evaluate"


def test_on_balanced_data_oversampling_and_logit_adjustment_arms_train_once(prepared):
    """Class-balanced sampling of balanced data draws the plain batches, and a uniform prior's logit adjustment
    is a constant the softmax cancels: those arms share the plainer recipe's network instead of training it again."""
    counts = prepared.train.counts()
    assert (counts == counts[0]).all(), "fixture must be balanced"
    named = {recipe.name: recipe for recipe in recipes.RECIPES}
    same = recipes.shared_networks(list(recipes.RECIPES), counts)
    assert same == {"real": "real", "real+classic": "real+classic", "real+oversample+classic": "real+classic",
                    "real+logit_adjust": "real", "real+logit_adjust+classic": "real+classic", "real+mixup+classic": "real+mixup+classic"}
    assert recipes.same_network(named["real+logit_adjust"], np.array([5, 4])) == named["real+logit_adjust"]  # imbalanced: kept
    assert set(recipes.shared_networks(list(recipes.RECIPES), np.array([5, 4])).values()) == set(named)

    spy = SpyFit()
    results = evaluate.run_arms(prepared.train, prepared.test, None, None, FAST, fit=spy)
    arm_fits = [call for call in spy.fits if len(call["seeds"]) == FAST.seeds]
    assert len(arm_fits) == len(set(same.values())) == 3
    per_seed = results["per_seed"].set_index(["arm", "seed"])["balanced_accuracy"]
    for name, first in same.items():
        np.testing.assert_array_equal(per_seed[name].to_numpy(), per_seed[first].to_numpy())
    assert results["selection"]["same_network"] == {name: first for name, first in same.items() if name != first}

    imbalanced = prepared.train.subset(np.delete(np.arange(len(prepared.train.y)), np.flatnonzero(prepared.train.y == 0)[0]))  # one image fewer
    spy = SpyFit()
    evaluate.run_arms(imbalanced, prepared.test, None, None, FAST, fit=spy)
    assert len([call for call in spy.fits if len(call["seeds"]) == FAST.seeds]) == len(FAST.recipes)


def test_only_the_selected_recipe_when_not_every_recipe_is_tested(prepared):
    config = FAST.model_copy(update={"test_every_recipe": False})
    results = evaluate.run_arms(prepared.train, prepared.test, prepared.val, None, config)
    best, strongest = results["selection"]["best_recipe"], results["decision"]["best_baseline"]
    assert strongest in {"real", best}
    assert set(results["per_seed"]["arm"]) == {"real", best, f"{best}+synthetic", f"{strongest}+synthetic", "real+synthetic"}


def test_decide_compares_the_strongest_treatment_with_the_strongest_baseline():
    means = {"real": 0.5, "real+classic": 0.6, "real+logit_adjust+classic": 0.7,
             "real+classic+synthetic": 0.65, "real+logit_adjust+classic+synthetic": 0.72, "real+synthetic": 0.55}
    summary = {arm: {"balanced_accuracy": {"mean": mean}} for arm, mean in means.items()}
    assert evaluate.strongest(summary, ["real", "real+classic", "real+logit_adjust+classic"]) == "real+logit_adjust+classic"
    treatments = ["real+classic+synthetic", "real+logit_adjust+classic+synthetic", "real+synthetic"]
    up = {"mean": 0.02, "ci_low": 0.01, "ci_high": 0.03}
    straddles = {"mean": 0.02, "ci_low": -0.01, "ci_high": 0.05}
    gains = {arm: {"balanced_accuracy": up} for arm in treatments}
    decision = evaluate.decide(summary, gains, "real+logit_adjust+classic", treatments)
    assert decision["verdict"] == "recommended" and decision["best_synthetic"] == "real+logit_adjust+classic+synthetic"
    gains = {arm: {"balanced_accuracy": straddles} for arm in treatments}
    decision = evaluate.decide(summary, gains, "real+logit_adjust+classic", treatments)
    assert decision["verdict"] == "not recommended" and "includes zero" in decision["reason"]
    assert evaluate.decide(summary, gains, "real", [])["reason"] == "no accepted synthetic samples to evaluate"


def test_check_disjoint_compares_indices_of_the_same_source_only(prepared):
    leaky = LabeledImages(prepared.test.x[:3], prepared.test.y[:3], prepared.class_names, prepared.train.index[:3])
    same_source = dict(prepared.meta, split_sources={"train": "source", "val": "source", "test": "source"})
    with pytest.raises(DataError, match="shares 3 source indices"):
        data.check_disjoint(PreparedData(prepared.train, prepared.val, leaky, same_source))
    separate = dict(prepared.meta, split_sources={"train": "source", "val": "source", "test": "test_source"})
    data.check_disjoint(PreparedData(prepared.train, prepared.val, leaky, separate))  # positions in another file
    data.check_disjoint(prepared)


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
    config = EvaluateConfig(steps=60, seeds=3, batch_size=32, width=16, device="cpu", quality=False,
                            recipes=("real+classic", "real+logit_adjust+classic"))
    good = evaluate.run_arms(sets["train"], sets["test"], sets["good"], None, config)
    bad = evaluate.run_arms(sets["train"], sets["test"], noise, None, config)
    assert good["decision"]["verdict"] == "recommended", good["decision"]["reason"]
    assert bad["decision"]["verdict"] == "not recommended", bad["decision"]["reason"]


def test_main_writes_small_metrics_and_details(tiny_prepared, tmp_path):
    config = Config(evaluate=FAST)
    details = evaluate.main(config, tiny_prepared, tmp_path / "no-synthetic", tmp_path / "no-pool", tmp_path / "reports", progress=False)
    metrics = read_json(tmp_path / "reports" / "metrics.json")
    assert metrics["verdict"] == details["verdict"] == "not recommended"
    assert set(metrics["balanced_accuracy"]) == set(FAST.recipes) and metrics["steps"] == FAST.steps
    assert len(metrics) <= 12  # a handful of numbers, so `dvc exp show` fits a terminal
    saved = read_json(tmp_path / "reports" / "evaluation" / "details.json")
    assert saved["arms"]["real"]["balanced_accuracy"]["n"] == FAST.seeds
    assert len(saved["per_class_recall"]["real"]) == 10
    assert (tmp_path / "reports" / "evaluation" / "per_seed.csv").is_file()


def test_unfiltered_ablation_takes_the_first_candidates_of_each_class_in_sample_id_order():
    """The filter keeps the first passing candidates in sample-id order, so the ablation takes the
    first candidates in the same order: both arms share every candidate the filters let through."""
    ids = np.array([7, 3, 5, 0, 9, 4, 1])
    y = np.array([0, 0, 1, 1, 0, 1, 0])
    pool = LabeledImages(np.zeros((7, 2, 2, 1), np.uint8), y, ("a", "b"), ids)
    rows = evaluate.first_candidates(pool, np.array([2, 1]))
    assert sorted(ids[rows].tolist()) == [0, 1, 3]  # class a: ids 1, 3; class b: id 0


def test_differing_samples_counts_the_accepted_ids_the_unfiltered_ablation_lacks():
    """Accepted 1, 3, 4 against the first candidates 0, 1, 3: the filters rejected 0 and took 4 in its place."""
    x = np.zeros((3, 2, 2, 1), np.uint8)
    accepted = LabeledImages(x, np.array([0, 0, 1]), ("a", "b"), np.array([1, 3, 4]))
    unfiltered = LabeledImages(x, np.array([0, 0, 1]), ("a", "b"), np.array([0, 1, 3]))
    assert evaluate.differing_samples(accepted, unfiltered) == 1
    assert evaluate.differing_samples(accepted, accepted) == 0
    assert evaluate.differing_samples(accepted, None) is None


@pytest.mark.parametrize("prior", ["real", "all"])
def test_arms_with_synthetic_images_take_the_logit_adjustment_prior_from_the_real_rows(prepared, prior):
    spy = SpyFit()
    config = FAST.model_copy(update={"steps": 4, "recipes": ("real", "real+logit_adjust"), "logit_adjust_prior": prior})
    evaluate.run_arms(prepared.train, prepared.test, prepared.val, prepared.val, config, fit=spy)
    n_real = len(prepared.train.y)
    for call in spy.fits:
        if len(call["y"]) == n_real or prior == "all":  # the baselines, and every arm under "all": every row's prior
            assert call["prior_rows"] is None
        else:  # the real rows come first, the synthetic (or unfiltered) ones after them
            assert call["prior_rows"].tolist() == [True] * n_real + [False] * (len(call["y"]) - n_real)
    assert sum(len(call["y"]) > n_real for call in spy.fits) >= 2  # the strongest recipe +synthetic and +unfiltered (and real+synthetic)


def test_a_synthetic_set_of_other_classes_is_refused_by_name():
    """`synthgen prepare` rerun alone with another class list: the old synthetic labels would mean other classes."""
    real = LabeledImages(np.zeros((4, 8, 8, 1), np.uint8), np.array([0, 0, 1, 1]), ("cat", "dog"))
    stale = LabeledImages(np.zeros((2, 8, 8, 1), np.uint8), np.array([0, 1]), ("cat", "emu"))
    with pytest.raises(DataError, match=r"classes \['cat', 'emu'\].*\['cat', 'dog'\].*rerun generate and filter"):
        evaluate.training_set(real, stale, 1.0)
    assert len(evaluate.training_set(real, LabeledImages(stale.x, stale.y, real.class_names), 1.0)[0]) == 6


@pytest.mark.parametrize(("counts", "tail"), [
    ([50, 32, 21, 14, 9, 6, 4, 2, 2, 1], [5, 6, 7, 8, 9]),  # the demo's long tail: the five rarest
    ([9, 9, 5, 5, 5, 5, 5, 5, 9, 9], [2, 3, 4, 5, 6, 7]),  # six tied at the cutoff: all of them, not the first five by index
    ([1, 1, 1, 1, 2, 2, 2, 2, 2, 2], [0, 1, 2, 3]),  # the cutoff tied with the largest classes: only those below
    ([8] * 10, []),  # balanced: no tail
    ([1000, 40, 1], [2]),
])
def test_tail_classes_keep_ties_whole_and_balanced_data_has_none(counts, tail):
    from synthgen.metrics import tail_classes

    assert tail_classes(np.array(counts)).tolist() == tail


def test_without_an_accepted_set_there_is_no_unfiltered_arm(tiny_prepared):
    """The ablation matches the accepted set's class counts; with no accepted set (filter not run) it would be the whole pool."""
    prepared = load_prepared(tiny_prepared)
    extras = evaluate.extra_sets(prepared.train, None, prepared.val, EvaluateConfig())
    assert extras == {"synthetic": None, "unfiltered": None}
