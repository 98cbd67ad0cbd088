"""REPORT.md, a data card for the synthetic set, plus its figures (stage ``report``).

Pure pieces the Prefect flow reuses: :func:`render_markdown` (metrics + card -> markdown that
reads well on GitHub and as a Prefect markdown artifact) and :func:`summary_tables` (rows for
Prefect table artifacts). Figures are drawn with matplotlib's Agg backend; the accepted-sample
grid, class names beside its rows, by :mod:`synthgen.grids`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from synthgen.config import Config, config_to_dict
from synthgen.data import DataError, LabeledImages, load_prepared
from synthgen.grids import save_labeled_grid
from synthgen.io import atomic_dir, atomic_write_text, read_json, sha256_file

LIMITATIONS = (
    "The verdict compares the strongest arm with synthetic images against the strongest without, both "
    "picked by mean test balanced accuracy (the recipe given the synthetic set is the strongest on test, or "
    "chosen out-of-fold on the training images when evaluate.test_every_recipe is false). The side without is "
    "the best of more arms, and the recipe given the synthetic set is the one test luck lifted most, so the "
    "selection favours the side without: the verdict errs towards not recommended. The paired t-interval over "
    "classifier seeds does not cover the randomness of the labeled images, the generator or the filter.",
    "Seeds vary only the downstream classifier (weights, batches, augmentation), not the scarce "
    "train split: a different draw of the few labeled images can change the conclusion.",
    "Frechet distance and precision/recall use the features of a small CNN trained on the same "
    "scarce real data (train + val), not Inception features: compare them across runs of this "
    "project only; per-class values rest on few samples.",
    "The near-copy check is pixel-L2 to the real train split; it does not catch shifted or "
    "re-coloured copies.",
)


# ---------------------------------------------------------------------- tables
def _scored(value) -> bool:
    """A number that was measured (JSON null, NaN or inf: nothing could be measured)."""
    return value is not None and bool(np.isfinite(value))


def _pct(value) -> str:
    return f"{100 * value:.2f}" if _scored(value) else "n/a"


def _num(value) -> str:
    """3 significant digits, or n/a (a class without accepted samples has no Frechet distance)."""
    return f"{value:.3g}" if _scored(value) else "n/a"


def _interval(stat: dict | None, signed: bool = False) -> str:
    """'91.30 [90.10, 92.50]' in percent points."""
    if not stat or not _scored(stat["mean"]):  # e.g. tail recall on balanced data
        return "n/a"
    sign = "+" if signed and stat["mean"] >= 0 else ""
    return f"{sign}{_pct(stat['mean'])} [{_pct(stat['ci_low'])}, {_pct(stat['ci_high'])}]"


def level(metrics: dict) -> str:  # the intervals' confidence level as evaluate used it: '95%', '90%', '97.5%'
    return f"{100 * metrics['evaluate']['confidence']:g}%"


def tail_text(tail: list[int], class_names: list[str]) -> str:
    return str([class_names[c] for c in tail]) if tail else "none (every class has as many real images; tail recall n/a)"


def summary_tables(metrics: dict, class_names: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """(gains rows, per-class recall rows) as lists of flat dicts (Prefect table artifacts, markdown).

    Gains are paired per-seed differences in balanced accuracy vs the strongest baseline, in points.
    """
    gains_rows = []
    for arm, stats in metrics["arms"].items():
        gain = metrics["gains"].get(arm, {}).get("balanced_accuracy")
        gains_rows.append({
            "arm": arm,
            f"balanced accuracy % [{level(metrics)} CI]": _interval(stats["balanced_accuracy"]),
            "accuracy %": _interval(stats["accuracy"]),
            "macro-F1 %": _interval(stats["macro_f1"]),
            "tail-class recall %": _interval(stats["tail_recall"]),
            "gain vs strongest baseline (points)": "strongest baseline" if arm == metrics["best_baseline"] else _interval(gain, signed=True),
        })
    recall = metrics["per_class_recall"]
    n_classes = len(next(iter(recall.values())))
    names = class_names or [str(c) for c in range(n_classes)]
    per_class_rows = [{"class": names[c], **{arm: _pct(values[c]) for arm, values in recall.items()}} for c in range(n_classes)]
    return gains_rows, per_class_rows


def markdown_table(rows: list[dict]) -> str:
    """GitHub-flavoured markdown table from a list of flat dicts (keys of the first row are columns)."""
    if not rows:
        return "_(none)_"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def filter_rows(filter_summary: dict | None) -> list[dict]:
    """Per-class counts before/after filtering and each filter's threshold/acceptance."""
    if not filter_summary:
        return []
    rows = []
    for name, entry in filter_summary.get("per_class", {}).items():
        row = {"class": name}
        for key, value in entry.items():
            row[key] = f"{value:.3g}" if isinstance(value, float) else value
            judge = key.rsplit("_", 1)[0]  # a filter's threshold means nothing for a class it does not judge
            if key.endswith(("_threshold", "_acceptance")) and entry.get(f"{judge}_judged") is False:
                row[key] = "not judged"
        rows.append(row)
    return rows


def quality_rows(quality: dict | None, class_names: list[str]) -> list[dict]:
    if not quality:
        return []
    rows = []
    for entry in quality["per_class"]:
        rows.append({
            "class": class_names[entry["class"]], "synthetic": entry["n_synthetic"],
            "Frechet": _num(entry["frechet"]), "precision": _pct(entry["precision"]),
            "recall": _pct(entry["recall"]), "near-copy %": _pct(entry["near_copy_fraction"]),
        })
    return rows


def selection_text(metrics: dict) -> str:
    """How the budget and the recipe given the synthetic set were chosen, with the out-of-fold numbers where there are any."""
    selection = metrics["selection"]
    curve = ", ".join(f"{row['steps']}: {_pct(row['balanced_accuracy'])}%" for row in selection["budget_curve"])
    scores = ", ".join(f"`{name}` {_pct(value)}%" for name, value in selection["recipe_scores"].items())
    capped = curve and selection["steps"] == selection["budget_curve"][-1]["steps"]  # converged: the step before the last
    how = "the most `evaluate.max_steps` allows; `real+classic` was still improving" if capped else "where `real+classic` stopped improving"
    if len(selection["budget_curve"]) == 1:  # min_steps doubled would pass max_steps: nothing was compared
        how = "the one budget `evaluate.min_steps` and `evaluate.max_steps` allow, scored"
    budget = (f"Budget: {selection['steps']} steps, {how} in {selection['folds']}-fold cross-validation on the training "
              f"images (out-of-fold balanced accuracy by steps: {curve})." if curve else f"Budget: {selection['steps']} steps (`evaluate.steps`).")
    if curve and not any(_scored(row["balanced_accuracy"]) for row in selection["budget_curve"]):
        budget = (f"Budget: {selection['steps']} steps, the most `evaluate.max_steps` allows: no held-out fold could be "
                  "scored (no class has images in two folds), so convergence was not measured.")
    if selection.get("same_network"):  # balanced data: oversampling and the logit adjustment change nothing
        pairs = ", ".join(f"`{name}` as `{first}`" for name, first in selection["same_network"].items())
        budget += f" Every class has as many training images, so these recipes train the same network and were trained once: {pairs}."
    if scores and not any(_scored(value) for value in selection["recipe_scores"].values()):
        return (f"{budget} No recipe could be scored out-of-fold (no class has images in two folds); "
                f"`{selection['best_recipe']}`, the first listed, got the synthetic set first.")
    if "logit_adjust" in selection["best_recipe"] and metrics.get("evaluate", {}).get("logit_adjust_prior") == "real":
        budget += (" With the synthetic set, the logit adjustment's prior is the real training images' class counts "
                   "(`evaluate.logit_adjust_prior: real`): train your own classifier on the accepted set the same way.")
    if selection.get("chosen_by", "out-of-fold") == "test":
        given = " got the synthetic set and the unfiltered ablation" if metrics.get("filter_ablation") else " gets the synthetic set"
        return (f"{budget} Every recipe was scored on the test set; the strongest there, `{selection['best_recipe']}`,"
                f"{given} (no out-of-fold recipe selection: the verdict compares the strongest arms on test).")
    return (f"{budget} Recipes, out-of-fold balanced accuracy at that budget: {scores}; "
            f"`{selection['best_recipe']}` was selected and got the synthetic set first.")


# -------------------------------------------------------------------- markdown
def ablation_text(ablation: dict | None, counts: dict | None = None) -> str:
    """Whether filtering paid: filtered minus unfiltered samples, same recipe and class counts, and how many samples differ."""
    if not ablation:
        return "_No filter ablation (no accepted or no unfiltered samples)._"
    text = (f"Filtering against no filtering: `{ablation['filtered']}` minus `{ablation['unfiltered']}` (as many raw "
            f"candidates per class): {_interval(ablation['gain'], signed=True)} points balanced accuracy.")
    differing = (counts or {}).get("filter_differing")
    if differing is not None:  # a handful of swapped samples: the interval is the classifier's own noise (docs/RESULTS.md)
        text += (f" The two sets share all but {differing} of their {counts['synthetic']} samples: what the filters "
                 "rejected among the first candidates, and what replaced it.")
    return text


def render_markdown(metrics: dict, card: dict) -> str:
    """The whole REPORT.md. ``card``: class_names, meta, generator, filter_summary, params, figures."""
    class_names = list(card["class_names"])
    generate_params = (card.get("params") or {}).get("generate") or {}
    gains_rows, per_class_rows = summary_tables(metrics, class_names)
    gain = metrics.get("gain")
    quality = metrics.get("quality")
    generator = card.get("generator") or {}
    meta = card.get("meta") or {}
    lines = [
        "# Synthetic data card",
        "",
        f"**Verdict: {metrics['verdict']}** — {metrics['reason']}.",
        "",
        f"The question: does adding the accepted synthetic set to the best recipe you could use without it "
        f"make the classifier better? The strongest recipe without it on the test set is `{metrics['best_baseline']}`; "
        f"the strongest with it is `{metrics['best_synthetic']}`: {_interval(gain, signed=True)} points "
        f"balanced accuracy (paired over {metrics['evaluate']['seeds']} classifier seeds, "
        f"{level(metrics)} t-interval).",
        "",
        selection_text(metrics),
        "",
        "## Source data",
        "",
        f"Source `{meta.get('source')}`, image shape {meta.get('image_shape')}, {len(class_names)} classes, "
        f"split rule `{(meta.get('split') or {}).get('rule')}`, seed {meta.get('seed')}. The test split is read only by `evaluate`.",
        "",
        markdown_table([{"split": split, **counts} for split, counts in (meta.get("counts") or {}).items()]),
        "",
        "## Generator",
        "",
        f"Model `{generator.get('model')}`, checkpoint `{generator.get('path')}`, sha256 `{generator.get('sha256')}`, "
        f"{generator.get('steps')} steps. Sampling: `generate.latent={generate_params.get('latent')}` "
        f"(auto: between encoded training images of the class for the cVAE and VAE-GAN, prior draws for the cGAN), "
        f"`latent_noise={generate_params.get('latent_noise')}`"
        + (" (the model's own: cVAE 1.0, VAE-GAN 1.3)." if generate_params.get("latent_noise") == "auto" else "."),
        "",
        "## Filtering",
        "",
        f"Thresholds calibrated on {card.get('calibration') or 'n/a'}. Counts before/after filtering. Filter params: "
        + ", ".join(f"`{k}={v}`" for k, v in ((card.get("params") or {}).get("filter") or {}).items()) + ".",
        "",
        ablation_text(metrics.get("filter_ablation"), metrics.get("counts")),
        "",
        markdown_table(filter_rows(card.get("filter_summary"))),
        "",
        "## Downstream evaluation",
        "",
        f"Fixed classifier `{metrics['evaluate']['classifier']}` (width {metrics['evaluate']['width']}), identical budget for "
        f"every arm: {metrics['selection']['steps']} steps, batch {metrics['evaluate']['batch_size']}, lr {metrics['evaluate']['lr']}; "
        f"synthetic loss weight {metrics['evaluate']['synthetic_weight']}. Train {metrics['counts']['train']} real images, "
        f"{metrics['counts']['synthetic']} synthetic; test {metrics['counts']['test']} real images. "
        f"Tail classes (fewest real images): {tail_text(metrics['counts']['tail_classes'], class_names)}.",
        "",
        markdown_table(gains_rows),
        "",
        "![gain per arm](figures/gain_per_arm.png)",
        "",
        "### Per-class recall (%, mean over seeds)",
        "",
        markdown_table(per_class_rows),
        "",
        "![per-class recall](figures/per_class_recall.png)",
        "",
        "## Generator quality",
        "",
    ]
    if quality:
        lines += [
            f"CAS (train on synthetic only, test on real): accuracy {_pct(quality['cas']['accuracy'])}%, "
            f"balanced accuracy {_pct(quality['cas']['balanced_accuracy'])}%. Frechet distance {_num(quality['frechet'])}, "
            f"precision {_pct(quality['precision'])}%, recall {_pct(quality['recall'])}% "
            f"(k-NN manifolds; {quality['feature_space']}). Near-copies: {_pct(quality['near_copy_fraction'])}% "
            f"(novelty rule, threshold {quality['near_copy_threshold']}).",
            "",
            markdown_table(quality_rows(quality, class_names)),
        ]
    else:
        lines.append("_Not computed (no accepted samples or `evaluate.quality: false`)._")
    lines += ["", "![accepted samples](figures/accepted_grid.png)", "", "## Limitations", ""]
    lines += [f"- {item}" for item in LIMITATIONS]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------- figures
def plot_gains(metrics: dict, path: Path) -> None:
    """Horizontal bars: paired gain in balanced accuracy vs the best baseline, with CI error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [arm for arm in metrics["arms"] if arm in metrics["gains"]]
    means = np.array([100 * metrics["gains"][a]["balanced_accuracy"]["mean"] for a in arms])
    low = np.array([100 * metrics["gains"][a]["balanced_accuracy"]["ci_low"] for a in arms])
    high = np.array([100 * metrics["gains"][a]["balanced_accuracy"]["ci_high"] for a in arms])
    colors = ["tab:green" if "synthetic" in a else "tab:orange" if "unfiltered" in a else "tab:grey" for a in arms]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(arms) + 1.2))
    ax.barh(arms, means, xerr=[means - low, high - means], color=colors, capsize=4)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel(f"balanced accuracy gain vs {metrics['best_baseline']}\n(the strongest baseline; points, {level(metrics)} CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long arm names and labels stay inside the image
    plt.close(fig)


def plot_per_class_recall(metrics: dict, class_names: list[str], path: Path) -> None:
    """Heatmap arms x classes of mean recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(metrics["per_class_recall"])
    values = 100 * np.array([metrics["per_class_recall"][a] for a in arms])  # (n_arms, n_classes)
    fig, ax = plt.subplots(figsize=(0.6 * len(class_names) + 3, 0.45 * len(arms) + 1.5))
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45 if max(map(len, class_names)) > 3 else 0)
    ax.set_yticks(range(len(arms)), arms)
    for (i, j), value in np.ndenumerate(values):
        ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7, color="white" if value < 60 else "black")
    fig.colorbar(image, ax=ax, label="recall %")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def save_sample_grid(images: LabeledImages, path: Path, per_class: int = 8):
    """One row per class, its name beside it: up to ``per_class`` accepted samples (blank where a class has fewer)."""
    rows = [list(images.x[images.y == c][:per_class]) for c in range(images.n_classes)]
    return save_labeled_grid(rows, images.class_names, path, images.image_shape, per_class)


# ------------------------------------------------------------------------- I/O
def generator_card(models_root: Path, model: str) -> dict:
    path = Path(models_root) / model / "generator.pt"
    if not path.is_file():
        return {"model": model, "path": str(path), "sha256": "missing", "steps": None}
    summary_path = path.parent / "summary.json"
    summary = read_json(summary_path) if summary_path.is_file() else {}
    return {"model": model, "path": str(path), "sha256": sha256_file(path), "steps": summary.get("steps"), "summary": summary}


def main(config: Config, prepared_dir, models_root, synthetic_root, reports_dir) -> str:
    """Read evaluate's details.json and the earlier stages' summaries; write REPORT.md and figures/."""
    reports_dir, synthetic_root = Path(reports_dir), Path(synthetic_root)
    metrics_path = reports_dir / "evaluation" / "details.json"
    if not metrics_path.is_file():
        raise DataError(f"{metrics_path} not found: run `synthgen evaluate` first")
    metrics = read_json(metrics_path)
    prepared = load_prepared(prepared_dir)
    filter_summary_path = synthetic_root / "filter_summary.json"
    filter_summary = read_json(filter_summary_path) if filter_summary_path.is_file() else None
    card = {
        "class_names": list(prepared.class_names), "meta": prepared.meta,
        "calibration": (filter_summary or {}).get("calibration"), "generator": generator_card(Path(models_root), config.train.model),
        "filter_summary": filter_summary, "params": config_to_dict(config),
    }
    with atomic_dir(reports_dir / "figures") as figures:
        plot_gains(metrics, figures / "gain_per_arm.png")
        plot_per_class_recall(metrics, card["class_names"], figures / "per_class_recall.png")
        if filter_summary_path.is_file():
            from synthgen.artifacts import load_accepted

            save_sample_grid(load_accepted(synthetic_root), figures / "accepted_grid.png")
    text = render_markdown(metrics, card)
    atomic_write_text(reports_dir / "REPORT.md", text)
    return text
