"""Benchmark of generation + filtering + PNG writing at MNIST size (28x28), printed as tables.

    nice -n 5 .venv/bin/python bench/bench_generate.py [PREPARED_DIR] [GENERATOR_PT]

PREPARED_DIR defaults to an MNIST 20-per-class split drawn here from ../shared/data/mnist-t10k;
GENERATOR_PT defaults to models/cgan/generator.pt when it exists, else an untrained default-size
cGAN (speed rows only: acceptance rates then mean nothing). Rows:
* samples/s of each step (generate, D, classifier, novelty, PNG) done the batched/sharded way,
  and the textbook way (batches of 64, then a per-sample Python loop), with the speed ratio;
* FLOPs/sample of G + D + classifier (FlopCounterMode) x achieved samples/s as a fraction of the
  dense fp32 matmul rate measured in the same run;
* peak RSS of generating + scoring 10k and 100k samples (a fresh subprocess per size);
* acceptance per filter on the MNIST split (with the given or trained generator).
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

from synthgen import data, filter as flt, generate
from synthgen.config import FilterConfig, GenerateConfig, load_config
from synthgen.filter_outputs import save_png
from synthgen.models import build_generator, load_generator, save_generator

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-t10k"
N_FAST, N_TEXTBOOK = 4096, 512
CLASSIFIER_STEPS = 100  # filter classifier steps (params default 300; fit time is printed)


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def matmul_rate(size: int = 2048, repeats: int = 5) -> float:
    """Dense fp32 FLOP/s of torch.mm on this machine, now."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    _, seconds = timed(lambda: [torch.mm(a, b) for _ in range(repeats)])
    return 2 * size**3 * repeats / seconds


def _fold_parametrizations(network: torch.nn.Module) -> None:
    """Fold spectral norm into plain weights, in place (FlopCounterMode trips on parametrizations).

    Only ever on a freshly loaded model: a deepcopy shares the injected Parametrized* classes,
    so removing the parametrization there would break the original too.
    """
    for module in network.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name)


def flops_per_sample(model_path: Path, classifier, image_shape) -> dict[str, float]:
    n = 64
    labels = torch.zeros(n, dtype=torch.long)
    model = load_generator(model_path, "cpu")
    _fold_parametrizations(model.network)
    _fold_parametrizations(model.discriminator)
    counts = {}
    with torch.inference_mode():
        for name, fn in {
            "G": lambda: model.sample(labels, torch.Generator().manual_seed(0)),
            "D": lambda: model.discriminator_score(torch.zeros(n, *image_shape), labels),
            "classifier": lambda: classifier.model_(torch.zeros(n, *image_shape)),
        }.items():
            with FlopCounterMode(display=False) as counter:
                fn()
            counts[name] = counter.get_total_flops() / n
    return counts


def textbook(model, filters, labels, out_dir: Path) -> float:
    """Batches of 64 from the generator, then score/filter/save each sample in a Python loop."""
    start = time.perf_counter()
    images = []
    for first in range(0, len(labels), 64):
        batch = model.sample(torch.as_tensor(labels[first : first + 64]), torch.Generator().manual_seed(first))
        images.append(data.to_uint8(batch))
    x = np.concatenate(images)
    for i in range(len(x)):
        one_x, one_y = x[i : i + 1], labels[i : i + 1]
        kept = [bool(f.keep(one_x, one_y)[0]) for f in filters.values() if f is not None]  # noqa: F841
        save_png(x[i], out_dir / f"{i}.png")  # every sample, as in the batched rows
    return len(x) / (time.perf_counter() - start)


def rss_child(n_samples: int, model_path: str, prepared_dir: str) -> None:
    """Subprocess body: generate + score (D, novelty) ``n_samples`` shard by shard, print peak RSS (MiB)."""
    prepared = data.load_prepared(prepared_dir)
    config = GenerateConfig(batch_size=1024, shard_size=4096)
    model = generate.load_model(model_path, "cpu")
    filters = flt.fit_filters(FilterConfig(classifier=False), prepared, model, torch.device("cpu"))
    requests = np.full(prepared.n_classes, n_samples // prepared.n_classes)
    with tempfile.TemporaryDirectory() as tmp:
        specs = generate.make_shard_specs(requests, 0, config, model_path, "cpu", tmp)
        for spec in specs:  # generate then score each shard; nothing but the score table accumulates
            generate.run_shard(spec)
            flt.score_shard(flt.ScoreSpec(spec.out_path, filters, 0))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main(prepared_dir: Path | None = None, model_path: Path | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_generate.") as tmp:
        run_all(Path(tmp), prepared_dir, model_path)


def run_all(work: Path, prepared_dir: Path | None, model_path: Path | None) -> None:
    if prepared_dir is None:
        config = load_config(None, [f"data.source={MNIST}", "data.per_class=20", "data.val_per_class=10", "data.test_per_class=10"])
        prepared_dir = work / "prepared"
        data.main(config, prepared_dir, progress=False)
    prepared = data.load_prepared(prepared_dir)
    image_shape = (prepared.image_shape[2], *prepared.image_shape[:2])
    if model_path is None:
        model_path = Path("models/cgan/generator.pt")
    trained = model_path.is_file()
    if not trained:
        model_path = work / "untrained.pt"
        save_generator(build_generator("cgan", prepared.n_classes, image_shape), model_path)
    model = load_generator(model_path, "cpu")
    device = torch.device("cpu")
    filters, fit_s = timed(flt.fit_filters, FilterConfig(classifier_steps=CLASSIFIER_STEPS), prepared, model, device)
    labels = np.repeat(np.arange(prepared.n_classes), N_FAST // prepared.n_classes)
    rows = []
    x, seconds = timed(generate.sample_batches, model, labels, 0, 1024, 0, device)
    rows.append(("generate (batch 1024)", seconds))
    for name in flt.FILTERS:
        _, seconds = timed(filters[name].score, x, labels)
        rows.append((f"filter {name}", seconds))
    png_dir = work / "png"
    png_dir.mkdir()
    _, seconds = timed(lambda: [save_png(image, png_dir / f"{i}.png") for i, image in enumerate(x)])
    rows.append(("PNG write", seconds))
    total = sum(s for _, s in rows)
    rows.append(("end to end (sum)", total))
    table = pd.DataFrame({"step": [r[0] for r in rows], "samples/s": [len(labels) / s for _, s in rows]})
    textbook_dir = work / "textbook"
    textbook_dir.mkdir()
    textbook_rate = textbook(model, filters, labels[:: N_FAST // N_TEXTBOOK][:N_TEXTBOOK], textbook_dir)
    print(f"\n== throughput, {len(labels)} samples at {prepared.image_shape}, torch threads={torch.get_num_threads()} "
          f"(filter fit: {fit_s:.1f} s, generator {'trained: ' + str(model_path) if trained else 'untrained default-size cGAN'})")
    print(table.to_string(index=False, float_format=lambda v: f"{v:,.0f}"))
    print(f"textbook (batches of 64, per-sample loop; {N_TEXTBOOK} samples): {textbook_rate:,.0f} samples/s; "
          f"speed-up of the batched path: {len(labels) / total / textbook_rate:.1f}x")

    flops = flops_per_sample(model_path, filters["classifier"].classifier_, image_shape)
    rate = matmul_rate()
    model_seconds = sum(s for name, s in rows if name.startswith(("generate", "filter discriminator", "filter classifier")))
    achieved = sum(flops.values()) * len(labels) / model_seconds
    print("\n== compute: FLOPs/sample " + ", ".join(f"{k}={v / 1e6:.2f} M" for k, v in flops.items()))
    print(f"dense fp32 mm rate {rate / 1e9:.1f} GFLOP/s; G+D+classifier achieved {achieved / 1e9:.1f} GFLOP/s "
          f"= {achieved / rate:.2f} of the matmul rate (end to end incl. novelty + PNG: {sum(flops.values()) * len(labels) / total / rate:.2f})")

    # a small (base_channels=8) cGAN keeps 100k samples affordable on 2 shared cores; memory per batch, not per count, is the point
    small_path = work / "small.pt"
    save_generator(build_generator("cgan", prepared.n_classes, image_shape, base_channels=8), small_path)
    print("\n== peak RSS (generate + D + novelty scoring of every shard, base_channels=8 cGAN, fresh subprocess per size)")
    for n in (10_000, 100_000):
        out = subprocess.run([sys.executable, __file__, "rss", str(n), str(small_path), str(prepared_dir)], capture_output=True, text=True, check=True)
        print(f"{n:>7} requested: {float(out.stdout.split()[-1]):,.0f} MiB")

    pool = generate.sample_batches(model, np.repeat(np.arange(prepared.n_classes), 200), 0, 1024, 0, device)
    pool_y = np.repeat(np.arange(prepared.n_classes), 200)
    scores = pd.DataFrame(flt.score_candidates(pool, pool_y, filters)).assign(label=pool_y)
    acceptance = scores.groupby("label")[[f"pass_{n}" for n in flt.FILTERS]].mean()
    acceptance["all"] = scores.assign(all=scores[[f"pass_{n}" for n in flt.FILTERS]].all(axis=1)).groupby("label")["all"].mean()
    print(f"\n== acceptance per filter and class (2000 candidates, default filter params but classifier_steps={CLASSIFIER_STEPS}, generator {'trained' if trained else 'UNTRAINED'})")
    print(acceptance.to_string(float_format=lambda v: f"{v:.2f}"))
    print(acceptance.mean().to_frame("mean").T.to_string(float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "rss":
        rss_child(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        main(*(Path(a) for a in sys.argv[1:3]))
