"""Tests of REPORT.md rendering and the figures."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from synthgen import evaluate, grids, report
from synthgen.config import Config, EvaluateConfig
from synthgen.data import load_prepared

FAST = EvaluateConfig(steps=6, seeds=2, batch_size=16, width=8, device="cpu", quality=False)


@pytest.fixture(scope="module")
def metrics(tiny_prepared):
    prepared = load_prepared(tiny_prepared)
    results = evaluate.run_arms(prepared.train, prepared.test, prepared.val, None, FAST)
    return evaluate.details_payload(results, None, FAST)


def test_summary_tables_have_every_arm_and_class(metrics):
    gains_rows, per_class_rows = report.summary_tables(metrics, [f"digit{c}" for c in range(10)])
    arms = [row["arm"] for row in gains_rows]
    assert arms[: len(FAST.recipes)] == list(FAST.recipes) and "real+synthetic" in arms
    assert f"{metrics['selection']['best_recipe']}+synthetic" in arms
    strongest = next(row for row in gains_rows if row["arm"] == metrics["best_baseline"])
    assert strongest["gain vs strongest baseline (points)"] == "strongest baseline"
    treatment = next(row for row in gains_rows if row["arm"] == metrics["best_synthetic"])
    assert treatment["gain vs strongest baseline (points)"].startswith(("+", "-"))
    assert [row["class"] for row in per_class_rows] == [f"digit{c}" for c in range(10)]
    assert set(per_class_rows[0]) == {"class", *metrics["arms"]}


def test_render_markdown_has_verdict_and_tables(metrics, tiny_prepared):
    prepared = load_prepared(tiny_prepared)
    card = {"class_names": list(prepared.class_names), "meta": prepared.meta,
            "generator": {"model": "cgan", "path": "models/cgan/generator.pt", "sha256": "ab" * 32, "steps": 5},
            "filter_summary": {"per_class": {"0": {"quota": 3, "generated": 6, "accepted": 3, "novelty_threshold": 0.25}}},
            "params": {"filter": {"novelty_threshold": 0.5}}}
    text = report.render_markdown(metrics, card)
    assert f"**Verdict: {metrics['verdict']}**" in text
    assert "| arm | balanced accuracy % [95% CI] |" in text
    assert f"| {metrics['best_synthetic']} |" in text
    assert "strongest recipe without it" in text and "Every recipe was scored on the test set" in text
    assert "ab" * 32 in text and "| 0 | 3 | 6 | 3 | 0.25 |" in text
    assert "## Limitations" in text


def test_ablation_text_says_how_many_samples_the_filtered_and_unfiltered_sets_differ_in():
    ablation = {"filtered": "real+synthetic", "unfiltered": "real+unfiltered", "gain": {"mean": -0.004, "ci_low": -0.01, "ci_high": 0.002}}
    text = report.ablation_text(ablation, {"synthetic": 1000, "filter_differing": 9})
    assert "-0.40" in text and "share all but 9 of their 1000 samples" in text
    assert "share all but" not in report.ablation_text(ablation, {"synthetic": 1000, "filter_differing": None})
    assert report.ablation_text(None).startswith("_No filter ablation")


def test_selection_text_says_how_the_recipe_that_got_the_synthetic_set_was_chosen():
    curve = [{"steps": 500, "balanced_accuracy": 0.7}, {"steps": 1000, "balanced_accuracy": 0.702}]
    on_test = {"selection": {"steps": 500, "budget_curve": curve, "recipe_scores": {}, "best_recipe": "real+logit_adjust",
                             "chosen_by": "test", "folds": 2}}
    text = report.selection_text(on_test)
    assert "Budget: 500 steps" in text and "strongest there, `real+logit_adjust`" in text and "out-of-fold balanced accuracy at" not in text
    assert "stopped improving" in text and "still improving" not in text
    capped = report.selection_text({"selection": {**on_test["selection"], "steps": 1000, "budget_curve": [{**curve[0], "balanced_accuracy": 0.42},
                                                                                                         {**curve[1], "balanced_accuracy": 0.56}]}})
    assert "1000 steps, the most `evaluate.max_steps` allows; `real+classic` was still improving" in capped and "stopped" not in capped
    one = report.selection_text({"selection": {**on_test["selection"], "budget_curve": curve[:1]}})
    assert "the one budget `evaluate.min_steps` and `evaluate.max_steps` allow, scored in 2-fold" in one and "improving" not in one
    out_of_fold = {"selection": {**on_test["selection"], "chosen_by": "out-of-fold", "recipe_scores": {"real": 0.6, "real+logit_adjust": 0.65}}}
    text = report.selection_text(out_of_fold)
    assert "`real+logit_adjust` 65.00%" in text and "`real+logit_adjust` was selected" in text
    # every class a single image: no fold could be scored, and the report must not claim a converged budget or a selection
    unscored = {"selection": {"steps": 1000, "budget_curve": [{"steps": 500, "balanced_accuracy": None}, {"steps": 1000, "balanced_accuracy": float("nan")}],
                              "recipe_scores": {"real": None, "real+classic": None}, "best_recipe": "real", "chosen_by": "out-of-fold", "folds": 2}}
    text = report.selection_text(unscored)
    assert "convergence was not measured" in text and "No recipe could be scored" in text
    assert "stopped improving" not in text and "was selected" not in text
    balanced = {"selection": {**on_test["selection"], "same_network": {"real+logit_adjust": "real"}}}
    assert "`real+logit_adjust` as `real`" in report.selection_text(balanced)
    assert "prior" not in report.selection_text(on_test)  # no evaluate section: nothing said about the prior
    real_prior = {**on_test, "evaluate": {"logit_adjust_prior": "real"}}
    assert "`evaluate.logit_adjust_prior: real`" in report.selection_text(real_prior)
    assert "prior" not in report.selection_text({**real_prior, "evaluate": {"logit_adjust_prior": "all"}})


def test_main_writes_report_and_pngs(tiny_prepared, tmp_path):
    config = Config(evaluate=FAST)
    evaluate.main(config, tiny_prepared, tmp_path / "synthetic", tmp_path / "pool", tmp_path / "reports", progress=False)
    text = report.main(config, tiny_prepared, tmp_path / "models", tmp_path / "synthetic", tmp_path / "reports")
    assert (tmp_path / "reports" / "REPORT.md").read_text() == text
    assert "Verdict: not recommended" in text and "sha256 `missing`" in text
    for name in ("gain_per_arm.png", "per_class_recall.png"):
        with Image.open(tmp_path / "reports" / "figures" / name) as image:
            assert image.size[0] > 100


def test_sample_grid_one_row_per_class_with_its_name(tiny_prepared, tmp_path):
    prepared = load_prepared(tiny_prepared)
    figure = report.save_sample_grid(prepared.val, tmp_path / "grid.png", per_class=4)
    assert [tick.get_text() for tick in figure.axes[0].get_yticklabels()] == list(prepared.class_names)
    assert np.asarray(Image.open(tmp_path / "grid.png")).std() > 0
    rows = [list(prepared.val.x[prepared.val.y == c][:4]) for c in range(10)]
    rows[9] = rows[9][:1]  # a class with one sample: the rest of its row stays blank (grey)
    grid = grids.tile_rows(rows, 4, prepared.image_shape)  # 10 rows of 4 tiles of 8 px, 1 px padding
    assert grid.shape == (10 * 9 + 1, 4 * 9 + 1, 1)
    np.testing.assert_array_equal(grid[1:9, 1:9], rows[0][0])
    assert (grid[-9:-1, 10:] == 128).all()


def test_filter_table_says_not_judged_instead_of_a_threshold_that_decides_nothing():
    summary = {"per_class": {
        "cat": {"accepted": 90, "discriminator_judged": True, "discriminator_threshold": -1.23456, "discriminator_acceptance": 0.98},
        "horse": {"accepted": 100, "discriminator_judged": False, "discriminator_threshold": -14.96, "discriminator_acceptance": 1.0,
                  "classifier_judged": "n/a", "classifier_threshold": "n/a"}}}
    cat, horse = report.filter_rows(summary)
    assert cat["discriminator_threshold"] == "-1.23" and cat["discriminator_acceptance"] == "0.98"
    assert horse["discriminator_threshold"] == horse["discriminator_acceptance"] == "not judged"
    assert horse["classifier_threshold"] == "n/a" and horse["accepted"] == 100


def test_the_report_gives_the_confidence_level_evaluate_used_and_no_tail_on_balanced_data(metrics, tiny_prepared):
    prepared = load_prepared(tiny_prepared)  # 8 training images in every class: no class is a tail class
    card = {"class_names": list(prepared.class_names), "meta": prepared.meta, "generator": {}, "filter_summary": None, "params": {}}
    at_90 = {**metrics, "evaluate": {**metrics["evaluate"], "confidence": 0.9}}
    text = report.render_markdown(at_90, card)
    assert "| arm | balanced accuracy % [90% CI] |" in text and "90% t-interval" in text and "95%" not in text
    assert report.level({"evaluate": {"confidence": 0.975}}) == "97.5%"  # not cut to 97
    assert metrics["counts"]["tail_classes"] == [] and "Tail classes (fewest real images): none" in text
    assert all(not np.isfinite(row["tail_recall"]["mean"]) for row in metrics["arms"].values())
