"""Loaders of labeled image sources into memory: sklearn digits, ImageFolder, ``.npz``, MNIST IDX.

Every loader returns a :class:`synthgen.data.LabeledImages` (uint8 (N, H, W, C), int64 labels in
0..K-1, class names) or raises :class:`synthgen.data.DataError` naming the file, field or class at
fault. :func:`load_source` dispatches on the ``data.source`` string; it is pure apart from reading
the source (no writes, no globals). ImageFolders are decoded by :mod:`synthgen.image_folder` (one
colour mode per folder, conversions noted).
"""

from __future__ import annotations

import dataclasses
import gzip
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from synthgen.data import DataError, LabeledImages
from synthgen.image_folder import load_image_folder


def load_source(source: str, image_size: int | None = None, progress: bool = False) -> LabeledImages:
    """Load ``source`` into memory: ``'digits'``, an ImageFolder dir, an ``.npz`` file, or IDX files.

    * ``digits``: sklearn's 8x8 digits (values 0..16 scaled to 0..255), classes "0".."9".
    * ``digits-long-tail`` / ``digits-long-tail-test``: the built-in demo, a fixed long tail of the
      digits (50, 32, 21, 14, 9, 6, 4, 2, 2, 1 images of 0-9) and every other digit as its test set.
    * a directory with ``*-images-idx3-ubyte[.gz]`` + ``*-labels-idx1-ubyte[.gz]`` (or the path of
      the images file): MNIST-style IDX files.
    * another directory: ImageFolder, ``root/<class_name>/**/*.{png,jpg,jpeg,bmp,gif,webp}``,
      classes in sorted name order; see :func:`load_image_folder`.
    * ``*.npz`` with ``x`` (N, H, W[, C]) and ``y`` (N,), optional ``class_names``; see :func:`load_npz`.

    Labels are mapped to ``0..K-1`` in sorted order of their original values (kept as class names),
    so labels {3, 7} become {0, 1} named "3" and "7". When ``image_size`` is set every image is
    resized (PIL bilinear, antialiased when shrinking) to ``image_size x image_size``; otherwise
    images of different sizes are refused. Fewer than two classes is an error.
    """
    if source in BUILTIN_SOURCES:
        images = load_builtin(source)
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"data source not found: {path}")
        if path.is_dir() and _idx_files(path):
            images = load_idx(path)
        elif path.is_dir():
            images = load_image_folder(path, image_size, progress)
        elif path.suffix.lower() == ".npz":
            images = load_npz(path)
        elif "idx3-ubyte" in path.name:
            images = load_idx(path)
        else:
            raise DataError(f"{path}: unsupported data source (expected 'digits', a directory, an .npz or IDX file)")
    if image_size is not None and images.x.shape[1:3] != (image_size, image_size):
        images = dataclasses.replace(images, x=resize_images(images.x, image_size))
    if images.n_classes < 2:
        raise DataError(f"{source}: needs at least 2 classes, found only class {images.class_names!r}")
    return dataclasses.replace(images, class_names=checked_class_names(images.class_names, source))


def checked_class_names(names: tuple[str, ...], origin: str) -> tuple[str, ...]:
    """Class names in Unicode NFC, each usable as one folder name on any system (the accepted set is
    written as ``accepted/<class name>/``); a DataError naming the class otherwise.

    NFC: macOS writes folder names decomposed (NFD), so "café" from a Mac folder and "café" from
    an .npz would otherwise be two different classes that print the same.
    """
    normalized = tuple(unicodedata.normalize("NFC", name) for name in names)
    for name in normalized:
        if not name.strip() or name.startswith(".") or any(c in name for c in "/\\\0"):
            raise DataError(f"{origin}: class name {name!r} cannot name a folder (empty, '.', '..', a leading '.', "
                            "or a '/', '\\' or NUL in it): rename the class")
    folded = [name.casefold() for name in normalized]
    if len(set(folded)) != len(folded):  # one folder on macOS and Windows
        twins = sorted({name for name, key in zip(normalized, folded) if folded.count(key) > 1})
        raise DataError(f"{origin}: class names {twins!r} differ only in case or Unicode form (one folder on macOS "
                        "and Windows): rename one of them")
    return normalized


DEMO_TAIL = (50, 50.0)  # (max, ratio): class c gets round(max * ratio ** (-c / 9)), at least 1
BUILTIN_SOURCES = ("digits", "digits-long-tail", "digits-long-tail-test")


def load_builtin(name: str) -> LabeledImages:
    """The built-in sources (sklearn's digits ship with scikit-learn: nothing is downloaded).

    The demo's long tail is a source of its own rather than ``data.long_tail`` in params.yaml, so
    that pointing ``data.source`` at your folder trains on every image of it, with no cut inherited
    from the demo. The draw is fixed (seed 0, per class), so the two halves never overlap.
    """
    digits = load_digits_images()
    if name == "digits":
        return digits
    maximum, ratio = DEMO_TAIL
    rng = np.random.default_rng(0)
    train = []
    for c in range(digits.n_classes):
        count = max(1, int(np.floor(maximum * ratio ** (-c / (digits.n_classes - 1)) + 0.5)))
        train.append(np.sort(rng.permutation(np.flatnonzero(digits.y == c))[:count]))
    train_rows = np.concatenate(train)
    rows = train_rows if name == "digits-long-tail" else np.setdiff1d(np.arange(len(digits.y)), train_rows)
    return digits.subset(rows)


def resize_images(x: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 (N, H, W, C) -> uint8 (N, S, S, C), PIL bilinear per image."""
    return np.stack([_resize(image, image_size) for image in x]) if len(x) else x


def _resize(image: np.ndarray, image_size: int) -> np.ndarray:
    """(H, W, C) uint8 -> (S, S, C) uint8."""
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    resized = np.asarray(pil.resize((image_size, image_size), Image.Resampling.BILINEAR))
    return resized[..., None] if resized.ndim == 2 else resized


def _relabel(x: np.ndarray, raw_labels: np.ndarray, names: list[str] | None, origin: str) -> LabeledImages:
    """Map sorted unique raw label values to 0..K-1; name classes by ``names[value]`` or the value."""
    if len(x) == 0:
        raise DataError(f"{origin}: holds no images")
    values, y = np.unique(raw_labels, return_inverse=True)
    if names is None:
        class_names = tuple(str(value) for value in values)
    else:
        missing = sorted(set(range(len(names))) - set(values.tolist()))
        if missing:
            label = missing[0]
            raise DataError(f"{origin}: class_names lists {names[label]!r} but y has no image of label {label}")
        class_names = tuple(names)
    return LabeledImages(x, y.astype(np.int64), class_names, np.arange(len(y), dtype=np.int64))


def load_digits_images() -> LabeledImages:
    """sklearn ``load_digits``: 1797 images 8x8x1, 0..16 scaled to 0..255 uint8."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return _relabel(x, digits.target, None, "digits")


def load_npz(path: Path) -> LabeledImages:
    """``x`` uint8 as is, or float/int all within [0, 1] (scaled x255) or [0, 255]; ``y`` integers >= 0,
    or strings (then they are the class names, in sorted order).

    Anything else (NaN/inf, values outside both ranges, negative or non-integer labels, x/y length
    mismatch) is a DataError naming the field and the count of bad values. An optional string
    array ``class_names`` names labels 0..K-1 (then every label must be present).
    """
    try:
        with np.load(path, allow_pickle=False) as arrays:
            fields = {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DataError(f"{path}: cannot read as .npz ({error})") from None
    for key in ("x", "y"):
        if key not in fields:
            raise DataError(f"{path}: missing array {key!r} (found {sorted(fields)})")
    x, y = fields["x"], fields["y"]
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{path}: field 'x' must have shape (N, H, W) or (N, H, W, C) with C in 1, 3; got {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{path}: field 'x' has {len(x)} images but field 'y' has shape {y.shape}")
    if len(x) == 0:
        raise DataError(f"{path}: holds no images (field 'x' has shape {x.shape})")
    x = _to_uint8_checked(x, f"{path}: field 'x'")
    if y.dtype.kind in "SU":  # class names as labels: classes in sorted name order
        if "class_names" in fields:
            raise DataError(f"{path}: field 'y' holds names, so field 'class_names' must be left out")
        return _relabel(x, np.array([_name_text(label, f"{path}: field 'y'") for label in y]), None, str(path))
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: field 'y' must hold integer labels or class names, got dtype {y.dtype}")
    if (bad := int((y < 0).sum())) > 0:
        raise DataError(f"{path}: field 'y' has {bad} negative labels")
    names = None
    if "class_names" in fields:
        names = [_name_text(name, f"{path}: field 'class_names'") for name in np.asarray(fields["class_names"]).ravel()]
        if len(set(names)) != len(names) or int(y.max()) >= len(names):
            raise DataError(f"{path}: field 'class_names' must hold {int(y.max()) + 1}+ unique names, got {names}")
    return _relabel(x, y, names, str(path))


def _name_text(name, origin: str) -> str:
    """A class name as NFC text: byte strings (numpy ``S`` arrays, as h5py writes them) decoded as UTF-8."""
    try:
        text = name.decode("utf-8") if isinstance(name, bytes) else str(name)
    except UnicodeDecodeError:
        raise DataError(f"{origin}: {bytes(name)!r} is not UTF-8 text") from None
    return unicodedata.normalize("NFC", text)


def _to_uint8_checked(x: np.ndarray, origin: str) -> np.ndarray:
    """Validate pixel values and convert to uint8 (see :func:`load_npz` for the accepted ranges)."""
    if x.dtype == np.uint8:
        return x
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{origin} must be numeric, got dtype {x.dtype}")
    values = x.astype(np.float64)
    if (bad := int((~np.isfinite(values)).sum())) > 0:
        raise DataError(f"{origin} has {bad} NaN/inf values")
    if np.issubdtype(x.dtype, np.floating) and values.min() >= 0 and values.max() <= 1:
        values = values * 255.0
    if (bad := int(((values < 0) | (values > 255)).sum())) > 0:
        raise DataError(f"{origin} has {bad} values outside [0, 1] (floats) or [0, 255]")
    return np.round(values).astype(np.uint8)


# ---------------------------------------------------------------------- IDX files
def _idx_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and "-images-idx3-ubyte" in p.name)


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot read ({error}); the file may be truncated or corrupt") from None


def _parse_idx(path: Path, magic: int, n_dims: int) -> np.ndarray:
    """Big-endian header: int32 magic, ``n_dims`` int32 sizes; then uint8 data of exactly that size."""
    raw = _read_maybe_gzip(path)
    header_bytes = 4 * (1 + n_dims)
    if len(raw) < header_bytes:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    header = np.frombuffer(raw, dtype=">i4", count=1 + n_dims)
    if int(header[0]) != magic:
        raise DataError(f"{path}: bad IDX magic number {int(header[0])}, expected {magic}")
    shape = tuple(int(v) for v in header[1:])
    expected = header_bytes + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(
            f"{path}: IDX header says {shape} ({expected} bytes) but the file has {len(raw)} bytes (truncated?)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(shape)


def load_idx(path: Path) -> LabeledImages:
    """MNIST-style IDX: ``path`` is the images file or a directory holding exactly one images file."""
    if path.is_dir():
        candidates = _idx_files(path)
        if len(candidates) != 1:
            raise DataError(f"{path}: expected one *-images-idx3-ubyte[.gz] file, found {[p.name for p in candidates]}")
        path = candidates[0]
    stem = path.name.replace("-images-idx3-ubyte", "-labels-idx1-ubyte").removesuffix(".gz")
    labels_path = next((p for p in (path.with_name(stem + ".gz"), path.with_name(stem)) if p.is_file()), None)
    if labels_path is None:
        raise DataError(f"{path}: labels file {stem}[.gz] not found next to it")
    x = _parse_idx(path, 2051, 3)[..., None]
    y = _parse_idx(labels_path, 2049, 1)
    if len(x) != len(y):
        raise DataError(f"{path} has {len(x)} images but {labels_path} has {len(y)} labels")
    return _relabel(x, y, None, str(path))
