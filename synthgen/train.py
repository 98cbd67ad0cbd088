"""Stage `train`: one training loop for the cGAN, the cVAE and the VAE-GAN, resumable bit for bit on the CPU.

The whole training split sits on the device as one tensor; batches are drawn by index (with
replacement) from a seeded CPU ``torch.Generator`` that also draws all noise and DiffAugment
parameters, so its state plus the weights and optimiser states is the entire training state.
Every ``checkpoint_every`` steps that state is written atomically to ``checkpoints/<model>/last.pt``
(tensors and plain types only, loadable with ``weights_only=True``); a killed run restarted with
the same command continues from there. A checkpoint whose config or data differ is ignored.
A non-finite loss stops training with an error naming the step, before anything is saved.

Pure core: :func:`fit_generator` trains on arrays and returns the generator, the final state and
a summary, writing nothing (checkpoints go to an ``on_checkpoint`` callback); the notebook sampler
(:mod:`synthgen.sampler`) calls it directly. :func:`main` is the stage: it reads the prepared
split, joins the DDP process group, resumes, writes checkpoints and outputs.

Outputs (``models/<model>/``, swapped in atomically at the end): ``generator.pt``,
``config.json``, ``losses.csv`` (DVC plot source), ``summary.json``, ``samples.png`` (one row
per class) and ``grids/step-XXXXX.png`` (one per checkpoint).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torchvision.utils import save_image

from synthgen import models
from synthgen.config import Config, TrainConfig, config_to_dict
from synthgen.data import load_prepared
from synthgen.tensors import to_tensor
from synthgen.device import cpu_autocast, resolve_device, training_precision
from synthgen.io import atomic_dir, atomic_write_bytes, atomic_write_text, write_json
from synthgen.models import cgan, cvae, vaegan
from synthgen.models.diffaugment import parse_policy
from synthgen.progress import Milestones
from synthgen.train_state import (
    TrainingError, TrainState, build_state, checkpoint_payload, data_fingerprint, init_distributed, restore_state,
    resume_mismatch, wrap_parallel,
)


# ------------------------------------------------------------------------ pure core
def train_mode(network: torch.nn.Module) -> None:
    network.train()
    if isinstance(network, cgan.CGAN):
        network.ema_generator.eval()  # only ever sampled from
    if isinstance(network, vaegan.VAEGAN):
        network.ema_decoder.eval()


def inner_step(config: TrainConfig, state: TrainState, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Draw a batch by index and run the model's inner step; returns finite python-float losses."""
    batch = torch.randint(len(images), (config.batch_size,), generator=state.rng).to(images.device)
    real, batch_labels = images[batch], labels[batch]
    with cpu_autocast(images.device, config.cpu_bf16):
        losses = model_step(config, state, real, batch_labels)
    values = {name: float(value) for name, value in losses.items()}
    if not all(math.isfinite(v) for v in values.values()):
        raise TrainingError(f"non-finite loss at step {state.step + 1}: {values}; lower the learning rate or check the data")
    return values


def model_step(config: TrainConfig, state: TrainState, real: torch.Tensor, batch_labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``config.model``'s own train step on one (N, C, H, W) batch; returns its loss tensors."""
    if config.model == "cgan":
        section = config.cgan
        losses = cgan.train_step(
            state.network, state.optimizers, real, batch_labels, state.rng, state.step, parse_policy(section.diffaugment),
            section.ema_decay, section.lecam_weight, cgan.condition_strength(state.step, state.schedule_steps, section.condition_fade),
            section.mode_seeking_weight, **state.parallel,
        )
    elif config.model == "vaegan":
        section = config.vaegan
        losses = vaegan.train_step(
            state.network, state.optimizers, real, batch_labels, state.rng, state.step,
            cvae.kl_weight_at(state.step, section.kl_weight, section.kl_warmup_steps), section.adversarial_weight,
            parse_policy(section.diffaugment), section.ema_decay, section.lecam_weight, section.interpolation_noise, **state.parallel,
        )
    else:
        kl_weight = cvae.kl_weight_at(state.step, config.cvae.kl_weight, config.cvae.kl_warmup_steps)
        losses = cvae.train_step(state.network, state.optimizers, real, batch_labels, state.rng, kl_weight, **state.parallel)
    return losses


def validation_loss(config: TrainConfig, state: TrainState, images: torch.Tensor, labels: torch.Tensor) -> float:
    module = {"cgan": cgan, "cvae": cvae, "vaegan": vaegan}[config.model]
    with cpu_autocast(images.device, config.cpu_bf16):
        return module.validation_loss(state.network, images, labels)


def train_loop(
    config: TrainConfig,
    state: TrainState,
    train_data: tuple[torch.Tensor, torch.Tensor],
    val_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    on_log: Callable[[TrainState, dict], None] | None = None,
) -> TrainState:
    """Run from ``state.step`` to ``config.steps`` (or early stop); mutates and returns ``state``."""
    images, labels = train_data
    train_mode(state.network)
    while state.step < config.steps:
        losses = inner_step(config, state, images, labels)
        state.step += 1
        for name, value in losses.items():
            state.running[name] = state.running.get(name, 0.0) + value
        state.running["_count"] = state.running.get("_count", 0.0) + 1
        if state.step % config.log_every == 0:
            row = pending_row(state)
            state.history.append(row)
            state.running = {}
            if on_log is not None:
                on_log(state, row)
        stop = False
        if val_data is not None and len(val_data[0]) and state.step % config.eval_every == 0:
            val_loss = validation_loss(config, state, *val_data)
            state.evals.append({"step": state.step, "val_loss": val_loss})
            state.best_val, state.bad_evals = (val_loss, 0) if val_loss < state.best_val else (state.best_val, state.bad_evals + 1)
            stop = config.early_stopping_patience is not None and state.bad_evals >= config.early_stopping_patience
        if on_checkpoint is not None and (state.step % config.checkpoint_every == 0 or state.step == config.steps or stop):
            on_checkpoint(state)
        if stop:
            break
    return state


def pending_row(state: TrainState) -> dict | None:
    """Mean losses since the last logged row (None when nothing is pending)."""
    count = state.running.get("_count", 0.0)
    if not count:
        return None
    return {"step": state.step, **{name: total / count for name, total in state.running.items() if name != "_count"}}


def loss_table(state: TrainState) -> pd.DataFrame:
    """Logged rows, a final partial row, and val losses merged by step (the losses.csv content)."""
    rows = state.history + ([pending_row(state)] if pending_row(state) else [])
    table = pd.DataFrame(rows)
    if state.evals:
        table = table.merge(pd.DataFrame(state.evals), on="step", how="outer").sort_values("step")
    return table


def sample_grid(generator: models.ConditionalGenerator, per_class: int = 8, seed: int = 0) -> torch.Tensor:
    """(K * per_class, C, H, W) samples in [0, 1], class k in row k, fixed noise."""
    labels = torch.arange(generator.n_classes).repeat_interleave(per_class)
    return generator.sample(labels, torch.Generator().manual_seed(seed)).cpu() * 0.5 + 0.5


def pixel_diversity_ratio(generator: models.ConditionalGenerator, images: torch.Tensor, labels: torch.Tensor, n: int = 64, seed: int = 0) -> dict:
    """Per class: mean pairwise pixel distance of samples / of the real training images (mode-collapse alarm)."""
    ratios = {}
    rng = torch.Generator().manual_seed(seed)
    for k in range(generator.n_classes):
        real = images[labels == k].flatten(1).float().cpu()
        if len(real) < 2:
            continue
        fake = generator.sample(torch.full((n,), k), rng).flatten(1).cpu()
        ratios[k] = float(torch.pdist(fake).mean() / torch.pdist(real).mean().clamp_min(1e-8))
    return ratios


def fit_generator(
    config: TrainConfig, x: np.ndarray, y: np.ndarray, x_val: np.ndarray | None = None, y_val: np.ndarray | None = None, *,
    n_classes: int | None = None, on_checkpoint: Callable[[TrainState, dict], None] | None = None,
    on_log: Callable[[TrainState, dict], None] | None = None, resume_state: dict | None = None,
    device: torch.device | None = None, rank: int = 0, world_size: int = 1,
) -> tuple[models.ConditionalGenerator, TrainState, dict]:
    """Train ``config.model`` on uint8 (N, H, W, C) images ``x`` with labels ``y`` in 0..K-1; writes nothing.

    ``x_val``/``y_val``: held-out images for the validation loss and early stopping (None or empty: none).
    ``resume_state``: a checkpoint payload (already checked with :func:`resume_mismatch`) to continue
    from. ``on_checkpoint(state, payload)`` is called every ``checkpoint_every`` steps and at the
    end with the resumable payload (built only when a callback is given; under DDP every rank must
    pass one, since building it gathers all ranks' generator states). Returns the sampling
    generator (the cVAE with its latent bank), the final state and a summary.
    """
    device = device if device is not None else resolve_device(config.device)
    height, width, channels = x.shape[1:]
    state = build_state(config, n_classes or int(np.max(y)) + 1, (channels, height, width), device, rank, world_size)
    if resume_state is not None:
        restore_state(state, resume_state)
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    state.network.to(memory_format=layout)  # in place: the optimisers keep their parameters
    wrap_parallel(state, device)
    start_step = state.step
    images, labels = to_tensor(x, device).contiguous(memory_format=layout), torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)
    val_data = None
    if x_val is not None and len(x_val):
        val_data = (to_tensor(x_val, device), torch.from_numpy(np.asarray(y_val, dtype=np.int64)).to(device))
    fingerprint = data_fingerprint(x, y) if on_checkpoint is not None else ""
    session_start = last_save = time.perf_counter()

    def checkpoint(current: TrainState) -> None:
        nonlocal last_save
        now = time.perf_counter()
        current.train_seconds, last_save = current.train_seconds + (now - last_save), now
        if on_checkpoint is not None:
            on_checkpoint(current, checkpoint_payload(current, config, fingerprint))  # the payload checks weights are finite

    train_loop(config, state, (images, labels), val_data, checkpoint, on_log)
    wall = time.perf_counter() - session_start
    generator = trained_generator(state, images, labels)
    summary = training_summary(config, state, start_step, wall, device)
    summary["pixel_diversity_ratio"] = pixel_diversity_ratio(generator, images, labels, seed=config.seed)
    return generator, state, summary


def training_summary(config: TrainConfig, state: TrainState, start_step: int, wall: float, device: torch.device) -> dict:
    """What ``summary.json`` reports of a (possibly resumed) run: steps, timings, throughput, final losses."""
    return {
        "model": config.model,
        "steps": state.step,
        "resumed_from_step": start_step,
        "stopped_early": state.step < config.steps,
        "wall_time_s": wall,
        "total_train_time_s": state.train_seconds,
        "images_per_s": (state.step - start_step) * config.batch_size * state.world_size / max(wall, 1e-9),
        "world_size": state.world_size,
        "final_losses": pending_row(state) or (state.history[-1] if state.history else {}),
        "final_val_loss": state.evals[-1]["val_loss"] if state.evals else None,
        "device": str(device),
        "precision": training_precision(device, config.cpu_bf16),
    }


def trained_generator(state: TrainState, images: torch.Tensor, labels: torch.Tensor) -> models.ConditionalGenerator:
    """The sampling generator of a trained network; a cVAE (or VAE-GAN) keeps its training images' codes for ``interpolate``."""
    generator = models.as_generator(state.network, state.step)
    vae = state.network.vae if isinstance(state.network, vaegan.VAEGAN) else state.network
    if isinstance(vae, cvae.CVAE):
        generator.latent_bank = (cvae.encode_means(vae, images, labels).cpu(), labels.cpu())
    return generator


# ------------------------------------------------------------------------------ I/O
def _png_bytes(grid: torch.Tensor, per_class: int) -> bytes:
    buffer = io.BytesIO()
    save_image(grid, buffer, nrow=per_class, padding=1, format="png")
    return buffer.getvalue()


def _progress(console: Console) -> Progress:
    columns = TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.description}")
    return Progress(*columns, console=console)


def resumable_checkpoint(config: TrainConfig, checkpoint_path: Path, fingerprint: str, world_size: int, console: Console) -> dict | None:
    """The checkpoint payload at ``checkpoint_path`` when it exists and matches config, data and world size."""
    if not checkpoint_path.is_file():
        return None
    payload = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    reason = resume_mismatch(payload, config, fingerprint, world_size)
    if reason is None:
        console.print(f"resuming {config.model} from step {payload['step']} ({checkpoint_path})")
        return payload
    console.print(f"[yellow]{checkpoint_path}: {reason}; starting fresh[/yellow]")
    shutil.rmtree(checkpoint_path.parent / "grids", ignore_errors=True)
    return None


def write_checkpoint(state: TrainState, payload: dict, checkpoint_path: Path, grids_dir: Path) -> None:
    """Write the resumable ``payload`` and this step's sample grid. Every rank built the payload (it
    gathers their batch-generator states); only rank 0 writes."""
    if state.rank != 0:
        return
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    grid = sample_grid(models.as_generator(state.network, state.step))
    train_mode(state.network)
    atomic_write_bytes(grids_dir / f"step-{state.step:05d}.png", _png_bytes(grid, 8))
    atomic_write_bytes(checkpoint_path, buffer.getvalue())


def write_outputs(out_dir: Path, generator, state: TrainState, config: TrainConfig, summary: dict, grids_dir: Path) -> None:
    """Build ``models/<model>/`` in a temp sibling and swap it in."""
    with atomic_dir(out_dir) as out:
        models.save_generator(generator, out / "generator.pt", config_to_dict(config))
        write_json(out / "config.json", {"train": config_to_dict(config), "model": dataclasses.asdict(generator.config)})
        atomic_write_text(out / "losses.csv", loss_table(state).to_csv(index=False))
        write_json(out / "summary.json", summary)
        atomic_write_bytes(out / "samples.png", _png_bytes(sample_grid(generator), 8))
        if grids_dir.is_dir():
            shutil.copytree(grids_dir, out / "grids")


def main(config: Config, prepared_dir: str | Path, models_root: str | Path, checkpoints_root: str | Path) -> dict:
    """Train ``config.train.model`` on PREPARED/train, resuming from CHECKPOINTS/<model>/last.pt.

    Under ``torchrun --nproc_per_node N`` (WORLD_SIZE > 1) every rank trains on its own batches with
    DistributedDataParallel; only rank 0 writes files or prints.
    """
    train_config = config.train
    rank, world_size = init_distributed()
    console = Console(stderr=True, quiet=rank != 0)
    prepared = load_prepared(prepared_dir)
    device = resolve_device(train_config.device)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    checkpoint_dir = Path(checkpoints_root) / train_config.model
    checkpoint_path, grids_dir = checkpoint_dir / "last.pt", checkpoint_dir / "grids"
    fingerprint = data_fingerprint(prepared.train.x, prepared.train.y)
    resume = resumable_checkpoint(train_config, checkpoint_path, fingerprint, world_size, console)
    if train_config.early_stopping_patience is not None and not len(prepared.val.y):
        console.print("[yellow]train.early_stopping_patience is set but there are no held-out images "
                      "(data.val_per_class: 0, no data.val_source): training runs all train.steps[/yellow]")

    start = resume["step"] if resume else 0
    # rich's bar draws nothing when stderr is not a terminal (dvc under the flow, a CI log): a line per tenth then
    tenths = Milestones(f"train {train_config.model}", train_config.steps, unit="steps", done=start) \
        if rank == 0 and not console.is_terminal else None
    with _progress(console) as progress:
        task = progress.add_task("", total=train_config.steps, completed=start)

        def on_log(current: TrainState, row: dict) -> None:
            progress.update(task, completed=current.step, description=" ".join(f"{k}={v:.3f}" for k, v in row.items() if k != "step"))
            if tenths is not None:
                tenths.reach(current.step)

        generator, state, summary = fit_generator(
            train_config, prepared.train.x, prepared.train.y, prepared.val.x, prepared.val.y, n_classes=prepared.n_classes,
            on_checkpoint=functools.partial(write_checkpoint, checkpoint_path=checkpoint_path, grids_dir=grids_dir),
            on_log=on_log, resume_state=resume, device=device, rank=rank, world_size=world_size,
        )
        progress.update(task, completed=state.step)
    if rank == 0:
        write_outputs(Path(models_root) / train_config.model, generator, state, train_config, summary, grids_dir)
        console.print(
            f"trained {train_config.model} to step {state.step} in {summary['wall_time_s']:.1f}s "
            f"({summary['images_per_s']:.0f} img/s) -> {Path(models_root) / train_config.model}"
        )
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary
