"""Plain-text progress lines (synthgen.progress): one per tenth of the work, nothing outside a block."""

from __future__ import annotations

import io
import re

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
