"""Stage `train`: outputs, conditioning, checkpoint/resume (incl. SIGKILL), NaN guard, config checks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from synthgen import train
from synthgen.config import ConfigError, TrainConfig, config_from_dict, load_config
from synthgen.data import LabeledImages, PreparedData, save_prepared
from synthgen.io import read_json
from synthgen.models import load_generator

TINY = [  # fp32 everywhere: the bf16 CPU path has its own tests below
    "train.model=cgan", "train.cpu_bf16=false", "train.batch_size=16", "train.log_every=5", "train.eval_every=10", "train.checkpoint_every=10",
    "train.device=cpu",
    "train.cgan.base_channels=4", "train.cgan.latent_dim=8", "train.cvae.base_channels=4", "train.cvae.latent_dim=4",
    "train.vaegan.base_channels=4", "train.vaegan.latent_dim=4",
]
ROOT = Path(__file__).resolve().parents[1]


def quadrant_images(per_class: int, seed: int) -> LabeledImages:
    """Class k (0..3) = a bright 4x4 square in quadrant k of a dark noisy 8x8 image."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(4), per_class)
    x = rng.integers(0, 40, size=(len(y), 8, 8, 1))
    for i, k in enumerate(y):
        top, left = 4 * (k // 2), 4 * (k % 2)
        x[i, top : top + 4, left : left + 4] = rng.integers(200, 256, size=(4, 4, 1))
    return LabeledImages(x.astype(np.uint8), y.astype(np.int64), ("a", "b", "c", "d"))


def quadrant_of(images: torch.Tensor) -> np.ndarray:
    """Rule classifier: the brightest quadrant of (N, 1, 8, 8) images."""
    quadrants = images.unflatten(2, (2, 4)).unflatten(4, (2, 4)).mean(dim=(1, 3, 5))  # (N, 2, 2)
    return quadrants.flatten(1).argmax(1).numpy()


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    meta = {"class_names": ["a", "b", "c", "d"], "image_shape": [8, 8, 1], "source": "quadrants"}
    save_prepared(out, PreparedData(quadrant_images(10, 0), quadrant_images(3, 1), quadrant_images(3, 2), meta))
    return out


def run_main(prepared_dir: Path, root: Path, *overrides: str) -> dict:
    config = load_config(None, [*TINY, *overrides])
    return train.main(config, prepared_dir, root / "models", root / "checkpoints")


@pytest.mark.parametrize("kind", ["cgan", "cvae", "vaegan"])
def test_main_writes_outputs(prepared_dir, tmp_path, kind):
    summary = run_main(prepared_dir, tmp_path, f"train.model={kind}", "train.steps=20")
    out = tmp_path / "models" / kind
    assert summary["steps"] == 20 and summary["device"] == "cpu" and summary["images_per_s"] > 0
    assert set(read_json(out / "summary.json")["pixel_diversity_ratio"]) == {"0", "1", "2", "3"}
    losses = pd.read_csv(out / "losses.csv")
    assert losses["step"].tolist() == [5, 10, 15, 20] and "val_loss" in losses
    expected = {"cgan": {"loss_d", "loss_g", "d_real", "d_fake", "strength"}, "cvae": {"loss", "recon", "kl"},
                "vaegan": {"loss", "recon", "kl", "loss_d", "loss_g", "d_real", "d_fake"}}[kind]
    assert expected <= set(losses), set(losses)
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["step-00010.png", "step-00020.png"]
    assert (out / "samples.png").stat().st_size > 0 and read_json(out / "config.json")["train"]["model"] == kind
    model = load_generator(out / "generator.pt")
    assert model.kind == kind and model.image_shape == (1, 8, 8) and model.step == 20
    assert model.can_interpolate == (kind != "cgan")  # the cVAE and VAE-GAN keep their training images' codes
    assert model.has_discriminator == (kind != "cvae")
    if kind != "cgan":
        train_labels = np.load(prepared_dir / "train.npz")["y"]
        assert model.latent_bank[0].shape == (len(train_labels), model.latent_dim)
        np.testing.assert_array_equal(model.latent_bank[1].numpy(), train_labels)
    payload = torch.load(tmp_path / "checkpoints" / kind / "last.pt", weights_only=True)
    assert payload["step"] == 20


@pytest.mark.parametrize("kind, steps, bf16", [("cvae", 150, False), ("cgan", 600, False), ("vaegan", 150, False),
                                              ("cvae", 150, True), ("cgan", 600, True)])
def test_conditioning_really_conditions(prepared_dir, tmp_path, kind, steps, bf16):
    # the cGAN's mode-seeking term (on by default) spreads its samples: 300 steps gave 79% here, 600 give 90%
    # bf16: a weight cache kept across the step (autocast's default) froze the weights the forward saw, and nothing conditioned
    summary = run_main(prepared_dir, tmp_path, f"train.model={kind}", f"train.steps={steps}", "train.checkpoint_every=1000",
             f"train.cpu_bf16={str(bf16).lower()}",
             "train.cgan.base_channels=8", "train.cgan.lr_generator=0.001", "train.cgan.lr_discriminator=0.001",
             "train.cvae.base_channels=8", "train.cvae.kl_warmup_steps=50", "train.cvae.kl_weight=1.0",
             "train.vaegan.base_channels=8", "train.vaegan.kl_warmup_steps=50", "train.vaegan.kl_weight=1.0")
    model = load_generator(tmp_path / "models" / kind / "generator.pt")
    labels = torch.arange(4).repeat_interleave(50)
    for latent in ("prior", "interpolate") if kind != "cgan" else ("prior",):
        images = model.sample(labels, torch.Generator().manual_seed(0), latent=latent)
        accuracy = (quadrant_of(images) == labels.numpy()).mean()
        assert accuracy >= 0.8, f"{kind} ({latent}): samples land in the conditioned quadrant {accuracy:.0%} of the time (chance 25%)"
    # and no class collapses: its samples spread at least half as far apart as its real images (a collapsed class: ~0)
    assert min(summary["pixel_diversity_ratio"].values()) >= 0.5, summary["pixel_diversity_ratio"]


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["network"]


@pytest.mark.parametrize("kind, bf16", [("cgan", False), ("vaegan", False), ("vaegan", True)])
def test_resume_in_process_is_bit_identical(prepared_dir, tmp_path, kind, bf16, monkeypatch):
    # the cGAN's conditioning fades in over the run and both models carry LeCam anchors: all in the checkpoint
    straight, precision = tmp_path / "straight", f"train.cpu_bf16={str(bf16).lower()}"
    summary = run_main(prepared_dir, straight, f"train.model={kind}", "train.steps=30", precision)
    assert summary["precision"] == ("bf16" if bf16 else "fp32")
    resumed, write_checkpoint = tmp_path / "resumed", train.write_checkpoint

    def crash_after_step_14(state, *args, **kwargs):
        write_checkpoint(state, *args, **kwargs)
        if state.step == 14:  # mid log window (log_every 5)
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(train, "write_checkpoint", crash_after_step_14)
    with pytest.raises(KeyboardInterrupt):
        run_main(prepared_dir, resumed, f"train.model={kind}", "train.steps=30", "train.checkpoint_every=7", precision)
    monkeypatch.setattr(train, "write_checkpoint", write_checkpoint)
    summary = run_main(prepared_dir, resumed, f"train.model={kind}", "train.steps=30", "train.checkpoint_every=7", precision)
    assert summary["resumed_from_step"] == 14
    for name, tensor in _weights(straight / f"models/{kind}/generator.pt").items():
        assert torch.equal(tensor, _weights(resumed / f"models/{kind}/generator.pt")[name]), name
    pd.testing.assert_frame_equal(pd.read_csv(straight / f"models/{kind}/losses.csv"), pd.read_csv(resumed / f"models/{kind}/losses.csv"))


def test_changed_config_starts_fresh(prepared_dir, tmp_path, capsys):
    run_main(prepared_dir, tmp_path, "train.steps=10")
    summary = run_main(prepared_dir, tmp_path, "train.steps=20", "train.cgan.lr_generator=0.001")
    assert summary["resumed_from_step"] == 0 and summary["steps"] == 20
    assert "train config changed (cgan)" in capsys.readouterr().err.replace("\n", " ")


def _prepared(out: Path, train_seed: int, val_per_class: int) -> Path:
    meta = {"class_names": ["a", "b", "c", "d"], "image_shape": [8, 8, 1], "source": "quadrants"}
    save_prepared(out, PreparedData(quadrant_images(10, train_seed), quadrant_images(val_per_class, 1),
                                    quadrant_images(3, 2), meta))
    return out


def _scripted_val_losses(monkeypatch, values: list[float]) -> list[int]:
    """Make the validation loss return ``values`` in turn; returns the list of steps it was evaluated at."""
    losses, steps = iter(values), []

    def scripted(config, state, images, labels):
        steps.append(state.step)
        return next(losses)

    monkeypatch.setattr(train, "validation_loss", scripted)
    return steps


def test_early_stopping_stops_when_val_loss_stops_improving(prepared_dir, tmp_path, monkeypatch):
    # best at the 2nd evaluation (step 10), then two evaluations without improvement: stop at step 20 of 100
    evaluated = _scripted_val_losses(monkeypatch, [1.0, 0.5, 0.6, 0.55] + [0.1] * 20)
    summary = run_main(prepared_dir, tmp_path, "train.steps=100", "train.eval_every=5", "train.early_stopping_patience=2",
                       "train.checkpoint_every=50")
    assert evaluated == [5, 10, 15, 20]
    assert summary["steps"] == 20 and summary["stopped_early"] is True and summary["final_val_loss"] == 0.55
    losses = pd.read_csv(tmp_path / "models/cgan/losses.csv")
    assert losses.dropna(subset=["val_loss"])["step"].tolist() == [5, 10, 15, 20]
    assert load_generator(tmp_path / "models/cgan/generator.pt").step == 20
    # the stop is checkpointed, so a rerun with the same config has nothing left to do
    assert torch.load(tmp_path / "checkpoints/cgan/last.pt", weights_only=True)["step"] == 20


def test_no_early_stop_while_val_loss_improves_or_without_patience(prepared_dir, tmp_path, monkeypatch):
    _scripted_val_losses(monkeypatch, [1.0 - 0.01 * i for i in range(20)])
    improving = run_main(prepared_dir, tmp_path / "improving", "train.steps=40", "train.eval_every=5",
                         "train.early_stopping_patience=1")
    assert improving["steps"] == 40 and improving["stopped_early"] is False
    _scripted_val_losses(monkeypatch, [1.0] * 20)  # flat, but patience null: never stop
    flat = run_main(prepared_dir, tmp_path / "flat", "train.steps=40", "train.eval_every=5")
    assert flat["steps"] == 40 and flat["stopped_early"] is False


def test_early_stopping_needs_a_val_split(tmp_path, monkeypatch):
    """Without val images there is no val loss: patience is inert and training runs all its steps."""
    evaluated = _scripted_val_losses(monkeypatch, [1.0] * 20)
    no_val = _prepared(tmp_path / "prepared", train_seed=0, val_per_class=0)
    summary = run_main(no_val, tmp_path, "train.steps=30", "train.eval_every=5", "train.early_stopping_patience=1")
    assert evaluated == [] and summary["steps"] == 30 and summary["final_val_loss"] is None
    assert "val_loss" not in pd.read_csv(tmp_path / "models/cgan/losses.csv")


def test_resume_is_refused_when_the_training_data_changed(tmp_path, capsys):
    first = _prepared(tmp_path / "first", train_seed=0, val_per_class=3)
    other = _prepared(tmp_path / "other", train_seed=5, val_per_class=3)  # same shapes and labels, other pixels
    run_main(first, tmp_path, "train.steps=10")
    payload = torch.load(tmp_path / "checkpoints/cgan/last.pt", weights_only=True)
    config = load_config(None, [*TINY, "train.steps=20"]).train
    same = np.load(first / "train.npz")
    changed = np.load(other / "train.npz")
    assert train.resume_mismatch(payload, config, train.data_fingerprint(same["x"], same["y"])) is None
    assert "training data changed" in train.resume_mismatch(payload, config, train.data_fingerprint(changed["x"], changed["y"]))
    relabelled = train.data_fingerprint(same["x"], np.roll(same["y"], 1))  # same pixels, other labels
    assert "training data changed" in train.resume_mismatch(payload, config, relabelled)
    assert "process" in train.resume_mismatch(payload, config, train.data_fingerprint(same["x"], same["y"]), world_size=2)
    capsys.readouterr()
    summary = run_main(other, tmp_path, "train.steps=20")
    assert summary["resumed_from_step"] == 0 and summary["steps"] == 20
    assert "training data changed" in capsys.readouterr().err.replace("\n", " ")
    resumed = run_main(other, tmp_path, "train.steps=30")  # its own checkpoint is resumed
    assert resumed["resumed_from_step"] == 20


def _cli(tmp_path: Path, prepared_dir: Path, root: Path, steps: int) -> list[str]:
    overrides = [*TINY, f"train.steps={steps}", "train.checkpoint_every=10"]
    return [sys.executable, "-m", "synthgen.cli", "train", "--prepared", str(prepared_dir), "--out", str(root / "models"),
            "--checkpoints", str(root / "checkpoints"), *[arg for item in overrides for arg in ("--set", item)]]


def test_sigkill_and_resume_matches_uninterrupted_run(prepared_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    steps = 150
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cli(tmp_path, prepared_dir, straight, steps), check=True, env=env, cwd=tmp_path, capture_output=True)

    process = subprocess.Popen(_cli(tmp_path, prepared_dir, killed, steps), env=env, cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    grids = killed / "checkpoints" / "cgan" / "grids"
    deadline = time.monotonic() + 120
    while len(list(grids.glob("*.png"))) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed; raise `steps`"
    process.send_signal(signal.SIGKILL)
    process.wait()
    checkpoint_step = torch.load(killed / "checkpoints/cgan/last.pt", weights_only=True)["step"]
    assert 0 < checkpoint_step < steps and not (killed / "models" / "cgan").exists()

    subprocess.run(_cli(tmp_path, prepared_dir, killed, steps), check=True, env=env, cwd=tmp_path, capture_output=True)
    summary = read_json(killed / "models/cgan/summary.json")
    assert summary["resumed_from_step"] >= checkpoint_step
    for name, tensor in _weights(straight / "models/cgan/generator.pt").items():
        assert torch.equal(tensor, _weights(killed / "models/cgan/generator.pt")[name]), name
    assert (straight / "models/cgan/losses.csv").read_text() == (killed / "models/cgan/losses.csv").read_text()


@pytest.mark.parametrize("kind", ["cvae", "vaegan"])
def test_nan_loss_stops_with_step_and_no_poisoned_checkpoint(prepared_dir, tmp_path, kind):
    with pytest.raises(train.TrainingError, match="non-finite loss at step 2"):
        run_main(prepared_dir, tmp_path, f"train.model={kind}", "train.steps=50", f"train.{kind}.lr=1e6", "train.checkpoint_every=1")
    payload = torch.load(tmp_path / f"checkpoints/{kind}/last.pt", weights_only=True)
    assert payload["step"] == 1  # the last good state, never the diverged one
    assert all(torch.isfinite(t).all() for t in payload["network"].values() if t.is_floating_point())
    assert not (tmp_path / "models" / kind).exists()


def test_cli_reports_divergence_with_exit_code_2(prepared_dir, tmp_path):
    from typer.testing import CliRunner

    from synthgen.cli import app

    args = ["train", "--prepared", str(prepared_dir), "--out", str(tmp_path / "m"), "--checkpoints", str(tmp_path / "c"),
            "--params", str(tmp_path / "none.yaml")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "params file not found" in result.output
    (tmp_path / "params.yaml").write_text("train:\n  model: cvae\n  steps: 5\n  cvae:\n    lr: 1.0e+6\n    base_channels: 4\n")
    result = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "params.yaml")])
    assert result.exit_code == 2 and "non-finite loss at step" in result.output


def test_config_validation():
    assert TrainConfig().model == "cvae"
    with pytest.raises(ConfigError, match="train.cgan.widht"):
        config_from_dict({"train": {"cgan": {"widht": 3}}})
    with pytest.raises(ConfigError, match="train.model"):
        config_from_dict({"train": {"model": "diffusion"}})
    with pytest.raises(ConfigError, match="unknown op"):
        config_from_dict({"train": {"cgan": {"diffaugment": "translation,rotate"}}})
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps=0"])
    with pytest.raises(ConfigError, match="train.cvae.lr"):
        load_config(None, ["train.cvae.lr=-1"])


@pytest.mark.slow  # four processes importing torch: about a minute each on 2 shared cores
@pytest.mark.parametrize("kind", ["cgan", "cvae", "vaegan"])  # vaegan: its decoder also runs outside the DDP wrapper
def test_ddp_two_processes_with_torchrun(prepared_dir, tmp_path, kind):
    """`torchrun --nproc_per_node 2` (gloo on CPU): rank 0 writes the outputs; a rerun resumes on both ranks."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

    def command(steps: int) -> list[str]:
        return [*launcher, *_cli(tmp_path, prepared_dir, tmp_path, steps)[1:], "--set", f"train.model={kind}"]

    subprocess.run(command(20), check=True, env=env, cwd=tmp_path, capture_output=True, timeout=240)
    summary = read_json(tmp_path / "models" / kind / "summary.json")
    assert summary["world_size"] == 2 and summary["steps"] == 20
    assert len(torch.load(tmp_path / "checkpoints" / kind / "last.pt", weights_only=True)["rng"]) == 2
    subprocess.run(command(30), check=True, env=env, cwd=tmp_path, capture_output=True, timeout=240)
    summary = read_json(tmp_path / "models" / kind / "summary.json")
    assert summary["resumed_from_step"] == 20 and summary["steps"] == 30
    assert load_generator(tmp_path / "models" / kind / "generator.pt").step == 30


def test_an_extended_cgan_keeps_its_conditioning_fade_and_a_shortened_run_starts_fresh(prepared_dir, tmp_path, capsys):
    """train.steps may change between runs: an extension continues with the fade-in it began with (the strength
    would drop from 1 back to 0.25 if the fade were a share of the new total); a checkpoint past the new total is not
    resumed (the model would be the longer run's under the shorter run's params)."""
    run_main(prepared_dir, tmp_path, "train.steps=20")  # fade over steps 2-10 of 20: full strength from step 10
    extended = run_main(prepared_dir, tmp_path, "train.steps=80")
    strength = pd.read_csv(tmp_path / "models/cgan/losses.csv").set_index("step")["strength"]
    assert extended["resumed_from_step"] == 20 and strength.loc[25:].min() == 1.0
    capsys.readouterr()
    shortened = run_main(prepared_dir, tmp_path, "train.steps=30")  # the checkpoint is at step 80
    assert shortened["resumed_from_step"] == 0 and shortened["steps"] == 30
    assert "past train.steps=30" in " ".join(capsys.readouterr().err.split())
