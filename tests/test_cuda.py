"""The CUDA path: training, sampling and filtering under bf16 autocast with tensors on the GPU.

Skipped where no CUDA device is present (CI has none); run them on a GPU machine with
``pytest tests/test_cuda.py``. The CPU stays the reference: a model trained on the GPU must
sample, on the GPU, what the same weights sample on the CPU (the noise is drawn on the CPU,
so only bf16 rounding may differ), and every stage must run end to end with ``device=cuda``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from synthgen import artifacts
from synthgen import evaluate, filter as flt, generate, train
from synthgen.config import load_config
from synthgen.models import load_generator
from tests.test_train import TINY, quadrant_of, prepared_dir  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = ["train.device=cuda", "generate.device=cuda", "filter.device=cuda", "evaluate.device=cuda"]
# bf16 keeps 8 mantissa bits: a [-1, 1] pixel is off by up to ~2^-8 relative, i.e. a level or two of 255
MAX_MEAN_UINT8_GAP = 3.0


def _config(*overrides: str):
    return load_config(None, [*TINY, *CUDA, *overrides])


@pytest.mark.parametrize("kind, steps", [("cvae", 150), ("cgan", 300)])
def test_trained_on_cuda_conditions_and_matches_cpu_sampling(prepared_dir, tmp_path, kind, steps):  # noqa: F811
    config = _config(f"train.model={kind}", f"train.steps={steps}", "train.checkpoint_every=1000",
                     "train.cgan.base_channels=8", "train.cgan.lr_generator=0.001", "train.cgan.lr_discriminator=0.001",
                     "train.cvae.base_channels=8", "train.cvae.kl_warmup_steps=50", "train.cvae.kl_weight=1.0")
    summary = train.main(config, prepared_dir, tmp_path / "models", tmp_path / "checkpoints")
    assert summary["device"].startswith("cuda")
    losses = pd.read_csv(tmp_path / "models" / kind / "losses.csv")
    assert np.isfinite(losses.drop(columns=["step", "val_loss"]).to_numpy(dtype=float)).all()
    assert np.isfinite(losses["val_loss"].dropna()).all() and losses["val_loss"].notna().any()  # every eval_every steps

    path = tmp_path / "models" / kind / "generator.pt"
    on_gpu, on_cpu = load_generator(path, "cuda"), load_generator(path, "cpu")
    labels = np.repeat(np.arange(4), 50)
    latent = generate.resolve_latent("auto", on_gpu)
    gpu = generate.sample_batches(on_gpu, labels, 0, 64, 0, torch.device("cuda"), latent)
    cpu = generate.sample_batches(on_cpu, labels, 0, 64, 0, torch.device("cpu"), latent)
    gap = np.abs(gpu.astype(np.int16) - cpu.astype(np.int16)).mean()
    assert gap <= MAX_MEAN_UINT8_GAP, f"GPU (bf16) and CPU samples of the same weights differ by {gap:.2f} grey levels on average"
    images = torch.from_numpy(gpu).permute(0, 3, 1, 2).float()
    accuracy = (quadrant_of(images) == labels).mean()
    assert accuracy >= 0.8, f"{kind} trained on CUDA: samples land in the conditioned quadrant {accuracy:.0%} of the time"
    if on_gpu.has_discriminator:
        real = torch.from_numpy(cpu).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        torch.testing.assert_close(on_gpu.discriminator_score(real, labels).cpu(), on_cpu.discriminator_score(real, labels), atol=0.05, rtol=0.05)


def test_resume_on_cuda_continues_from_the_checkpoint(prepared_dir, tmp_path):  # noqa: F811
    train.main(_config("train.steps=20", "train.checkpoint_every=10"), prepared_dir, tmp_path / "models", tmp_path / "checkpoints")
    summary = train.main(_config("train.steps=40", "train.checkpoint_every=10"), prepared_dir, tmp_path / "models", tmp_path / "checkpoints")
    assert summary["resumed_from_step"] == 20 and summary["steps"] == 40
    assert load_generator(tmp_path / "models" / "cgan" / "generator.pt").step == 40


def test_every_stage_runs_on_cuda(tiny_prepared, tmp_path):
    # loosest filters (D is compared with the CPU above): a 30-step GAN passes no real filter; this is about devices
    overrides = ["train.model=cgan", "train.steps=30", "generate.min_per_class=20", "generate.max_rounds=2",
                 "filter.classifier_steps=20", "filter.classifier_threshold=0.0", "filter.discriminator=false",
                 "filter.novelty=false", "evaluate.steps=20", "evaluate.seeds=2", "evaluate.quality=false"]
    config = _config(*overrides)
    models, pool, synthetic, reports = (tmp_path / name for name in ("models", "pool", "synthetic", "reports"))
    train.main(config, tiny_prepared, models, tmp_path / "checkpoints")
    generate.main(config, tiny_prepared, models, pool)
    summary = flt.main(config, tiny_prepared, models, pool, synthetic)
    accepted = artifacts.load_accepted(synthetic)
    assert summary["accepted"] == len(accepted.y) > 0 and np.isin(accepted.y, np.arange(10)).all()
    metrics = evaluate.main(config, tiny_prepared, synthetic, pool, reports, progress=False)
    assert metrics["verdict"] in {"recommended", "not recommended"}
    assert all(np.isfinite(arm["balanced_accuracy"]["mean"]) for arm in metrics["arms"].values()), metrics["arms"]


@pytest.mark.parametrize("model", ["cvae", "vaegan"])
def test_the_default_filters_and_quality_run_on_cuda(tiny_prepared, tmp_path, model):
    """What a user with a GPU runs: the default filters (posthoc discriminator, confidence, novelty), generated
    with the model's interpolation, and the quality metrics; the VAE-GAN also trains its discriminator on the GPU."""
    overrides = [f"train.model={model}", "train.steps=30", "generate.min_per_class=20", "generate.max_rounds=2",
                 "filter.classifier_steps=20", "filter.discriminator_steps=20", "filter.discriminator_samples=20",
                 "filter.discriminator_calibration_samples=20", "evaluate.steps=20", "evaluate.seeds=2",
                 # every filter on; a 30-step generator's samples would fail the confidence and near-copy cuts
                 "filter.classifier_threshold=0.0", "filter.novelty_threshold=0.0"]
    config = _config(*overrides)
    models, pool, synthetic, reports = (tmp_path / name for name in ("models", "pool", "synthetic", "reports"))
    train.main(config, tiny_prepared, models, tmp_path / "checkpoints")
    generate.main(config, tiny_prepared, models, pool)
    summary = flt.main(config, tiny_prepared, models, pool, synthetic)
    assert summary["filters"] == {"discriminator": "on", "classifier": "on", "claimed": "on", "novelty": "on"}
    assert summary["accepted"] == len(artifacts.load_accepted(synthetic).y) > 0
    metrics = evaluate.main(config, tiny_prepared, synthetic, pool, reports, progress=False)
    quality = metrics["quality"]
    assert quality is not None and np.isfinite(quality["frechet"]) and 0 <= quality["cas"]["balanced_accuracy"] <= 1
