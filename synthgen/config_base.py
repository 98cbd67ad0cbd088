"""The config base class and the generator sections of ``train`` (one per model), split out of :mod:`synthgen.config`.

Every section is a frozen pydantic model that forbids unknown keys; :mod:`synthgen.config` builds
the stage sections and the whole :class:`~synthgen.config.Config` on this base and re-exports it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """Base for every config section: immutable, strict about unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")


# ---------------------------------------------------------------- generator sections
def check_diffaugment(policy: str, key: str) -> None:
    unknown = [op for op in policy.split(",") if op.strip() and op.strip() not in ("color", "translation", "cutout")]
    if unknown:
        raise ValueError(f"{key}: unknown op(s) {unknown}; choose from color, translation, cutout")


class CGANSection(Section):
    """cGAN sizes and optimiser settings (used when train.model = cgan)."""

    latent_dim: int = Field(64, ge=1, description="Size of the noise vector.")
    base_channels: int = Field(32, ge=4, description="Width of the image-resolution layer (coarser layers are wider).")
    lr_generator: float = Field(2e-4, gt=0)
    lr_discriminator: float = Field(2e-4, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA of generator weights used for sampling.")
    diffaugment: str = Field("translation,cutout", description="DiffAugment ops, comma-separated from color,translation,cutout ('' disables).")
    lecam_weight: float = Field(
        0.1, ge=0, description="LeCam regulariser of the discriminator (Tseng et al. 2021): keeps D's outputs near the "
        "EMA of the other side's, which limits D's overfitting to few images (0: off)."
    )
    mode_seeking_weight: float = Field(
        0.1, ge=0, description="Mode-seeking term of the generator (Mao et al. 2019): penalises two noise vectors of one "
        "class that give near-identical images, i.e. collapse within a class (0: off). On MNIST 20 per class 0.1 lifts "
        "the least diverse class from 0.23 to 0.92 of real images' spread; 0.3 overshoots (off-class samples) and 1 "
        "breaks the images (bench/bench_train.py, docs/RESULTS.md)."
    )
    condition_fade: tuple[float, float] = Field(
        (0.1, 0.5), description="Fractions of train.steps between which class conditioning fades in from 0 to 1 "
        "(Shahbazi et al. 2022, 'Collapse by Conditioning'): unconditional first, so that the few images of a class "
        "share what all classes share. [0, 0] conditions from the start."
    )

    @model_validator(mode="after")
    def _known_ops(self) -> "CGANSection":
        check_diffaugment(self.diffaugment, "train.cgan.diffaugment")
        start, end = self.condition_fade
        if not 0 <= start <= end <= 1:
            raise ValueError(f"train.cgan.condition_fade: need 0 <= start <= end <= 1, got {list(self.condition_fade)}")
        return self


class CVAESection(Section):
    """cVAE sizes and optimiser settings (used when train.model = cvae)."""

    latent_dim: int = Field(16, ge=1, description="Size of the latent vector.")
    base_channels: int = Field(32, ge=4, description="Width of the image-resolution layer (coarser layers are wider).")
    lr: float = Field(1e-3, gt=0)
    kl_weight: float = Field(
        0.5, ge=0, description="Final weight of the KL term (lower: more diverse samples; at 0.1 MNIST samples break)."
    )
    kl_warmup_steps: int = Field(500, ge=0, description="Linear KL warm-up from 0 to kl_weight.")


class VAEGANSection(CVAESection):
    """Adversarial cVAE (train.model = vaegan): the cVAE's settings plus a projection discriminator."""

    lr_discriminator: float = Field(2e-4, gt=0)
    adversarial_weight: float = Field(
        0.1, ge=0, description="Weight of the decoder's hinge loss against D, per pixel (x C*H*W, so that it keeps its "
        "share of the summed reconstruction loss at any image size)."
    )
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA of decoder weights used for sampling.")
    diffaugment: str = Field("translation,cutout", description="DiffAugment ops on everything D sees.")
    lecam_weight: float = Field(0.1, ge=0, description="LeCam regulariser of D (0: off).")
    interpolation_noise: float | None = Field(
        1.0, ge=0, description="D also judges decodes between the codes of two images of a class in the batch plus this "
        "much N(0, I) noise, the kind of code `generate` decodes; null: D judges reconstructions only. (Generation then samples "
        "at 1.3, generate.latent_noise: auto: with D at 1.0 the decoder's samples at 1.0 fell short of the real spread.)"
    )

    @model_validator(mode="after")
    def _known_ops(self) -> "VAEGANSection":
        check_diffaugment(self.diffaugment, "train.vaegan.diffaugment")
        return self
