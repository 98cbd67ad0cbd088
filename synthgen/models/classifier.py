"""A small CNN image classifier: one training loop for E seeds at once, and a scikit-learn estimator on top.

Used three ways: the real-data classifier behind the confidence and novelty filters, the fixed
downstream classifier of the evaluation harness, and the feature extractor for diversity /
Frechet distance / precision-recall.

:func:`fit_members` is the only training loop. It trains one CNN per seed on the same data as
one grouped network (:mod:`synthgen.models.ensemble`: measured speed-ups there). Member e's run depends only on its seed: its initial weights are a
``SmallCNN`` built under ``torch.manual_seed(seed)`` (what a lone :class:`CNNClassifier` gets),
its batch indices come from ``torch.Generator().manual_seed(seed)`` and its augmentation,
mixup and dropout draws from a second generator of its own. ``batched=False`` runs the same loop
one seed at a time (the reference path); the two differ only by float rounding.

:class:`CNNClassifier` follows scikit-learn's estimator rules (``__init__`` only stores, ``fit``
returns ``self``, fitted attributes end in ``_``, all randomness from ``random_state``) and fits
through ``fit_members(seeds=[random_state])``. The training set stays on the device as one tensor
and batches are drawn by index (scarce data: no per-sample DataLoader work).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from torch import nn

from synthgen.device import autocast, inference_rows, resolve_device
from synthgen.models import ensemble
from synthgen.tensors import to_tensor


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
    """Two conv blocks (conv-BN-ReLU x2, then 2x2 max-pool while the map is >= 4 px), global pooling, MLP head.

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


# ------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainingData:
    """Everything the loop reads, on ``device``: images (N, C, H, W), targets (N, K), weights (N,), prior (K,)."""

    images: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    prior: torch.Tensor
    sampling: torch.Tensor  # (N,) float64 CPU probabilities of drawing each row
    config: SmallCNNConfig
    device: torch.device


def training_data(X, y, n_classes, width, balanced, sample_weight, soft_targets, device) -> TrainingData:
    """Validate the inputs and put them on ``device`` (see :func:`fit_members`)."""
    X, y = np.asarray(X), np.asarray(y).astype(np.int64)
    if X.ndim != 4 or X.dtype != np.uint8:
        raise ValueError(f"X must be uint8 (N, H, W, C), got {X.dtype} {X.shape}")
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} images but y has {len(y)} labels")
    if sample_weight is not None and np.shape(sample_weight) != (len(y),):
        raise ValueError(f"sample_weight must have shape {(len(y),)}, got {np.shape(sample_weight)}")
    n_classes = n_classes or int(y.max()) + 1
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"labels must lie in 0..{n_classes - 1}, got {y.min()}..{y.max()}")
    probs = np.ones(len(y)) if not balanced else 1.0 / np.bincount(y, minlength=n_classes)[y]
    probs = probs / probs.sum()
    if soft_targets is None:  # (N, K) probabilities: one-hot unless a teacher's soft labels are given
        targets = np.eye(n_classes, dtype=np.float32)[y]
    elif np.shape(soft_targets) != (len(y), n_classes):
        raise ValueError(f"soft_targets must have shape {(len(y), n_classes)}, got {np.shape(soft_targets)}")
    else:
        targets = np.asarray(soft_targets, dtype=np.float32)
    weights = np.ones(len(y), np.float32) if sample_weight is None else np.asarray(sample_weight, dtype=np.float32)
    prior = ensemble.sampling_prior(y, probs, n_classes, sample_weight)

    def on_device(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(array, dtype=torch.float32, device=device)

    return TrainingData(to_tensor(X, device), on_device(targets), on_device(weights), on_device(prior), torch.from_numpy(probs),
                        SmallCNNConfig(X.shape[3], n_classes, width), device)


def train_group(data: TrainingData, recipe: ensemble.Recipe, seeds: list[int]) -> tuple[ensemble.GroupedCNN, list[float]]:
    """THE training loop: the members ``seeds`` as one grouped network; returns it (eval mode) and each member's last loss."""
    image_size, device = tuple(data.images.shape[2:]), data.device
    states = [seeded_cnn(data.config, image_size, seed).state_dict() for seed in seeds]
    # channels_last: 1.1-1.4x faster steps on the CPU (measured, E = 1 and 5, 8x8 and 28x28); untested elsewhere
    layout = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    model = ensemble.GroupedCNN.from_member_states(data.config, image_size, states).to(device, memory_format=layout)
    batch_rngs = [torch.Generator().manual_seed(seed) for seed in seeds]
    noise_rngs = [torch.Generator().manual_seed(ensemble.stream_seed(seed, ensemble.NOISE_STREAM)) for seed in seeds]
    # AdamW and OneCycleLR act element-wise, so one optimizer over the grouped weights is E independent ones
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.15)
    model.train()
    for _ in range(recipe.steps):
        draws = ensemble.draw_step(recipe, data.sampling, batch_rngs, noise_rngs, model.body_features, data.config.dropout)
        draws = {name: value.to(device, non_blocking=True) for name, value in draws.items()}  # CPU draws: device-independent
        batch = draws["batch"]  # (E, B)
        inputs, targets, weights = data.images[batch], data.targets[batch], data.weights[batch]  # (E, B, C, H, W), (E, B, K), (E, B)
        if recipe.augment:
            inputs = ensemble.apply_affine(inputs.flatten(0, 1), draws["theta"].flatten(0, 1)).view_as(inputs)
        if recipe.mixup_alpha > 0:  # after augmentation; weights mix like the targets
            inputs, targets, weights = (ensemble.mix(v, draws["lam"], draws["partner"]) for v in (inputs, targets, weights))
        with autocast(device):
            logits = model(ensemble.interleave(inputs).contiguous(memory_format=layout), draws["keep"]).float()  # (E, B, K)
        if recipe.loss == "logit_adjusted":
            logits = ensemble.adjust_logits(logits, data.prior, recipe.logit_adjust_tau)
        losses = ensemble.member_losses(logits, targets, weights, recipe.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # members share no weights: each gets only its own loss's gradient
        optimizer.step()
        schedule.step()
    return model.eval(), losses.detach().cpu().tolist()


AUTO_BATCH_MAX_PIXELS = 16 * 16  # batched="auto" on the CPU: only small images gain from one grouped model


def fit_members(X, y, seeds: list[int], *, n_classes=None, width=32, steps=300, batch_size=64, lr=2e-3,
                weight_decay=5e-4, balanced=False, augment=False, allow_flips=False, label_smoothing=0.0,
                loss="ce", logit_adjust_tau=1.0, mixup_alpha=0.0, sample_weight=None, soft_targets=None,
                device="auto", batched="auto") -> "Members":
    """Train one CNN per seed on the same (X, y) for ``steps`` batches of ``batch_size``.

    X uint8 (N, H, W, C), y int labels. ``balanced`` draws batches class-balanced (the oversampling
    baseline); ``augment`` applies :func:`classic_augment`; ``sample_weight`` (N,) scales each row's
    loss (sum(w * l) / sum(w)); ``soft_targets`` (N, K) probabilities replace the one-hot targets
    (``y`` still drives sampling). ``loss="logit_adjusted"`` trains on logits + tau * log(prior),
    prior = the class distribution of the batches (:func:`ensemble.sampling_prior`); prediction uses
    the raw logits. Under ``balanced=True`` without sample weights the prior is uniform and the
    adjustment is a no-op. ``mixup_alpha > 0`` mixes each augmented batch with a permutation of itself,
    lam ~ Beta(alpha, alpha) per sample, targets and weights mixed alike. ``batched=True``: all seeds
    as one grouped network; ``batched=False``: one at a time; ``"auto"``: batched on CUDA and for
    images of at most 16x16 pixels, where per-step overhead dominates on the CPU (2 cores: 1.9x
    faster on 8x8 digits, but 0.87x on 28x28 MNIST, where the work is compute-bound and five
    members' activations leave the cache; bench/bench_evaluate.py). Both compute the same thing with the
    same draws; only float rounding differs (grouped vs plain conv kernels), which training amplifies
    over hundreds of steps (5 x 300 steps on digits: 99.4 % of test predictions agree, same accuracy).
    """
    seeds = [int(seed) for seed in seeds]
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    if loss not in ensemble.LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose from {list(ensemble.LOSSES)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    data = training_data(X, y, n_classes, width, balanced, sample_weight, soft_targets, resolve_device(device))
    if batched == "auto":
        batched = data.device.type == "cuda" or int(np.prod(np.shape(X)[1:3])) <= AUTO_BATCH_MAX_PIXELS
    recipe = ensemble.Recipe(steps, batch_size, lr, weight_decay, augment, allow_flips, label_smoothing, loss, logit_adjust_tau, mixup_alpha)
    groups = [seeds] if batched else [[seed] for seed in seeds]
    trained = [train_group(data, recipe, group) for group in groups]
    if batched:
        model = trained[0][0]
    else:  # stack the lone members into one grouped network for inference
        states = [lone.member_state(0) for lone, _ in trained]
        model = ensemble.GroupedCNN.from_member_states(data.config, trained[0][0].image_size, states).to(data.device).eval()
    return Members(seeds, model, tuple(np.shape(X)[1:]), [value for _, losses in trained for value in losses])


class Members:
    """The E trained CNNs of :func:`fit_members`, kept as one grouped network."""

    def __init__(self, seeds: list[int], model: ensemble.GroupedCNN, image_shape: tuple[int, int, int], final_losses: list[float]):
        self.seeds = list(seeds)
        self.model = model  # training-mode layout (BN separate): the source of member()
        self.inference_model = model.folded()  # conv + BN folded
        self.image_shape = image_shape  # (H, W, C)
        self.final_losses = final_losses  # each member's loss on its last batch
        self.device = next(model.parameters()).device
        self.n_classes = model.config.n_classes

    def __len__(self) -> int:
        return len(self.seeds)

    def member(self, e: int) -> SmallCNN:
        """Member ``e``'s weights as a plain SmallCNN in eval mode, on the training device."""
        cnn = seeded_cnn(self.model.config, self.model.image_size, 0)
        cnn.load_state_dict(self.model.member_state(e))
        return cnn.to(self.device).eval()

    @torch.inference_mode()
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(E, N, K) class probabilities of every member: one grouped forward pass per chunk of rows."""
        X = np.asarray(X)
        if tuple(X.shape[1:]) != self.image_shape:
            raise ValueError(f"X images have shape {X.shape[1:]}, the members were fitted on {self.image_shape}")
        height, width = self.image_shape[:2]
        rows = inference_rows(self.device, max(1, len(X)), (height, width * len(self)))  # a row is E images
        outputs = [torch.empty(len(self), 0, self.n_classes)]
        for start in range(0, len(X), rows):
            inputs = to_tensor(X[start : start + rows], self.device).repeat(1, len(self), 1, 1)  # (n, E*C, H, W)
            with autocast(self.device):
                outputs.append(torch.softmax(self.inference_model(inputs).float(), dim=2).cpu())
        return torch.cat(outputs, dim=1).numpy()

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(E, N) each member's predicted class."""
        return self.predict_proba(X).argmax(axis=2)


# ------------------------------------------------------------------------ estimator
class CNNClassifier(ClassifierMixin, BaseEstimator):
    """Small CNN trained for a fixed number of steps: :func:`fit_members` with one seed, ``random_state``.

    ``balanced=True`` samples batches class-balanced (each class equally likely), the
    oversampling baseline. ``augment=True`` applies :func:`classic_augment` to every batch.
    ``loss``, ``logit_adjust_tau`` and ``mixup_alpha`` are the loss recipes of :func:`fit_members`.
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
        loss: str = "ce",
        logit_adjust_tau: float = 1.0,
        mixup_alpha: float = 0.0,
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
        self.loss = loss
        self.logit_adjust_tau = logit_adjust_tau
        self.mixup_alpha = mixup_alpha
        self.device = device
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None,
            soft_targets: np.ndarray | None = None) -> "CNNClassifier":
        """Train for ``steps`` batches. ``soft_targets`` (N, K) probabilities replace the one-hot
        targets in the loss (e.g. a real-data teacher's soft labels for synthetic samples);
        ``y`` still drives class-balanced sampling."""
        seed = 0 if self.random_state is None else int(self.random_state)
        members = fit_members(
            X, y, [seed], n_classes=self.n_classes, width=self.width, steps=self.steps, batch_size=self.batch_size, lr=self.lr,
            weight_decay=self.weight_decay, balanced=self.balanced, augment=self.augment, allow_flips=self.allow_flips,
            label_smoothing=self.label_smoothing, loss=self.loss, logit_adjust_tau=self.logit_adjust_tau,
            mixup_alpha=self.mixup_alpha, sample_weight=sample_weight, soft_targets=soft_targets, device=self.device)
        self.classes_ = np.arange(members.n_classes)
        self.image_shape_ = members.image_shape
        self.model_ = members.member(0)
        self.inference_model_ = fuse_for_inference(self.model_)
        self.device_ = members.device
        self.final_loss_ = members.final_losses[0]
        return self

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

    def _inference_model(self) -> SmallCNN:
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
