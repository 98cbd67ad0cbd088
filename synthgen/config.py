"""Typed, frozen configuration for every stage, loaded from ``params.yaml``.

One section per stage (``data``, ``train``, ``generate``, ``filter``, ``evaluate``).
Each section is a frozen pydantic model that forbids unknown keys, so a typo such as
``filter.clasifier_threshold`` fails loudly with the dotted key named, instead of being
silently ignored. ``load_config(path, overrides=["train.steps=100"])`` applies single-key
overrides (the CLI's ``--set``) before validation, so overrides are type-checked too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from synthgen.config_base import CGANSection, CVAESection, Section, VAEGANSection  # noqa: F401 (Section re-exported)


class ConfigError(ValueError):
    """Invalid params: the message names the file and the dotted key at fault."""


# --------------------------------------------------------------------------- data
class LongTail(Section):
    """Long-tailed scarce split: class c gets round(max * ratio ** (-c / (K - 1))), at least 1."""

    max: int = Field(50, ge=1, description="Images of the largest (first) class.")
    ratio: float = Field(100.0, ge=1.0, description="Imbalance ratio largest / smallest.")


class DataConfig(Section):
    """Where the labeled images come from and how the scarce split is drawn."""

    source: str = Field(
        "digits",
        min_length=1,
        description="'digits' (built-in), an ImageFolder directory, an .npz file, or a directory of IDX files.",
    )
    test_source: str | None = Field(
        None, description="Optional separate test set (same formats and classes); then train comes from `source` alone."
    )
    val_source: str | None = Field(
        None, description="Optional separate labeled validation set (same classes): calibrates the filters and early "
        "stopping without taking images from training."
    )
    per_class: int | None = Field(
        None, ge=1, description="Draw this many training images per class from `source` (null: long_tail, or every image)."
    )
    long_tail: LongTail | None = Field(None, description="Long-tailed scarce split instead of per_class.")
    val_per_class: int = Field(
        0, ge=0, description="Images per class held out of training to calibrate the filters and stop early. 0 (or null): "
        "every labeled image trains, and the filters calibrate by cross-fitting on the training images instead."
    )
    test_per_class: int | None = Field(
        None, ge=1, description="Test images per class; null takes all that remain (or all of test_source)."
        " Needed without test_source when per_class and long_tail are both null."
    )
    image_size: int | None = Field(
        None, ge=4, description="Resize every image to this square size; null refuses mixed sizes."
    )
    seed: int = Field(0, description="Seed of the split draw.")

    @field_validator("val_per_class", mode="before")
    @classmethod
    def _null_is_zero(cls, value):
        return 0 if value is None else value

    @model_validator(mode="after")
    def _one_split_rule(self) -> "DataConfig":
        if self.per_class is not None and self.long_tail is not None:
            raise ValueError("data.per_class and data.long_tail are exclusive: set one of them to null")
        if self.val_source is not None and self.val_per_class:
            raise ValueError("data.val_source and data.val_per_class are exclusive: set val_per_class to 0")
        if self.test_source is not None and self.test_source in (self.source, self.val_source):
            which = "data.source" if self.test_source == self.source else "data.val_source"
            raise ValueError(f"data.test_source is the same as {which} ({self.test_source}): the test set must be other images")
        return self


# -------------------------------------------------------------------------- train
class TrainConfig(Section):
    """Generator training (stage `train`): shared loop settings plus one section per model."""

    model: Literal["cgan", "cvae", "vaegan"] = Field(
        "cvae", description="Which conditional generator to train (cvae: diverse on scarce data; vaegan: the cVAE plus a "
        "discriminator, sharper; cgan: closest to real images as a population, but more samples drift to another "
        "class, and behind the cVAE downstream on MNIST)."
    )
    seed: int = Field(0, description="Seed of weights, batches and noise.")
    steps: int = Field(2000, ge=1, description="Optimiser steps (one D + one G update each for the cGAN).")
    batch_size: int = Field(64, ge=1, description="Real images per step (drawn with replacement).")
    checkpoint_every: int = Field(500, ge=1, description="Steps between resumable checkpoints (and sample grids).")
    log_every: int = Field(50, ge=1, description="Steps between loss-curve rows.")
    eval_every: int = Field(250, ge=1, description="Steps between validation losses (val split).")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without a better val loss (null: never)."
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto")
    channels_last: bool = Field(
        True, description="Train with NHWC (channels-last) tensors: the same function, faster convolutions (bench/bench_train_speed.py)."
    )
    cpu_bf16: bool | Literal["auto"] = Field(
        "auto", description="bf16 autocast for CPU training (fp32 weights; CUDA always trains in bf16). auto: only on CPUs "
        "with native bf16 (AVX512-BF16 / AMX), where a 28x28 step is about 1.6x faster; fp32 elsewhere."
    )
    cgan: CGANSection = CGANSection()
    cvae: CVAESection = CVAESection()
    vaegan: VAEGANSection = VAEGANSection()


# ----------------------------------------------------------------------- generate
class GenerateConfig(Section):
    """Class-balanced sampling plan and generation (stage `generate`)."""

    balance: Literal["to_max", "to_count", "ratio"] = Field(
        "to_max", description="to_max: lift every class to the largest real count; to_count: to `count` (real + synthetic); ratio: see `ratio`."
    )
    count: int = Field(100, ge=0, description="Target real + synthetic per class for balance=to_count.")
    ratio: float = Field(
        1.0, ge=0, description="balance=ratio: ratio x all real images, given to the smallest classes first (ratio x real per class when balanced)."
    )
    min_per_class: int = Field(100, ge=0, description="Every class's quota is at least this (balanced data has no to_max deficit).")
    latent: Literal["auto", "prior", "interpolate"] = Field(
        "auto", description="Latent sampling: prior z ~ N(0, I); interpolate between encoded training images of the class "
        "(cVAE, VAE-GAN); auto = interpolate when the generator has a latent bank (cVAE, VAE-GAN), else prior."
    )
    latent_noise: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="interpolate: std of the Gaussian noise added to the interpolated code; auto: the model's "
        "own (cVAE 1.0; VAE-GAN 1.3, whose sharpened decoder turns noise into less variation)."
    )
    borrow_style_below: int = Field(
        5, ge=0, description="interpolate: a class with fewer training images than this interpolates between its own "
        "codes and codes of any class (style from the head classes, decoded with the rare label); 0 turns it off."
    )
    oversample: float = Field(2.0, ge=1.0, description="First-round over-generation factor before acceptance is measured.")
    max_rounds: int = Field(4, ge=1, description="Bound on top-up rounds.")
    batch_size: int = Field(1024, ge=1, description="Samples per generator forward pass.")
    shard_size: int = Field(4096, ge=1, description="Samples per shard on disk.")
    seed: int = Field(0)
    executor: Literal["serial", "process", "dask"] = Field("serial", description="Where shards are generated.")
    workers: int = Field(2, ge=1)
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto")


# ------------------------------------------------------------------------- filter
class FilterConfig(Section):
    """Two-stage filtering plus novelty (stage `filter`)."""

    discriminator: bool = Field(True, description="Use the discriminator-score filter (every generator: see discriminator_source).")
    discriminator_source: Literal["posthoc", "model"] = Field(
        "posthoc", description="posthoc: a discriminator trained after the generator on real vs generated images, "
        "cross-fitted so that it is calibrated on images it did not train on (any generator); model: the generator's "
        "own discriminator (cgan, vaegan), calibrated on the val split or on the training images it saw."
    )
    discriminator_quantile: float = Field(
        0.02, ge=0, le=1, description="Keep if D >= this quantile of D on real images of the class (out-of-fold); the posthoc "
        "cut rejects at most about this share of a class's candidates (calibrated on generated images it did not learn "
        "from; a guard against broken samples: rejecting more costs downstream accuracy, docs/RESULTS.md)."
    )
    discriminator_steps: int = Field(300, ge=1, description="Training steps of each posthoc discriminator fold.")
    discriminator_samples: int = Field(
        100, ge=1, description="Generated images per class the posthoc discriminator learns from (drawn as generate draws them, other seeds)."
    )
    discriminator_calibration_samples: int = Field(
        400, ge=1, description="Generated images per class that no posthoc fold learns from, scored as candidates are: "
        "discriminator_quantile of their scores is the cap (at 100, the 2% cut rejected 0.5-4% of a class's candidates)."
    )
    classifier: bool = Field(True, description="Use the classifier-confidence filter.")
    classifier_threshold: float = Field(0.5, ge=0, le=1, description="Min. probability of the conditioned class (after per-class calibration).")
    classifier_calibration: Literal["none", "per_class"] = Field(
        "per_class", description="per_class: t_c = min(threshold, classifier_quantile of p_c on real images of class c "
        "the classifier did not see: out-of-fold, or the val split)."
    )
    classifier_quantile: float = Field(0.1, ge=0, le=1, description="Quantile of held-out (or out-of-fold) real confidences for per-class calibration.")
    classifier_steps: int = Field(300, ge=1, description="Training steps of the real-data filter classifier (train split only).")
    calibration_folds: int = Field(
        3, ge=0, description="Without held-out images: cross-fitted folds whose out-of-fold probabilities calibrate "
        "the classifier threshold per class (0 or 1: no calibration, the global threshold)."
    )
    claim_threshold: float | None = Field(
        0.5, ge=0, le=1, description="A candidate of a class too small for the confidence filter to judge (filter.min_class_images) "
        "is rejected when its classifier gives a class it judges more than this probability: the sample reads as that class "
        "(null: off). MNIST, 1,000 / 40 / 1 images of three digits: the accepted set beat the unfiltered one by 8.2 points (docs/RESULTS.md)."
    )
    novelty: bool = Field(True, description="Reject near-copies of training images.")
    novelty_threshold: float = Field(
        0.1, ge=0, description="Reject if NN distance < this x median real NN distance of the class. Higher values "
        "reject useful variations of the few images of a tail class (MNIST long tail, latent interpolation: +0.5 points "
        "at 0.25, +2.1 at 0.1, +3.0 with novelty off).",
    )
    min_class_images: int = Field(
        5, ge=1, description="Filters judge only classes with at least this many real training images; in smaller classes only "
        "the claim filter (claim_threshold) rejects (the others can only say how unlike those few images a sample is). 1: judge every class."
    )
    discriminator_min_class_images: int | None = Field(
        20, ge=1, description="The discriminator judges only classes with at least this many real training images, "
        "or as many as the largest class, and never fewer than filter.min_class_images (null: filter.min_class_images). On a long tail, trained on a few images of a "
        "rare class, it calls the samples least like them unreal, and those teach a classifier the class's variation "
        "(MNIST long tails: +0.17 and +0.25 points over judging classes of 5+); on balanced data it judges every class "
        "(MNIST 10 per class: its cut earned +0.13 and +0.14 on two draws). docs/RESULTS.md.",
    )
    image_folder: bool = Field(
        True, description="Also write accepted/<class>/*.png. At 100k+ samples set false: DVC then hashes a few "
        "npz shards instead of one file per sample; `synthgen export` writes the ImageFolder tree on demand.",
    )
    write_workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Processes writing the ImageFolder tree, each every N-th shard; auto: every core "
        "from 10,000 accepted images on, else 1 (starting them costs more than they save below that).",
    )
    seed: int = Field(0)
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto")


# ----------------------------------------------------------------------- evaluate
RECIPE_NAMES = (
    "real", "real+classic", "real+oversample+classic", "real+logit_adjust", "real+logit_adjust+classic", "real+mixup+classic",
)


class EvaluateConfig(Section):
    """Downstream utility harness (stage `evaluate`): the best non-generative recipe, with and without synthgen."""

    classifier: Literal["small_cnn"] = Field("small_cnn", description="Fixed downstream classifier (not tuned per run).")
    width: int = Field(16, ge=4, description="Classifier width (same for every arm).")
    lr: float = Field(2e-3, gt=0, description="Classifier peak learning rate (same for every arm).")
    seeds: int = Field(5, ge=2, description="Classifier seeds per arm (paired across arms).")
    seed: int = Field(0, description="First classifier seed; seeds are seed, seed+1, ...")
    steps: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Optimiser steps of every arm; auto: doubled from min_steps while the out-of-fold "
        "balanced accuracy of real+classic on the training images still improves by more than budget_tolerance."
    )
    min_steps: int = Field(
        500, ge=1, description="First budget tried by steps: auto (why 500: docs/RESULTS.md)."
    )
    max_steps: int = Field(1000, ge=1, description="Largest budget steps: auto may choose.")
    budget_tolerance: float = Field(0.005, ge=0, description="Out-of-fold gain below which doubling the budget stops.")
    selection_folds: int = Field(2, ge=2, description="Stratified folds of the training images for the budget (and the recipe when test_every_recipe is false).")
    recipes: tuple[Literal[RECIPE_NAMES], ...] = Field(  # type: ignore[valid-type]
        RECIPE_NAMES, min_length=1, description="Non-generative recipes competing for the best baseline."
    )
    test_every_recipe: bool = Field(
        True, description="Score every recipe on test and give the strongest the synthetic set; false: only real and "
                          "the one selected out-of-fold on the training images (fewer arms on big test sets)."
    )
    logit_adjust_tau: float = Field(1.0, ge=0, description="Temperature of the logit-adjusted loss (1: Balanced Softmax).")
    logit_adjust_prior: Literal["real", "all"] = Field(
        "real", description="The class prior of the logit adjustment in arms with synthetic images. real: your images' class "
        "counts, as in the arm without them (a one-image class's samples cover far less of the class than their number says); "
        "all: every training row's, synthetic ones included, which the synthetic set makes nearly uniform. docs/RESULTS.md."
    )
    mixup_alpha: float = Field(0.2, gt=0, description="Beta(alpha, alpha) mixing weights of the mixup recipe.")
    batch_size: int = Field(64, ge=1)
    synthetic_weight: float = Field(1.0, ge=0, description="Loss weight of synthetic samples (real = 1).")
    synthetic_per_class: int | None = Field(None, ge=0, description="Cap on synthetic samples used per class (null: all accepted).")
    soft_label_mix: float = Field(0.0, ge=0, le=1, description="Synthetic targets = (1 - mix) one-hot + mix x a real-train teacher's probabilities (0: hard labels).")
    allow_flips: bool = Field(False, description="Classical augmentation may flip horizontally.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Level of the t-intervals over seeds.")
    quality: bool = Field(True, description="Also compute generator quality (CAS, Frechet distance, precision/recall, near-copies).")
    quality_k: int = Field(3, ge=1, description="k of the k-NN manifolds for precision/recall.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto")
    batched: bool | Literal["auto"] = Field("auto", description="Train the arms' models together as one grouped network "
                                            "(auto: on CUDA and for images up to 16x16; false: one model at a time). The budget "
                                            "search (and the recipe selection when there is one) always trains one at a time.")
    cpu_bf16: bool | Literal["auto"] = Field("auto", description="bf16 autocast for the arms' models on the CPU (fp32 weights). "
                                             "auto: only on CPUs with native bf16 (AVX512-BF16 / AMX). The budget search "
                                             "(and the recipe selection when there is one) always trains in fp32.")

    @model_validator(mode="after")
    def _budget_range(self) -> "EvaluateConfig":
        if self.min_steps > self.max_steps:
            raise ValueError("evaluate.min_steps must not exceed evaluate.max_steps")
        if len(set(self.recipes)) != len(self.recipes):
            raise ValueError(f"evaluate.recipes lists a recipe twice: {list(self.recipes)}")
        return self


class Config(Section):
    """The whole of ``params.yaml``."""

    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    generate: GenerateConfig = GenerateConfig()
    filter: FilterConfig = FilterConfig()
    evaluate: EvaluateConfig = EvaluateConfig()


# ------------------------------------------------------------------------ loading
def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of ``raw`` with ``key.sub=value`` overrides applied (values parsed as YAML)."""
    merged = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = merged
        for part in parts[:-1]:
            if node.get(part) is None:  # absent, or a null section (data.long_tail: null) that this key starts
                node[part] = {}
            child = node[part]
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(value.strip()) if value.strip() else ""  # YAML: `3`, `0.5`, `null`, `true` typed
    return merged


def _format_errors(error: ValidationError, origin: str) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        hint = ""
        if item["type"] == "string_type" and isinstance(item.get("input"), (bool, int, float)):  # YAML read `2024`, `off`
            hint = f" (YAML read it as {item['input']!r}: quote it, e.g. --set '{key}=\"...\"')"
        lines.append(f"  {key}: {item['msg']}{hint}")
    return f"invalid params in {origin}:\n" + "\n".join(lines)


def config_from_dict(raw: dict, origin: str = "<dict>") -> Config:
    """Validate a plain dict (as read from YAML) into a frozen :class:`Config`."""
    try:
        return Config.model_validate(raw or {})
    except ValidationError as error:
        raise ConfigError(_format_errors(error, origin)) from None


def load_config(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Config:
    """Load ``params.yaml`` (or defaults when ``path`` is None), apply overrides, validate."""
    raw: dict = {}
    origin = "<defaults>"
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.is_file():
            raise ConfigError(f"params file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(apply_overrides(raw, overrides or []), origin)


def config_to_dict(config: Section) -> dict:
    """Plain-JSON form of a config or section (what checkpoints and reports store)."""
    return config.model_dump(mode="json")
