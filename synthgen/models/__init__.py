"""The conditional-generator interface every downstream stage uses.

```python
model = load_generator("models/cgan/generator.pt", device)   # or build_generator("cvae", 10, (1, 8, 8))
model.n_classes, model.image_shape                             # image_shape = (C, H, W)
images = model.sample(class_labels, generator)                 # (N, C, H, W) float32 in [-1, 1]
model.has_discriminator                                        # True for the cGAN
scores = model.discriminator_score(images, class_labels)       # (N,), higher = more real
```

``generator.pt`` holds only tensors and plain types (``torch.load(weights_only=True)``): the
model kind, its config dataclass as a dict, the sampling network's weights (the EMA generator
for the cGAN, the decoder for the cVAE), the cGAN discriminator, the training step and the
train config.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import torch
from torch import nn

from synthgen.device import autocast
from synthgen.io import atomic_write_bytes
from synthgen.models import cgan, cvae

FORMAT = "synthgen-generator/1"
MODEL_KINDS = ("cgan", "cvae")


class ConditionalGenerator:
    """A trained (or freshly built) class-conditional generator, ready for sampling."""

    def __init__(self, kind: str, config, network: nn.Module, discriminator: nn.Module | None = None, step: int = 0):
        self.kind = kind
        self.config = config  # cgan.CGANConfig or cvae.CVAEConfig
        self.network = network.eval()  # (z, labels) -> raw output; see _activation
        self.discriminator = discriminator.eval() if discriminator is not None else None
        self.step = step

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
        if self.discriminator is not None:
            self.discriminator.to(device)
        return self

    def _activation(self, raw: torch.Tensor) -> torch.Tensor:
        return cgan.output_activation(raw) if self.kind == "cgan" else cvae.output_activation(raw)

    @torch.inference_mode()
    def sample(self, class_labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N,) class ids -> (N, C, H, W) float32 images in [-1, 1]. Noise is drawn from ``generator``
        on its own device (a CPU generator gives the same noise on every device)."""
        labels = torch.as_tensor(class_labels, dtype=torch.long)
        if labels.ndim != 1:
            raise ValueError(f"class_labels must be 1-D, got shape {tuple(labels.shape)}")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.n_classes):
            raise ValueError(f"class_labels must lie in 0..{self.n_classes - 1}")
        device = self.device
        noise_device = generator.device if generator is not None else device
        noise = torch.randn(len(labels), self.latent_dim, generator=generator, device=noise_device).to(device)
        with autocast(device):
            raw = self.network(noise, labels.to(device))
        return self._activation(raw.float()).clamp(-1.0, 1.0)

    @torch.inference_mode()
    def discriminator_score(self, images: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images in [-1, 1] and (N,) class ids -> (N,) float32 realness logits (cGAN only)."""
        if self.discriminator is None:
            raise ValueError(f"a {self.kind} has no discriminator; check has_discriminator first")
        device = self.device
        with autocast(device):
            scores = self.discriminator(images.to(device, torch.float32), torch.as_tensor(class_labels, dtype=torch.long).to(device))
        return scores.float()


# ------------------------------------------------------------------ building and I/O
def model_config(kind: str, n_classes: int, image_shape: tuple[int, int, int], **sizes):
    """The config dataclass of ``kind`` ('cgan' or 'cvae'); ``sizes`` override its fields."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model {kind!r}; choose from {list(MODEL_KINDS)}")
    config_class = cgan.CGANConfig if kind == "cgan" else cvae.CVAEConfig
    return config_class(n_classes=int(n_classes), image_shape=tuple(int(v) for v in image_shape), **sizes)


def build_network(config) -> nn.Module:
    """The full trainable module (cgan.CGAN or cvae.CVAE) for a config dataclass."""
    return cgan.CGAN(config) if isinstance(config, cgan.CGANConfig) else cvae.CVAE(config)


def as_generator(network: nn.Module, step: int = 0) -> ConditionalGenerator:
    """Wrap a training module for sampling: the cGAN's EMA generator + discriminator, the cVAE's decoder."""
    if isinstance(network, cgan.CGAN):
        return ConditionalGenerator("cgan", network.config, network.ema_generator, network.discriminator, step)
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
    return model.to(device)
