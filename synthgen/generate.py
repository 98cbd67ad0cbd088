"""Class-balanced generation plan and sharded candidate sampling (stage ``generate``).

* :func:`compute_quotas` turns real per-class train counts into synthetic quotas
  (``to_max``: lift every class to the largest; ``to_count``: lift every class to ``count``;
  ``ratio``: a budget of ``ratio`` x all real images, water-filled into the smallest classes
  first, i.e. ``ratio`` x real per class when the data is balanced). ``min_per_class`` is a floor.
* Sample ids are global integers. Batch ``k`` holds ids ``[k*B, (k+1)*B)`` (``B`` =
  ``generate.batch_size``) and draws its noise from a ``torch.Generator`` seeded by
  ``SeedSequence([generate.seed, k])``: sample ``i`` is reproducible from its id alone (given seed,
  batch size and the label plan), whatever the shard size or executor.
* Shards (``shard-00000.npz``: ``x`` uint8 NHWC, ``y`` int64, ``sample_id`` int64) are written by
  the workers themselves, so memory stays flat however many samples are requested.
* :func:`generate_candidates` is the in-memory core (a generator object in, arrays out) that the
  notebook sampler uses; it returns for given ids exactly the samples the shards hold.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from synthgen.config import Config, ConfigError, GenerateConfig
from synthgen.artifacts import POOL_SUMMARY
from synthgen.data import DataError, PreparedData, load_prepared
from synthgen.device import autocast, resolve_device
from synthgen.executor import map_shards
from synthgen.io import atomic_dir, atomic_write_text, save_npz, sha256_file, write_json
from synthgen.tensors import to_uint8



# ------------------------------------------------------------------------ quotas
def _water_fill(real_counts: np.ndarray, budget: int) -> np.ndarray:
    """Give ``budget`` samples to the smallest classes first, so totals end as level as possible."""
    quotas = np.zeros_like(real_counts)
    for _ in range(int(budget)):  # budget is at most a few x the real data: a loop is clear and cheap
        totals = real_counts + quotas
        quotas[int(np.argmin(totals))] += 1  # ties go to the lowest class index
    return quotas


def compute_quotas(real_counts: np.ndarray, config: GenerateConfig) -> np.ndarray:
    """Synthetic samples wanted per class (int64, (K,)); minority classes always get the most."""
    real_counts = np.asarray(real_counts, dtype=np.int64)
    if config.balance == "to_max":
        quotas = real_counts.max() - real_counts
    elif config.balance == "to_count":
        quotas = np.maximum(config.count - real_counts, 0)
    elif config.balance == "ratio":
        quotas = _water_fill(real_counts, round(config.ratio * real_counts.sum()))
    else:  # pragma: no cover - the config validates the literal
        raise ValueError(f"unknown balance mode {config.balance!r}")
    return np.maximum(quotas, config.min_per_class).astype(np.int64)


def first_round_requests(quotas: np.ndarray, oversample: float) -> np.ndarray:
    """Candidates to draw per class before any acceptance rate is known."""
    return np.ceil(np.asarray(quotas) * oversample).astype(np.int64)


def plan_table(real_counts: np.ndarray, quotas: np.ndarray, requests: np.ndarray, class_names) -> pd.DataFrame:
    return pd.DataFrame(
        {"class": list(class_names), "label": np.arange(len(class_names)), "real": real_counts, "quota": quotas, "request": requests}
    )


# ---------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class ShardSpec:
    """One unit of generation work; picklable, so any executor can run it."""

    index: int
    model_path: str
    labels: np.ndarray  # (n,) int64 class of each sample, in sample-id order
    first_id: int  # sample id of labels[0]; a multiple of batch_size
    batch_size: int
    seed: int
    device: str
    out_path: str | None = None  # write the shard here and return a summary; None returns arrays
    latent: str = "prior"  # "prior" or "interpolate" (resolved from generate.latent, see resolve_latent)
    latent_noise: float | None = None  # None: the model's own (generate.latent_noise: auto)
    borrow_below: int = 0  # generate.borrow_style_below (interpolate only)


def batch_seed(seed: int, batch_index: int) -> int:
    """Deterministic 63-bit seed of generation batch ``batch_index``."""
    state = np.random.SeedSequence([int(seed), int(batch_index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def resolve_latent(mode: str, model) -> str:
    """``generate.latent`` for this generator: ``auto`` is ``interpolate`` when it has a latent bank (cVAE)."""
    if mode == "auto":
        return "interpolate" if model.can_interpolate else "prior"
    if mode == "interpolate" and not model.can_interpolate:
        raise DataError(f"generate.latent=interpolate needs a generator with a latent bank (cvae, vaegan); this {model.kind} has none (use prior or auto)")
    return mode


def sample_batches(model, labels: np.ndarray, first_id: int, batch_size: int, seed: int, device: torch.device,
                   latent: str = "prior", latent_noise: float | None = None, borrow_below: int = 0) -> np.ndarray:
    """Sample ``labels`` (ids ``first_id...``) batch by batch; returns uint8 (n, H, W, C)."""
    if first_id % batch_size:
        raise ValueError(f"first_id {first_id} is not a multiple of batch_size {batch_size}")
    outputs = []
    for start in range(0, len(labels), batch_size):
        # a CPU generator: the noise (hence sample i) is the same on every device
        generator = torch.Generator().manual_seed(batch_seed(seed, (first_id + start) // batch_size))
        batch = torch.as_tensor(labels[start : start + batch_size], dtype=torch.long, device=device)
        with torch.inference_mode(), autocast(device):
            outputs.append(to_uint8(model.sample(batch, generator, latent=latent, latent_noise=latent_noise, borrow_below=borrow_below)))
    if not outputs:
        channels, height, width = model.image_shape
        return np.zeros((0, height, width, channels), dtype=np.uint8)
    return np.concatenate(outputs)


@functools.lru_cache(maxsize=2)
def _cached_generator(path: str, device: str, mtime_ns: int):
    from synthgen.models import load_generator

    return load_generator(path, torch.device(device))  # networks come back in eval mode


def load_model(path: str | Path, device: str | torch.device):
    """Load (once per process and file version) the generator at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"generator weights {path} not found: run `synthgen train` first")
    return _cached_generator(str(path), str(device), path.stat().st_mtime_ns)


def sample_shard(spec: ShardSpec, model) -> dict[str, np.ndarray]:
    """The candidates of ``spec`` from ``model``, in memory: x uint8 (n, H, W, C), y, sample_id."""
    x = sample_batches(model, spec.labels, spec.first_id, spec.batch_size, spec.seed, torch.device(spec.device), spec.latent,
                       spec.latent_noise, spec.borrow_below)
    return {"x": x, "y": spec.labels.astype(np.int64), "sample_id": spec.first_id + np.arange(len(spec.labels), dtype=np.int64)}


def run_shard(spec: ShardSpec) -> dict:
    """Generate one shard with the generator at ``spec.model_path``; top-level so process and Dask workers can unpickle it."""
    arrays = sample_shard(spec, load_model(spec.model_path, torch.device(spec.device)))
    if spec.out_path is None:
        return arrays
    save_npz(spec.out_path, **arrays)
    return {"path": Path(spec.out_path).name, "n": len(arrays["y"])}


def request_labels(requests: np.ndarray) -> np.ndarray:
    """The class of each requested candidate in sample-id order: ids are assigned class by class."""
    return np.repeat(np.arange(len(requests), dtype=np.int64), requests)


def requested_latent_noise(config: GenerateConfig) -> float | None:
    """``generate.latent_noise`` as sampling takes it: None (the model's own noise) for auto."""
    return None if config.latent_noise == "auto" else config.latent_noise


def _spec(index: int, labels: np.ndarray, first_id: int, config: GenerateConfig, model_path, device: str, out_path: str | None,
          latent: str) -> ShardSpec:
    return ShardSpec(index, str(model_path), labels, first_id, config.batch_size, config.seed, device, out_path, latent,
                     requested_latent_noise(config), config.borrow_style_below)


def make_shard_specs(
    requests: np.ndarray, first_id: int, config: GenerateConfig, model_path: str | Path, device: str, out_dir: str | Path | None,
    start_index: int = 0, latent: str = "prior",
) -> list[ShardSpec]:
    """Split the per-class requests (ids assigned class by class from ``first_id``) into shards.

    Shards hold a whole number of batches, so no batch (and no batch seed) straddles two shards.
    """
    labels = request_labels(requests)
    shard_len = math.ceil(config.shard_size / config.batch_size) * config.batch_size
    specs = []
    for number, start in enumerate(range(0, len(labels), shard_len)):
        index = start_index + number
        out_path = None if out_dir is None else str(Path(out_dir) / f"shard-{index:05d}.npz")
        specs.append(_spec(index, labels[start : start + shard_len], first_id + start, config, model_path, device, out_path, latent))
    return specs


def generate_candidates(model, requests: np.ndarray, first_id: int, config: GenerateConfig, device: str,
                        latent: str = "prior") -> dict[str, np.ndarray]:
    """In memory: ``requests[k]`` candidates of class k with ids from ``first_id`` (a multiple of
    ``config.batch_size``), from a generator object; the same samples the stage's shards hold for those ids."""
    return sample_shard(_spec(0, request_labels(requests), first_id, config, "", str(device), None, latent), model)


def next_batch_start(last_id: int, batch_size: int) -> int:
    """First batch-aligned sample id after ``last_id`` (fresh ids for a top-up round)."""
    return (last_id // batch_size + 1) * batch_size


def model_path_for(config: Config, models_root: str | Path) -> Path:
    return Path(models_root) / config.train.model / "generator.pt"


def check_pool(pool_dir: Path, pool_summary: dict, prepared: PreparedData, model_path: Path) -> None:
    """Refuse a pool of other classes, image shape or generator than the prepared data and ``model_path`` (filter's
    top-up rounds draw from that generator, and would mix its samples with another's)."""
    if list(pool_summary["class_names"]) != list(prepared.class_names):
        raise DataError(f"{pool_dir} was generated for classes {pool_summary['class_names']}, the prepared data has "
                        f"{list(prepared.class_names)}: rerun `synthgen generate` (or `dvc repro`)")
    if list(pool_summary.get("image_shape") or prepared.image_shape) != list(prepared.image_shape):
        raise DataError(f"{pool_dir} holds images of shape {pool_summary['image_shape']}, the prepared data "
                        f"{list(prepared.image_shape)}: rerun `synthgen generate` (or `dvc repro`)")
    made_by = pool_summary.get("generator_sha256")  # absent from pools written before it was recorded
    if made_by and (not model_path.is_file() or sha256_file(model_path) != made_by):
        raise DataError(f"{pool_dir} was generated by a {pool_summary.get('model')} other than {model_path}: "
                        f"rerun `synthgen generate` (or `dvc repro`)")


def main(config: Config, prepared_dir: str | Path, models_root: str | Path, pool_dir: str | Path) -> dict:
    """Plan quotas from the real train counts and write the first-round candidate pool to ``pool_dir``."""
    gen = config.generate
    prepared = load_prepared(prepared_dir)
    real_counts = prepared.train.counts()
    quotas = compute_quotas(real_counts, gen)
    if not quotas.any():  # evaluate would have nothing to compare, and filter nothing to judge
        raise ConfigError(f"generate.balance={gen.balance} asks no sample of any class (training counts {real_counts.tolist()}, "
                          f"generate.min_per_class={gen.min_per_class}): raise generate.min_per_class "
                          "(or generate.count for to_count, generate.ratio for ratio)")
    requests = first_round_requests(quotas, gen.oversample)
    model_path = model_path_for(config, models_root)
    if not model_path.is_file():
        raise DataError(f"generator weights {model_path} not found: run `synthgen train` first")
    device = str(resolve_device(gen.device))
    model = load_model(model_path, device)
    latent = resolve_latent(gen.latent, model)
    started = time.perf_counter()
    with atomic_dir(pool_dir) as tmp:
        specs = make_shard_specs(requests, 0, gen, model_path, device, tmp, latent=latent)
        shards = map_shards(run_shard, specs, gen.executor, gen.workers)
        n_samples = int(requests.sum())
        plan = plan_table(real_counts, quotas, requests, prepared.class_names)
        atomic_write_text(tmp / "plan.csv", plan.to_csv(index=False))
        summary = {
            "class_names": list(prepared.class_names),
            "image_shape": list(prepared.image_shape),
            "model": config.train.model,
            "generator_sha256": sha256_file(model_path),  # filter refuses a pool another generator made
            "balance": gen.balance,
            "latent": latent,
            "latent_noise": model.latent_noise_used(latent, requested_latent_noise(gen)),
            "real": real_counts,
            "quotas": quotas,
            "requests": requests,
            "n_samples": n_samples,
            "next_sample_id": next_batch_start(n_samples - 1, gen.batch_size) if n_samples else 0,
            "shards": shards,
        }
        write_json(tmp / POOL_SUMMARY, summary)
    seconds = time.perf_counter() - started
    print(f"generate: {n_samples} candidates in {len(specs)} shards, {seconds:.1f} s ({n_samples / max(seconds, 1e-9):.0f} samples/s) -> {pool_dir}")
    return summary
