"""A small CNN image classifier with a scikit-learn estimator interface.

Used three ways: the real-data classifier behind the confidence and novelty filters, the
fixed downstream classifier of the evaluation harness, and the feature extractor for
diversity / Frechet distance / precision-recall. Follows scikit-learn's estimator rules:
``__init__`` only stores, ``fit`` returns ``self``, fitted attributes end in ``_``, and all
randomness comes from ``random_state``. The whole training set stays on the device as one
tensor and batches are drawn by index (scarce data: no per-sample DataLoader work).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from synthgen.data import to_tensor
from synthgen.device import autocast, inference_rows, resolve_device


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
    layers, kept = list(fused.body), []
    while layers:
        layer = layers.pop(0)
        if isinstance(layer, nn.Conv2d) and layers and isinstance(layers[0], nn.BatchNorm2d):
            layer = fuse_conv_bn_eval(layer, layers.pop(0))
        kept.append(layer)
    fused.body = nn.Sequential(*kept)
    return fused.to(memory_format=torch.channels_last)


class SmallCNN(nn.Module):
    """Two conv blocks (conv-BN-ReLU x2, then 2x2 max-pool while the map is >= 4 px), global pooling, MLP head.

    Works for any H, W >= 4: pooling stops before the map gets smaller than 2x2.
    """

    def __init__(self, config: SmallCNNConfig, image_size: tuple[int, int]):
        super().__init__()
        self.config = config
        width, size = config.width, min(image_size)
        layers: list[nn.Module] = []
        channels = config.in_channels
        for out_channels in (width, 2 * width):
            for _ in range(2):
                layers += [nn.Conv2d(channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
                channels = out_channels
            if size >= 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.neck = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(channels * 4, config.feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(config.feature_dim, config.n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, feature_dim) penultimate features."""
        return self.neck(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def classic_augment(images: torch.Tensor, allow_flips: bool = False) -> torch.Tensor:
    """Classical augmentation, an independent draw per image: small random affine (+ optional h-flip).

    Rotation within +-10 degrees, translation within +-10 % of the size, scale 0.9-1.1, empty
    border filled with -1 (black). Vectorised over the batch with one ``affine_grid`` /
    ``grid_sample`` call (a per-image torchvision loop was the evaluation harness's bottleneck);
    draws come from torch's global RNG, which ``CNNClassifier.fit`` seeds.
    """
    n, device = images.shape[0], images.device
    angle = (torch.rand(n) * 2 - 1) * (torch.pi * 10 / 180)
    scale = 0.9 + 0.2 * torch.rand(n)
    shift = (torch.rand(n, 2) * 2 - 1) * 0.2  # grid coordinates span [-1, 1]: 10 % of the size is 0.2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    if allow_flips:
        flip = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
        theta[:, :, 0] *= flip[:, None]  # mirror the sampled x coordinate
    grid = F.affine_grid(theta.to(device, images.dtype), list(images.shape), align_corners=False)
    # shift to [0, 2] so zero padding becomes -1 after shifting back
    return F.grid_sample(images + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0


class CNNClassifier(ClassifierMixin, BaseEstimator):
    """Small CNN trained for a fixed number of steps.

    ``balanced=True`` samples batches class-balanced (each class equally likely), the
    oversampling baseline. ``augment=True`` applies :func:`classic_augment` to every batch.
    ``sample_weight`` scales each sample's loss (e.g. down-weighting synthetic samples).
    Inputs ``X`` are uint8 (N, H, W, C) arrays, as in :mod:`synthgen.data`.
    """

    def __init__(
        self,
        n_classes: int | None = None,
        width: int = 32,
        steps: int = 300,
        batch_size: int = 64,
        lr: float = 2e-3,
        weight_decay: float = 5e-4,
        balanced: bool = False,
        augment: bool = False,
        allow_flips: bool = False,
        label_smoothing: float = 0.0,
        device: str = "auto",
        random_state: int | None = 0,
    ):
        self.n_classes = n_classes
        self.width = width
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.balanced = balanced
        self.augment = augment
        self.allow_flips = allow_flips
        self.label_smoothing = label_smoothing
        self.device = device
        self.random_state = random_state

    # ------------------------------------------------------------------ training
    def _batch_sampler(self, y: np.ndarray, sample_weight: np.ndarray | None, rng: torch.Generator):
        """Return a function drawing one batch of indices (with replacement, so any N works)."""
        probs = np.ones(len(y), dtype=np.float64)
        if self.balanced:
            counts = np.bincount(y, minlength=self.classes_.size).astype(np.float64)
            probs = 1.0 / counts[y]
        weights = torch.from_numpy(probs / probs.sum())
        return lambda: torch.multinomial(weights, self.batch_size, replacement=True, generator=rng)

    def fit(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None,
            soft_targets: np.ndarray | None = None) -> "CNNClassifier":
        """Train for ``steps`` batches. ``soft_targets`` (N, K) probabilities replace the one-hot
        targets in the loss (e.g. a real-data teacher's soft labels for synthetic samples);
        ``y`` still drives class-balanced sampling."""
        X, y = np.asarray(X), np.asarray(y).astype(np.int64)
        if X.ndim != 4 or X.dtype != np.uint8:
            raise ValueError(f"X must be uint8 (N, H, W, C), got {X.dtype} {X.shape}")
        if len(X) != len(y):
            raise ValueError(f"X has {len(X)} images but y has {len(y)} labels")
        n_classes = self.n_classes or int(y.max()) + 1
        self.classes_ = np.arange(n_classes)
        self.image_shape_ = tuple(X.shape[1:])
        device = resolve_device(self.device)
        seed = 0 if self.random_state is None else int(self.random_state)
        torch.manual_seed(seed)  # weight init and torchvision's augmentation draws
        rng = torch.Generator().manual_seed(seed)
        model = SmallCNN(SmallCNNConfig(X.shape[3], n_classes, self.width), X.shape[1:3]).to(device)
        images, labels = to_tensor(X, device), torch.from_numpy(y).to(device)
        if soft_targets is not None:  # (N, K) probabilities: cross_entropy accepts them as targets
            if np.shape(soft_targets) != (len(y), n_classes):
                raise ValueError(f"soft_targets must have shape {(len(y), n_classes)}, got {np.shape(soft_targets)}")
            labels = torch.as_tensor(soft_targets, dtype=torch.float32, device=device)
        weights = torch.ones(len(y), device=device) if sample_weight is None else torch.as_tensor(sample_weight, dtype=torch.float32, device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=self.steps, pct_start=0.15)
        draw = self._batch_sampler(y, sample_weight, rng)
        model.train()
        for _ in range(self.steps):
            batch = draw().to(device)
            inputs = images[batch]
            if self.augment:
                inputs = classic_augment(inputs, self.allow_flips)
            with autocast(device):
                logits = model(inputs)
            loss = F.cross_entropy(logits.float(), labels[batch], reduction="none", label_smoothing=self.label_smoothing)
            loss = (loss * weights[batch]).sum() / weights[batch].sum().clamp_min(1e-8)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        self.model_ = model
        self.inference_model_ = fuse_for_inference(model)
        self.device_ = device
        self.final_loss_ = float(loss.detach())
        return self

    # ----------------------------------------------------------------- inference
    def _check_input(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X)
        if tuple(X.shape[1:]) != self.image_shape_:
            raise ValueError(f"X images have shape {X.shape[1:]}, the classifier was fitted on {self.image_shape_}")
        return X

    @torch.inference_mode()
    def _map(self, X: np.ndarray, fn, batch_size: int = 2048) -> np.ndarray:
        X = self._check_input(X)
        batch_size = inference_rows(self.device_, batch_size, self.image_shape_[:2])
        outputs = []
        for start in range(0, len(X), batch_size):
            inputs = to_tensor(X[start : start + batch_size], self.device_)
            with autocast(self.device_):
                outputs.append(fn(inputs).float().cpu())
        if not outputs:
            return np.zeros((0, 0), dtype=np.float32)
        return torch.cat(outputs).numpy()

    def _inference_model(self) -> "SmallCNN":
        fused = getattr(self, "inference_model_", None)  # absent from estimators pickled before it existed
        return self.model_ if fused is None else fused

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(N, K) class probabilities."""
        model = self._inference_model()
        return self._map(X, lambda t: torch.softmax(model(t).float(), dim=1))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.predict_proba(X).argmax(axis=1)

    def transform(self, X: np.ndarray) -> np.ndarray:
        """(N, feature_dim) penultimate-layer features (for novelty, diversity, Frechet distance)."""
        return self._map(X, self._inference_model().features)
