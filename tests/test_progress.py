"""Plain-text progress lines (synthgen.progress): one per tenth of the work, nothing outside a block."""

from __future__ import annotations

import io
import re

import numpy as np

from synthgen import evaluate, progress
from synthgen.models.classifier import fit_members


def test_a_line_per_tenth_crossed_and_none_outside_a_block():
    stream = io.StringIO()
    with progress.milestones("work", 40, stream=stream):
        for _ in range(13):
            progress.advance(3)  # 39 of 40, then 42: every tenth printed once, 100% at most once
        progress.advance(3)
    progress.advance(5)  # no block: nothing
    lines = stream.getvalue().splitlines()
    assert [line.split(":")[1].split("%")[0].strip() for line in lines] == [str(10 * k) for k in range(1, 11)]
    assert lines[0].startswith("work: 10% of 40 network-steps, ") and lines[-1].endswith(" s")
    assert progress.duration(42) == "42 s" and progress.duration(185) == "3 min 5 s" and progress.duration(3720) == "1 h 2 min"


def test_a_disabled_block_prints_nothing(capsys, tiny_prepared):
    from synthgen.data import load_prepared

    train = load_prepared(tiny_prepared).train
    with progress.milestones("quiet", 10, enabled=False):
        fit_members(train.x, train.y, [0], steps=2, width=8, device="cpu")
    assert capsys.readouterr().out == ""


def test_evaluate_prints_where_it_is_while_it_trains(capsys, tiny_prepared):
    from synthgen.config import EvaluateConfig
    from synthgen.data import load_prepared

    prepared = load_prepared(tiny_prepared)
    config = EvaluateConfig(steps="auto", min_steps=4, max_steps=8, seeds=2, batch_size=16, width=8, device="cpu", quality=False,
                            recipes=["real", "real+classic"])
    evaluate.run_arms(prepared.train, prepared.test, prepared.val, prepared.val, config, progress=True)
    out = capsys.readouterr().out
    assert "evaluate: the step budget, out-of-fold: 100% of 24 network-steps" in out  # (4 + 8 steps) x 2 folds
    for what in ("recipes without synthetic images", "arms with synthetic or unfiltered images"):  # 2 recipes; 2 or 3 arms
        networks, steps, total = map(int, re.search(rf"evaluate: (\d) {what} x 2 seeds, (\d+) steps: 100% of (\d+) network-steps",
                                                    out).groups())
        assert total == networks * 2 * steps and steps in (4, 8)  # the budget found


def test_the_filter_stage_s_lines_end_at_100_percent_with_and_without_held_out_images(tiny_prepared):
    """fitting_work counts what fit_filters_on trains: the lines stop at 100%, not short of it or early."""
    from synthgen import filter as filter_stage
    from synthgen.config import load_config
    from synthgen.data import load_prepared
    from synthgen.models import build_generator

    prepared = load_prepared(tiny_prepared)
    config = load_config(None, ["filter.classifier_steps=7", "filter.discriminator_steps=5", "filter.discriminator_samples=4",
                                "filter.discriminator_calibration_samples=4", "filter.device=cpu", "generate.device=cpu"])
    model = build_generator("cvae", prepared.n_classes, (1, 8, 8), base_channels=8)
    fakes = filter_stage.reference_samples(model, prepared.n_classes, config.filter, config.generate, "cpu", "prior")
    one_each = np.unique(prepared.train.y, return_index=True)[1][:2]  # two images for three folds: one fold is empty
    for x, y, held_out, expected in ((prepared.train.x, prepared.train.y, (prepared.val.x, prepared.val.y), 3 * 5 + 7),
                                     (prepared.train.x, prepared.train.y, None, 3 * 5 + 4 * 7),  # 3 folds; + 3 folds
                                     (prepared.train.x[one_each], prepared.train.y[one_each], None, None)):
        work = filter_stage.fitting_work(config.filter, y, held_out is not None, fakes)
        stream = io.StringIO()
        with progress.milestones("filter", work, stream=stream):
            filter_stage.fit_filters_on(config.filter, x, y, model, "cpu", held_out, prepared.n_classes, fakes)
        assert expected in (work, None) and stream.getvalue().splitlines()[-1].startswith(f"filter: 100% of {work} network-steps")


def test_generator_training_prints_a_line_per_tenth_when_not_on_a_terminal_and_resumes_from_its_step(tiny_prepared, tmp_path,
                                                                                                     capsys):
    from synthgen import train
    from synthgen.config import load_config

    def run(steps: int) -> str:
        config = load_config(None, ["train.model=cvae", f"train.steps={steps}", "train.log_every=2", "train.checkpoint_every=4",
                                    "train.batch_size=16", "train.device=cpu", "train.cvae.base_channels=4", "train.cvae.latent_dim=4"])
        train.main(config, tiny_prepared, tmp_path / "models", tmp_path / "checkpoints")
        return capsys.readouterr().out

    def percents(out: str) -> list[str]:
        return [line.split("%")[0].removeprefix("train cvae: ") for line in out.splitlines() if line.startswith("train cvae:")]

    assert percents(run(4)) == ["50", "100"]  # a loss row every 2 steps: at 2 of 4, 4 of 4
    assert percents(run(8)) == ["70", "100"]  # resumed at 4 of 8 (50%, not printed again): at 6 of 8, 8 of 8
