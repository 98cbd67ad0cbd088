"""``synthgen prepare`` through the real CLI: success, and user errors as exit code 2 with no output dir."""

from __future__ import annotations

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from synthgen.cli import app
from synthgen.data import load_prepared
from synthgen.io import read_json

runner = CliRunner()


def prepare(tmp_path, *overrides: str):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  per_class: 3\n  val_per_class: 2\n  test_per_class: 4\n")
    args = ["prepare", "--params", str(params), "--out", str(tmp_path / "out")]
    for item in overrides:
        args += ["--set", item]
    return runner.invoke(app, args)


def test_prepare_writes_splits(tmp_path):
    result = prepare(tmp_path, "data.seed=3")
    assert result.exit_code == 0, result.output
    prepared = load_prepared(tmp_path / "out")
    assert prepared.train.counts().tolist() == [3] * 10 and prepared.test.counts().tolist() == [4] * 10
    assert prepared.meta["seed"] == 3 and "total" in result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "meta.json", "summary.json", "test.npz", "train.npz", "val.npz"]


def test_prepare_bad_source_exits_2_and_writes_nothing(tmp_path):
    result = prepare(tmp_path, f"data.source={tmp_path / 'nowhere'}")
    assert result.exit_code == 2
    assert "nowhere" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_prepare_bad_data_names_field(tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.full((4, 2, 2), np.nan), y=np.array([0, 1, 0, 1]))
    result = prepare(tmp_path, f"data.source={tmp_path / 'bad.npz'}")
    assert result.exit_code == 2 and "'x' has 16 NaN/inf" in result.output
    assert not (tmp_path / "out").exists()


def test_prepare_class_too_small_and_bad_param(tmp_path):
    result = prepare(tmp_path, "data.per_class=400")
    assert result.exit_code == 2 and "class '0'" in result.output
    result = prepare(tmp_path, "data.bogus=1")
    assert result.exit_code == 2 and "data.bogus" in result.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------- the user's own folders, through the CLI
def write_folder(root, counts: dict[str, int], size: int = 8, colour: tuple[str, ...] = ()) -> None:
    """root/<class>/<i>.png: grey images, except classes in ``colour`` (RGB)."""
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shape = (size, size, 3) if name in colour else (size, size)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name / f"{i}.png")


def write_npz(path, class_names: list[str], per_class: int = 2, size: int = 8) -> None:
    y = np.repeat(np.arange(len(class_names)), per_class)
    x = np.random.default_rng(1).integers(0, 256, (len(y), size, size), dtype=np.uint8)
    np.savez(path, x=x, y=y, class_names=np.array(class_names))


def prepare_folder(tmp_path, *overrides: str):
    """`synthgen prepare` of tmp_path/images with the defaults (val_per_class 0), train = every image."""
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  source: {tmp_path / 'images'}\n  per_class: null\n  long_tail: null\n")
    args = ["prepare", "--params", str(params), "--out", str(tmp_path / "out")]
    return runner.invoke(app, [*args, *(arg for item in overrides for arg in ("--set", item))])


def assert_refused(result, tmp_path, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())  # undo terminal wrapping
    assert "Traceback" not in message and all(fragment in message for fragment in fragments), message
    assert not (tmp_path / "out").exists()


def test_empty_class_folder_is_named(tmp_path):
    write_folder(tmp_path / "images", {"cat": 2, "dog": 2})
    (tmp_path / "images" / "emu").mkdir()
    result = prepare_folder(tmp_path, f"data.test_source={tmp_path / 'test.npz'}")
    assert_refused(result, tmp_path, "class 'emu'", str(tmp_path / "images" / "emu"), "has no images")


def test_test_and_val_source_classes_must_match(tmp_path):
    write_folder(tmp_path / "images", {"cat": 2, "dog": 2, "emu": 1})
    write_npz(tmp_path / "test.npz", ["cat", "dog", "emu", "fox"])
    write_npz(tmp_path / "val.npz", ["cat", "dog"])
    result = prepare_folder(tmp_path, f"data.test_source={tmp_path / 'test.npz'}")
    assert_refused(result, tmp_path, "data.test_source classes differ from data.source", "extra ['fox']", "missing []",
                   f"({tmp_path / 'test.npz'} against {tmp_path / 'images'})")  # the two paths, as the user gave them
    write_npz(tmp_path / "test.npz", ["cat", "dog", "emu"])
    result = prepare_folder(tmp_path, f"data.test_source={tmp_path / 'test.npz'}", f"data.val_source={tmp_path / 'val.npz'}")
    assert_refused(result, tmp_path, "data.val_source classes differ from data.source", "extra []", "missing ['emu']")


def test_test_source_of_another_size_names_both_shapes(tmp_path):
    write_folder(tmp_path / "images", {"cat": 2, "dog": 2})
    write_npz(tmp_path / "test.npz", ["cat", "dog"], size=12)
    result = prepare_folder(tmp_path, f"data.test_source={tmp_path / 'test.npz'}")
    assert_refused(result, tmp_path, "data.test_source images have shape (12, 12, 1)", "data.source images (8, 8, 1)",
                   "data.image_size")


def test_mixed_grey_and_rgb_folder_is_converted_and_says_so(tmp_path):
    write_folder(tmp_path / "images", {"cat": 3, "dog": 2}, colour=("dog",))
    write_npz(tmp_path / "test.npz", ["cat", "dog"])
    result = prepare_folder(tmp_path, f"data.test_source={tmp_path / 'test.npz'}")
    assert result.exit_code == 0, result.output
    note = "converted 3 grey images (one channel, or three equal ones) to RGB (e.g. cat/0.png)"
    summary = read_json(tmp_path / "out" / "summary.json")
    assert summary["image_shape"] == [8, 8, 3] and summary["notes"][0] == note
    assert summary["notes"][1] == "data.test_source: converted its 4 grey images to RGB (another source is RGB)"
    assert read_json(tmp_path / "out" / "meta.json")["notes"] == summary["notes"]
    assert note in " ".join(result.output.split())
    assert load_prepared(tmp_path / "out").test.x.shape == (4, 8, 8, 3)


def test_one_image_classes_are_accepted_and_every_image_trains(tmp_path):
    counts = {"a": 6, "b": 3, "c": 1, "d": 1}  # a long tail down to one image per class
    write_folder(tmp_path / "images", counts)
    write_npz(tmp_path / "test.npz", ["d", "c", "b", "a"], per_class=3)
    result = prepare_folder(tmp_path, f"data.test_source={tmp_path / 'test.npz'}")
    assert result.exit_code == 0, result.output
    prepared = load_prepared(tmp_path / "out")
    assert prepared.train.counts().tolist() == list(counts.values())
    assert sorted(prepared.train.index.tolist()) == list(range(sum(counts.values())))  # every source image
    assert len(prepared.val.y) == 0 and prepared.test.counts().tolist() == [3, 3, 3, 3]
    assert prepared.meta["split_sources"] == {"train": "source", "val": "source", "test": "test_source"}


def test_training_folder_under_another_name_as_test_source_is_refused(tmp_path):
    write_folder(tmp_path / "images", {"cat": 3, "dog": 2})
    (tmp_path / "alias").symlink_to(tmp_path / "images")  # the same folder through a link: its own string, the same images
    result = prepare_folder(tmp_path, f"data.test_source={tmp_path / 'alias'}")
    assert_refused(result, tmp_path, "5 of the 5 test images are identical to training images", "data.test_source")
    result = prepare_folder(tmp_path, f"data.test_source={tmp_path / 'images'}/.")
    assert_refused(result, tmp_path, "5 of the 5 test images are identical to training images")
    write_npz(tmp_path / "test.npz", ["cat", "dog"])
    result = prepare_folder(tmp_path, f"data.test_source={tmp_path / 'test.npz'}", f"data.val_source={tmp_path / 'alias'}")
    assert_refused(result, tmp_path, "5 of the 5 val images are identical to training images", "data.val_source")


def test_a_few_test_images_identical_to_training_images_get_a_note(tmp_path):
    write_folder(tmp_path / "images", {"cat": 3, "dog": 2})
    write_folder(tmp_path / "test", {"cat": 3, "dog": 2})  # the same seed: a copy of images/
    rng = np.random.default_rng(7)
    for name in ("cat/2.png", "dog/0.png", "dog/1.png"):  # 3 of 5 replaced, 2 still copies: a note, not a refusal
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "test" / name)
    result = prepare_folder(tmp_path, f"data.test_source={tmp_path / 'test'}")
    assert result.exit_code == 0, result.output
    assert read_json(tmp_path / "out" / "summary.json")["notes"] == ["2 of the 5 test images are identical to a training image"]
