"""The non-generative recipes a team would use instead of synthgen, and how the best one is chosen.

A recipe is a way to train the fixed downstream CNN on the real images alone: plain, with
classical augmentation, with class-balanced oversampling, with a logit-adjusted loss (Menon et
al. 2021; Balanced Softmax, Ren et al. 2020), or with mixup. The question synthgen answers is
"does adding the accepted synthetic set to the BEST of these make my classifier better?", so
both the step budget and the best recipe are chosen here, on the real training images alone,
by stratified k-fold cross-validation (out-of-fold balanced accuracy). The test split never
reaches this module.

* :func:`choose_budget`: the classifier's step budget, doubled from ``min_steps`` while the
  out-of-fold balanced accuracy of ``real+classic`` still improves by more than ``tolerance``:
  the budget at which the real-data classifier has converged, identical for every arm.
* :func:`select_recipe`: every recipe's out-of-fold balanced accuracy at that budget; the best wins.
  The evaluate stage uses it only when ``evaluate.test_every_recipe`` is false (then only ``real``
  and the selected recipe are scored on test); otherwise every recipe is scored on test and the
  strongest there gets the synthetic set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from synthgen.config import EvaluateConfig
from synthgen.data import LabeledImages
from synthgen.metrics import balanced_accuracy, stratified_folds
from synthgen.models.classifier import fit_tasks


@dataclass(frozen=True)
class Recipe:
    """How one arm trains the fixed CNN (everything else is shared by every arm)."""

    name: str
    augment: bool = False  # classical augmentation (small affine)
    balanced: bool = False  # class-balanced batch sampling (random oversampling)
    loss: str = "ce"  # "ce" or "logit_adjusted"
    mixup: bool = False


RECIPES = (
    Recipe("real"),
    Recipe("real+classic", augment=True),
    Recipe("real+oversample+classic", augment=True, balanced=True),
    Recipe("real+logit_adjust", loss="logit_adjusted"),
    Recipe("real+logit_adjust+classic", augment=True, loss="logit_adjusted"),
    Recipe("real+mixup+classic", augment=True, mixup=True),
)
BUDGET_RECIPE = "real+classic"  # augmentation converges slower than plain training: a budget that suits it suits both


def same_network(recipe: Recipe, class_counts: np.ndarray) -> Recipe:
    """``recipe`` without what changes nothing on a training set with these class counts (the name kept).

    On balanced data (every class the same count) class-balanced sampling draws the batches that
    plain sampling draws, and the logit adjustment adds the same log(1/K) to every logit, which the
    softmax cancels. Such recipes train the network the plainer one does (the adjustment up to float
    rounding), so the evaluate stage trains it once, for the first of them listed (:func:`shared_networks`):
    on balanced data 3 of the 6 default recipes share another's network.
    """
    counts = np.asarray(class_counts)
    if len(counts) == 0 or (counts != counts[0]).any():
        return recipe
    return dataclasses.replace(recipe, balanced=False, loss="ce")


def shared_networks(recipes: list[Recipe], class_counts: np.ndarray) -> dict[str, str]:
    """{recipe name: the first listed recipe that trains the same network on these class counts} (itself when none)."""
    first: dict[Recipe, str] = {}
    return {recipe.name: first.setdefault(dataclasses.replace(same_network(recipe, class_counts), name=""), recipe.name)
            for recipe in recipes}


def recipe_named(name: str) -> Recipe:
    for recipe in RECIPES:
        if recipe.name == name:
            return recipe
    raise ValueError(f"unknown recipe {name!r}; choose from {[r.name for r in RECIPES]}")


def classifier_params(recipe: Recipe, config: EvaluateConfig, n_classes: int, steps: int) -> dict:
    """Keyword arguments of :func:`~synthgen.models.members.fit_members` for ``recipe``: only the recipe's fields vary by arm."""
    return {
        "n_classes": n_classes, "width": config.width, "steps": steps, "batch_size": config.batch_size, "lr": config.lr,
        "balanced": recipe.balanced, "augment": recipe.augment, "allow_flips": config.allow_flips, "loss": recipe.loss,
        "logit_adjust_tau": config.logit_adjust_tau, "mixup_alpha": config.mixup_alpha if recipe.mixup else 0.0,
        "device": config.device,
    }


def out_of_fold_scores(images: LabeledImages, recipes: list[Recipe], config: EvaluateConfig, steps: int,
                       fit=fit_tasks) -> dict[str, float]:
    """{recipe name: mean over folds of the balanced accuracy on the held-out fold}, one seed, over the
    classes the fold's model trained on (a class with fewer images than folds is missing from some
    training folds; its held-out images would score zero for every recipe and only add noise).

    The models train one at a time whatever ``evaluate.batched`` says, in fp32, side by side on the CPU
    with one intra-op thread each (:func:`~synthgen.models.members.concurrently`: 1.3x over one after
    another on the digits demo, docs/RESULTS.md). Never grouped: the arms' batching (and bf16) round
    differently, and amplified over hundreds of steps that can flip which of two close recipes wins
    (measured on the digits demo), so it would change the selected recipe. This way the budget and the
    recipe are the same whichever way the arms train, and on a CPU of 2+ threads the same whatever the count."""
    folds = stratified_folds(images.y, config.selection_folds, config.seed)
    held_out = [folds == fold for fold in range(config.selection_folds)]
    held_out = [held for held in held_out if held.any() and not held.all()]
    tasks = [dict(X=images.x[~held], y=images.y[~held], seeds=[config.seed], **classifier_params(recipe, config, images.n_classes, steps))
             for recipe in recipes for held in held_out]
    fitted = iter(fit(tasks, False, concurrent=True))
    scores = {}
    for recipe in recipes:
        per_fold = []
        for held in held_out:
            members = next(fitted)
            # score only classes the fold's model saw: a one-image class held out is a miss for every recipe
            seen = np.isin(images.y[held], images.y[~held])
            if seen.any():
                per_fold.append(balanced_accuracy(images.y[held][seen], members.predict(images.x[held][seen])[0]))
        scores[recipe.name] = float(np.mean(per_fold)) if per_fold else float("nan")
    return scores


def budget_candidates(config: EvaluateConfig) -> list[int]:
    """The budgets :func:`choose_budget` tries in turn: ``min_steps``, doubled while it stays within ``max_steps``."""
    candidates = [config.min_steps]
    while candidates[-1] * 2 <= config.max_steps:
        candidates.append(candidates[-1] * 2)
    return candidates


def budget_work(config: EvaluateConfig, images: LabeledImages) -> int:
    """Network-steps :func:`choose_budget` trains at most (every candidate, every fold, one seed): a progress total."""
    if config.steps != "auto":
        return 0
    return sum(budget_candidates(config)) * min(config.selection_folds, len(images.y))


def choose_budget(images: LabeledImages, config: EvaluateConfig, fit=fit_tasks) -> tuple[int, list[dict]]:
    """(steps, curve): the smallest doubling of ``min_steps`` after which doubling again gains at most
    ``budget_tolerance`` out-of-fold balanced accuracy (or ``max_steps``). ``evaluate.steps`` set to a
    number skips the search."""
    if config.steps != "auto":
        return int(config.steps), []
    recipe, curve = recipe_named(BUDGET_RECIPE), []
    for steps in budget_candidates(config):
        curve.append({"steps": steps, "balanced_accuracy": out_of_fold_scores(images, [recipe], config, steps, fit)[recipe.name]})
        if len(curve) >= 2 and curve[-1]["balanced_accuracy"] - curve[-2]["balanced_accuracy"] <= config.budget_tolerance:
            return curve[-2]["steps"], curve
    return curve[-1]["steps"], curve


def select_recipe(images: LabeledImages, config: EvaluateConfig, steps: int, curve: list[dict] | None = None,
                  fit=fit_tasks) -> tuple[Recipe, dict]:
    """(best recipe, {name: out-of-fold balanced accuracy}) among ``config.recipes`` at ``steps``.

    Scores already measured on the budget curve at ``steps`` are reused. Ties go to the recipe
    listed first (the simpler one). ``fit`` is :func:`fit_tasks` (tests pass a spy).
    """
    known = {row["steps"]: row["balanced_accuracy"] for row in curve or []}
    reused = {BUDGET_RECIPE: known[steps]} if steps in known and BUDGET_RECIPE in config.recipes else {}
    pending = [recipe_named(name) for name in config.recipes if name not in reused]
    scores = {**reused, **out_of_fold_scores(images, pending, config, steps, fit)}
    scores = {name: scores[name] for name in config.recipes}
    best = max(config.recipes, key=lambda name: (scores[name], -config.recipes.index(name)))
    return recipe_named(best), scores
