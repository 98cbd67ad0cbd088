"""ImageFolder sources: ``root/<class_name>/**/<image>`` decoded into one :class:`~synthgen.data.LabeledImages`.

Colour in an ImageFolder. Users' folders mix modes (a few grey scans among colour photos, a PNG
with transparency, a GIF with a palette). The networks need one channel count, so a folder is
decoded to ONE mode: grey (C=1) when every image is grey, else RGB (C=3). Refusing mixed folders
would make the user convert files by hand for no gain, and keeping only grey would throw colour
away; converting grey to RGB loses nothing (R = G = B). What was changed is not silent: each kind
of change becomes a line of ``LabeledImages.notes`` ("converted 3 grey images (one channel, or three
equal ones) to RGB (e.g. cat/img7.png)", "painted 2 images with transparency onto white ..."), which ``prepare`` prints and writes
into ``meta.json`` and ``summary.json``. Palette images are decoded to RGB (or grey when their
colours are all grey); an RGB file whose three channels are equal counts as grey.

16-bit grey PNGs are scaled to 8 bits (PIL's own conversion clips them to white), with a note.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image
from rich.progress import track

from synthgen.data import DataError, LabeledImages

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_GREY_MODES = ("1", "L", "LA", "F")
_WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit grey PNGs decode to these
_ALPHA_MODES = ("LA", "PA", "RGBA", "RGBa", "La")


def _list_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Sorted class folders and their files; hidden files/folders (leading '.') are ignored."""
    # classes in sorted order of their NFC names: a folder copied from a Mac (NFD) keeps its label order
    entries = sorted((p for p in root.iterdir() if not p.name.startswith(".")), key=lambda p: unicodedata.normalize("NFC", p.name))
    stray = [p for p in entries if not p.is_dir()]
    if stray:
        raise DataError(f"{stray[0]}: ImageFolder root {root} must hold only class folders")
    if not entries:
        raise DataError(f"{root}: empty directory, expected class folders root/<class_name>/*.png")
    files: list[tuple[Path, int]] = []
    for label, class_dir in enumerate(entries):
        found = [
            p for p in sorted(class_dir.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
        ]
        for path in found:
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise DataError(f"{path}: not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)})")
        if not found:
            raise DataError(f"class {class_dir.name!r} ({class_dir}) has no images")
        files += [(path, label) for path in found]
    return [unicodedata.normalize("NFC", p.name) for p in entries], files


def _decode(path: Path) -> tuple[Image.Image, bool, bool]:
    """Fully decode one file to 'L' (grey), 'RGB' (colour; RGB files with R == G == B count as grey) or, when it has
    an alpha channel or palette transparency, 'RGBA' for :func:`_flatten`.

    Returns the image, whether it has transparency, and whether it was 16-bit grey, which is scaled to 8 bits.
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in _WIDE_GREY_MODES:  # no alpha in these modes
                return _wide_grey_to_l(image), False, True
            if image.mode in _ALPHA_MODES or "transparency" in image.info:
                return image.convert("RGBA"), True, False
            if image.mode in _GREY_MODES:
                return image.convert("L"), False, False
            return _grey_if_equal(image.convert("RGB")), False, False
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: not a readable image ({error})") from None


def _grey_if_equal(rgb: Image.Image) -> Image.Image:
    array = np.asarray(rgb)
    is_grey = np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2])
    return rgb.convert("L") if is_grey else rgb


def _background(rgba: Image.Image) -> int:
    """White (255) behind dark drawn content, black (0) behind light: chosen once per folder, from its first image
    with transparency, so that every image of the folder gets the same background."""
    pixels = np.asarray(rgba)
    drawn = pixels[..., 3] >= 128
    return 0 if drawn.any() and pixels[..., :3][drawn].mean() > 127.5 else 255


def _flatten(rgba: Image.Image, background: int) -> Image.Image:
    """An 'RGBA' image painted onto a plain ``background`` grey level -> 'L' or 'RGB'. Dropping the alpha channel
    kept whatever colour the transparent pixels hold: a glyph drawn only in the alpha channel (one colour on a
    transparent sheet) became a plain square. Fully opaque pixels are unchanged."""
    sheet = Image.new("RGBA", rgba.size, (background, background, background, 255))
    return _grey_if_equal(Image.alpha_composite(sheet, rgba).convert("RGB"))


def _wide_grey_to_l(image: Image.Image) -> Image.Image:
    """A 16-bit grey image (PIL mode "I;16", or "I" in older Pillow versions) -> 'L', 0..65535 scaled to 0..255.

    PIL's ``convert("L")`` clips these modes at 255 instead of scaling, which turns an ordinary
    16-bit scan into a white square. No 8-bit file of the accepted formats decodes to these modes,
    so every such image is scaled the same way (a dark scan stays dark beside a bright one).
    """
    values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) * (255.0 / 65535.0)
    return Image.fromarray(np.round(values).astype(np.uint8), mode="L")


def _count_note(what: str, paths: list[Path], root: Path) -> list[str]:
    """``["<what> (e.g. cat/img7.png)"]`` with ``{n}`` (and plural ``{s}``) filled in; nothing when ``paths`` is empty."""
    if not paths:
        return []
    return [f"{what.format(n=len(paths), s='' if len(paths) == 1 else 's')} (e.g. {paths[0].relative_to(root).as_posix()})"]


def load_image_folder(root: Path, image_size: int | None = None, progress: bool = True) -> LabeledImages:
    """Decode ``root/<class_name>/**/<file>`` with PIL (progress bar while decoding).

    Colour (module docstring): if any image is colour, all images become RGB (C=3) and the grey
    ones are counted in a note; else all are grey 'L' (C=1). Transparency is painted onto a background, with a note. A
    non-image or corrupt/truncated file, a class folder without images, or different image sizes
    while ``image_size`` is null are DataErrors naming the file(s) or class.
    """
    class_names, files = _list_image_folder(root)
    decoded, with_alpha, wide, background = [], [], [], None
    for path, _ in track(files, description=f"decoding {root}", disable=not progress, transient=True):
        image, had_alpha, was_wide = _decode(path)
        if had_alpha:
            background = _background(image) if background is None else background
            image = _flatten(image, background)
        with_alpha += [path] if had_alpha else []
        wide += [path] if was_wide else []
        # resize as we go so only the small copies are held in memory
        decoded.append(image.resize((image_size, image_size), Image.Resampling.BILINEAR) if image_size else image)
    if image_size is None:
        for (path, _), image in zip(files, decoded):
            if image.size != decoded[0].size:
                raise DataError(
                    f"images differ in size: {files[0][0]} is {decoded[0].size[0]}x{decoded[0].size[1]} but {path} is "
                    f"{image.size[0]}x{image.size[1]}; set data.image_size to resize them"
                )
    mode = "RGB" if any(image.mode == "RGB" for image in decoded) else "L"
    grey = [path for (path, _), image in zip(files, decoded) if image.mode == "L"] if mode == "RGB" else []
    sheet, content = ("black", "light") if background == 0 else ("white", "dark")
    notes = (_count_note("converted {n} grey image{s} (one channel, or three equal ones) to RGB", grey, root)
             + _count_note(f"painted {{n}} image{{s}} with transparency onto {sheet} (the first one's content is {content})",
                           with_alpha, root)
             + _count_note("scaled {n} 16-bit grey image{s} to 8 bits", wide, root))
    arrays = [np.asarray(image.convert(mode)) for image in decoded]
    x = np.stack(arrays)
    x = x[..., None] if x.ndim == 3 else x
    y = np.array([label for _, label in files], dtype=np.int64)
    return LabeledImages(x, y, tuple(class_names), np.arange(len(y), dtype=np.int64), tuple(notes))
