"""ImageFolder trees (``root/<class_name>/<sample_id>.png``) written from npz shards, by several processes.

PNG encoding is pure host work (zlib on one core per process, ~20k images/s at 28x28). On a GPU the
generator and every filter run about ten times faster than one core encodes, so a large tree is
written by ``workers`` processes, each given every ``workers``-th shard. Each is a fresh
``python -m synthgen.png_tree`` that imports only numpy and :mod:`synthgen.io`: it starts in about
0.1 s, where a ``spawn`` pool re-imports the caller's main module (torch and all: seconds per
worker) and ``fork`` copies a process whose OpenMP threads may hold locks. Below
:data:`AUTO_MIN_IMAGES` images ``"auto"`` writes in this process (``bench/bench_png.py --tree``).

File names come from the sample ids, so the tree is the same whichever process writes which
shard. Callers write into a temp directory that is swapped in whole (:func:`synthgen.io.atomic_dir`):
a killed run never exposes a partial tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from synthgen.io import encode_png

AUTO_MIN_IMAGES = 10_000  # 2 cores: two writers gain from about 5,000 images on (bench/bench_png.py --tree)


@dataclass(frozen=True)
class ShardJob:
    """Write every image of one npz shard (``x`` uint8 NHWC, ``y``, ``sample_id``) under ``out_dir``."""

    shard: str
    out_dir: str
    class_names: tuple[str, ...]


def save_png(image: np.ndarray, path: Path) -> None:
    """uint8 (H, W, C) -> PNG: grey for one channel, RGB for three (fast zlib level).

    Written in place, not renamed: every PNG lands inside a temp directory that is
    swapped in whole, so a killed run never exposes a partial file.
    """
    with open(path, "wb") as file:
        file.write(encode_png(image))


def write_shard(job: ShardJob) -> int:
    """Write one shard's images as ``out_dir/<class_name>/<sample_id:09d>.png``; returns how many."""
    with np.load(job.shard) as arrays:
        images, labels, sample_ids = arrays["x"], arrays["y"], arrays["sample_id"]
    out_dir = Path(job.out_dir)
    for image, label, sample_id in zip(images, labels, sample_ids):
        save_png(image, out_dir / job.class_names[label] / f"{sample_id:09d}.png")
    return len(labels)


def available_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_workers(workers: int | str, n_images: int, n_shards: int) -> int:
    """Processes to write ``n_images`` in ``n_shards`` shards: ``"auto"`` = every core from
    :data:`AUTO_MIN_IMAGES` images on, else 1; never more than there are shards."""
    if workers == "auto":
        workers = available_cores() if n_images >= AUTO_MIN_IMAGES else 1
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1 or 'auto', got {workers!r}")
    return max(1, min(int(workers), n_shards))


def shard_sizes(shards: list[Path]) -> list[int]:
    """Images per shard, read from the npz headers only (no pixel data)."""
    sizes = []
    for path in shards:
        with np.load(path) as arrays:
            sizes.append(len(arrays["sample_id"]))
    return sizes


def write_tree(shards: list[Path], out_dir: str | Path, class_names, workers: int | str = "auto") -> int:
    """Write every image of ``shards`` as ``out_dir/<class_name>/<sample_id>.png``; returns the number written.

    ``workers`` processes (or ``"auto"``: :func:`resolve_workers`) write every ``workers``-th shard each;
    1 writes in this process. The class directories are made first, every one of them, and one left
    empty gets a hidden ``.keep`` file: DVC stores no empty directory, and without it a checkout would
    drop the class and shift every later class's ImageFolder label by one.
    """
    out_dir, class_names = Path(out_dir), tuple(str(name) for name in class_names)
    for name in class_names:
        (out_dir / name).mkdir(parents=True, exist_ok=True)
    jobs = [ShardJob(str(path), str(out_dir), class_names) for path in shards]
    processes = resolve_workers(workers, sum(shard_sizes(shards)), len(jobs))
    written = sum(write_shard(job) for job in jobs) if processes == 1 else sum(_run_writers([jobs[first::processes] for first in range(processes)]))
    for name in class_names:
        if not any((out_dir / name).iterdir()):
            (out_dir / name / ".keep").write_text(f"No sample of class {name!r} was accepted. This file keeps the class's folder "
                                                  "(and the labels of the classes after it) through DVC.\n")
    return written


def _run_writers(parts: list[list[ShardJob]]) -> list[int]:
    """One ``python -m synthgen.png_tree`` per part, all at once (its jobs as JSON on stdin); each prints how many it wrote."""
    package_root = str(Path(__file__).resolve().parents[1])  # this synthgen, also where it is not installed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    writers, logs = [], [tempfile.TemporaryFile("w+") for _ in parts]  # stderr to files: a full pipe would block a writer
    try:
        for part, log in zip(parts, logs):
            writer = subprocess.Popen([sys.executable, "-m", "synthgen.png_tree"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=log, env=env, text=True)
            writers.append(writer)
            writer.stdin.write(json.dumps([asdict(job) for job in part]))
            writer.stdin.close()
        counts = [writer.stdout.read() for writer in writers]
        for writer, part, log in zip(writers, parts, logs):
            if writer.wait() != 0:
                log.seek(0)
                raise RuntimeError(f"the PNG writer of {[job.shard for job in part]} failed (exit {writer.returncode}): {log.read()[-2000:]}")
        return [int(count) for count in counts]
    finally:  # interrupted, or one failed: no writer outlives the call
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
            writer.stdout.close()
        for log in logs:
            log.close()


if __name__ == "__main__":  # a writer process of _run_writers: jobs on stdin, the count on stdout
    print(sum(write_shard(ShardJob(job["shard"], job["out_dir"], tuple(job["class_names"]))) for job in json.load(sys.stdin)))
