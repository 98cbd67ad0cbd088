"""E copies of :class:`~synthgen.models.small_cnn.SmallCNN` as one grouped network, plus the per-member loss pieces.

The evaluation harness trains the same CNN for many arms x E seeds. Training the E seeds as one
network (grouped convolutions: member e's channels form group e) pays the per-call overhead of a
step once instead of E times. On the CPU (2 cores, width 16, batch 64, 5 seeds x 300 steps,
bench/bench_evaluate.py) that made 8x8 digits 1.9x faster, but 28x28 MNIST 0.87x: there the step
is compute- and cache-bound and E times larger activations no longer fit in cache. GPUs, where
per-call overhead dominates far more, were not measured. Member e's batch occupies input channels
``e*C:(e+1)*C``; every conv has ``groups=E``, every BatchNorm keeps per-channel (so per-member)
statistics, pooling is per channel, and the two linear layers hold one weight per member
(``(E, in, out)``, applied with a batched matmul). Nothing mixes members, so the gradient of the
summed loss reaches member e only through member e's own loss.

The layer order of ``body`` mirrors ``SmallCNN.body`` index for index, which is what lets
:meth:`GroupedCNN.member_state` and :meth:`GroupedCNN.from_member_states` convert weights by
slicing. Also here: the per-step random draws of every member (batch indices, affine
augmentation, mixup, dropout, each from the member's own generators) and the loss recipes
(logit adjustment, mixup, weighted soft cross-entropy). The training loop that uses all this
is ``members.train_group``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

LOSSES = ("ce", "logit_adjusted")
NOISE_STREAM = 1  # stream_seed(seed, 1) seeds a member's augmentation / mixup / dropout generator
MIN_PRIOR = 1e-12  # log(0) for a class the sampler never draws


def fold_batch_norm(body: nn.Sequential) -> nn.Sequential:
    """An eval-mode copy of ``body`` with every conv + BN pair folded into one conv (grouped convs too)."""
    layers, kept = list(copy.deepcopy(body).eval()), []
    while layers:
        layer = layers.pop(0)
        if isinstance(layer, nn.Conv2d) and layers and isinstance(layers[0], nn.BatchNorm2d):
            layer = fuse_conv_bn_eval(layer, layers.pop(0))
        kept.append(layer)
    return nn.Sequential(*kept)


def conv_body(in_channels: int, width: int, image_size: tuple[int, int], groups: int = 1) -> tuple[nn.Sequential, int]:
    """SmallCNN's body with every channel count times ``groups``: (conv-BN-ReLU x2, max-pool while the map is >= 4 px) x2,
    2x2 average pool (an identity when the map is already 2x2), flatten. Returns the body and the flattened features per member."""
    size, channels, layers = min(image_size), in_channels, []
    for out_channels in (width, 2 * width):
        for _ in range(2):
            layers += [nn.Conv2d(channels * groups, out_channels * groups, 3, padding=1, bias=False, groups=groups),
                       nn.BatchNorm2d(out_channels * groups), nn.ReLU(inplace=True)]
            channels = out_channels
        if size >= 4:
            layers.append(nn.MaxPool2d(2))
            size //= 2
    # already 2x2 (8x8 inputs): the pool would copy the map, and its backward cost 3% of a grouped step
    pool = nn.Identity() if size == 2 and max(image_size) == min(image_size) else nn.AdaptiveAvgPool2d(2)
    return nn.Sequential(*layers, pool, nn.Flatten()), channels * 4


class GroupedCNN(nn.Module):
    """``n_members`` SmallCNNs with one config, run as one network.

    ``forward`` takes (B, E*C, H, W), member e's images in channels ``e*C:(e+1)*C``, and returns
    (E, B, K) logits. Dropout is not drawn here: the training loop passes ``keep``, member e's
    (B, F) scaled keep-mask drawn from member e's own generator (torch's global RNG would tie the
    members' masks to each other and to E).
    """

    def __init__(self, config, image_size: tuple[int, int], n_members: int):
        super().__init__()
        self.config, self.image_size, self.n_members = config, tuple(image_size), n_members
        self.body, self.body_features = conv_body(config.in_channels, config.width, image_size, n_members)
        empty = torch.empty  # filled by from_member_states
        self.neck_weight = nn.Parameter(empty(n_members, self.body_features, config.feature_dim))
        self.neck_bias = nn.Parameter(empty(n_members, config.feature_dim))
        self.head_weight = nn.Parameter(empty(n_members, config.feature_dim, config.n_classes))
        self.head_bias = nn.Parameter(empty(n_members, config.n_classes))

    @classmethod
    def from_member_states(cls, config, image_size: tuple[int, int], states: list[dict]) -> "GroupedCNN":
        """Stack SmallCNN state dicts (member e = ``states[e]``) into one grouped network."""
        with torch.random.fork_rng(devices=[]):  # the convs' own init draws would move torch's global RNG
            model = cls(config, image_size, len(states))
        stacked = {}
        for key, value in model.body.state_dict().items():
            parts = [state[f"body.{key}"] for state in states]
            stacked[f"body.{key}"] = parts[0].clone() if value.ndim == 0 else torch.cat(parts)  # ndim 0: num_batches_tracked
        stacked["neck_weight"] = torch.stack([state["neck.1.weight"].T for state in states])
        stacked["neck_bias"] = torch.stack([state["neck.1.bias"] for state in states])
        stacked["head_weight"] = torch.stack([state["head.weight"].T for state in states])
        stacked["head_bias"] = torch.stack([state["head.bias"] for state in states])
        model.load_state_dict(stacked)
        return model

    def member_state(self, member: int) -> dict:
        """Member ``member``'s weights as a SmallCNN state dict (CPU copies)."""
        state = {}
        for key, value in self.body.state_dict().items():
            part = value if value.ndim == 0 else value.chunk(self.n_members)[member]
            state[f"body.{key}"] = part.detach().cpu().clone()
        state["neck.1.weight"] = self.neck_weight[member].detach().T.cpu().contiguous()
        state["neck.1.bias"] = self.neck_bias[member].detach().cpu().clone()
        state["head.weight"] = self.head_weight[member].detach().T.cpu().contiguous()
        state["head.bias"] = self.head_bias[member].detach().cpu().clone()
        return state

    def features(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, E*C, H, W) -> (E, B, feature_dim) penultimate features; ``keep`` (E, B, body_features) dropout mask."""
        flat = self.body(x).view(len(x), self.n_members, self.body_features).transpose(0, 1)  # (E, B, F)
        if keep is not None:
            flat = flat * keep
        return F.relu(torch.baddbmm(self.neck_bias.unsqueeze(1), flat, self.neck_weight))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return torch.baddbmm(self.head_bias.unsqueeze(1), self.features(x, keep), self.head_weight)

    def folded(self) -> "GroupedCNN":
        """An eval-mode copy with conv + BN folded (inference only)."""
        fused = copy.deepcopy(self).eval()
        fused.body = fold_batch_norm(self.body)
        return fused.to(memory_format=torch.channels_last)


def interleave(images: torch.Tensor) -> torch.Tensor:
    """(E, B, C, H, W) per-member batches -> (B, E*C, H, W), member e in channels e*C:(e+1)*C."""
    n_members, batch, channels, height, width = images.shape
    return images.transpose(0, 1).reshape(batch, n_members * channels, height, width)


# ----------------------------------------------------------- per-member random draws
def affine_params(n: int, allow_flips: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 2, 3) CPU affine matrices: rotation within +-10 degrees, translation within +-10 %, scale 0.9-1.1, optional h-flip."""
    angle = (torch.rand(n, generator=generator) * 2 - 1) * (torch.pi * 10 / 180)
    scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * 0.2  # grid coordinates span [-1, 1]: 10 % of the size is 0.2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    if allow_flips:
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        theta[:, :, 0] *= flip[:, None]  # mirror the sampled x coordinate
    return theta


def apply_affine(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Warp (N, C, H, W) images in [-1, 1] by (N, 2, 3) ``theta``, empty border filled with -1 (black)."""
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    # shift to [0, 2] so zero padding becomes -1 after shifting back
    return F.grid_sample(images + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0


@dataclass(frozen=True)
class Recipe:
    """One member's training settings (``members.fit_members`` arguments) that the loop reads."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    augment: bool
    allow_flips: bool
    label_smoothing: float
    loss: str
    logit_adjust_tau: float
    mixup_alpha: float


def draw_step(recipes: list[Recipe], samplings: list[torch.Tensor], batch_rngs: list, noise_rngs: list, n_features: int,
              dropout: float) -> dict:
    """One step's random draws for every member, each from that member's own generators and recipe, stacked on dim 0 (CPU).

    ``batch`` (E, B) row indices of the member's own training set (``samplings[e]``: its row
    probabilities) from the batch generator; then from the noise generator, in this order: ``theta``
    (A, B, 2, 3) affine for the A augmenting members, ``lam`` and ``partner`` (E, B) mixup (when any
    member mixes; lam = 1 and no draw for one that does not), ``keep`` (E, B, n_features) dropout mask.
    A member's draws are the same whatever else trains beside it.
    """
    draws: dict[str, list] = {"batch": [], "theta": [], "lam": [], "partner": [], "keep": []}
    mixing = any(recipe.mixup_alpha > 0 for recipe in recipes)
    for recipe, sampling, batch_rng, noise_rng in zip(recipes, samplings, batch_rngs, noise_rngs):
        size = recipe.batch_size
        draws["batch"].append(torch.multinomial(sampling, size, replacement=True, generator=batch_rng))
        if recipe.augment:
            draws["theta"].append(affine_params(size, recipe.allow_flips, noise_rng))
        if mixing:
            lam, partner = draw_mixup(size, recipe.mixup_alpha, noise_rng)
            draws["lam"].append(lam)
            draws["partner"].append(partner)
        draws["keep"].append(keep_mask((size, n_features), dropout, noise_rng))
    return {name: torch.stack(values) for name, values in draws.items() if values}


# ----------------------------------------------------------------------- loss recipes
def sampling_prior(y: np.ndarray, sampling_probs: np.ndarray, n_classes: int, sample_weight: np.ndarray | None = None) -> np.ndarray:
    """(K,) class distribution the training batches are drawn from, each row weighted by its loss weight:
    prior[c] = sum over rows of class c of p_i * w_i, normalised. Uniform under class-balanced sampling without weights."""
    mass = np.asarray(sampling_probs, dtype=np.float64)
    if sample_weight is not None:
        mass = mass * np.asarray(sample_weight, dtype=np.float64)
    prior = np.bincount(y, weights=mass, minlength=n_classes)
    prior = prior / max(prior.sum(), MIN_PRIOR)
    # a class absent from the training rows (a cross-validation fold without a one-image class) gets half
    # the rarest present class's prior, not ~0: log(1e-12) would freeze its logit at initialisation
    present = prior > 0
    if present.any() and not present.all():
        prior = np.where(present, prior, 0.5 * prior[present].min())
        prior = prior / prior.sum()
    return prior


def adjust_logits(logits: torch.Tensor, prior: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """Logit adjustment (Menon et al. 2021; Balanced Softmax at tau = 1): logits + tau * log(prior), prior >= 1e-12.

    Used in the training loss only; predictions use the raw logits, which then estimate the
    class-balanced posterior. A uniform prior adds the same constant to every class: a no-op.
    ``tau`` may be a tensor broadcast against the logits (per member; 0 leaves a member's logits as they are).
    """
    return logits + tau * prior.clamp_min(MIN_PRIOR).log()


def draw_mixup(batch: int, alpha: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(lam (B,), partner (B,)): lam ~ Beta(alpha, alpha) per sample, partner a random permutation of the batch.

    alpha = 0 means no mixing: lam = 1, partner = identity, and nothing is drawn from ``generator``.
    Beta = G1 / (G1 + G2) with gammas drawn in float64 (for small alpha both can underflow in float32).
    """
    if alpha <= 0:
        return torch.ones(batch), torch.arange(batch)
    gammas = torch._standard_gamma(torch.full((2, batch), float(alpha), dtype=torch.float64), generator=generator)
    lam = (gammas[0] / (gammas[0] + gammas[1])).nan_to_num(0.5).float()
    return lam, torch.randperm(batch, generator=generator)


def mix(values: torch.Tensor, lam: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """lam * v + (1 - lam) * v[partner] along dim 1: values (E, B, ...), lam and partner (E, B)."""
    index = partner.view(*partner.shape, *[1] * (values.ndim - 2)).expand_as(values)
    lam = lam.view(*lam.shape, *[1] * (values.ndim - 2)).to(values.dtype)
    return lam * values + (1 - lam) * values.gather(1, index)


def member_losses(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """(E,) each member's weighted-mean soft cross-entropy: logits and targets (E, B, K), weights (E, B)."""
    n_members, batch, n_classes = logits.shape
    losses = F.cross_entropy(logits.reshape(-1, n_classes), targets.reshape(-1, n_classes), reduction="none",
                             label_smoothing=label_smoothing).view(n_members, batch)
    return (losses * weights).sum(1) / weights.sum(1).clamp_min(1e-8)


def stream_seed(seed: int, stream: int) -> int:
    """A 63-bit seed for ``stream`` of ``seed`` (independent of ``torch.Generator().manual_seed(seed)``)."""
    return int(np.random.SeedSequence([seed % 2**63, stream]).generate_state(1, np.uint64)[0]) % 2**63


def keep_mask(shape: tuple[int, ...], dropout: float, generator: torch.Generator) -> torch.Tensor:
    """Inverted-dropout keep mask: 0 with probability ``dropout``, else 1 / (1 - dropout)."""
    return (torch.rand(shape, generator=generator) >= dropout).float() / (1.0 - dropout) if dropout > 0 else torch.ones(shape)

