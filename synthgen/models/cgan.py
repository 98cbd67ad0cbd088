"""Class-conditional GAN for scarce data: conditional-BN generator, projection discriminator.

* Generator: noise + class embedding -> linear to a small base map (about 4x4), ``k`` blocks of
  (class-conditional BN, ReLU, 2x nearest upsampling + 3x3 conv as one transposed conv), then a centre crop to the exact
  (H, W). ``k`` is chosen from the image size, so 8x8, 28x28, 32x32 and 64x64 all work.
* Discriminator: 3x3 spectral-norm convs with average pooling, global sum pooling and a
  projection head (Miyato & Koyama 2018): ``D(x, y) = w . h + embed(y) . h``.
* Hinge loss, DiffAugment on everything the discriminator sees, EMA of the generator weights
  (what sampling uses). ``train_step`` is one discriminator step plus one generator step.
* Against collapse on scarce data: the LeCam regulariser (Tseng et al. 2021) pulls D's outputs on
  real images toward the running mean of its outputs on fakes and vice versa, and class
  conditioning fades in (Shahbazi et al. 2022): every class-dependent term (the generator's class
  embedding and class-conditional BN, the discriminator's projection) is scaled by a ``strength``
  that rises from 0 to 1, so the generator first learns what all classes share.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm

from synthgen.device import autocast
from synthgen.models.diffaugment import diff_augment


@dataclass(frozen=True)
class CGANConfig:
    n_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    latent_dim: int = 64
    base_channels: int = 32
    max_channel_mult: int = 4


def n_resamplings(height: int, width: int, max_steps: int = 4) -> int:
    """How many 2x steps separate the image from a base map of 4-8 px (8 -> 1, 28 -> 2, 32 -> 3, 64 -> 4).

    An exact halving chain is preferred (28 = 7 * 2^2, no wasted border); otherwise the base map is
    ceil(size / 2^k) of at least 4 px and the generator crops its output to the exact size.
    """
    size, steps = min(height, width), 0
    while steps < max_steps and math.ceil(size / 2 ** (steps + 1)) >= 4:
        steps += 1
    exact = 0
    while exact < max_steps and size % 2 ** (exact + 1) == 0 and size // 2 ** (exact + 1) >= 4:
        exact += 1
    return exact if size // 2**exact <= 8 else steps


def level_channels(config: CGANConfig, n_levels: int) -> list[int]:
    """Channels from the coarsest level (index 0) to the image-resolution level (index ``n_levels``)."""
    return [config.base_channels * min(2 ** (n_levels - i), config.max_channel_mult) for i in range(n_levels + 1)]


class ConditionalBatchNorm(nn.Module):
    """BatchNorm whose scale and shift are looked up per class."""

    def __init__(self, channels: int, n_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Embedding(n_classes, channels)
        self.bias = nn.Embedding(n_classes, channels)
        nn.init.zeros_(self.gain.weight)  # starts as plain BN: scale 1 + 0, shift 0
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        gain = 1.0 + strength * self.gain(labels)[:, :, None, None]  # (N, C, 1, 1)
        return self.norm(x) * gain + strength * self.bias(labels)[:, :, None, None]


class Generator(nn.Module):
    """(z (N, latent_dim), labels (N,)) -> raw image (N, C, H, W); the caller applies the output activation."""

    def __init__(self, config: CGANConfig):
        super().__init__()
        self.config = config
        channels_out, height, width = config.image_shape
        self.n_levels = n_resamplings(height, width)
        self.base_size = (math.ceil(height / 2**self.n_levels), math.ceil(width / 2**self.n_levels))
        channels = level_channels(config, self.n_levels)
        self.embed = nn.Embedding(config.n_classes, config.latent_dim)
        self.stem = nn.Linear(2 * config.latent_dim, channels[0] * self.base_size[0] * self.base_size[1])
        self.norms = nn.ModuleList(ConditionalBatchNorm(c, config.n_classes) for c in channels[:-1])
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(channels[:-1], channels[1:]))
        self.out_norm = ConditionalBatchNorm(channels[-1], config.n_classes)
        self.out_conv = nn.Conv2d(channels[-1], channels_out, 3, padding=1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """``strength`` scales every class-dependent term (1: fully conditional, 0: unconditional)."""
        h = self.stem(torch.cat([z, strength * self.embed(labels)], dim=1))
        # (N, C0, h0, w0) in the convs' layout: a view of the linear layer's rows is NCHW, and a channels-last conv
        # stack fed NCHW maps hands its ReLUs gradients in the other layout (10x slower backward, measured)
        h = h.view(z.shape[0], -1, *self.base_size).contiguous(memory_format=weight_layout(self.out_conv))
        for norm, conv in zip(self.norms, self.convs):
            h = upsample_conv(F.relu(norm(h, labels, strength)), conv)  # (N, C, 2h, 2w)
        h = self.out_conv(F.relu(self.out_norm(h, labels, strength)))  # (N, C, h0 * 2^k, w0 * 2^k)
        return center_crop(h, self.config.image_shape[1:])


def weight_layout(conv: nn.Conv2d) -> torch.memory_format:
    """torch.channels_last when ``conv``'s weight is stored so (``module.to(memory_format=torch.channels_last)``), else contiguous."""
    weight = conv.weight
    channels_last = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def transposed_kernel(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) kernel of conv3x3(upsample2x(x)) -> (C_in, C_out, 4, 4) kernel of one stride-2 transposed conv.

    Along each axis, output 2m reads input m-1 with tap 0 and input m with taps 1 + 2, and output
    2m+1 reads m with taps 0 + 1 and m+1 with tap 2; a stride-2, padding-1 transposed conv puts
    input i on outputs 2i-1+k, so kernel index k = 0..3 holds taps (2, 1+2, 0+1, 0).
    """
    def along(kernel: torch.Tensor, dim: int) -> torch.Tensor:
        t0, t1, t2 = kernel.unbind(dim)
        return torch.stack((t2, t1 + t2, t0 + t1, t0), dim)

    return along(along(weight, 2), 3).transpose(0, 1)


def upsample_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(nearest 2x upsampling of x)``, the same function up to float rounding, as one transposed conv:
    16 instead of 36 multiply-adds per channel pair and input pixel, and no upsampled map. Gradients
    reach ``conv``'s 3x3 weight through :func:`transposed_kernel`, so checkpoints keep the 3x3 layout.
    Measured on 2 CPU cores (AVX2, batch 64): 1.8-2.2x faster forward + backward at the cVAE's two
    MNIST levels (bench/bench_train_speed.py for whole runs)."""
    kernel = transposed_kernel(conv.weight)
    if x.is_contiguous(memory_format=torch.channels_last):
        kernel = kernel.contiguous(memory_format=torch.channels_last)
    return transposed_upsample(x, kernel, conv.bias)


def transposed_upsample(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(N, C_in, h, w) -> (N, C_out, 2h, 2w) with a :func:`transposed_kernel` (the stride and padding it was built for)."""
    return F.conv_transpose2d(x, kernel, bias, stride=2, padding=1)


def upsample_conv_reference(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """What :func:`upsample_conv` computes, written the direct way (tests and the before/after bench)."""
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    top, left = (x.shape[2] - size[0]) // 2, (x.shape[3] - size[1]) // 2
    return x[:, :, top : top + size[0], left : left + size[1]]


class Discriminator(nn.Module):
    """Projection discriminator with spectral norm: (images, labels) -> (N,) realness logits."""

    def __init__(self, config: CGANConfig):
        super().__init__()
        channels_in, height, width = config.image_shape
        n_levels = n_resamplings(height, width)
        channels = [channels_in] + level_channels(config, n_levels)[::-1]  # image level first
        self.n_levels = n_levels
        self.convs = nn.ModuleList(spectral_norm(nn.Conv2d(a, b, 3, padding=1)) for a, b in zip(channels[:-1], channels[1:]))
        self.linear = spectral_norm(nn.Linear(channels[-1], 1))
        self.embed = spectral_norm(nn.Embedding(config.n_classes, channels[-1]))

    def forward(self, x: torch.Tensor, labels: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = F.leaky_relu(conv(x), 0.2)
            if i < self.n_levels:
                x = F.avg_pool2d(x, 2)
        h = x.sum(dim=(2, 3))  # (N, C_last) global sum pooling
        return self.linear(h).squeeze(1) + strength * (self.embed(labels) * h).sum(dim=1)


class CGAN(nn.Module):
    """Generator, discriminator and the EMA generator used for sampling."""

    def __init__(self, config: CGANConfig):
        super().__init__()
        self.config = config
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)
        self.ema_generator = copy.deepcopy(self.generator).requires_grad_(False).eval()
        self.register_buffer("lecam_anchors", torch.zeros(2))  # running means of D on (real, fake): in checkpoints


def condition_strength(step: int, total_steps: int, fade: tuple[float, float]) -> float:
    """Class-conditioning strength at ``step``: 0 before ``fade[0] * total_steps``, 1 after ``fade[1] * total_steps``, linear between."""
    start, end = fade[0] * total_steps, fade[1] * total_steps
    if step >= end:
        return 1.0
    if step < start:
        return 0.0
    return (step - start) / (end - start)


def lecam_penalty(real_logits: torch.Tensor, fake_logits: torch.Tensor, anchors: torch.Tensor, decay: float = 0.99) -> torch.Tensor:
    """LeCam regulariser (Tseng et al. 2021) of one discriminator step; updates ``anchors`` (running
    means of D on real and on fake images) in place after computing the penalty."""
    penalty = F.relu(real_logits - anchors[1]).pow(2).mean() + F.relu(anchors[0] - fake_logits).pow(2).mean()
    with torch.no_grad():
        anchors.lerp_(torch.stack([real_logits.mean(), fake_logits.mean()]).detach().to(anchors.dtype), 1.0 - decay)
    return penalty


def discriminator_update(discriminator: nn.Module, optimizer: torch.optim.Optimizer, real: torch.Tensor, fake: torch.Tensor,
                         labels: torch.Tensor, rng: torch.Generator, policy: tuple[str, ...], lecam_weight: float,
                         anchors: torch.Tensor, strength: float = 1.0) -> dict[str, torch.Tensor]:
    """One hinge-loss step of a projection discriminator on real vs (detached) fake (N, C, H, W) images."""
    with autocast(real.device):
        # one pass over real and fake together: (2N, C, H, W) -> (2N,) logits
        augmented = torch.cat([diff_augment(real, policy, rng), diff_augment(fake, policy, rng)])
        real_logits, fake_logits = discriminator(augmented, torch.cat([labels, labels]), strength).float().chunk(2)
    loss_d = hinge_discriminator_loss(real_logits, fake_logits)
    total = loss_d + lecam_weight * lecam_penalty(real_logits, fake_logits, anchors) if lecam_weight > 0 else loss_d
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return {"loss_d": loss_d.detach(), "d_real": real_logits.detach().mean(), "d_fake": fake_logits.detach().mean()}


def output_activation(raw: torch.Tensor) -> torch.Tensor:
    return torch.tanh(raw)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """EMA of weights with a warm-up (decay grows with the step); BN buffers are copied."""
    decay = min(decay, (1.0 + step) / (10.0 + step))
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param, 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


def build_optimizers(model: CGAN, lr_generator: float, lr_discriminator: float) -> dict[str, torch.optim.Optimizer]:
    betas = (0.0, 0.99)  # beta1 = 0 is the usual choice for hinge-loss GANs with spectral norm
    return {
        "generator": torch.optim.Adam(model.generator.parameters(), lr=lr_generator, betas=betas),
        "discriminator": torch.optim.Adam(model.discriminator.parameters(), lr=lr_discriminator, betas=betas),
    }


def _noise(n: int, latent_dim: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(n, latent_dim, generator=rng).to(device)


def mode_seeking_loss(first: torch.Tensor, second: torch.Tensor, z_first: torch.Tensor, z_second: torch.Tensor) -> torch.Tensor:
    """1 / (mean |x1 - x2| / mean |z1 - z2|) over pairs of samples (Mao et al. 2019, MSGAN): large when
    different noise gives near-identical images. Means over the batch, as the reference implementation."""
    ratio = (first.float() - second.float()).abs().mean() / (z_first.float() - z_second.float()).abs().mean()
    return 1.0 / (ratio + 1e-5)


def generator_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels for the generator step with mode seeking: sample i and i + N // 2 share row i's class."""
    half = len(labels) // 2
    return torch.cat([labels[:half], labels[:half], labels[2 * half:]])


def train_step(
    model: CGAN,
    optimizers: dict[str, torch.optim.Optimizer],
    real: torch.Tensor,
    labels: torch.Tensor,
    rng: torch.Generator,
    step: int,
    policy: tuple[str, ...],
    ema_decay: float,
    lecam_weight: float = 0.0,
    strength: float = 1.0,
    mode_seeking_weight: float = 0.0,
    generator_net: nn.Module | None = None,
    discriminator_net: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """One discriminator step and one generator step on a batch of real (N, C, H, W) images.

    ``strength``: class-conditioning strength (:func:`condition_strength`). With ``mode_seeking_weight``
    > 0 the generator step draws pairs of one class (:func:`generator_labels`) and adds
    :func:`mode_seeking_loss`. ``generator_net`` /
    ``discriminator_net`` are the modules to call (e.g. DistributedDataParallel wrappers); by
    default the model's own networks.
    """
    device, latent_dim = real.device, model.config.latent_dim
    generator = generator_net if generator_net is not None else model.generator
    discriminator = discriminator_net if discriminator_net is not None else model.discriminator
    with torch.no_grad(), autocast(device):
        fake = output_activation(generator(_noise(len(real), latent_dim, rng, device), labels, strength))
    losses = discriminator_update(discriminator, optimizers["discriminator"], real, fake.float(), labels, rng, policy, lecam_weight,
                                  model.lecam_anchors, strength)
    seeking = mode_seeking_weight > 0 and len(real) >= 2  # a batch of one has no pair
    g_labels = generator_labels(labels) if seeking else labels
    with autocast(device):
        z = _noise(len(real), latent_dim, rng, device)
        fake = output_activation(generator(z, g_labels, strength))
        loss_g = hinge_generator_loss(discriminator(diff_augment(fake, policy, rng), g_labels, strength).float())
    total, logged = loss_g, {**losses, "loss_g": loss_g.detach()}
    if seeking:
        half = len(real) // 2
        loss_ms = mode_seeking_loss(fake[:half], fake[half : 2 * half], z[:half], z[half : 2 * half])
        total, logged["loss_ms"] = loss_g + mode_seeking_weight * loss_ms, loss_ms.detach()
    optimizers["generator"].zero_grad(set_to_none=True)
    total.backward()
    optimizers["generator"].step()
    update_ema(model.ema_generator, generator, ema_decay, step)
    return {**logged, "strength": torch.tensor(strength)}


@torch.no_grad()
def validation_loss(model: CGAN, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Hinge 'real' loss of the discriminator on held-out real images (rises as D memorises train)."""
    model.discriminator.eval()
    with autocast(images.device):
        logits = model.discriminator(images, labels).float()
    model.discriminator.train()
    return float(F.relu(1.0 - logits).mean())
