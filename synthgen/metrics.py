"""Metrics shared by the stages: classification scores, intervals over seeds, nearest-neighbour distances.

No stage owns them: :func:`stratified_folds` cuts the cross-fitting folds of the confidence filter
and of the recipe selection; ``evaluate`` scores arms with :func:`score` (recall of the
:func:`tail_classes` too) and :func:`t_interval`, the
novelty filter and the near-copy metric use :func:`nearest_distance`, generator quality uses
:func:`pairwise_distances`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, recall_score


def tail_classes(train_counts: np.ndarray, n_tail: int = 5) -> np.ndarray:
    """The classes with the fewest real training images: those with no more than the ``n_tail``-th fewest (``n_tail``
    at most half of the classes), ties kept whole rather than cut by class index; none when every class has as many."""
    counts = np.asarray(train_counts)
    if len(counts) == 0 or counts.min() == counts.max():
        return np.zeros(0, dtype=np.int64)
    cutoff = np.sort(counts)[max(1, min(n_tail, len(counts) // 2)) - 1]
    # a cutoff tied with the largest classes would take them all: then only the classes below them
    return np.flatnonzero(counts < cutoff if cutoff == counts.max() else counts <= cutoff)


def score(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, tail: np.ndarray | None = None) -> dict:
    """Accuracy, macro-F1 (sklearn.metrics), balanced accuracy, per-class recall, tail-class recall."""
    labels = np.arange(n_classes)
    recall = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "tail_recall": float(recall[tail].mean()) if tail is not None and len(tail) else float("nan"),  # none: balanced
        "recall": recall.astype(float),
    }


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true`` (sklearn's definition, without its warning
    when a fold of a rare class predicts a class the fold does not hold)."""
    classes = np.unique(y_true)
    return float(np.mean([(y_pred[y_true == c] == c).mean() for c in classes])) if len(classes) else float("nan")


def t_interval(values, confidence: float = 0.95) -> dict:
    """Mean, std (ddof=1) and the two-sided Student-t confidence interval of the mean."""
    values = np.asarray(values, dtype=np.float64)
    n, mean = len(values), float(values.mean())
    std = float(values.std(ddof=1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * std / np.sqrt(n)) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def flat_pixels(x: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, H*W*C) in [0, 1], the space of the novelty distances."""
    return torch.from_numpy(np.ascontiguousarray(x).reshape(len(x), -1)).float().div_(255.0)


def nearest_distance(queries: torch.Tensor, reference: torch.Tensor, batch_size: int = 1024,
                     exclude_self: bool = False) -> np.ndarray:
    """L2 distance of each query row to its nearest reference row, chunked (memory: batch x N_ref).

    ``exclude_self``: the queries ARE the reference (leave-one-out); a lone row gets ``inf``.
    """
    out = []
    for start in range(0, len(queries), batch_size):
        distances = torch.cdist(queries[start : start + batch_size], reference)
        if exclude_self:
            rows = torch.arange(distances.shape[0])
            distances[rows, rows + start] = math.inf
        out.append(distances.min(dim=1).values if distances.shape[1] else torch.full((distances.shape[0],), math.inf))
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances (len(a), len(b)) between row vectors (float64 for stable small values)."""
    return torch.cdist(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)).numpy()


def stratified_folds(y: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold id per row: each class's rows shuffled (seeded) and dealt round-robin, so every fold
    gets a share of every class with at least ``n_folds`` images."""
    rng = np.random.default_rng([seed % 2**64, 17])
    folds = np.zeros(len(y), dtype=np.int64)
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        folds[rows] = (np.arange(len(rows)) + int(rng.integers(n_folds))) % n_folds
    return folds
