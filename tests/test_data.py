"""Tests for synthgen.data: every loader, the split rules, bad inputs, and the atomic prepare main."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthgen import data, prepare
from synthgen.config import Config, ConfigError, DataConfig
from synthgen.data import DataError, LabeledImages
from synthgen.prepare import make_splits
from synthgen.sources import load_source
from synthgen.io import read_json

MNIST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ----------------------------------------------------------------------- helpers
def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def grey_folder(root: Path, classes=("cat", "dog"), per_class: int = 3, size=(6, 5)) -> dict[str, list[np.ndarray]]:
    """root/<class>/<i>.png grey images of (height, width) = size; returns the arrays written."""
    rng = np.random.default_rng(0)
    written = {}
    for name in classes:
        written[name] = [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(per_class)]
        for i, array in enumerate(written[name]):
            write_png(root / name / f"{i}.png", array)
    return written


def write_idx(directory: Path, x: np.ndarray, y: np.ndarray, prefix: str = "t10k", compress: bool = True) -> Path:
    """MNIST-style IDX pair (big-endian int32 header) written to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    images = np.array([2051, *x.shape], dtype=">i4").tobytes() + x.astype(np.uint8).tobytes()
    labels = np.array([2049, len(y)], dtype=">i4").tobytes() + y.astype(np.uint8).tobytes()
    opener, ext = (gzip.open, ".gz") if compress else (open, "")
    with opener(directory / f"{prefix}-images-idx3-ubyte{ext}", "wb") as handle:
        handle.write(images)
    with opener(directory / f"{prefix}-labels-idx1-ubyte{ext}", "wb") as handle:
        handle.write(labels)
    return directory / f"{prefix}-images-idx3-ubyte{ext}"


def synthetic_images(counts: list[int], size: int = 4, seed: int = 0) -> LabeledImages:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
    x = rng.integers(0, 256, (len(y), size, size, 1), dtype=np.uint8)
    return LabeledImages(x, y, tuple(str(c) for c in range(len(counts))), np.arange(len(y)))


# ----------------------------------------------------------------------- loaders
def test_digits_loader():
    images = load_source("digits")
    assert images.x.shape == (1797, 8, 8, 1) and images.x.dtype == np.uint8
    assert images.y.dtype == np.int64 and images.class_names == tuple(str(c) for c in range(10))
    assert images.x.max() == 255 and images.x.min() == 0
    assert images.counts().sum() == 1797


def test_image_folder_grey_exact_pixels_and_hidden_files_ignored(tmp_path):
    written = grey_folder(tmp_path / "root")
    (tmp_path / "root" / "cat" / ".DS_Store").write_bytes(b"\x00junk")
    write_png(tmp_path / "root" / "dog" / ".thumbs" / "x.png", np.zeros((9, 9), np.uint8))
    (tmp_path / "root" / ".git").mkdir()
    images = load_source(str(tmp_path / "root"))
    assert images.class_names == ("cat", "dog")
    assert images.x.shape == (6, 6, 5, 1)
    assert images.y.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(images.x[3, ..., 0], written["dog"][0])


def test_image_folder_any_colour_makes_all_rgb(tmp_path):
    grey_folder(tmp_path / "root", per_class=2)
    colour = np.zeros((6, 5, 3), np.uint8)
    colour[..., 0] = 200
    write_png(tmp_path / "root" / "dog" / "colour.png", colour)
    images = load_source(str(tmp_path / "root"))
    assert images.image_shape == (6, 5, 3)
    # grey images are replicated over R, G, B; the colour one keeps its channels
    assert np.array_equal(images.x[0, ..., 0], images.x[0, ..., 2])
    assert images.x[images.y == 1][-1, 0, 0].tolist() == [200, 0, 0]
    assert images.notes == ("converted 4 grey images (one channel, or three equal ones) to RGB (e.g. cat/0.png)",)


def test_image_folder_rgba_and_palette_images_join_rgb_with_notes(tmp_path):
    grey_folder(tmp_path, per_class=1)
    rgba = np.zeros((6, 5, 4), np.uint8)
    rgba[..., 1], rgba[..., 3] = 90, 128
    write_png(tmp_path / "dog" / "rgba.png", rgba)
    colour = np.zeros((6, 5, 3), np.uint8)
    colour[:, :2] = (200, 30, 0)
    Image.fromarray(colour).convert("P").save(tmp_path / "cat" / "palette.png")
    images = load_source(str(tmp_path))
    assert images.image_shape == (6, 5, 3) and images.y.tolist() == [0, 0, 1, 1]
    assert images.notes == ("converted 2 grey images (one channel, or three equal ones) to RGB (e.g. cat/0.png)",
                            "painted 1 image with transparency onto white (the first one's content is dark) (e.g. dog/rgba.png)")
    np.testing.assert_array_equal(images.x[1], np.asarray(Image.open(tmp_path / "cat" / "palette.png").convert("RGB")))
    assert images.x[3, 0, 0].tolist() == [127, 172, 127]  # dark green at half opacity over white


@pytest.mark.parametrize("ink", [0, 255])
def test_a_picture_drawn_only_in_the_alpha_channel_stays_visible(tmp_path, ink):
    """One colour on a transparent sheet (an icon, a glyph): dropping alpha gave a plain square of that colour."""
    glyph = np.zeros((8, 8, 4), np.uint8)
    glyph[..., :3] = ink
    glyph[2:6, 3:5, 3] = 255  # the stroke; the rest transparent
    for name in ("a", "b"):
        write_png(tmp_path / name / "glyph.png", glyph)
    images = load_source(str(tmp_path))
    stroke, sheet = images.x[0, 3, 3, 0], images.x[0, 0, 0, 0]
    assert images.image_shape == (8, 8, 1) and stroke == ink and sheet == 255 - ink  # the stroke on a contrasting sheet


def test_one_background_for_every_transparent_image_of_a_folder(tmp_path):
    """Chosen once, from the first such image: a per-image choice flipped between near-identical images (ink 126 and 129)."""
    for name, ink in (("a", 126), ("b", 129)):
        glyph = np.zeros((8, 8, 4), np.uint8)
        glyph[..., :3], glyph[2:6, 3:5, 3] = ink, 255
        write_png(tmp_path / name / "glyph.png", glyph)
    images = load_source(str(tmp_path))
    assert images.x[0, 0, 0, 0] == images.x[1, 0, 0, 0] == 255  # class a's content (126) is dark: white for both


def test_grey_only_folder_stays_one_channel_without_notes(tmp_path):
    grey_folder(tmp_path, per_class=2)
    images = load_source(str(tmp_path), image_size=8)
    assert images.image_shape == (8, 8, 1) and images.notes == ()


def test_grey_source_and_rgb_test_source_meet_in_rgb_with_a_note():
    images = synthetic_images([6, 6])
    test = synthetic_images([2, 2], seed=1)
    test = LabeledImages(np.repeat(test.x, 3, axis=-1), test.y, test.class_names, test.index, ("a loader note",))
    prepared = make_splits(images, split_config(val_per_class=0), test)
    assert prepared.image_shape == (4, 4, 3) and prepared.test.x.shape[-1] == 3
    np.testing.assert_array_equal(prepared.train.x[..., 2], images.x[prepared.train.index, ..., 0])
    assert prepared.meta["notes"] == [
        "data.source: converted its 12 grey images to RGB (another source is RGB)", "data.test_source: a loader note"]


def test_image_folder_rgb_files_with_equal_channels_stay_grey(tmp_path):
    for name in ("a", "b"):
        grey = np.full((4, 4), 77 if name == "a" else 10, np.uint8)
        write_png(tmp_path / name / "0.png", np.stack([grey] * 3, axis=-1))
    images = load_source(str(tmp_path))
    assert images.image_shape == (4, 4, 1) and images.x[0, 0, 0, 0] == 77


def test_npz_uint8_with_class_names(tmp_path):
    x = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 1, 0]), class_names=np.array(["no", "yes"]))
    images = load_source(str(tmp_path / "d.npz"))
    assert images.class_names == ("no", "yes") and images.image_shape == (3, 3, 1)
    np.testing.assert_array_equal(images.x[..., 0], x)


def test_npz_float_ranges_and_label_remapping(tmp_path):
    unit = np.full((4, 2, 2, 3), 0.5)
    np.savez(tmp_path / "unit.npz", x=unit, y=np.array([7, 3, 7, 3]))
    images = load_source(str(tmp_path / "unit.npz"))
    assert images.x.dtype == np.uint8 and images.x.max() == 128  # 0.5 * 255 rounded
    assert images.class_names == ("3", "7") and images.y.tolist() == [1, 0, 1, 0]
    np.savez(tmp_path / "byte.npz", x=np.full((2, 2, 2), 200.0), y=np.array([0, 1]))
    assert load_source(str(tmp_path / "byte.npz")).x.max() == 200


def test_npz_string_labels_are_the_class_names(tmp_path):
    np.savez(tmp_path / "s.npz", x=np.arange(3 * 4, dtype=np.uint8).reshape(3, 2, 2), y=np.array(["dog", "cat", "dog"]))
    images = load_source(str(tmp_path / "s.npz"))
    assert images.class_names == ("cat", "dog") and images.y.tolist() == [1, 0, 1]
    np.savez(tmp_path / "b.npz", x=np.zeros((2, 2, 2), np.uint8), y=np.array([b"dog", b"cat"]))
    assert load_source(str(tmp_path / "b.npz")).class_names == ("cat", "dog")


def test_npz_byte_string_class_names_decoded(tmp_path):
    np.savez(tmp_path / "h5.npz", x=np.zeros((2, 2, 2), np.uint8), y=np.array([0, 1]), class_names=np.array([b"caf\xc3\xa9", b"dog"]))
    assert load_source(str(tmp_path / "h5.npz")).class_names == ("caf\u00e9", "dog")


def test_class_names_in_one_unicode_form(tmp_path):
    """A Mac folder's decomposed "café" and an .npz's composed one are the same class."""
    decomposed = "cafe\u0301"
    grey_folder(tmp_path / "folder", classes=(decomposed, "dog"))
    np.savez(tmp_path / "test.npz", x=np.zeros((2, 6, 5), np.uint8), y=np.array([0, 1]), class_names=np.array(["caf\u00e9", "dog"]))
    assert load_source(str(tmp_path / "folder")).class_names == ("caf\u00e9", "dog")
    assert load_source(str(tmp_path / "test.npz")).class_names == ("caf\u00e9", "dog")


def test_16_bit_grey_png_scaled_not_clipped(tmp_path):
    """PIL's convert("L") clips 16-bit values at 255: a 16-bit scan would become a white square."""
    for name, value in (("dark", 257 * 40), ("bright", 257 * 200)):
        path = tmp_path / name / "0.png"
        path.parent.mkdir(parents=True)
        Image.fromarray(np.full((4, 4), value, np.uint16)).save(path)
        assert Image.open(path).mode.startswith("I")
    images = load_source(str(tmp_path))
    assert images.class_names == ("bright", "dark") and images.image_shape == (4, 4, 1)
    assert images.x[images.y == 0].max() == 200 and images.x[images.y == 1].max() == 40
    assert any("scaled 2 16-bit grey images to 8 bits" in note for note in images.notes)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_directory_and_images_file(tmp_path, compress):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (12, 5, 4), dtype=np.uint8)
    y = np.array([2, 5] * 6)
    images_file = write_idx(tmp_path / "idx", x, y, compress=compress)
    for source in (tmp_path / "idx", images_file):
        images = load_source(str(source))
        assert images.image_shape == (5, 4, 1) and images.class_names == ("2", "5")
        np.testing.assert_array_equal(images.x[..., 0], x)
        assert images.y.tolist() == [0, 1] * 6


@pytest.mark.slow
def test_real_mnist_idx(mnist_dir):
    images = load_source(str(mnist_dir))
    assert images.x.shape == (10000, 28, 28, 1)
    assert images.counts().tolist() == MNIST_COUNTS
    config = DataConfig(source=str(mnist_dir), per_class=None, long_tail={"max": 50, "ratio": 100}, test_per_class=800)
    prepared = make_splits(images, config)
    assert prepared.train.counts().tolist() == [50, 30, 18, 11, 6, 4, 2, 1, 1, 1]
    assert len(prepared.val.y) == 0 and prepared.test.counts().tolist() == [800] * 10  # default: nothing held out


def test_resize_when_image_size_set(tmp_path):
    grey_folder(tmp_path / "root", size=(6, 6), per_class=2)
    write_png(tmp_path / "root" / "dog" / "big.png", np.zeros((10, 12), np.uint8))
    images = load_source(str(tmp_path / "root"), image_size=8)
    assert images.image_shape == (8, 8, 1) and len(images.y) == 5
    assert load_source("digits", image_size=16).image_shape == (16, 16, 1)


# -------------------------------------------------------------------- bad inputs
def test_missing_path():
    with pytest.raises(DataError, match="not found: .*nowhere"):
        load_source("/nonexistent/nowhere")


def test_empty_root(tmp_path):
    with pytest.raises(DataError, match="empty directory"):
        load_source(str(tmp_path))


def test_class_folder_without_images(tmp_path):
    grey_folder(tmp_path)
    (tmp_path / "emu" / ".hidden").mkdir(parents=True)
    with pytest.raises(DataError, match="class 'emu'.*no images"):
        load_source(str(tmp_path))


def test_corrupt_and_truncated_images_named(tmp_path):
    grey_folder(tmp_path / "a")
    (tmp_path / "a" / "dog" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="broken.png"):
        load_source(str(tmp_path / "a"))
    grey_folder(tmp_path / "b", size=(64, 64))
    good = tmp_path / "b" / "cat" / "0.png"
    payload = good.read_bytes()
    good.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(DataError, match="0.png"):
        load_source(str(tmp_path / "b"))


def test_non_image_file_named(tmp_path):
    grey_folder(tmp_path)
    (tmp_path / "cat" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="notes.txt: not an image file"):
        load_source(str(tmp_path))


def test_stray_root_file_named(tmp_path):
    grey_folder(tmp_path)
    (tmp_path / "README.md").write_text("about")
    with pytest.raises(DataError, match="README.md: ImageFolder root .* only class folders"):
        load_source(str(tmp_path))


def test_unsupported_file_source(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="data.csv: unsupported data source"):
        load_source(str(tmp_path / "data.csv"))


def test_mixed_sizes_refused_naming_both_files(tmp_path):
    grey_folder(tmp_path, size=(6, 6))
    write_png(tmp_path / "dog" / "odd.png", np.zeros((7, 6), np.uint8))
    with pytest.raises(DataError, match=r"cat/0.png is 6x6 but .*dog/odd.png is 6x7.*image_size"):
        load_source(str(tmp_path))


def test_single_class_refused(tmp_path):
    grey_folder(tmp_path / "folder", classes=("only",))
    with pytest.raises(DataError, match="at least 2 classes.*only"):
        load_source(str(tmp_path / "folder"))
    np.savez(tmp_path / "one.npz", x=np.zeros((3, 2, 2)), y=np.array([4, 4, 4]))
    with pytest.raises(DataError, match="at least 2 classes.*'4'"):
        load_source(str(tmp_path / "one.npz"))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((3, 2, 2)), "y": np.array([0, 1])}, "'x' has 3 images but field 'y'"),
        ({"x": np.array([np.nan, 0, np.inf, 1]).reshape(1, 2, 2).repeat(2, 0), "y": np.array([0, 1])}, "'x' has 4 NaN/inf"),
        ({"x": np.array([-1.0, 0, 300, 2]).reshape(1, 2, 2).repeat(2, 0), "y": np.array([0, 1])}, "'x' has 4 values outside"),
        ({"x": np.zeros((2, 2, 2), np.uint8), "y": np.array([0, -1])}, "'y' has 1 negative"),
        ({"x": np.zeros((2, 2, 2), np.uint8), "y": np.array([0.0, 1.0])}, "'y' must hold integer labels or class names"),
        ({"x": np.zeros((2, 2, 2), np.uint8), "y": np.array(["a", "b"]), "class_names": np.array(["a", "b"])}, "'class_names' must be left out"),
        ({"x": np.zeros((2, 2, 2), np.uint8)}, "missing array 'y'"),
        ({"x": np.zeros((2, 2, 2, 2), np.uint8), "y": np.array([0, 1])}, "'x' must have shape"),
        ({"x": np.zeros((0, 2, 2, 3), np.float32), "y": np.zeros(0, np.int64)}, "holds no images"),
        ({"x": np.zeros((2, 2, 2), np.uint8), "y": np.array([0, 1]), "class_names": np.array(["ok", "dog/wolf"])}, "'dog/wolf' cannot name a folder"),
        ({"x": np.zeros((2, 2, 2), np.uint8), "y": np.array([0, 1]), "class_names": np.array(["ok", ".."])}, "'..' cannot name a folder"),
        ({"x": np.zeros((2, 2, 2), np.uint8), "y": np.array([0, 1]), "class_names": np.array(["ok", " "])}, "' ' cannot name a folder"),
        ({"x": np.zeros((2, 2, 2), np.uint8), "y": np.array([0, 1]), "class_names": np.array(["Cat", "cat"])}, "differ only in case"),
        ({"x": np.zeros((2, 2, 2), np.uint8), "y": np.array([b"\xff", b"\xfe"])}, "field 'y': b'.+' is not UTF-8"),
    ],
)
def test_bad_npz_fields_named(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_source(str(tmp_path / "bad.npz"))


def test_bad_idx_files_named(tmp_path):
    x, y = np.zeros((4, 3, 3), np.uint8), np.array([0, 1, 0, 1])
    images_file = write_idx(tmp_path / "cut", x, y, compress=False)
    images_file.write_bytes(images_file.read_bytes()[:-5])
    with pytest.raises(DataError, match="images-idx3-ubyte: IDX header says.*truncated"):
        load_source(str(tmp_path / "cut"))
    labels_file = write_idx(tmp_path / "magic", x, y, compress=False).with_name("t10k-labels-idx1-ubyte")
    labels_file.write_bytes(np.array([2051, 4], ">i4").tobytes() + y.astype(np.uint8).tobytes())
    with pytest.raises(DataError, match="labels-idx1-ubyte: bad IDX magic number 2051"):
        load_source(str(tmp_path / "magic"))
    write_idx(tmp_path / "magic", x, y, prefix="train")
    with pytest.raises(DataError, match="expected one .*t10k-images-idx3-ubyte.*train-images-idx3-ubyte"):
        load_source(str(tmp_path / "magic"))
    gz = write_idx(tmp_path / "gz", x, y)
    gz.write_bytes(gz.read_bytes()[:20])
    with pytest.raises(DataError, match="images-idx3-ubyte.gz"):
        load_source(str(tmp_path / "gz"))


# ------------------------------------------------------------------------ splits
def split_config(**changes) -> DataConfig:
    base = {"per_class": 5, "val_per_class": 3, "test_per_class": None, "seed": 0}
    return DataConfig(**{**base, **changes})


def test_splits_deterministic_disjoint_and_exact_counts():
    images = synthetic_images([20, 15, 30])
    first = make_splits(images, split_config())
    second = make_splits(images, split_config())
    other = make_splits(images, split_config(seed=1))
    for name in data.SPLITS:
        np.testing.assert_array_equal(getattr(first, name).index, getattr(second, name).index)
    assert not np.array_equal(first.train.index, other.train.index)
    index_sets = [set(getattr(first, name).index.tolist()) for name in data.SPLITS]
    assert not (index_sets[0] & index_sets[1] or index_sets[0] & index_sets[2] or index_sets[1] & index_sets[2])
    assert first.train.counts().tolist() == [5, 5, 5] and first.val.counts().tolist() == [3, 3, 3]
    assert first.test.counts().tolist() == [12, 7, 22]  # everything that remains
    # labels follow the images: each split's x is the source's x at its index
    np.testing.assert_array_equal(first.train.x, images.x[first.train.index])
    np.testing.assert_array_equal(first.train.y, images.y[first.train.index])
    assert first.meta["counts"]["train"] == {"0": 5, "1": 5, "2": 5}
    assert first.meta["image_shape"] == [4, 4, 1] and first.meta["seed"] == 0


def test_train_split_independent_of_test_per_class():
    images = synthetic_images([30, 30])
    full = make_splits(images, split_config())
    capped = make_splits(images, split_config(test_per_class=4))
    np.testing.assert_array_equal(full.train.index, capped.train.index)
    np.testing.assert_array_equal(full.val.index, capped.val.index)
    assert capped.test.counts().tolist() == [4, 4]


def test_long_tail_counts():
    n_classes, maximum, ratio = 10, 50, 100.0
    expected = [max(1, math.floor(maximum * ratio ** (-c / (n_classes - 1)) + 0.5)) for c in range(n_classes)]
    assert expected == [50, 30, 18, 11, 6, 4, 2, 1, 1, 1]
    images = synthetic_images([70] * n_classes)
    config = split_config(per_class=None, long_tail={"max": maximum, "ratio": ratio}, val_per_class=5)
    prepared = make_splits(images, config)
    assert prepared.train.counts().tolist() == expected
    assert prepared.meta["split"]["rule"] == "long_tail"


def test_all_remaining_rule_needs_a_test_split():
    images = synthetic_images([12, 9])
    prepared = make_splits(images, split_config(per_class=None, test_per_class=2))
    assert prepared.train.counts().tolist() == [7, 4] and prepared.test.counts().tolist() == [2, 2]
    with pytest.raises(ConfigError, match="test_source or data.test_per_class"):
        make_splits(images, split_config(per_class=None))


def test_separate_test_source_aligned_by_class_name():
    images = synthetic_images([10, 10, 10])
    test = synthetic_images([4, 6, 5], seed=3)
    # the test set lists the same classes in another order: labels are remapped by name
    test = LabeledImages(test.x, 2 - test.y, ("2", "1", "0"), test.index)
    prepared = make_splits(images, split_config(), test)
    assert prepared.train.counts().tolist() == [5, 5, 5]
    assert prepared.test.counts().tolist() == [4, 6, 5]
    assert set(prepared.test.index.tolist()) == set(range(15))
    assert make_splits(images, split_config(test_per_class=3), test).test.counts().tolist() == [3, 3, 3]
    with pytest.raises(DataError, match="class '0' has 4 test_source images, fewer than test_per_class=5"):
        make_splits(images, split_config(test_per_class=5), test)
    missing = LabeledImages(test.x[:4], test.y[:4], ("0", "1", "9"), test.index[:4])
    with pytest.raises(DataError, match=r"extra \['9'\], missing \['2'\]"):
        make_splits(images, split_config(), missing)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"per_class": 8}, "class '1' has 10 images, too few for val_per_class=3 \\+ per-class train 8"),
        ({"per_class": 2, "val_per_class": 11}, "class '1' has 10 images, too few for val_per_class=11"),
        ({"per_class": 5, "test_per_class": 3}, "class '1' has 10 images.*\\+ test 3 \\(= 11\\)"),
    ],
)
def test_class_too_small_named(changes, message):
    with pytest.raises(DataError, match=message):
        make_splits(synthetic_images([30, 10]), split_config(**changes))


# -------------------------------------------------------------------------- main
def test_main_writes_prepared_dir(tiny_prepared):
    prepared = data.load_prepared(tiny_prepared)
    assert prepared.train.counts().tolist() == [8] * 10
    assert prepared.val.counts().tolist() == [4] * 10 and prepared.test.counts().tolist() == [10] * 10
    summary = read_json(tiny_prepared / "summary.json")
    assert summary["totals"] == {"train": 80, "val": 40, "test": 100}
    assert summary["classes"][3] == {"class": "3", "train": 8, "val": 4, "test": 10}
    assert prepared.meta["class_names"] == [str(c) for c in range(10)]


def test_main_with_test_source_files(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", x=rng.random((30, 5, 5)), y=np.repeat([1, 4], 15))
    np.savez(tmp_path / "test.npz", x=rng.random((8, 5, 5)), y=np.repeat([4, 1], 4))
    config = Config(data=DataConfig(source=str(tmp_path / "train.npz"), test_source=str(tmp_path / "test.npz"),
                                    per_class=None, val_per_class=5, image_size=6))
    prepared = prepare.main(config, tmp_path / "out", progress=False)
    assert prepared.class_names == ("1", "4") and prepared.image_shape == (6, 6, 1)
    assert prepared.train.counts().tolist() == [10, 10] and prepared.test.counts().tolist() == [4, 4]
    # class "1" sits at positions 4..7 of the test file, class "4" at 0..3
    assert prepared.test.index.tolist() == [4, 5, 6, 7, 0, 1, 2, 3] and prepared.test.y.tolist() == [0] * 4 + [1] * 4
    assert data.load_prepared(tmp_path / "out").meta["test_source"].endswith("test.npz")


def test_failed_main_writes_nothing(tmp_path):
    out_dir = tmp_path / "prepared"
    config = Config(data=DataConfig(source="digits", per_class=500))
    with pytest.raises(DataError, match="class '0'"):
        prepare.main(config, out_dir, progress=False)
    assert not out_dir.exists() and list(tmp_path.iterdir()) == []
    # a failed re-run leaves an earlier good output untouched
    prepare.main(Config(data=DataConfig(per_class=2, val_per_class=1, test_per_class=1)), out_dir, progress=False)
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    with pytest.raises(DataError):
        prepare.main(config, out_dir, progress=False)
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before
