"""Synthetic over-sampling in a notebook: :class:`SynthgenSampler`, an imbalanced-learn sampler.

```python
from imblearn.pipeline import make_pipeline
from synthgen.sampler import SynthgenSampler

sampler = SynthgenSampler(train={"steps": 500}, generate={"min_per_class": 0}, random_state=0)
X_res, y_res = sampler.fit_resample(X, y)   # X uint8 (N, H, W) or (N, H, W, C): real rows first, then synthetic
```

``fit_resample`` runs the pipeline's own cores on the arrays, writing no file (no DVC, no
Prefect): it trains the generator (:func:`synthgen.train.fit_generator`), plans each class's
synthetic quota from the ``generate`` section (:func:`synthgen.generate.compute_quotas`), draws
candidates (:func:`synthgen.generate.generate_candidates`) and keeps those that pass the filters,
topping up short classes (:func:`synthgen.filter.select_candidates`). The filters are fitted on
``X, y`` only and calibrate by cross-fitting (out-of-fold classifier probabilities,
leave-one-out novelty scales), so every image trains the generator and nothing is held out.

How many samples (imbalanced-learn's ``sampling_strategy``). The quotas come from the
``generate`` section, as in ``params.yaml`` (``balance``, ``count``, ``ratio``, ``min_per_class``),
not from a ``sampling_strategy`` argument. ``sampling_strategy`` is a read-only callable giving
imbalanced-learn the per-class targets (real + quota), so after fitting ``sampling_strategy_``
maps each label to its number of synthetic samples, as for every imbalanced-learn over-sampler.
``generate={"balance": "to_max", "min_per_class": 0}`` is imbalanced-learn's ``"auto"`` (every
class up to the largest); the section's default floor ``min_per_class: 100`` adds at least 100
per class. Filters can leave a class short (``filter_summary_["shortfalls"]``): the output then
has fewer rows than the targets.

Seeds: an int ``random_state`` replaces the ``seed`` of all three sections (0 reproduces the
pipeline's defaults); ``None`` keeps the sections' own seeds. Fits are deterministic on the CPU.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import numpy as np
from imblearn.base import BaseSampler
from imblearn.utils import check_target_type
from pydantic import ValidationError
from sklearn.utils import check_consistent_length, check_random_state

from synthgen import filter as filter_stage
from synthgen import generate as generate_stage
from synthgen import train as train_stage
from synthgen.config import ConfigError, FilterConfig, GenerateConfig, Section, TrainConfig
from synthgen.device import resolve_device


def as_section(section_class: type[Section], value, name: str) -> Section:
    """A params section from None (its defaults), a dict (validated) or the section itself."""
    if value is None:
        return section_class()
    if isinstance(value, section_class):
        return value
    if isinstance(value, Mapping):
        try:
            return section_class.model_validate(dict(value))
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in error.errors())
            raise ConfigError(f"SynthgenSampler({name}=...): {problems}") from None
    raise TypeError(f"SynthgenSampler({name}=...) takes a dict or a {section_class.__name__}, got {type(value).__name__}")


def check_images(X) -> np.ndarray:
    """``X`` as a uint8 (N, H, W) or (N, H, W, C) array with C in 1, 3, or a ValueError saying what is wrong."""
    images = np.asarray(X)
    if images.dtype != np.uint8:
        raise ValueError(f"X must hold uint8 images, got dtype {images.dtype} "
                         "(floats in [0, 1]: pass np.round(X * 255).astype(np.uint8))")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise ValueError(f"X must have shape (N, H, W) or (N, H, W, C) with C in 1, 3; got {images.shape}")
    return images


class SynthgenSampler(BaseSampler):
    """Over-sample image classes with filtered samples of a class-conditional generator trained on ``X, y``.

    ``train``, ``generate``, ``filter``: the sections of ``params.yaml`` (dicts or
    :class:`~synthgen.config.TrainConfig` / :class:`~synthgen.config.GenerateConfig` /
    :class:`~synthgen.config.FilterConfig`; None takes the defaults). ``random_state``: see the
    module docstring. ``fit_resample(X, y)`` returns ``X`` followed by the accepted synthetic
    images (same layout and dtype) and ``y`` followed by their labels.

    Fitted attributes: ``classes_`` (labels in sorted order), ``sampling_strategy_`` (label ->
    synthetic quota), ``generator_`` (the trained :class:`synthgen.models.ConditionalGenerator`),
    ``filters_``, ``train_summary_``, ``filter_summary_`` (per-class acceptance, shortfalls). When every
    quota is 0 (balanced data under ``to_max`` with ``min_per_class: 0``) nothing is trained:
    ``fit_resample`` returns ``X, y`` and ``generator_`` is None.
    """

    _sampling_type = "over-sampling"
    _parameter_constraints: dict = {
        "train": [dict, TrainConfig, None],
        "generate": [dict, GenerateConfig, None],
        "filter": [dict, FilterConfig, None],
        "random_state": ["random_state"],
    }

    def __init__(self, train=None, generate=None, filter=None, random_state=0):  # noqa: A002 - the params.yaml section name
        self.train = train
        self.generate = generate
        self.filter = filter
        self.random_state = random_state

    @property
    def sampling_strategy(self):
        """Read-only: ``y -> {label: real count + quota}`` from the ``generate`` section (module docstring)."""
        return self._targets

    def _targets(self, y) -> dict:
        labels, counts = np.unique(y, return_counts=True)
        quotas = generate_stage.compute_quotas(counts, as_section(GenerateConfig, self.generate, "generate"))
        return {label: int(count + quota) for label, count, quota in zip(labels, counts, quotas)}

    def _sections(self) -> tuple[TrainConfig, GenerateConfig, FilterConfig]:
        sections = (as_section(TrainConfig, self.train, "train"), as_section(GenerateConfig, self.generate, "generate"),
                    as_section(FilterConfig, self.filter, "filter"))
        if self.random_state is None:
            return sections
        # numpy integers too (a grid search over np.arange seeds); a RandomState draws one
        state = self.random_state
        seed = int(state) if isinstance(state, numbers.Integral) else int(check_random_state(state).randint(2**31))
        return tuple(section.model_copy(update={"seed": seed}) for section in sections)  # type: ignore[return-value]

    def _check_X_y(self, X, y, accept_sparse=None):
        """imbalanced-learn validates X as a 2-D table; images are 3-D or 4-D (see :func:`check_images`)."""
        y, binarize_y = check_target_type(y, indicate_one_vs_all=True)
        images = check_images(X)
        check_consistent_length(images, y)
        return images, np.asarray(y), binarize_y

    def _fit_resample(self, X: np.ndarray, y: np.ndarray):
        train_config, generate_config, filter_config = self._sections()
        images = X if X.ndim == 4 else X[..., None]  # (N, H, W, C), as every stage core takes them
        self.classes_, codes = np.unique(y, return_inverse=True)
        quotas = np.array([self.sampling_strategy_.get(label, 0) for label in self.classes_], dtype=np.int64)
        n_classes = len(self.classes_)
        if not quotas.any():  # nothing to over-sample (e.g. balanced data under to_max): X, y as they are, no training
            self.generator_, self.filters_, self.train_summary_ = None, {}, None
            self.filter_summary_ = {"generated": 0, "accepted": 0, "quota": 0, "shortfalls": {}, "per_class": {}}
            return X, y
        generator, _, self.train_summary_ = train_stage.fit_generator(train_config, images, codes, n_classes=n_classes)
        device = str(resolve_device(generate_config.device))
        self.generator_ = generator.fuse().to(device)  # weights are final: sample as a loaded generator does
        latent = generate_stage.resolve_latent(generate_config.latent, self.generator_)
        fakes = filter_stage.reference_samples(self.generator_, n_classes, filter_config, generate_config, device, latent)
        self.filters_ = filter_stage.fit_filters_on(filter_config, images, codes, self.generator_,
                                                    resolve_device(filter_config.device), n_classes=n_classes, fakes=fakes)

        def draw(requests: np.ndarray, first_id: int) -> dict[str, np.ndarray]:
            return generate_stage.generate_candidates(self.generator_, requests, first_id, generate_config, device, latent)

        accepted, table, history = filter_stage.select_candidates(draw, self.filters_, quotas, generate_config)
        self.filter_summary_ = filter_stage.summarize(table, quotas, self.filters_, [str(c) for c in self.classes_], history)
        synthetic = accepted["x"] if X.ndim == 4 else accepted["x"][..., 0]
        return np.concatenate([X, synthetic]), np.concatenate([y, self.classes_[accepted["y"]]])

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array, tags.input_tags.three_d_array = False, True
        tags.input_tags.sparse = tags.input_tags.dataframe = False
        return tags
