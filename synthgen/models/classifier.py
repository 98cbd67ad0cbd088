"""The small CNN classifier as a scikit-learn estimator, and where its parts live.

Used three ways: the real-data classifier behind the confidence and discriminator filters, the
fixed downstream classifier of the evaluation harness (through :func:`fit_tasks` directly), and the
feature extractor for diversity / Frechet distance / precision-recall.

The network is :mod:`synthgen.models.small_cnn`; the one training loop, for any number of seeds,
recipes and training sets at once, is :mod:`synthgen.models.members`. Both are re-exported here.

:class:`CNNClassifier` follows scikit-learn's estimator rules (``__init__`` only stores, ``fit``
returns ``self``, fitted attributes end in ``_``, all randomness from ``random_state``) and fits
through :func:`fit_tasks` with one seed, ``random_state``; :func:`fit_together` fits several in one call.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin

from synthgen.device import autocast, inference_rows
from synthgen.models.members import Members, fit_members, fit_tasks
from synthgen.models.small_cnn import SmallCNN, SmallCNNConfig, classic_augment, fuse_for_inference, seeded_cnn
from synthgen.tensors import to_tensor

__all__ = ["CNNClassifier", "Members", "SmallCNN", "SmallCNNConfig", "classic_augment", "fit_members", "fit_tasks",
           "fit_together", "fuse_for_inference", "seeded_cnn"]


# ------------------------------------------------------------------------ estimator
class CNNClassifier(ClassifierMixin, BaseEstimator):
    """Small CNN trained for a fixed number of steps: one seed, ``random_state``, of :func:`fit_members`.

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
        return self._adopt(fit_tasks([self._task(X, y, sample_weight, soft_targets)], "auto")[0])

    def _task(self, X, y, sample_weight=None, soft_targets=None) -> dict:
        """This estimator's :func:`fit_tasks` task: one seed, ``random_state``."""
        return dict(X=X, y=y, seeds=[0 if self.random_state is None else int(self.random_state)], n_classes=self.n_classes,
                    width=self.width, steps=self.steps, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                    balanced=self.balanced, augment=self.augment, allow_flips=self.allow_flips, label_smoothing=self.label_smoothing,
                    loss=self.loss, logit_adjust_tau=self.logit_adjust_tau, mixup_alpha=self.mixup_alpha,
                    sample_weight=sample_weight, soft_targets=soft_targets, device=self.device)

    def _adopt(self, members: Members) -> "CNNClassifier":
        """Take the one trained member as this estimator's fitted state."""
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


def fit_together(fits: list[tuple]) -> list:
    """Fit each ``(estimator, X, y)`` on its own images; returns the estimators, fitted in place.

    The :class:`CNNClassifier` among them train in one :func:`fit_tasks` call: as one grouped network
    on small images, side by side on the CPU's threads on larger ones, each as it would train alone up
    to float rounding. The filters' cross-fitted classifiers and the quality stage's two take about
    two thirds of the time they took one after another (docs/RESULTS.md). Any other estimator fits alone.
    """
    calls: dict[str, list[tuple]] = {}  # one call per device: fit_tasks takes its bf16 and threads from its first task's
    for estimator, X, y in fits:
        if type(estimator) is CNNClassifier:  # a subclass may fit otherwise
            calls.setdefault(str(estimator.device), []).append((estimator, X, y))
        else:
            estimator.fit(X, y)
    for group in calls.values():
        for (estimator, _, _), members in zip(group, fit_tasks([estimator._task(X, y) for estimator, X, y in group], "auto")):
            estimator._adopt(members)
    return [estimator for estimator, _, _ in fits]
