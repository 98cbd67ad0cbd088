"""The conditional-generator interface every downstream stage uses.

```python
model = load_generator("models/cgan/generator.pt", device)   # or build_generator("cvae", 10, (1, 8, 8))
model.n_classes, model.image_shape                             # image_shape = (C, H, W)
images = model.sample(class_labels, generator)                 # (N, C, H, W) float32 in [-1, 1]
images = model.sample(class_labels, generator, latent="interpolate")  # cVAE, VAE-GAN: between real codes
model.has_discriminator                                        # True for the cGAN
scores = model.discriminator_score(images, class_labels)       # (N,), higher = more real
```

``generator.pt`` holds only tensors and plain types (``torch.load(weights_only=True)``): the
model kind, its config dataclass as a dict, the sampling network's weights (the EMA generator
for the cGAN, the decoder for the cVAE), the cGAN discriminator, the cVAE's latent bank (the
posterior means of the training images and their labels), the training step and the train config.

Sampling modes (``latent=``): ``prior`` draws z ~ N(0, I). ``interpolate`` (cVAE, VAE-GAN) picks two
training images of the requested class from the latent bank, takes z on the segment between
their codes (t ~ U(0, 1)) and adds ``latent_noise`` x N(0, I) (None: the model's own,
``default_latent_noise``): samples stay on the region of
latent space that real images occupy instead of the prior's holes, which on scarce data made the
synthetic set far more useful downstream (docs/RESULTS.md). Rare classes also borrow codes of
other classes (``borrow_below``, :func:`interpolate_codes`).
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import torch
from torch import nn

from synthgen.device import autocast, inference_rows
from synthgen.io import atomic_write_bytes
from synthgen.models import cgan, cvae, fused, vaegan

FORMAT = "synthgen-generator/1"
MIN_CODES_TO_INTERPOLATE = 2  # one code gives only near-copies of its image (MNIST long tail: every candidate rejected)
MODEL_KINDS = ("cgan", "cvae", "vaegan")
CONFIG_CLASSES = {"cgan": cgan.CGANConfig, "cvae": cvae.CVAEConfig, "vaegan": vaegan.VAEGANConfig}
SAMPLING_NOISE = {"cgan": cvae.SAMPLING_NOISE, "cvae": cvae.SAMPLING_NOISE, "vaegan": vaegan.SAMPLING_NOISE}  # cgan: unused


class ConditionalGenerator:
    """A trained (or freshly built) class-conditional generator, ready for sampling."""

    def __init__(self, kind: str, config, network: nn.Module, discriminator: nn.Module | None = None, step: int = 0,
                 latent_bank: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.kind = kind
        self.config = config  # cgan.CGANConfig, cvae.CVAEConfig or vaegan.VAEGANConfig
        self.network = network.eval()  # (z, labels) -> raw output; see _activation (the vaegan's EMA decoder)
        self.discriminator = discriminator.eval() if discriminator is not None else None
        self.step = step
        self.latent_bank = latent_bank  # (codes (M, latent_dim) float32, labels (M,) int64) on the CPU, or None
        self.sampler: nn.Module | None = None  # fused.FusedGenerator once the weights are final (see fuse)

    @property
    def n_classes(self) -> int:
        return self.config.n_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.config.image_shape)  # type: ignore[return-value]

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def has_discriminator(self) -> bool:
        return self.discriminator is not None

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def to(self, device: torch.device | str) -> "ConditionalGenerator":
        self.network.to(device)
        if self.sampler is not None:
            self.sampler.to(device)
        if self.discriminator is not None:
            self.discriminator.to(device)
        return self

    def fuse(self) -> "ConditionalGenerator":
        """Sample through :class:`fused.FusedGenerator` (same function, ~3x faster on the CPU) from now on.

        Call it once the weights are final: the fused copy does not follow later changes to ``network``.
        """
        self.sampler = fused.FusedGenerator.from_generator(self.network)
        return self

    def _activation(self, raw: torch.Tensor) -> torch.Tensor:
        return cgan.output_activation(raw) if self.kind == "cgan" else cvae.output_activation(raw)  # vaegan: Bernoulli logits

    @property
    def default_latent_noise(self) -> float:
        """The noise ``interpolate`` sampling adds when none is given (generate.latent_noise: auto)."""
        return SAMPLING_NOISE[self.kind]

    def latent_noise_used(self, latent: str, latent_noise: float | None) -> float | None:
        """The noise ``sample(latent=..., latent_noise=...)`` adds: None for prior draws, the model's own for None."""
        if latent == "prior":
            return None
        return self.default_latent_noise if latent_noise is None else latent_noise

    @property
    def can_interpolate(self) -> bool:
        return self.latent_bank is not None and len(self.latent_bank[1]) > 0

    @torch.inference_mode()
    def sample(self, class_labels: torch.Tensor, generator: torch.Generator | None = None,
               latent: str = "prior", latent_noise: float | None = None, borrow_below: int = 0) -> torch.Tensor:
        """(N,) class ids -> (N, C, H, W) float32 images in [-1, 1]. Noise is drawn from ``generator``
        on its own device (a CPU generator gives the same noise on every device). ``latent``:
        ``prior`` or ``interpolate`` (module docstring); ``borrow_below``: see :func:`interpolate_codes`."""
        labels = torch.as_tensor(class_labels, dtype=torch.long)
        if labels.ndim != 1:
            raise ValueError(f"class_labels must be 1-D, got shape {tuple(labels.shape)}")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.n_classes):
            raise ValueError(f"class_labels must lie in 0..{self.n_classes - 1}")
        device = self.device
        noise_device = generator.device if generator is not None else device
        noise = torch.randn(len(labels), self.latent_dim, generator=generator, device=noise_device)
        if latent == "interpolate":
            if not self.can_interpolate:
                raise ValueError(f"latent='interpolate' needs a latent bank of encoded training images (cvae, vaegan); this {self.kind} has none")
            scale = self.latent_noise_used(latent, latent_noise)
            noise = interpolate_codes(self.latent_bank, labels.cpu(), noise.cpu(), scale, generator, borrow_below)
        elif latent != "prior":
            raise ValueError(f"unknown latent sampling {latent!r}; choose prior or interpolate")
        noise, labels = noise.to(device), labels.to(device)
        network = self.sampler if self.sampler is not None else self.network

        def decode(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with autocast(device):
                raw = network(z, y)
            return self._activation(raw.float()).clamp(-1.0, 1.0)

        # the noise is drawn above, so the chunking never changes a sample
        images = _map_rows(decode, inference_rows(device, len(labels), self.image_shape[1:]), noise, labels)
        return images if images is not None else torch.zeros(0, *self.image_shape, device=device)

    @torch.inference_mode()
    def discriminator_score(self, images: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images in [-1, 1] and (N,) class ids -> (N,) float32 realness logits (cgan, vaegan)."""
        if self.discriminator is None:
            raise ValueError(f"a {self.kind} has no discriminator; check has_discriminator first")
        device = self.device
        images, labels = images.to(device, torch.float32), torch.as_tensor(class_labels, dtype=torch.long).to(device)

        def score(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with autocast(device):
                return self.discriminator(x, y).float()

        scores = _map_rows(score, inference_rows(device, len(labels), tuple(images.shape[2:])), images, labels)
        return scores if scores is not None else torch.zeros(0, device=device)


def _map_rows(fn, rows: int, *tensors: torch.Tensor) -> torch.Tensor | None:
    """``fn(*tensors)`` computed ``rows`` rows at a time, results concatenated; None when there are no rows."""
    if len(tensors[0]) == 0:  # the networks cannot reshape an empty batch
        return None
    return torch.cat([fn(*(t[start : start + rows] for t in tensors)) for start in range(0, len(tensors[0]), rows)])


def interpolate_codes(bank: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor, noise: torch.Tensor,
                      latent_noise: float, generator: torch.Generator | None, borrow_below: int = 0) -> torch.Tensor:
    """Latents between two bank codes for each row's class, plus ``latent_noise`` x ``noise``.

    ``bank`` = (codes (M, D), code labels (M,)); ``labels`` (N,); ``noise`` (N, D) standard normal.
    A class with fewer than ``borrow_below`` codes (but at least one) interpolates between one of its
    own codes and a code of ANY class (style transfer: the cVAE's code holds what the label does
    not, such as slant and thickness, so a head-class code decoded with the rare label lends the
    rare class variety its one or two images lack). Other classes interpolate between two of their
    own codes; a one-code class that does not borrow keeps ``noise`` (prior sampling): around a
    single code the decoder only reproduces that one image. All draws come
    from ``generator`` (on the CPU), so the result depends only on its state.
    """
    codes, code_labels = bank
    gen_device = generator.device if generator is not None else torch.device("cpu")
    picks = torch.rand(len(labels), 3, generator=generator, device=gen_device).cpu()  # (N, 3): first, second, t
    z = noise.clone()
    everyone = torch.arange(len(code_labels))
    for label in labels.unique().tolist():
        rows = torch.nonzero(labels == label).flatten()
        members = torch.nonzero(code_labels == label).flatten()
        if len(members) >= 1 and len(members) < borrow_below:
            partners = everyone
        elif len(members) >= MIN_CODES_TO_INTERPOLATE:
            partners = members
        else:
            continue
        first = members[(picks[rows, 0] * len(members)).long().clamp_max(len(members) - 1)]
        second = partners[(picks[rows, 1] * len(partners)).long().clamp_max(len(partners) - 1)]
        t = picks[rows, 2:3]
        z[rows] = (1 - t) * codes[first] + t * codes[second] + latent_noise * noise[rows]
    return z


# ------------------------------------------------------------------ building and I/O
def model_config(kind: str, n_classes: int, image_shape: tuple[int, int, int], **sizes):
    """The config dataclass of ``kind`` ('cgan', 'cvae' or 'vaegan'); ``sizes`` override its fields."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model {kind!r}; choose from {list(MODEL_KINDS)}")
    return CONFIG_CLASSES[kind](n_classes=int(n_classes), image_shape=tuple(int(v) for v in image_shape), **sizes)


def build_network(config) -> nn.Module:
    """The full trainable module (cgan.CGAN, cvae.CVAE or vaegan.VAEGAN) for a config dataclass."""
    if isinstance(config, vaegan.VAEGANConfig):  # first: a VAEGANConfig is also a CVAEConfig
        return vaegan.VAEGAN(config)
    return cgan.CGAN(config) if isinstance(config, cgan.CGANConfig) else cvae.CVAE(config)


def as_generator(network: nn.Module, step: int = 0) -> ConditionalGenerator:
    """Wrap a training module for sampling: the cGAN's EMA generator + discriminator, the cVAE's decoder,
    the VAE-GAN's EMA decoder + discriminator."""
    if isinstance(network, cgan.CGAN):
        return ConditionalGenerator("cgan", network.config, network.ema_generator, network.discriminator, step)
    if isinstance(network, vaegan.VAEGAN):
        return ConditionalGenerator("vaegan", network.config, network.ema_decoder, network.discriminator, step)
    return ConditionalGenerator("cvae", network.config, network.decoder, None, step)


def build_generator(kind: str, n_classes: int, image_shape: tuple[int, int, int], seed: int = 0, **sizes) -> ConditionalGenerator:
    """An untrained generator in memory (for tests), e.g. ``build_generator("cgan", 3, (1, 8, 8), base_channels=8)``."""
    torch.manual_seed(seed)
    return as_generator(build_network(model_config(kind, n_classes, image_shape, **sizes)))


def generator_payload(model: ConditionalGenerator, train_config: dict | None = None) -> dict:
    config = dataclasses.asdict(model.config)
    config["image_shape"] = list(config["image_shape"])
    return {
        "format": FORMAT,
        "model": model.kind,
        "model_config": config,
        "network": {k: v.detach().cpu() for k, v in model.network.state_dict().items()},
        "discriminator": None if model.discriminator is None else {k: v.detach().cpu() for k, v in model.discriminator.state_dict().items()},
        "latent_bank": None if model.latent_bank is None else {"codes": model.latent_bank[0].cpu(), "labels": model.latent_bank[1].cpu()},
        "step": int(model.step),
        "train_config": train_config or {},
    }


def save_generator(model: ConditionalGenerator, path: str | Path, train_config: dict | None = None) -> Path:
    """Atomically write ``model`` (weights + config + step) to ``path``."""
    buffer = io.BytesIO()
    torch.save(generator_payload(model, train_config), buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_generator(path: str | Path, device: torch.device | str = "cpu") -> ConditionalGenerator:
    """Read a ``generator.pt`` written by ``synthgen train`` (or :func:`save_generator`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `synthgen train` first")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a synthgen generator file (expected format {FORMAT})")
    kind, config_dict = payload["model"], dict(payload["model_config"])
    config = model_config(kind, config_dict.pop("n_classes"), config_dict.pop("image_shape"), **config_dict)
    network = build_network(config)
    model = as_generator(network, payload["step"])
    model.network.load_state_dict(payload["network"])
    if model.discriminator is not None:
        model.discriminator.load_state_dict(payload["discriminator"])
    bank = payload.get("latent_bank")
    model.latent_bank = None if bank is None else (bank["codes"].float(), bank["labels"].long())
    return model.fuse().to(device)  # loaded weights are final: sample through the fused network
