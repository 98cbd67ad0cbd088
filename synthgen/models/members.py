"""The training loop of the small CNN: many members (seeds x recipes x training sets) as one grouped network.

:func:`fit_tasks` trains a list of tasks, each the arguments of :func:`fit_members` (a training
set, a recipe and a list of seeds); tasks that share the step budget, batch size, learning rate,
width and image shape train together as one :class:`~synthgen.models.ensemble.GroupedCNN`, member
by member independent. Member e's run depends only on its own task and seed: its initial weights
are a ``SmallCNN`` built under ``torch.manual_seed(seed)`` (what a lone
:class:`~synthgen.models.classifier.CNNClassifier` gets), its batch indices come from
``torch.Generator().manual_seed(seed)`` over its own training set, and its augmentation, mixup and
dropout draws from a second generator of its own. Its recipe (class-balanced sampling,
augmentation, mixup, logit adjustment, sample weights, soft targets) applies to its rows only.
``batched=False`` runs every member alone (the reference path); the two differ only by float
rounding. The evaluation harness trains every baseline arm's seeds in one call, then every
synthetic arm's: on the CPU a step of a tiny CNN costs mostly per-call overhead, which one grouped
step pays once for all members (bench/bench_evaluate.py for one arm, bench/bench_evaluate_stage.py
for the whole stage).

The training sets stay on the device as tensors and batches are drawn by index (scarce data: no
per-sample DataLoader work).
"""

from __future__ import annotations

import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from synthgen import progress
from synthgen.device import autocast, cpu_autocast, cpu_bf16_enabled, inference_rows, resolve_device
from synthgen.models import ensemble
from synthgen.models.small_cnn import SmallCNN, SmallCNNConfig, seeded_cnn
from synthgen.tensors import to_tensor


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


def training_data(X, y, n_classes, width, balanced, sample_weight, soft_targets, device, prior_rows=None) -> TrainingData:
    """Validate the inputs and put them on ``device`` (see :func:`fit_members`)."""
    X, y = np.asarray(X), np.asarray(y).astype(np.int64)
    if X.ndim != 4 or X.dtype != np.uint8:
        raise ValueError(f"X must be uint8 (N, H, W, C), got {X.dtype} {X.shape}")
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} images but y has {len(y)} labels")
    if sample_weight is not None and np.shape(sample_weight) != (len(y),):
        raise ValueError(f"sample_weight must have shape {(len(y),)}, got {np.shape(sample_weight)}")
    if prior_rows is not None and (np.shape(prior_rows) != (len(y),) or not np.any(prior_rows)):
        raise ValueError(f"prior_rows must be a bool mask of shape {(len(y),)} with a True row, got shape {np.shape(prior_rows)}")
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
    rows = np.ones(len(y), bool) if prior_rows is None else np.asarray(prior_rows, bool)
    prior = ensemble.sampling_prior(y[rows], probs[rows], n_classes, None if sample_weight is None else weights[rows])

    def on_device(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(array, dtype=torch.float32, device=device)

    return TrainingData(to_tensor(X, device), on_device(targets), on_device(weights), on_device(prior), torch.from_numpy(probs),
                        SmallCNNConfig(X.shape[3], n_classes, width), device)


@dataclass(frozen=True)
class Member:
    """One network of a group: its training set, its recipe and its seed."""

    data: TrainingData
    recipe: ensemble.Recipe
    seed: int

    def group_key(self) -> tuple:
        """What every member of one grouped network must share: one optimizer schedule, one batch shape, one architecture."""
        recipe = self.recipe
        return (recipe.steps, recipe.batch_size, recipe.lr, recipe.weight_decay, recipe.label_smoothing, self.data.config,
                tuple(self.data.images.shape[1:]), str(self.data.device))


def stack_sets(members: list[Member]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The members' distinct training sets stacked: images (N, C, H, W), targets (N, K), weights (N,), and each
    member's first row in them (E, 1). Members of one task share one set (no copy when there is only one)."""
    sets = list({id(member.data): member.data for member in members}.values())
    starts = dict(zip(map(id, sets), np.cumsum([0] + [len(data.images) for data in sets[:-1]])))
    offsets = torch.tensor([[int(starts[id(member.data)])] for member in members])

    def stacked(field: str) -> torch.Tensor:
        parts = [getattr(data, field) for data in sets]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    return stacked("images"), stacked("targets"), stacked("weights"), offsets


def train_group(members: list[Member], cpu_bf16: bool = False) -> tuple[ensemble.GroupedCNN, list[float]]:
    """THE training loop: ``members`` (one :meth:`Member.group_key`) as one grouped network; returns it (eval mode) and each member's last loss.

    ``cpu_bf16``: forward passes under bf16 autocast on the CPU (weights and AdamW state stay fp32).
    """
    first = members[0]
    recipe, config, device = first.recipe, first.data.config, first.data.device  # the shared settings
    image_size = tuple(first.data.images.shape[2:])
    images, targets, weights, offsets = stack_sets(members)
    offsets = offsets.to(device)
    recipes = [member.recipe for member in members]
    augmenting = torch.tensor([e for e, r in enumerate(recipes) if r.augment], dtype=torch.long, device=device)
    mixing = any(r.mixup_alpha > 0 for r in recipes)
    # logit adjustment per member: tau 0 for plain cross-entropy adds exactly zero
    taus = torch.tensor([r.logit_adjust_tau if r.loss == "logit_adjusted" else 0.0 for r in recipes], device=device)
    priors = torch.stack([member.data.prior for member in members])[:, None, :]  # (E, 1, K)
    samplings = [member.data.sampling for member in members]
    # channels_last: 1.1-1.4x faster steps on the CPU (measured, E = 1 and 5, 8x8 and 28x28); untested elsewhere
    layout = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    # both seed and restore torch's global generator: one group at a time, or one's restore clobbers the other's seed
    with _GLOBAL_RNG:
        states = [seeded_cnn(config, image_size, member.seed).state_dict() for member in members]
        model = ensemble.GroupedCNN.from_member_states(config, image_size, states).to(device, memory_format=layout)
    batch_rngs = [torch.Generator().manual_seed(member.seed) for member in members]
    noise_rngs = [torch.Generator().manual_seed(ensemble.stream_seed(member.seed, ensemble.NOISE_STREAM)) for member in members]
    # AdamW and OneCycleLR act element-wise, so one optimizer over the grouped weights is E independent ones.
    # foreach: the same arithmetic as the per-tensor loop torch picks on the CPU (bit-identical weights), 1.1x faster at E = 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, foreach=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.15)
    model.train()
    for _ in range(recipe.steps):
        draws = ensemble.draw_step(recipes, samplings, batch_rngs, noise_rngs, model.body_features, config.dropout)
        draws = {name: value.to(device, non_blocking=True) for name, value in draws.items()}  # CPU draws: device-independent
        batch = draws["batch"] + offsets  # (E, B) rows of the stacked sets
        inputs, batch_targets, batch_weights = images[batch], targets[batch], weights[batch]  # (E, B, C, H, W), (E, B, K), (E, B)
        if len(augmenting):  # only the augmenting members' rows; theta is (A, B, 2, 3)
            warped = ensemble.apply_affine(inputs[augmenting].flatten(0, 1), draws["theta"].flatten(0, 1))
            inputs[augmenting] = warped.view(len(augmenting), *inputs.shape[1:])
        if mixing:  # after augmentation; weights mix like the targets; lam = 1 for members that do not mix
            inputs, batch_targets, batch_weights = (ensemble.mix(v, draws["lam"], draws["partner"]) for v in (inputs, batch_targets, batch_weights))
        with autocast(device), cpu_autocast(device, cpu_bf16):
            logits = model(ensemble.interleave(inputs).contiguous(memory_format=layout), draws["keep"]).float()  # (E, B, K)
        logits = ensemble.adjust_logits(logits, priors, taus[:, None, None])
        losses = ensemble.member_losses(logits, batch_targets, batch_weights, recipe.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # members share no weights: each gets only its own loss's gradient
        optimizer.step()
        schedule.step()
        progress.advance(len(members))  # one step of each member: a line per tenth inside a progress.milestones block
    return model.eval(), losses.detach().cpu().tolist()


AUTO_BATCH_MAX_PIXELS = 16 * 16  # batched="auto" on the CPU: only small images gain from one grouped model
SPLIT_MIN_MEMBERS = 8  # a grouped network splits across the CPU's threads only into parts of at least this many
_GLOBAL_RNG = threading.Lock()


def spread(jobs: list[list[int]], device: torch.device, allowed: bool = True) -> list[list[int]]:
    """``jobs`` (each a grouped network's member indices) with the largest halved while there are fewer jobs than
    the CPU's intra-op threads and each half keeps :data:`SPLIT_MIN_MEMBERS`: halves train side by side, one thread
    each (:func:`concurrently`). Digits 8x8, 2 cores, 300 steps: 30 members 1.16x (15 + 15 side by side against
    one group on two threads, 5 interleaved pairs), 16 members 1.1x, 10 members 1.04x, 4 none (docs/RESULTS.md)."""
    jobs = [list(job) for job in jobs]
    if not jobs or not allowed or device.type != "cpu":
        return jobs
    while len(jobs) < torch.get_num_threads():
        largest = max(range(len(jobs)), key=lambda j: len(jobs[j]))
        if len(jobs[largest]) < 2 * SPLIT_MIN_MEMBERS:
            break
        half = (len(jobs[largest]) + 1) // 2
        jobs[largest:largest + 1] = [jobs[largest][:half], jobs[largest][half:]]
    return jobs


def concurrently(fn, jobs: list, device: torch.device, allowed: bool = True) -> list:
    """``[fn(job) for job in jobs]``; on the CPU with T > 1 intra-op threads and several jobs, by T Python threads
    of one intra-op thread each (each job runs as it would alone with one thread: a test checks it bit for bit).

    A small CNN's ops use a second thread poorly: two 32x32 models of 300 steps took 25-26 s one after the other
    with two threads each, 17 s side by side with one; the evaluate stage on MNIST 20 per class (28x28, every
    arm one model at a time) 1.13-1.20x, the same verdict (bench/bench_evaluate_stage.py, docs/RESULTS.md). A
    new thread's first steps can cost about a second (measured on an AVX2 machine, where the filters' four
    300-step classifiers gained nothing; 1.4-1.6x on an AVX512 one). Each job runs in a copy of this context, so an enclosing
    :func:`synthgen.progress.milestones` block counts its steps.
    """
    threads = torch.get_num_threads()
    if not allowed or device.type != "cpu" or threads < 2 or len(jobs) < 2:
        return [fn(job) for job in jobs]
    torch.set_num_threads(1)  # new threads take the process-wide count when they first run an op
    try:
        with ThreadPoolExecutor(max_workers=min(threads, len(jobs))) as pool:
            contexts = [contextvars.copy_context() for _ in jobs]  # copied here: a worker thread's own context is empty
            return list(pool.map(lambda context, job: context.run(fn, job), contexts, jobs))
    finally:
        torch.set_num_threads(threads)


def task_members(X, y, seeds: list[int], *, n_classes=None, width=32, steps=300, batch_size=64, lr=2e-3,
                 weight_decay=5e-4, balanced=False, augment=False, allow_flips=False, label_smoothing=0.0,
                 loss="ce", logit_adjust_tau=1.0, mixup_alpha=0.0, sample_weight=None, soft_targets=None,
                 prior_rows=None, device="auto") -> list[Member]:
    """One task's members (one per seed), its inputs validated and put on the device (arguments: :func:`fit_members`)."""
    seeds = [int(seed) for seed in seeds]
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    if loss not in ensemble.LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose from {list(ensemble.LOSSES)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    data = training_data(X, y, n_classes, width, balanced, sample_weight, soft_targets, resolve_device(device), prior_rows)
    recipe = ensemble.Recipe(steps, batch_size, lr, weight_decay, augment, allow_flips, label_smoothing, loss, logit_adjust_tau, mixup_alpha)
    return [Member(data, recipe, seed) for seed in seeds]


def fit_tasks(tasks: list[dict], batched: bool | str = "auto", cpu_bf16: bool | str = False, concurrent: bool = True) -> list["Members"]:
    """Train every task (a dict of :func:`fit_members` arguments: X, y, seeds, recipe keywords); one :class:`Members` per task.

    ``batched=True``: the members of every task that share a :meth:`Member.group_key` train as one grouped
    network; ``False``: each member alone; ``"auto"``: batched on CUDA and for images of at most 16x16
    pixels, where per-step overhead dominates on the CPU (2 cores, five seeds of one arm: 1.9x faster on
    8x8 digits, but 0.87x on 28x28 MNIST, where the work is compute-bound and the members' activations
    leave the cache; bench/bench_evaluate.py). Both compute the same thing with the same draws; only
    float rounding differs (grouped vs plain conv kernels), which training amplifies over hundreds of
    steps (5 x 300 steps on digits: 99.4 % of test predictions agree, same accuracy).

    ``cpu_bf16`` (true, false or ``"auto"``: only on CPUs with native bf16) trains under bf16 autocast on
    the CPU. Measured on 2 cores with AVX512-BF16, same verdicts: the evaluate stage's arms 1.26x faster on
    8x8 digits (the whole stage 0.96-1.12x: its fp32 selection is half of it, and the machine is noisy),
    the whole stage 1.17x on 28x28 MNIST (bench/bench_evaluate_stage.py, docs/RESULTS.md). It rounds
    more than fp32, so the budget and recipe selection keep fp32.

    ``concurrent``: the networks (groups, single members, or the halves of a group of at least 16 members,
    :func:`spread`) train side by side on the CPU, one intra-op thread each (:func:`concurrently`); false: one
    after another with every thread, no group split (the code before).
    """
    per_task = [task_members(**task) for task in tasks]
    members = [member for group in per_task for member in group]
    if not members:
        return []
    def grouped(member: Member) -> bool:  # "auto" decided per member: one call may hold several image sizes
        if batched != "auto":
            return bool(batched)
        return member.data.device.type == "cuda" or int(np.prod(member.data.images.shape[2:])) <= AUTO_BATCH_MAX_PIXELS

    groups: dict[tuple, list[int]] = {}
    for index, member in enumerate(members):
        groups.setdefault(member.group_key() if grouped(member) else (index,), []).append(index)
    states, losses = [None] * len(members), [0.0] * len(members)
    bf16, jobs = cpu_bf16_enabled(members[0].data.device, cpu_bf16), spread(list(groups.values()), members[0].data.device, concurrent)
    trained = concurrently(lambda indices: train_group([members[i] for i in indices], bf16), jobs, members[0].data.device, concurrent)
    for indices, (model, final) in zip(jobs, trained):
        for position, index in enumerate(indices):
            states[index], losses[index] = model.member_state(position), final[position]
    results, start = [], 0
    for task, group in zip(tasks, per_task):
        data, chosen = group[0].data, range(start, start + len(group))
        image_size = tuple(data.images.shape[2:])
        model = ensemble.GroupedCNN.from_member_states(data.config, image_size, [states[i] for i in chosen]).to(data.device).eval()
        results.append(Members([m.seed for m in group], model, tuple(np.shape(task["X"])[1:]), [losses[i] for i in chosen]))
        start += len(group)
    return results


def fit_members(X, y, seeds: list[int], *, batched: bool | str = "auto", cpu_bf16: bool | str = False, **recipe) -> "Members":
    """Train one CNN per seed on the same (X, y) for ``steps`` batches of ``batch_size``.

    X uint8 (N, H, W, C), y int labels. ``balanced`` draws batches class-balanced (the oversampling
    baseline); ``augment`` applies :func:`~synthgen.models.small_cnn.classic_augment`; ``sample_weight``
    (N,) scales each row's loss (sum(w * l) / sum(w)); ``soft_targets`` (N, K) probabilities replace the
    one-hot targets (``y`` still drives sampling). ``loss="logit_adjusted"`` trains on logits + tau *
    log(prior), prior = the class distribution of the batches (:func:`ensemble.sampling_prior`);
    prediction uses the raw logits; ``prior_rows`` (N,) bool limits that prior to some rows (the real
    images, when the rest are synthetic). Under ``balanced=True`` without sample weights the prior is
    uniform and the adjustment is a no-op. ``mixup_alpha > 0`` mixes each augmented batch with a permutation of
    itself, lam ~ Beta(alpha, alpha) per sample, targets and weights mixed alike. ``batched`` and
    ``cpu_bf16``: see :func:`fit_tasks` (all seeds as one grouped network, or one at a time; the precision).
    """
    return fit_tasks([dict(X=X, y=y, seeds=seeds, **recipe)], batched, cpu_bf16)[0]


class Members:
    """The E trained CNNs of one task of :func:`fit_tasks`, kept as one grouped network."""

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
