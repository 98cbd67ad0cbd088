"""The small CNN image classifier: its config, the network, a seeded constructor and an inference copy with BN folded.

Trained by :mod:`synthgen.models.members` (one loop for every seed, recipe and training set) and
wrapped as a scikit-learn estimator by :mod:`synthgen.models.classifier`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from synthgen.models import ensemble


@dataclass(frozen=True)
class SmallCNNConfig:
    in_channels: int = 1
    n_classes: int = 10
    width: int = 32
    feature_dim: int = 128
    dropout: float = 0.3


def fuse_for_inference(model: "SmallCNN") -> "SmallCNN":
    """An eval-mode copy with every conv + BN folded into one conv, in channels_last.

    The same function to float rounding; half the time on the CPU (28x28, 2 cores: 303 -> 132
    us/sample), since each BN was a separate pass over the activations.
    """
    fused = copy.deepcopy(model).eval()
    fused.body = ensemble.fold_batch_norm(model.body)
    return fused.to(memory_format=torch.channels_last)


class SmallCNN(nn.Module):
    """Two conv blocks (conv-BN-ReLU x2, then 2x2 max-pool while the map is >= 4 px), average pooling to 2x2, MLP head.

    Works for any H, W >= 4: pooling stops before the map gets smaller than 2x2.
    """

    def __init__(self, config: SmallCNNConfig, image_size: tuple[int, int]):
        super().__init__()
        self.config = config
        self.body, n_features = ensemble.conv_body(config.in_channels, config.width, tuple(image_size))
        self.neck = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(n_features, config.feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(config.feature_dim, config.n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, feature_dim) penultimate features."""
        return self.neck(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def seeded_cnn(config: SmallCNNConfig, image_size: tuple[int, int], seed: int) -> SmallCNN:
    """``SmallCNN`` initialised under ``torch.manual_seed(seed)``, leaving torch's global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SmallCNN(config, image_size)



# --------------------------------------------------------------------- augmentation
def classic_augment(images: torch.Tensor, allow_flips: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Classical augmentation, an independent draw per image: small random affine (+ optional h-flip).

    Vectorised over the batch with one ``affine_grid`` / ``grid_sample`` call (a per-image
    torchvision loop was the evaluation harness's bottleneck). Draws come from the CPU
    ``generator`` (torch's global RNG when None), so they do not depend on the device.
    """
    return ensemble.apply_affine(images, ensemble.affine_params(images.shape[0], allow_flips, generator))

