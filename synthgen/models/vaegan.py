"""Adversarial class-conditional VAE (a VAE-GAN): the cVAE plus a projection discriminator.

The cVAE is what works on scarce data (its encoder's latent bank lets sampling interpolate between
real images of a class, so samples stay diverse), but its decoder is trained by a per-pixel
likelihood alone and its samples are blurry. Here a discriminator of the cGAN's kind (spectral
norm, projection head, hinge loss, DiffAugment on everything it sees, LeCam regulariser) judges the
decoder's reconstructions of real images, and the decoder minimises

    reconstruction + kl_weight * KL + adversarial_weight * C*H*W * hinge_generator_loss

so that its outputs are pushed toward the real-image manifold while the reconstruction term keeps
each output tied to the image it encodes: the adversarial term cannot collapse a class onto a
few modes, because every real image must still be reconstructed. Sampling uses an EMA of the
decoder, and the discriminator comes with the generator (``has_discriminator``).

``generate`` does not decode reconstructions: it decodes codes between two encoded images of a
class plus noise (``interpolate`` sampling). So with ``interpolation_noise`` set, D also judges
such decodes, made from the batch's own codes (:func:`batch_interpolations`; half of D's fakes,
and a second adversarial term of the decoder), and the decoder learns to render the region it is
sampled from, not only the codes of the training images (as Larsen et al. 2016 judge prior draws).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from synthgen.device import autocast
from synthgen.models import cgan, cvae
from synthgen.models.diffaugment import diff_augment


# The adversarial term sharpens the decoder and with it narrows what noise does: at the cVAE's 1.0
# its samples fell short of the real within-class spread (MNIST 20/class: feature-space diversity
# 0.77 in the worst class); at 1.3 every class reached 0.85 at 0.47x the cVAE's Frechet distance
# (bench/bench_train.py, docs/RESULTS.md), with D judging decodes at interpolation_noise 1.0 in
# training. generate.latent_noise: auto uses this.
SAMPLING_NOISE = 1.3


@dataclass(frozen=True)
class VAEGANConfig(cvae.CVAEConfig):
    """Same sizes as the cVAE; the discriminator follows the decoder's (cGAN) layout."""


class VAEGAN(nn.Module):
    """``vae`` (encoder + decoder, a :class:`cvae.CVAE`), ``discriminator`` and the EMA decoder used for sampling."""

    def __init__(self, config: VAEGANConfig):
        super().__init__()
        self.config = config
        self.vae = cvae.CVAE(config)
        self.discriminator = cgan.Discriminator(config.decoder_config())
        self.ema_decoder = copy.deepcopy(self.vae.decoder).requires_grad_(False).eval()
        self.register_buffer("lecam_anchors", torch.zeros(2))  # running means of D on (real, fake): in checkpoints


def build_optimizers(model: VAEGAN, lr: float, lr_discriminator: float) -> dict[str, torch.optim.Optimizer]:
    return {
        "vae": torch.optim.Adam(model.vae.parameters(), lr=lr),
        "discriminator": torch.optim.Adam(model.discriminator.parameters(), lr=lr_discriminator, betas=(0.0, 0.99)),
    }


def train_step(
    model: VAEGAN,
    optimizers: dict[str, torch.optim.Optimizer],
    real: torch.Tensor,
    labels: torch.Tensor,
    rng: torch.Generator,
    step: int,
    kl_weight: float,
    adversarial_weight: float,
    policy: tuple[str, ...],
    ema_decay: float,
    lecam_weight: float = 0.0,
    interpolation_noise: float | None = None,
    vae_net: nn.Module | None = None,
    discriminator_net: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """One discriminator step on real vs generated (N, C, H, W) images, then one VAE step on the
    negative ELBO plus the adversarial term. Generated: the reconstructions, or with
    ``interpolation_noise`` set, half reconstructions and half decodes between codes of the batch
    (the decoder's adversarial term then covers all of both). ``vae_net`` / ``discriminator_net``:
    e.g. DDP wrappers."""
    vae = vae_net if vae_net is not None else model.vae
    discriminator = discriminator_net if discriminator_net is not None else model.discriminator
    noise = torch.randn(len(real), model.config.latent_dim, generator=rng).to(real.device)
    with autocast(real.device):
        logits, mu, logvar = vae(real, labels, noise)
    fake = cvae.output_activation(logits.float())
    fakes, fake_labels = fake, labels
    if interpolation_noise is not None:
        codes = batch_interpolations(mu.detach().float(), labels, interpolation_noise, rng)
        with autocast(real.device):
            # the module itself: under DDP, vae_net wraps model.vae, whose decoder this is
            between = cvae.output_activation(model.vae.decoder(codes, labels).float())
        half = len(real) // 2  # D's fakes keep the batch size: reconstructions, then decodes between codes
        fake_for_d = torch.cat([fake[:half], between[half:]])
        fakes, fake_labels = torch.cat([fake, between]), torch.cat([labels, labels])
    else:
        fake_for_d = fake
    losses = cgan.discriminator_update(discriminator, optimizers["discriminator"], real, fake_for_d.detach(), labels, rng, policy,
                                       lecam_weight, model.lecam_anchors)
    loss, recon, kl = cvae.cvae_loss(logits.float(), real, mu.float(), logvar.float(), kl_weight)
    with autocast(real.device):
        adversarial = cgan.hinge_generator_loss(discriminator(diff_augment(fakes, policy, rng), fake_labels).float())
    pixels = real[0].numel()
    total = loss + adversarial_weight * pixels * adversarial
    optimizers["vae"].zero_grad(set_to_none=True)
    total.backward()
    optimizers["vae"].step()
    cgan.update_ema(model.ema_decoder, model.vae.decoder, ema_decay, step)
    return {**losses, "loss": loss.detach(), "recon": recon.detach(), "kl": kl.detach(), "loss_g": adversarial.detach()}


def batch_interpolations(codes: torch.Tensor, labels: torch.Tensor, noise_scale: float, rng: torch.Generator) -> torch.Tensor:
    """(N, D) codes of a batch -> (N, D): each row's code moved toward the code of a random row of its class
    (any of them, itself included: a class's only row stays on its own code) by t ~ U(0, 1), plus ``noise_scale`` x N(0, I), as
    ``interpolate`` sampling draws them from the latent bank. Draws come from ``rng`` (CPU)."""
    n, device = len(labels), codes.device
    scores = torch.rand(n, n, generator=rng).to(device)
    same_class = labels[:, None] == labels[None, :]
    partner = scores.masked_fill(~same_class, -1.0).argmax(1)  # a uniform pick among the row's classmates
    t = torch.rand(n, 1, generator=rng).to(device)
    noise = torch.randn(n, codes.shape[1], generator=rng).to(device)
    return (1 - t) * codes + t * codes[partner] + noise_scale * noise


@torch.no_grad()
def validation_loss(model: VAEGAN, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The cVAE's held-out negative ELBO (KL weight 1)."""
    return cvae.validation_loss(model.vae, images, labels)
