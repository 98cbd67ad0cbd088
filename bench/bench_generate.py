"""Benchmark of generation + filtering + PNG writing at MNIST size (28x28), printed as tables.

    nice -n 5 .venv/bin/python bench/bench_generate.py [PREPARED_DIR] [GENERATOR_PT] [--device cuda]
        [--samples N] [--batch-size B] [--work-dir DIR] [--rss-sizes 10000,100000,1000000] [--rss-only]

PREPARED_DIR defaults to an MNIST 20-per-class split drawn here from ../shared/data/mnist-t10k;
GENERATOR_PT defaults to models/cgan/generator.pt when it exists, else an untrained default-size
cGAN (speed rows only: acceptance rates then mean nothing). Rows:
* samples/s of each step (generate, D, classifier, novelty, PNG) done the batched/sharded way,
  and the textbook way (the generator as trained in batches of 64, then filters and a Pillow PNG
  per sample in a Python loop), with the speed ratio;
* FLOPs/sample of G + D + classifier (FlopCounterMode; G both as executed, fused, and as trained)
  x achieved samples/s as a fraction of the
  dense matmul rate measured in the same run, in the precision sampling runs in (fp32 on the CPU,
  bf16 under autocast on CUDA);
* peak RSS of generating + scoring 10k and 100k samples (``--rss-sizes``; a fresh subprocess per size;
  ``--rss-only`` prints only these rows);
* acceptance per filter on the MNIST split (with the given or trained generator).
"""

from __future__ import annotations

import copy
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

from synthgen import data, filter as flt, generate, prepare
from synthgen.tensors import to_uint8
from synthgen.config import FilterConfig, GenerateConfig, load_config
from synthgen.io import save_npz
from synthgen.host_memory import keep_freed_memory
from synthgen.png_tree import resolve_workers, write_tree
from synthgen.models import build_generator, load_generator, save_generator

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-t10k"
N_FAST, N_TEXTBOOK = 4096, 512
CLASSIFIER_STEPS = 100  # filter classifier steps (params default 300; fit time is printed)
REPEATS = 3  # each throughput row is the median of this many timed runs (PNG writing into a fresh dir each time)


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def median_timed(fn, *args):
    """(last output, median seconds over ``REPEATS`` runs)."""
    times = []
    for _ in range(REPEATS):
        out, seconds = timed(fn, *args)
        times.append(seconds)
    return out, float(np.median(times))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Dense FLOP/s of torch.mm here, now: fp32 on the CPU, bf16 (what autocast runs) on CUDA."""
    if device.type == "cuda":
        size, repeats, dtype = 8192, 20, torch.bfloat16
    else:
        dtype = torch.float32
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


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
    if model.has_discriminator:
        _fold_parametrizations(model.discriminator)
    counts = {}
    with torch.inference_mode():
        for name, fn in {
            "G": lambda: model.sample(labels, torch.Generator().manual_seed(0)),  # the fused network sampling runs
            "G as trained": lambda: model.network(torch.randn(n, model.latent_dim), labels),  # BN + upsample + 3x3 conv
            "D": (lambda: model.discriminator_score(torch.zeros(n, *image_shape), labels)) if model.has_discriminator else None,
            "classifier": lambda: classifier.model_(torch.zeros(n, *image_shape, device=next(classifier.model_.parameters()).device)),
        }.items():
            if fn is None:  # a cVAE has no discriminator
                counts[name] = 0.0
                continue
            with FlopCounterMode(display=False) as counter:
                fn()
            counts[name] = counter.get_total_flops() / n
    return counts


def textbook(model, filters, labels, out_dir: Path, device: torch.device) -> float:
    """Batches of 64 from the generator as trained (not fused), then score/filter/save (Pillow) each sample in a Python loop."""
    model = copy.copy(model)
    model.sampler = None  # sample through the training module: BN, upsample, 3x3 conv
    start = time.perf_counter()
    images = []
    for first in range(0, len(labels), 64):
        batch = model.sample(torch.as_tensor(labels[first : first + 64], device=device), torch.Generator().manual_seed(first))
        images.append(to_uint8(batch))
    x = np.concatenate(images)
    for i in range(len(x)):
        one_x, one_y = x[i : i + 1], labels[i : i + 1]
        kept = [bool(f.keep(one_x, one_y)[0]) for f in filters.values() if f is not None]  # noqa: F841
        Image.fromarray(x[i, ..., 0] if x.shape[-1] == 1 else x[i]).save(out_dir / f"{i}.png")  # every sample, as in the batched rows
    return len(x) / (time.perf_counter() - start)


def rss_child(n_samples: int, model_path: str, prepared_dir: str, device: str) -> None:
    """Subprocess body: generate + score (D, novelty) ``n_samples`` shard by shard, print peak RSS (MiB)."""
    keep_freed_memory()  # as the CLI runs the stages (SYNTHGEN_HOST_MEMORY=default: glibc's own malloc)
    prepared = data.load_prepared(prepared_dir)
    config = GenerateConfig(batch_size=1024, shard_size=4096)
    model = generate.load_model(model_path, device)
    filters = flt.fit_filters(FilterConfig(classifier=False, discriminator_source="model"), prepared, model, torch.device(device))
    requests = np.full(prepared.n_classes, n_samples // prepared.n_classes)
    with tempfile.TemporaryDirectory() as tmp:
        specs = generate.make_shard_specs(requests, 0, config, model_path, device, tmp)
        for spec in specs:  # generate then score each shard; nothing but the score table accumulates
            generate.run_shard(spec)
            flt.score_shard(flt.ScoreSpec(spec.out_path, filters, 0))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main(prepared_dir: Path | None = None, model_path: Path | None = None, device: str = "cpu",
         n_samples: int = N_FAST, batch_size: int = 1024, work_dir: Path | None = None,
         rss_sizes: tuple[int, ...] = (10_000, 100_000), rss_only: bool = False) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_generate.", dir=work_dir) as tmp:
        if rss_only:
            prepared_dir = prepared_dir or default_prepared(Path(tmp))
            peak_rss(Path(tmp), prepared_dir, data.load_prepared(prepared_dir), torch.device(device), rss_sizes)
        else:
            run_all(Path(tmp), prepared_dir, model_path, torch.device(device), n_samples, batch_size, rss_sizes)


def default_prepared(work: Path) -> Path:
    """An MNIST 20-per-class split drawn from ../shared, in ``work``."""
    config = load_config(None, [f"data.source={MNIST}", "data.per_class=20", "data.val_per_class=10", "data.test_per_class=10"])
    prepare.main(config, work / "prepared", progress=False)
    return work / "prepared"


def peak_rss(work: Path, prepared_dir: Path, prepared, device: torch.device, sizes: tuple[int, ...]) -> None:
    """Peak RSS of generate + D + novelty scoring, shard by shard, for each requested count (a fresh subprocess each)."""
    # a small (base_channels=8) cGAN keeps 100k samples affordable on 2 shared cores; memory per batch, not per count, is the point
    image_shape = (prepared.image_shape[2], *prepared.image_shape[:2])
    small_path = work / "small.pt"
    save_generator(build_generator("cgan", prepared.n_classes, image_shape, base_channels=8), small_path)
    print("\n== peak RSS (generate + D + novelty scoring of every shard, base_channels=8 cGAN, fresh subprocess per size)")
    for n in sizes:
        started = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "rss", str(n), str(small_path), str(prepared_dir), str(device)],
                             capture_output=True, text=True, check=True)
        print(f"{n:>9,} requested: {float(out.stdout.split()[-1]):,.0f} MiB ({time.perf_counter() - started:,.0f} s)", flush=True)


def run_all(work: Path, prepared_dir: Path | None, model_path: Path | None, device: torch.device, n_samples: int, batch_size: int,
            rss_sizes: tuple[int, ...] = (10_000, 100_000)) -> None:
    if prepared_dir is None:
        prepared_dir = default_prepared(work)
    prepared = data.load_prepared(prepared_dir)
    image_shape = (prepared.image_shape[2], *prepared.image_shape[:2])
    if model_path is None:
        model_path = Path("models/cgan/generator.pt")
    trained = model_path.is_file()
    if not trained:
        model_path = work / "untrained.pt"
        save_generator(build_generator("cgan", prepared.n_classes, image_shape), model_path)
    model = load_generator(model_path, device)
    latent = generate.resolve_latent("auto", model)  # as `synthgen generate` samples: interpolation for a cVAE
    filter_config = FilterConfig(classifier_steps=CLASSIFIER_STEPS)  # the posthoc discriminator learns from reference samples
    fakes = flt.reference_samples(model, prepared.n_classes, filter_config, GenerateConfig(), str(device), latent)
    filters, fit_s = timed(flt.fit_filters, filter_config, prepared, model, device, fakes)
    labels = np.repeat(np.arange(prepared.n_classes), n_samples // prepared.n_classes)
    active = [name for name in flt.FILTERS if filters.get(name) is not None]  # every filter that is on
    warm = generate.sample_batches(model, labels[:batch_size], 0, batch_size, 0, device, latent)  # kernels picked, memory pooled
    for name in active:
        filters[name].score(warm, labels[:batch_size])
    rows = []
    x, seconds = median_timed(generate.sample_batches, model, labels, 0, batch_size, 0, device, latent)
    rows.append((f"generate (batch {batch_size}, {latent})", seconds))
    for name in active:
        _, seconds = median_timed(filters[name].score, x, labels)
        rows.append((f"filter {name}", seconds))

    shard_dir = Path(tempfile.mkdtemp(prefix="accepted-shards.", dir=work))  # what filter writes before the tree
    shards = []
    for start in range(0, len(x), 4096):
        shards.append(save_npz(shard_dir / f"shard-{len(shards):05d}.npz", x=x[start : start + 4096], y=labels[start : start + 4096],
                               sample_id=np.arange(start, start + len(x[start : start + 4096]))))

    def write_pngs(workers) -> None:
        write_tree(shards, Path(tempfile.mkdtemp(prefix="png.", dir=work)), [str(c) for c in range(prepared.n_classes)], workers)

    _, seconds = median_timed(write_pngs, 1)
    rows.append(("PNG tree, 1 process (before)", seconds))
    _, seconds = median_timed(write_pngs, "auto")
    rows.append((f"PNG tree, filter.write_workers auto ({resolve_workers('auto', len(x), len(shards))} processes)", seconds))
    total = sum(s for name, s in rows if "(before)" not in name)
    rows.append(("end to end (sum)", total))
    table = pd.DataFrame({"step": [r[0] for r in rows], "samples/s": [len(labels) / s for _, s in rows]})
    textbook_dir = work / "textbook"
    textbook_dir.mkdir()
    textbook_rate = textbook(model, filters, labels[:: max(1, len(labels) // N_TEXTBOOK)][:N_TEXTBOOK], textbook_dir, device)
    print(f"\n== throughput on {describe(device)}, {len(labels)} samples at {prepared.image_shape}, torch threads={torch.get_num_threads()}, "
          f"median of {REPEATS} runs per step "
          f"(filter fit: {fit_s:.1f} s, generator {'trained: ' + str(model_path) if trained else 'untrained default-size cGAN'})")
    print(table.to_string(index=False, float_format=lambda v: f"{v:,.0f}"))
    print(f"textbook (batches of 64, per-sample loop; {N_TEXTBOOK} samples): {textbook_rate:,.0f} samples/s; "
          f"speed-up of the batched path: {len(labels) / total / textbook_rate:.1f}x")

    flops = flops_per_sample(model_path, filters["classifier"].classifier_, image_shape)
    rate = matmul_rate(device)
    model_seconds = sum(s for name, s in rows if name.startswith(("generate", "filter discriminator", "filter classifier")))
    print("\n== compute: FLOPs/sample " + ", ".join(f"{k}={v / 1e6:.2f} M" for k, v in flops.items()))
    print(f"dense {'bf16' if device.type == 'cuda' else 'fp32'} mm rate {rate / 1e9:,.1f} GFLOP/s")
    for label, generator_key in (("executed (fused G)", "G"), ("architecture (G as trained)", "G as trained")):
        per_sample = flops[generator_key] + flops["D"] + flops["classifier"]
        print(f"FLOPs {label}: {per_sample / 1e6:.1f} M/sample; compute-bound rate {rate / per_sample:,.0f} samples/s; "
              f"G+D+classifier at {per_sample * len(labels) / model_seconds / rate:.2f} of it, "
              f"end to end incl. novelty + PNG at {per_sample * len(labels) / total / rate:.2f}")

    peak_rss(work, prepared_dir, prepared, device, rss_sizes)

    pool = generate.sample_batches(model, np.repeat(np.arange(prepared.n_classes), 200), 0, batch_size, 0, device, latent)
    pool_y = np.repeat(np.arange(prepared.n_classes), 200)
    scores = pd.DataFrame(flt.score_candidates(pool, pool_y, filters)).assign(label=pool_y)
    acceptance = scores.groupby("label")[[f"pass_{n}" for n in flt.FILTERS]].mean()
    acceptance["all"] = scores.assign(all=scores[[f"pass_{n}" for n in flt.FILTERS]].all(axis=1)).groupby("label")["all"].mean()
    print(f"\n== acceptance per filter and class (2000 candidates, default filter params but classifier_steps={CLASSIFIER_STEPS}, generator {'trained' if trained else 'UNTRAINED'})")
    print(acceptance.to_string(float_format=lambda v: f"{v:.2f}"))
    print(acceptance.mean().to_frame("mean").T.to_string(float_format=lambda v: f"{v:.2f}"))


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (bf16 autocast)"
    return f"CPU x{torch.get_num_threads()} threads (fp32)"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "rss":
        rss_child(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
    else:
        import argparse

        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("prepared_dir", nargs="?", type=Path)
        parser.add_argument("model_path", nargs="?", type=Path)
        parser.add_argument("--device", default="cpu", help="cpu | cuda")
        parser.add_argument("--samples", type=int, default=N_FAST, help="samples in the throughput rows")
        parser.add_argument("--batch-size", type=int, default=1024)
        parser.add_argument("--work-dir", type=Path, help="where the PNGs are written (default: the system temp dir); "
                            "PNG rows measure this disk as much as the encoder")
        parser.add_argument("--rss-sizes", default="10000,100000", help="requested counts of the peak-RSS rows, comma-separated")
        parser.add_argument("--rss-only", action="store_true", help="print only the peak-RSS rows")
        args = parser.parse_args()
        main(args.prepared_dir, args.model_path, args.device, args.samples, args.batch_size, args.work_dir,
             tuple(int(n) for n in args.rss_sizes.split(",") if n), args.rss_only)
