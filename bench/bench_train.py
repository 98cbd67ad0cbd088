"""Benchmark of stage `train` on scarce MNIST: throughput, per-class diversity, CAS-style accuracy.

    nice -n 5 .venv/bin/python bench/bench_train.py                      # default model, MNIST 20/class
    nice -n 5 .venv/bin/python bench/bench_train.py --set train.model=cgan --set train.steps=1500

Prepares MNIST (``--source``, default ../shared/data/mnist-t10k) with ``--per-class`` training
images per class, trains the generator with the params defaults plus ``--set`` overrides, then
scores it with a CNNClassifier trained on the held-out real images (the test split):
* CAS-style accuracy: share of class-conditional samples the real-data classifier labels as the
  conditioned class (target >= 0.90);
* diversity ratio per class (samples drawn as `synthgen generate` draws them: ``generate.latent``,
  ``--set generate.latent=prior`` for prior draws): mean pairwise distance of samples in the classifier's feature space
  divided by the same for held-out real images of that class (target >= 0.80 for every class);
* Frechet distance between the samples and the held-out real images in the same feature space
  (the issue's target: at most 0.8x the plain cVAE's).

Compare models with the same ``--work`` parent, e.g. ``--set train.model=vaegan --work /tmp/bt-vaegan``.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table
from scipy.spatial.distance import pdist

from synthgen import prepare as data_stage
from synthgen import generate
from synthgen import train as train_stage
from synthgen.config import load_config
from synthgen.data import load_prepared
from synthgen.tensors import to_uint8
from synthgen.models import load_generator
from synthgen.models.classifier import CNNClassifier
from synthgen.quality import frechet_distance
from synthgen.host_memory import keep_freed_memory


def mean_pairwise(features: np.ndarray) -> float:
    return float(pdist(features).mean())


def score_generator(generator, real_x: np.ndarray, real_y: np.ndarray, n_per_class: int, classifier: CNNClassifier, seed: int = 0,
                    latent: str = "prior", latent_noise: float | None = None, borrow_below: int = 0) -> dict:
    """CAS-style accuracy and per-class feature-space diversity ratio of ``generator``'s samples."""
    labels = torch.arange(generator.n_classes).repeat_interleave(n_per_class)
    samples = to_uint8(generator.sample(labels, torch.Generator().manual_seed(seed), latent=latent, latent_noise=latent_noise,
                                        borrow_below=borrow_below))
    predicted = classifier.predict(samples)
    fake_features, real_features = classifier.transform(samples), classifier.transform(real_x)
    per_class = {}
    rng = np.random.default_rng(seed)
    for k in range(generator.n_classes):
        real_k = real_features[real_y == k]
        real_k = real_k[rng.permutation(len(real_k))[:n_per_class]]
        fake_k = fake_features[labels.numpy() == k]
        per_class[k] = {
            "cas_accuracy": float((predicted[labels.numpy() == k] == k).mean()),
            "diversity_ratio": mean_pairwise(fake_k) / mean_pairwise(real_k),
        }
    return {"cas_accuracy": float((predicted == labels.numpy()).mean()), "per_class": per_class,
            "frechet": frechet_distance(real_features, fake_features)}


def held_out_classifier(prepared, steps: int, cache: Path) -> CNNClassifier:
    """CNNClassifier fitted on the held-out real images (test split), cached per prepared split."""
    key = hashlib.sha256(prepared.test.x.tobytes() + prepared.test.y.tobytes()).hexdigest()[:16]
    if cache.is_file():
        stored_key, classifier = pickle.loads(cache.read_bytes())
        if stored_key == key:
            return classifier
    classifier = CNNClassifier(n_classes=prepared.n_classes, steps=steps, random_state=0).fit(prepared.test.x, prepared.test.y)
    cache.write_bytes(pickle.dumps((key, classifier)))
    return classifier


def main(
    source: Annotated[str, typer.Option(help="MNIST IDX directory (or any data.source).")] = "../shared/data/mnist-t10k",
    per_class: Annotated[int, typer.Option(help="Scarce training images per class.")] = 20,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Params override, repeatable.")] = None,
    work: Annotated[Path, typer.Option(help="Scratch directory (prepared data, model, checkpoints).")] = Path("/tmp/synthgen-bench-train"),
    samples_per_class: Annotated[int, typer.Option(help="Samples per class for the scores.")] = 200,
    classifier_steps: Annotated[int, typer.Option(help="Steps of the held-out real-data classifier.")] = 800,
    fresh: Annotated[bool, typer.Option(help="Delete old checkpoints first (no resume).")] = True,
    train: Annotated[bool, typer.Option(help="Train first; --no-train re-scores the model already in WORK.")] = True,
) -> None:
    keep_freed_memory()  # as the CLI runs the stages (SYNTHGEN_HOST_MEMORY=default: glibc's own malloc)
    console = Console()
    overrides = [f"data.source={source}", f"data.per_class={per_class}", *(set_ or [])]
    config = load_config(None, overrides)
    if train:
        if fresh:
            shutil.rmtree(work / "checkpoints", ignore_errors=True)
        data_stage.main(config, work / "prepared", progress=False)
        summary = train_stage.main(config, work / "prepared", work / "models", work / "checkpoints")
    else:
        summary = json.loads((work / "models" / config.train.model / "summary.json").read_text())
        summary["pixel_diversity_ratio"] = {int(k): v for k, v in summary["pixel_diversity_ratio"].items()}
    prepared = load_prepared(work / "prepared")
    start = time.perf_counter()
    classifier = held_out_classifier(prepared, classifier_steps, work / f"classifier-{classifier_steps}.pkl")
    classifier_seconds = time.perf_counter() - start
    generator = load_generator(work / "models" / config.train.model / "generator.pt")
    latent = generate.resolve_latent(config.generate.latent, generator)  # what `synthgen generate` will use
    scores = score_generator(generator, prepared.test.x, prepared.test.y, samples_per_class, classifier,
                             latent=latent, latent_noise=generate.requested_latent_noise(config.generate),
                             borrow_below=config.generate.borrow_style_below)

    scarce = f"{config.data.per_class}/class" if config.data.per_class else f"long tail {config.data.long_tail}"  # what --set chose
    table = Table(title=f"train bench: {config.train.model}, {scarce}, {config.train.steps} steps, latent={latent} ({source})")
    for column in ("class", "CAS accuracy", "diversity ratio", "pixel diversity ratio"):
        table.add_column(column, justify="right")
    for k, row in scores["per_class"].items():
        pixel = summary["pixel_diversity_ratio"].get(k, float("nan"))
        table.add_row(str(k), f"{row['cas_accuracy']:.3f}", f"{row['diversity_ratio']:.3f}", f"{pixel:.3f}")
    console.print(table)
    min_diversity = min(row["diversity_ratio"] for row in scores["per_class"].values())
    result = {
        "model": config.train.model,
        "latent": latent,
        "steps": summary["steps"],
        "train_wall_s": round(summary["wall_time_s"], 1),
        "real_images_per_s": round(summary["images_per_s"], 1),
        "threads": torch.get_num_threads(),
        "cas_accuracy": round(scores["cas_accuracy"], 4),
        "min_diversity_ratio": round(min_diversity, 3),
        "diversity_ratio": {k: round(row["diversity_ratio"], 3) for k, row in scores["per_class"].items()},
        "frechet": round(scores["frechet"], 3),
        "classifier_fit_s": round(classifier_seconds, 1),
        "pass": scores["cas_accuracy"] >= 0.9 and min_diversity >= 0.8,
    }
    console.print(json.dumps(result))


if __name__ == "__main__":
    typer.run(main)
