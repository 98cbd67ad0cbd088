"""The training state of stage `train`: what it holds, how it is built, wrapped for DDP, checkpointed and restored.

A :class:`TrainState` is the whole of a run's future: weights, optimiser states, the CPU
``torch.Generator`` that draws batches, noise and DiffAugment parameters, the step and the loss
history. :func:`checkpoint_payload` turns it into tensors and plain types (``torch.load(...,
weights_only=True)`` reads them back) and refuses non-finite weights; :func:`restore_state` puts a
payload back so that a resumed run continues bit for bit on the CPU; :func:`resume_mismatch`
says why a payload cannot be resumed (other data, config or number of processes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os

import numpy as np
import torch
import torch.distributed as dist

from synthgen import models
from synthgen.config import TrainConfig, config_to_dict
from synthgen.device import seed_everything
from synthgen.models import cgan, cvae, vaegan

# Keys that may change between a checkpoint and its resumption without invalidating it.
RESUMABLE_KEYS = ("steps", "checkpoint_every", "log_every", "device")


class TrainingError(RuntimeError):
    """Training diverged (non-finite loss or weights); the message names the step."""


@dataclasses.dataclass
class TrainState:
    """Everything that determines the rest of a run."""

    network: torch.nn.Module  # cgan.CGAN, cvae.CVAE or vaegan.VAEGAN
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
    schedule_steps: int = 0  # train.steps when the run began: the cGAN fades conditioning in over a share of it, kept when extended
    parallel: dict = dataclasses.field(default_factory=dict)  # DDP wrappers passed to the inner steps


def build_state(
    config: TrainConfig, n_classes: int, image_shape: tuple[int, int, int], device: torch.device, rank: int = 0, world_size: int = 1
) -> TrainState:
    """Fresh weights and optimisers from ``config.seed``; ``image_shape`` is (C, H, W). Each rank gets its own batch seed."""
    seed_everything(config.seed)
    section = getattr(config, config.model)  # the model's own section: cgan, cvae or vaegan
    model_config = models.model_config(
        config.model, n_classes, image_shape, latent_dim=section.latent_dim, base_channels=section.base_channels
    )
    network = models.build_network(model_config).to(device)
    if config.model == "cgan":
        optimizers = cgan.build_optimizers(network, config.cgan.lr_generator, config.cgan.lr_discriminator)
    elif config.model == "vaegan":
        optimizers = vaegan.build_optimizers(network, config.vaegan.lr, config.vaegan.lr_discriminator)
    else:
        optimizers = cvae.build_optimizers(network, config.cvae.lr)
    rng = torch.Generator().manual_seed(config.seed + 1 + 7919 * rank)
    return TrainState(network, optimizers, rng, rank=rank, world_size=world_size, schedule_steps=config.steps)


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
    elif isinstance(network, vaegan.VAEGAN):
        state.parallel = {
            "vae_net": DistributedDataParallel(network.vae, device_ids=ids),
            "discriminator_net": DistributedDataParallel(network.discriminator, device_ids=ids),
        }
    else:
        state.parallel = {"vae_net": DistributedDataParallel(network, device_ids=ids)}


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
        "schedule_steps": state.schedule_steps,
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
    state.schedule_steps = int(payload.get("schedule_steps", payload["config"]["steps"]))
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
    step, planned = payload.get("step", 0), payload.get("schedule_steps", payload.get("config", {}).get("steps", config.steps))
    if step > config.steps:  # resuming would keep the longer training under the shorter run's params
        return f"it is at step {step}, past train.steps={config.steps}"
    if config.model == "cgan" and config.steps < planned:  # the fade-in would end after the run does
        return f"the cGAN's class-conditioning fade-in was planned over {planned} steps, more than train.steps={config.steps}"
    return None
