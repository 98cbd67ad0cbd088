"""Stage `train`: one training loop for the cGAN and the cVAE, resumable bit for bit on the CPU.

The whole training split sits on the device as one tensor; batches are drawn by index (with
replacement) from a seeded CPU ``torch.Generator`` that also draws all noise and DiffAugment
parameters, so its state plus the weights and optimiser states is the entire training state.
Every ``checkpoint_every`` steps that state is written atomically to ``checkpoints/<model>/last.pt``
(tensors and plain types only, loadable with ``weights_only=True``); a killed run restarted with
the same command continues from there. A checkpoint whose config or data differ is ignored.
A non-finite loss stops training with an error naming the step, before anything is saved.

Outputs (``models/<model>/``, swapped in atomically at the end): ``generator.pt``,
``config.json``, ``losses.csv`` (DVC plot source), ``summary.json``, ``samples.png`` (one row
per class) and ``grids/step-XXXXX.png`` (one per checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
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
from synthgen.device import resolve_device, seed_everything
from synthgen.io import atomic_dir, atomic_write_bytes, atomic_write_text, write_json
from synthgen.models import cgan, cvae
from synthgen.models.diffaugment import parse_policy

# Keys that may change between a checkpoint and its resumption without invalidating it.
RESUMABLE_KEYS = ("steps", "checkpoint_every", "log_every", "device")


class TrainingError(RuntimeError):
    """Training diverged (non-finite loss or weights); the message names the step."""


@dataclasses.dataclass
class TrainState:
    """Everything that determines the rest of a run."""

    network: torch.nn.Module  # cgan.CGAN or cvae.CVAE
    optimizers: dict[str, torch.optim.Optimizer]
    rng: torch.Generator  # batches, noise, DiffAugment draws
    step: int = 0
    history: list = dataclasses.field(default_factory=list)  # loss rows {step, name: mean since last row}
    evals: list = dataclasses.field(default_factory=list)  # {step, val_loss}
    running: dict = dataclasses.field(default_factory=dict)  # loss sums since the last row
    best_val: float = math.inf
    bad_evals: int = 0
    train_seconds: float = 0.0  # summed over resumptions
    rank: int = 0
    world_size: int = 1
    parallel: dict = dataclasses.field(default_factory=dict)  # DDP wrappers passed to the inner steps


# ------------------------------------------------------------------------ pure core
def build_state(
    config: TrainConfig, n_classes: int, image_shape: tuple[int, int, int], device: torch.device, rank: int = 0, world_size: int = 1
) -> TrainState:
    """Fresh weights and optimisers from ``config.seed``; ``image_shape`` is (C, H, W). Each rank gets its own batch seed."""
    seed_everything(config.seed)
    section = config.cgan if config.model == "cgan" else config.cvae
    model_config = models.model_config(
        config.model, n_classes, image_shape, latent_dim=section.latent_dim, base_channels=section.base_channels
    )
    network = models.build_network(model_config).to(device)
    if config.model == "cgan":
        optimizers = cgan.build_optimizers(network, config.cgan.lr_generator, config.cgan.lr_discriminator)
    else:
        optimizers = cvae.build_optimizers(network, config.cvae.lr)
    rng = torch.Generator().manual_seed(config.seed + 1 + 7919 * rank)
    return TrainState(network, optimizers, rng, rank=rank, world_size=world_size)


def init_distributed() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; joins the process group when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world_size


def wrap_parallel(state: TrainState, device: torch.device) -> None:
    """DistributedDataParallel wrappers (weights broadcast from rank 0, gradients averaged) for the inner steps."""
    if state.world_size == 1:
        return
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    network = state.network
    if isinstance(network, cgan.CGAN):
        state.parallel = {
            "generator_net": DistributedDataParallel(network.generator, device_ids=ids),
            "discriminator_net": DistributedDataParallel(network.discriminator, device_ids=ids),
        }
    else:
        state.parallel = {"vae_net": DistributedDataParallel(network, device_ids=ids)}


def train_mode(network: torch.nn.Module) -> None:
    network.train()
    if isinstance(network, cgan.CGAN):
        network.ema_generator.eval()  # only ever sampled from


def inner_step(config: TrainConfig, state: TrainState, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Draw a batch by index and run the model's inner step; returns finite python-float losses."""
    batch = torch.randint(len(images), (config.batch_size,), generator=state.rng).to(images.device)
    real, batch_labels = images[batch], labels[batch]
    if config.model == "cgan":
        policy = parse_policy(config.cgan.diffaugment)
        losses = cgan.train_step(
            state.network, state.optimizers, real, batch_labels, state.rng, state.step, policy, config.cgan.ema_decay,
            **state.parallel,
        )
    else:
        kl_weight = cvae.kl_weight_at(state.step, config.cvae.kl_weight, config.cvae.kl_warmup_steps)
        losses = cvae.train_step(state.network, state.optimizers, real, batch_labels, state.rng, kl_weight, **state.parallel)
    values = {name: float(value) for name, value in losses.items()}
    if not all(math.isfinite(v) for v in values.values()):
        raise TrainingError(
            f"non-finite loss at step {state.step + 1}: {values}; lower the learning rate or check the data"
        )
    return values


def validation_loss(config: TrainConfig, state: TrainState, images: torch.Tensor, labels: torch.Tensor) -> float:
    module = cgan if config.model == "cgan" else cvae
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


# --------------------------------------------------------------------- checkpoints
def data_fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(x).tobytes())
    digest.update(np.ascontiguousarray(y).astype(np.int64).tobytes())
    digest.update(str(x.shape).encode())
    return digest.hexdigest()


def _comparable(config_dict: dict) -> dict:
    return {k: v for k, v in config_dict.items() if k not in RESUMABLE_KEYS}


def checkpoint_payload(state: TrainState, config: TrainConfig, fingerprint: str) -> dict:
    tensors = [t for t in state.network.state_dict().values() if t.is_floating_point()]
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise TrainingError(f"non-finite weights at step {state.step}: refusing to write a checkpoint")
    return {
        "network": {k: v.detach().cpu() for k, v in state.network.state_dict().items()},
        "optimizers": {name: opt.state_dict() for name, opt in state.optimizers.items()},
        "rng": gather_rng_states(state),  # one per rank
        "torch_rng": torch.get_rng_state(),
        "step": state.step,
        "history": state.history,
        "evals": state.evals,
        "running": state.running,
        "best_val": state.best_val,
        "bad_evals": state.bad_evals,
        "train_seconds": state.train_seconds,
        "config": config_to_dict(config),
        "fingerprint": fingerprint,
    }


def gather_rng_states(state: TrainState) -> list[torch.Tensor]:
    """Every rank's batch-generator state (a collective under DDP: all ranks call it)."""
    if state.world_size == 1:
        return [state.rng.get_state()]
    states: list = [None] * state.world_size
    dist.all_gather_object(states, state.rng.get_state())
    return states


def restore_state(state: TrainState, payload: dict) -> TrainState:
    state.network.load_state_dict(payload["network"])
    for name, optimizer in state.optimizers.items():
        optimizer.load_state_dict(payload["optimizers"][name])
    state.rng.set_state(payload["rng"][state.rank])
    torch.set_rng_state(payload["torch_rng"])
    state.step = int(payload["step"])
    state.history, state.evals = list(payload["history"]), list(payload["evals"])
    state.running = dict(payload["running"])
    state.best_val, state.bad_evals = float(payload["best_val"]), int(payload["bad_evals"])
    state.train_seconds = float(payload["train_seconds"])
    return state


def resume_mismatch(payload: dict, config: TrainConfig, fingerprint: str, world_size: int = 1) -> str | None:
    """Why a checkpoint cannot be resumed (None when it can)."""
    if payload.get("fingerprint") != fingerprint:
        return "the training data changed"
    if len(payload.get("rng", [])) != world_size:
        return f"it was written by {len(payload.get('rng', []))} process(es), this run has {world_size}"
    old, new = _comparable(payload.get("config", {})), _comparable(config_to_dict(config))
    if old != new:
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return f"train config changed ({', '.join(changed)})"
    return None


# ------------------------------------------------------------------------------ I/O
def _png_bytes(grid: torch.Tensor, per_class: int) -> bytes:
    buffer = io.BytesIO()
    save_image(grid, buffer, nrow=per_class, padding=1, format="png")
    return buffer.getvalue()


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.description}"),
        console=console,
    )


def maybe_resume(state: TrainState, config: TrainConfig, checkpoint_path: Path, fingerprint: str, console: Console) -> None:
    """Restore ``state`` from ``checkpoint_path`` when it exists and matches config and data."""
    if not checkpoint_path.is_file():
        return
    payload = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    reason = resume_mismatch(payload, config, fingerprint, state.world_size)
    if reason is None:
        restore_state(state, payload)
        console.print(f"resuming {config.model} from step {state.step} ({checkpoint_path})")
    else:
        console.print(f"[yellow]{checkpoint_path}: {reason}; starting fresh[/yellow]")
        shutil.rmtree(checkpoint_path.parent / "grids", ignore_errors=True)


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
    height, width, channels = prepared.image_shape
    state = build_state(train_config, prepared.n_classes, (channels, height, width), device, rank, world_size)
    fingerprint = data_fingerprint(prepared.train.x, prepared.train.y)
    checkpoint_dir = Path(checkpoints_root) / train_config.model
    checkpoint_path, grids_dir = checkpoint_dir / "last.pt", checkpoint_dir / "grids"
    maybe_resume(state, train_config, checkpoint_path, fingerprint, console)
    wrap_parallel(state, device)
    start_step = state.step

    images, labels = to_tensor(prepared.train.x, device), torch.from_numpy(prepared.train.y).to(device)
    val_data = (to_tensor(prepared.val.x, device), torch.from_numpy(prepared.val.y).to(device))
    session_start = last_save = time.perf_counter()

    def on_checkpoint(current: TrainState) -> None:
        nonlocal last_save
        now = time.perf_counter()
        current.train_seconds, last_save = current.train_seconds + (now - last_save), now
        payload = checkpoint_payload(current, train_config, fingerprint)  # checks weights are finite
        if rank != 0:
            return
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        grid = sample_grid(models.as_generator(current.network, current.step))
        train_mode(current.network)
        atomic_write_bytes(grids_dir / f"step-{current.step:05d}.png", _png_bytes(grid, 8))
        atomic_write_bytes(checkpoint_path, buffer.getvalue())

    with _progress(console) as progress:
        task = progress.add_task("", total=train_config.steps, completed=state.step)

        def on_log(current: TrainState, row: dict) -> None:
            text = " ".join(f"{k}={v:.3f}" for k, v in row.items() if k != "step")
            progress.update(task, completed=current.step, description=text)

        train_loop(train_config, state, (images, labels), val_data, on_checkpoint, on_log)
        progress.update(task, completed=state.step)
    wall = time.perf_counter() - session_start
    summary = {
        "model": train_config.model,
        "steps": state.step,
        "resumed_from_step": start_step,
        "stopped_early": state.step < train_config.steps,
        "wall_time_s": wall,
        "total_train_time_s": state.train_seconds,
        "images_per_s": (state.step - start_step) * train_config.batch_size * world_size / max(wall, 1e-9),
        "world_size": world_size,
        "final_losses": pending_row(state) or (state.history[-1] if state.history else {}),
        "final_val_loss": state.evals[-1]["val_loss"] if state.evals else None,
        "device": str(device),
    }
    if rank == 0:
        generator = models.as_generator(state.network, state.step)
        if isinstance(state.network, cvae.CVAE):  # codes of the training images, for latent="interpolate" sampling
            generator.latent_bank = (cvae.encode_means(state.network, images, labels).cpu(), labels.cpu())
        summary["pixel_diversity_ratio"] = pixel_diversity_ratio(generator, images, labels, seed=train_config.seed)
        write_outputs(Path(models_root) / train_config.model, generator, state, train_config, summary, grids_dir)
        console.print(
            f"trained {train_config.model} to step {state.step} in {wall:.1f}s "
            f"({summary['images_per_s']:.0f} img/s) -> {Path(models_root) / train_config.model}"
        )
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary
