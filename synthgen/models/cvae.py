"""Class-conditional VAE: the diverse, stable alternative to the cGAN on very scarce data.

* Encoder: image plus one-hot class planes -> 3x3 convs with average pooling -> (mu, logvar).
* Decoder: the cGAN generator architecture (class-conditional BN, sized from the image),
  producing Bernoulli logits per pixel; a sample is the mean image ``2 * sigmoid(logits) - 1``.
* Loss (pure function): per-image summed binary cross-entropy against the image mapped to
  [0, 1], plus the KL term scaled by a weight that warms up linearly (avoids posterior collapse).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from synthgen.device import autocast
from synthgen.models.cgan import CGANConfig, Generator, level_channels, n_resamplings


SAMPLING_NOISE = 1.0  # interpolate sampling's default noise (generate.latent_noise: auto): within-class spread ~ real's


@dataclass(frozen=True)
class CVAEConfig:
    n_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    latent_dim: int = 16
    base_channels: int = 32
    max_channel_mult: int = 4

    def decoder_config(self) -> CGANConfig:
        return CGANConfig(self.n_classes, self.image_shape, self.latent_dim, self.base_channels, self.max_channel_mult)


class Encoder(nn.Module):
    """(images (N, C, H, W), labels (N,)) -> (mu, logvar), each (N, latent_dim)."""

    def __init__(self, config: CVAEConfig):
        super().__init__()
        self.n_classes = config.n_classes
        channels_in, height, width = config.image_shape
        n_levels = n_resamplings(height, width)
        channels = [channels_in + config.n_classes] + level_channels(config.decoder_config(), n_levels)[::-1]
        self.n_levels = n_levels
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(channels[:-1], channels[1:]))
        final_h, final_w = height // 2**n_levels, width // 2**n_levels
        self.head = nn.Linear(channels[-1] * final_h * final_w, 2 * config.latent_dim)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        planes = F.one_hot(labels, self.n_classes).to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[2:])
        h = torch.cat([x, planes], dim=1)
        for i, conv in enumerate(self.convs):
            h = F.leaky_relu(conv(h), 0.2)
            if i < self.n_levels:
                h = F.avg_pool2d(h, 2)
        mu, logvar = self.head(h.flatten(1)).chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 10.0)  # keeps exp(logvar) finite early in training


class CVAE(nn.Module):
    def __init__(self, config: CVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Generator(config.decoder_config())

    def forward(self, x: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor):
        """Reparameterised pass: returns (logits (N, C, H, W), mu, logvar)."""
        mu, logvar = self.encoder(x, labels)
        z = mu + noise * torch.exp(0.5 * logvar)
        return self.decoder(z, labels), mu, logvar


def output_activation(logits: torch.Tensor) -> torch.Tensor:
    """Bernoulli mean mapped to [-1, 1]: 2 * sigmoid(l) - 1 == tanh(l / 2)."""
    return torch.tanh(0.5 * logits)


def cvae_loss(
    logits: torch.Tensor, images: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, kl_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, reconstruction, kl), each a per-image sum averaged over the batch."""
    target = (images + 1.0) * 0.5  # [-1, 1] -> [0, 1]
    recon = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(1).mean()
    kl = (-0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()
    return recon + kl_weight * kl, recon, kl


def kl_weight_at(step: int, final_weight: float, warmup_steps: int) -> float:
    """Linear KL warm-up from 0 to ``final_weight`` over ``warmup_steps``."""
    if warmup_steps <= 0:
        return final_weight
    return final_weight * min(1.0, step / warmup_steps)


def build_optimizers(model: CVAE, lr: float) -> dict[str, torch.optim.Optimizer]:
    return {"vae": torch.optim.Adam(model.parameters(), lr=lr)}


def train_step(
    model: CVAE,
    optimizers: dict[str, torch.optim.Optimizer],
    real: torch.Tensor,
    labels: torch.Tensor,
    rng: torch.Generator,
    kl_weight: float,
    vae_net: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """One optimiser step on the negative ELBO of a real (N, C, H, W) batch (``vae_net``: e.g. a DDP wrapper)."""
    noise = torch.randn(len(real), model.config.latent_dim, generator=rng).to(real.device)
    with autocast(real.device):
        logits, mu, logvar = (vae_net if vae_net is not None else model)(real, labels, noise)
    loss, recon, kl = cvae_loss(logits.float(), real, mu.float(), logvar.float(), kl_weight)
    optimizers["vae"].zero_grad(set_to_none=True)
    loss.backward()
    optimizers["vae"].step()
    return {"loss": loss.detach(), "recon": recon.detach(), "kl": kl.detach()}


@torch.no_grad()
def encode_means(model: CVAE, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Posterior means (N, latent_dim) of (N, C, H, W) images: the latent bank that ``interpolate`` sampling uses."""
    was_training = model.training
    model.eval()
    codes = [model.encoder(images[i : i + batch_size], labels[i : i + batch_size])[0].float() for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(codes) if codes else images.new_zeros(0, model.config.latent_dim)


@torch.no_grad()
def validation_loss(model: CVAE, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Negative ELBO (KL weight 1) of held-out real images, using the posterior means."""
    model.eval()
    with autocast(images.device):
        mu, logvar = model.encoder(images, labels)
        logits = model.decoder(mu, labels)
    model.train()
    return float(cvae_loss(logits.float(), images, mu.float(), logvar.float(), 1.0)[0])
