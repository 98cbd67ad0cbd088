"""PNG encoding in memory: synthgen's hand-written encoder (synthgen.io.encode_png) against Pillow;
with ``--tree``, writing an ImageFolder tree to disk from npz shards by 1 process against a pool.

    nice -n 5 .venv/bin/python bench/bench_png.py [--images 4096] [--repeats 5]
    .venv/bin/python bench/bench_png.py --tree --images 65536 --repeats 3 [--dir /tmp]

Encodes N 28x28 grey images (the real MNIST t10k digits from ../shared/data/mnist-t10k when
present, else smooth synthetic digits-like blobs) and N 32x32 RGB images (smooth random colour
fields plus a little noise, CIFAR-like statistics) to bytes in memory (no disk), one image at a
time as `filter` writes the accepted set, on one thread. Prints a markdown table: median images/s
over the repeats, mean bytes per image, and whether every PNG decodes (Pillow) to the input.
Rows: encode_png at zlib level 1 (what `filter` uses), Pillow at compress_level=1, Pillow at its
default (compress_level=6).

``--tree``: the 28x28 grey images as npz shards of 4,096 (``generate.shard_size``), then the tree
``<dir>/<class>/<sample_id>.png`` (10 classes) written by :func:`synthgen.png_tree.write_tree` with
1 process (what ``filter`` did before ``filter.write_workers``), with every core, and with
``auto``; runs interleaved, median images/s (the disk is measured too), trees checked identical.
"""

from __future__ import annotations

import argparse
import gzip
import io
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from synthgen.io import encode_png, save_npz  # noqa: E402
from synthgen.png_tree import available_cores, write_tree  # noqa: E402

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-t10k" / "t10k-images-idx3-ubyte.gz"


def grey_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    if MNIST.is_file():
        with gzip.open(MNIST) as handle:
            data = np.frombuffer(handle.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
        return data[np.arange(n) % len(data), :, :, None].copy(), "MNIST t10k"
    coarse = rng.random((n, 7, 7)) > 0.6  # blobs on a dark background, like a digit
    images = np.kron(coarse, np.ones((4, 4))) * rng.integers(180, 256, (n, 1, 1))
    return images.astype(np.uint8)[..., None], "synthetic blobs (MNIST not found)"


def rgb_images(n: int, rng: np.random.Generator) -> np.ndarray:
    coarse = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.float32)
    smooth = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)
    return np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)


def pillow(level: int):
    def encode(image: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(buffer, format="PNG", compress_level=level)
        return buffer.getvalue()

    return encode


def measure(encode, images: np.ndarray, repeats: int) -> tuple[float, float, bool]:
    """(median images/s, mean bytes, every PNG decodes to its input)."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        encoded = [encode(image) for image in images]
        rates.append(len(images) / (time.perf_counter() - start))
    decoded = [np.asarray(Image.open(io.BytesIO(data))) for data in encoded[:256]]
    exact = all(np.array_equal(d.reshape(i.shape), i) for d, i in zip(decoded, images[:256]))
    return float(np.median(rates)), float(np.mean([len(data) for data in encoded])), exact


def tree(images: np.ndarray, repeats: int, directory: str | None) -> None:
    """Write ``images`` as an ImageFolder tree by 1 process, by every core and by ``auto``; print the table."""
    work = Path(tempfile.mkdtemp(prefix="bench-png-tree.", dir=directory))
    try:
        shards = []
        for start in range(0, len(images), 4096):
            path = work / f"shard-{len(shards):05d}.npz"
            ids = np.arange(start, min(start + 4096, len(images)))
            save_npz(path, x=images[ids], y=ids % 10, sample_id=ids)
            shards.append(path)
        ways = {"1 process (before)": 1, f"{available_cores()} processes": available_cores(), "auto (the default)": "auto"}
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        for run in range(repeats):
            for name, workers in ways.items():
                out = work / f"tree-{run}-{len(seconds[name])}-{workers}"
                start = time.perf_counter()
                write_tree(shards, out, [str(c) for c in range(10)], workers)
                seconds[name].append(time.perf_counter() - start)
                if run == 0:
                    assert len(list(out.rglob("*.png"))) == len(images), name
                # trees are kept until the end: deleting files on a disk mounted with `discard` slows the next writes
        print(f"| tree of {len(images):,} 28x28 PNGs in {len(shards)} shards | images/s | vs 1 process |")
        print("| --- | ---: | ---: |")
        before = len(images) / float(np.median(seconds["1 process (before)"]))
        for name in ways:
            rate = len(images) / float(np.median(seconds[name]))
            print(f"| {name} | {rate:,.0f} | {rate / before:.2f}x |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tree", action="store_true", help="Write an ImageFolder tree to disk: 1 process against a pool.")
    parser.add_argument("--dir", default=None, help="Where the --tree work directory goes (default: the system temp dir).")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    grey, grey_source = grey_images(args.images, rng)
    if args.tree:
        print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}\n{grey_source}, median of {args.repeats} interleaved runs\n")
        tree(grey, args.repeats, args.dir)
        return
    sets = {f"28x28 grey ({grey_source})": grey, "32x32 RGB (smooth random fields)": rgb_images(args.images, rng)}
    encoders = {
        "synthgen encode_png, zlib level 1": lambda image: encode_png(image, 1),
        "Pillow, compress_level=1": pillow(1),
        "Pillow, compress_level=6 (default)": pillow(6),
    }
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"{args.images} images per set, in memory, one thread, median of {args.repeats} runs; "
          f"Pillow {Image.__version__}, Python {platform.python_version()}, {platform.machine()}\n")
    print("| images | encoder | images/s | bytes/image | vs encode_png | decodes exactly |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for set_name, images in sets.items():
        baseline = None
        for encoder_name, encode in encoders.items():
            rate, size, exact = measure(encode, images, args.repeats)
            baseline = baseline or rate
            print(f"| {set_name} | {encoder_name} | {rate:,.0f} | {size:,.0f} | {rate / baseline:.2f}x | {exact} |")


if __name__ == "__main__":
    main()
