"""The user's own images through the CLI stages: a long tail with a separate test set, colour, 64x64.

Each test writes an ImageFolder (and a test .npz) in a temp dir and runs ``synthgen <stage>`` with
the default paths there, tiny models and few steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from synthgen.cli import app
from synthgen.io import read_json

TINY = [
    "train.steps=30", "train.batch_size=16", "train.cvae.base_channels=8", "train.cvae.latent_dim=4", "train.device=cpu",
    "generate.min_per_class=5", "generate.batch_size=64", "generate.device=cpu",
    "filter.classifier_steps=20", "filter.discriminator_steps=20", "filter.discriminator_samples=20", "filter.discriminator_calibration_samples=40", "filter.device=cpu",
    "evaluate.seeds=2", "evaluate.steps=20", "evaluate.batch_size=16", "evaluate.width=8", "evaluate.device=cpu",
]


def shapes(label: int, size: int, rng: np.random.Generator, colour: bool) -> np.ndarray:
    """A noisy image of class ``label``: a bright block in corner ``label``, tinted per class when ``colour``."""
    image = rng.integers(0, 50, (size, size, 3), dtype=np.uint8)
    half = size // 2
    top, left = half * (label // 2 % 2), half * (label % 2)
    tint = np.array([[255, 60, 60], [60, 255, 60], [60, 60, 255], [255, 255, 60]][label % 4]) if colour else np.full(3, 230)
    image[top : top + half, left : left + half] = np.clip(tint - rng.integers(0, 30, (half, half, 1)), 0, 255)
    return image if colour else image[..., 0]


def write_long_tail(root, counts: dict[str, int], size: int, colour: bool = False, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for label, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(shapes(label, size, rng, colour)).save(root / name / f"{i}.png")


def write_test_npz(path, class_names: list[str], per_class: int, size: int, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(class_names)), per_class)
    np.savez(path, x=np.stack([shapes(label, size, rng, False) for label in y]), y=y, class_names=np.array(class_names))


def run_stages(stages: list[str], data: dict, *overrides: str) -> None:
    """``synthgen <stage> --params params.yaml --set ...`` for each stage in the current directory."""
    lines = ["data:"] + [f"  {key}: {value}" for key, value in data.items()]
    with open("params.yaml", "w") as params:
        params.write("\n".join(lines) + "\n")
    sets = [arg for item in [*TINY, *overrides] for arg in ("--set", item)]
    for stage in stages:
        result = CliRunner().invoke(app, [stage, "--params", "params.yaml", *sets])
        assert result.exit_code == 0, f"synthgen {stage} failed:\n{result.output}\n{result.exception!r}"


def accepted_pngs(class_name: str) -> list[Path]:
    return sorted((Path("data/synthetic/accepted") / class_name).glob("*.png"))


def test_test_source_end_to_end_with_a_one_image_class(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    counts = {"a": 6, "b": 3, "c": 1}
    write_long_tail(tmp_path / "images", counts, size=12)
    write_test_npz(tmp_path / "test.npz", list(counts), per_class=4, size=12)
    data = {"source": tmp_path / "images", "test_source": tmp_path / "test.npz", "per_class": "null", "long_tail": "null"}
    run_stages(["prepare", "train", "generate", "filter", "evaluate", "report"], data)
    prepared = read_json("data/prepared/summary.json")
    assert prepared["totals"] == {"train": 10, "val": 0, "test": 12}  # every labeled image trains
    accepted = read_json("data/synthetic/filter_summary.json")["per_class"]
    assert accepted["c"]["accepted"] > 0 and len(accepted_pngs("c")) == accepted["c"]["accepted"]
    metrics = read_json("reports/metrics.json")
    assert metrics["verdict"] in ("recommended", "not recommended")
    assert (tmp_path / "reports" / "REPORT.md").is_file()


def test_colour_images_stay_colour(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_long_tail(tmp_path / "images", {"red": 8, "green": 4, "blue": 2}, size=16, colour=True)
    data = {"source": tmp_path / "images", "per_class": "null", "long_tail": "null", "test_per_class": 1}
    run_stages(["prepare", "train", "generate", "filter"], data, "generate.max_rounds=1")
    assert read_json("data/prepared/summary.json")["image_shape"] == [16, 16, 3]
    pngs = [path for name in ("red", "green", "blue") for path in accepted_pngs(name)]
    assert pngs and {Image.open(path).mode for path in pngs} == {"RGB"}
    assert {Image.open(path).size for path in pngs} == {(16, 16)}


@pytest.mark.parametrize("colour", [False, True])
def test_resized_to_64(tmp_path, monkeypatch, colour):
    monkeypatch.chdir(tmp_path)
    write_long_tail(tmp_path / "images", {"x": 5, "y": 3}, size=20, colour=colour)
    data = {"source": tmp_path / "images", "per_class": "null", "long_tail": "null", "test_per_class": 1, "image_size": 64}
    run_stages(["prepare", "train", "generate", "filter"], data, "train.steps=10", "filter.classifier=false")
    pngs = accepted_pngs("x") + accepted_pngs("y")
    assert pngs and {Image.open(path).size for path in pngs} == {(64, 64)}
    assert {Image.open(path).mode for path in pngs} == {"RGB" if colour else "L"}


CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-3k" / "cifar10-3k.npz"


@pytest.mark.slow
def test_real_cifar_long_tail_down_to_one_image_gives_rgb_samples_and_a_verdict(tmp_path, monkeypatch):
    """Real CIFAR-10 photographs (../shared): a long tail 20 -> 1 image per class, every stage, RGB out."""
    if not CIFAR.is_file():
        pytest.skip(f"CIFAR-10 3k not found at {CIFAR}")
    monkeypatch.chdir(tmp_path)
    run_stages(["prepare", "train", "generate", "filter", "evaluate", "report"],
               {"source": str(CIFAR), "long_tail": "{max: 20, ratio: 20}", "test_per_class": 30},
               "evaluate.recipes=[real+classic,real+logit_adjust+classic]", "evaluate.quality=true")
    summary = read_json("data/prepared/summary.json")
    assert [row["train"] for row in summary["classes"]][-1] == 1 and summary["image_shape"] == [32, 32, 3]
    assert summary["totals"]["val"] == 0
    filtered = read_json("data/synthetic/filter_summary.json")
    assert filtered["per_class"]["truck"]["generated"] > 0  # the one-image class is topped up like any other
    pngs = [png for name in summary["classes"] for png in accepted_pngs(name["class"])]
    assert pngs, "a 30-step generator still gets some samples past the filters"
    with Image.open(pngs[0]) as image:
        assert image.mode == "RGB" and image.size == (32, 32)
    metrics = read_json("reports/metrics.json")
    assert metrics["recipe"] in metrics["balanced_accuracy"] and f"{metrics['recipe']}+synthetic" in metrics["balanced_accuracy"]
    assert "Verdict:" in Path("reports/REPORT.md").read_text()
