"""Tests of the filters, selection, top-up rounds and the atomically committed outputs (synthgen.filter)."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from synthgen import filters
from synthgen import artifacts
from synthgen import filter as flt
from synthgen import generate, png_tree
from synthgen.io import save_npz
from synthgen.config import load_config
from synthgen.data import DataError, load_prepared
from synthgen.models import build_generator, classifier, save_generator

TINY = {
    "train.model": "cgan", "generate.min_per_class": 5, "generate.batch_size": 64, "generate.shard_size": 64, "generate.device": "cpu",
    "generate.max_rounds": 2, "filter.classifier_steps": 10, "filter.device": "cpu", "filter.discriminator_steps": 20,
    "filter.discriminator_samples": 20,
}


def tiny_config(**overrides):
    return load_config(None, [f"{k}={v}" for k, v in {**TINY, **overrides}.items()])


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_generator(build_generator("cgan", 10, (1, 8, 8), base_channels=8), root / "cgan" / "generator.pt")
    save_generator(build_generator("cvae", 10, (1, 8, 8), base_channels=8), root / "cvae" / "generator.pt")
    return root


@pytest.fixture(scope="module")
def pool_dir(tiny_prepared, models_root, tmp_path_factory):
    pool = tmp_path_factory.mktemp("synthetic") / "pool"
    generate.main(tiny_config(), tiny_prepared, models_root, pool)
    return pool


def run_filter(tiny_prepared, models_root, pool_dir, out, **overrides):
    return flt.main(tiny_config(**overrides), tiny_prepared, models_root, pool_dir, out)


def test_novelty_rejects_an_exact_copy_of_a_training_image(tiny_prepared):
    data = load_prepared(tiny_prepared)
    novelty = filters.NoveltyFilter(0.5).fit(data.train.x, data.train.y, data.val.x, data.val.y)
    copies = data.train.x[:5]
    assert not novelty.keep(copies, data.train.y[:5]).any()
    assert np.allclose(novelty.score(copies, data.train.y[:5]), 0.0)
    assert novelty.keep(data.val.x, data.val.y).mean() > 0.5  # real unseen images are novel enough


def test_thresholds_tighten_monotonically(tiny_prepared, models_root, pool_dir):
    data = load_prepared(tiny_prepared)
    model = generate.load_model(models_root / "cgan" / "generator.pt", "cpu")
    pool = artifacts.load_pool(pool_dir)
    # candidates: the (untrained-generator) pool plus real images, so every filter sees a spread of scores
    x, y = np.concatenate([pool.x, data.val.x, data.train.x]), np.concatenate([pool.y, data.val.y, data.train.y])
    fitters = {
        ("discriminator", "model"): lambda q: filters.DiscriminatorFilter(model, q).fit(data.val.x, data.val.y),
        ("discriminator", "posthoc"): lambda q: filters.RealnessFilter(10, q, steps=20, folds=2, width=8, device="cpu").fit(
            data.train.x, data.train.y, pool.x, pool.y, data.val.x, data.val.y),
        ("classifier", ""): lambda t: filters.ConfidenceFilter(10, t, "none", steps=10, device="cpu").fit(data.train.x, data.train.y),
        ("novelty", ""): lambda t: filters.NoveltyFilter(t).fit(data.train.x, data.train.y, data.val.x, data.val.y),
    }
    settings = {"discriminator": [0.0, 0.3, 0.7, 1.0], "classifier": [0.0, 0.1, 0.12, 0.5], "novelty": [0.0, 1.0, 1.3, 5.0]}
    quotas = np.full(10, 10**6)
    for (name, source), fit in fitters.items():
        accepted_sets = []
        for setting in settings[name]:
            table = pd.DataFrame({"sample_id": np.arange(len(y)), "label": y, "round": 0, "shard": ""})
            table = table.assign(**flt.score_candidates(x, y, {name: fit(setting)}))
            accepted_sets.append(set(flt.select(table, quotas).query("accepted")["sample_id"]))
        sizes = [len(s) for s in accepted_sets]
        assert all(a >= b for a, b in zip(sizes, sizes[1:])), (name, source, sizes)
        assert all(tight <= loose for loose, tight in zip(accepted_sets, accepted_sets[1:])), (name, source)
        assert sizes[0] >= len(data.val.y) and sizes[-1] < sizes[0], (name, source, sizes)



def test_without_image_folder_dvc_tracks_shards_only_and_export_writes_the_tree(tiny_prepared, models_root, pool_dir, tmp_path):
    from typer.testing import CliRunner

    from synthgen.cli import app

    out = tmp_path / "synthetic"
    run_filter(tiny_prepared, models_root, pool_dir, out, **{"filter.image_folder": "false", "filter.discriminator": "false", "filter.classifier": "false", "filter.novelty_threshold": 0.0})
    assert [p.name for p in (out / "accepted").iterdir()] == ["README.txt"]  # the DVC out exists and says why
    accepted = artifacts.load_accepted(out)
    result = CliRunner().invoke(app, ["export", "--synthetic", str(out), "--out", str(tmp_path / "tree")])
    assert result.exit_code == 0, result.output
    folder = ImageFolder(tmp_path / "tree")
    assert np.bincount(folder.targets, minlength=10).tolist() == accepted.counts().tolist()
    missing = CliRunner().invoke(app, ["export", "--synthetic", str(tmp_path / "nowhere"), "--out", str(tmp_path / "t2")])
    assert missing.exit_code == 2 and "filter_summary.json" in missing.output and not (tmp_path / "t2").exists()
    bad = CliRunner().invoke(app, ["export", "--synthetic", str(out), "--out", str(tmp_path / "t3"), "--workers", "0"])
    assert bad.exit_code == 2 and "--workers" in bad.output and not (tmp_path / "t3").exists()
    again = CliRunner().invoke(app, ["export", "--synthetic", str(out), "--out", str(tmp_path / "tree")])  # an earlier export
    assert again.exit_code == 0, again.output


def test_export_refuses_to_replace_a_folder_that_is_not_an_earlier_export(tiny_prepared, models_root, pool_dir, tmp_path):
    """The export swaps its folder in whole: a folder of the user's own, or one holding the synthetic root, stays as it was."""
    from typer.testing import CliRunner

    from synthgen.cli import app

    out = tmp_path / "project" / "data" / "synthetic"
    run_filter(tiny_prepared, models_root, pool_dir, out, **{"filter.discriminator": "false", "filter.classifier": "false"})
    mine = tmp_path / "mine"
    (mine / "cats").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    for target, says in ((mine, "not an earlier export"), (out, "overlaps the synthetic root"), (tmp_path / "project", "overlaps"),
                         (out / "tree", "overlaps"), (mine / "notes.txt", "is a file")):
        result = CliRunner().invoke(app, ["export", "--synthetic", str(out), "--out", str(target)])
        assert result.exit_code == 2 and says in " ".join(result.output.split()), (target, result.output)
    assert (mine / "notes.txt").read_text() == "my notes" and (mine / "cats").is_dir() and (out / "filter_summary.json").is_file()


def test_outputs_get_the_permissions_of_the_umask_not_mkstemp_s_owner_only(tmp_path):
    """Atomic writes build in temp files and folders that mkstemp / mkdtemp make 0600 / 0700; a team's readers need more."""
    import os

    from synthgen.io import atomic_dir, atomic_write_text

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2775)  # a team folder whose group new folders inherit
    previous = os.umask(0o022)
    try:
        with atomic_dir(shared / "out") as work:
            atomic_write_text(work / "a.txt", "a")
        kept, read_only, cache = tmp_path / "kept.txt", tmp_path / "read-only.txt", tmp_path / "cache.txt"
        for path, mode in ((kept, 0o640), (read_only, 0o444), (cache, 0o444)):
            path.write_text("old")
            path.chmod(mode)
        linked = tmp_path / "linked.txt"  # what a DVC checkout with cache.type symlink leaves
        linked.symlink_to(cache)
        for path in (kept, read_only, linked):
            atomic_write_text(path, "new")
    finally:
        os.umask(previous)
    out = shared / "out"
    assert out.stat().st_mode & 0o7777 == 0o2755 and (out / "a.txt").stat().st_mode & 0o777 == 0o644
    assert kept.stat().st_mode & 0o777 == 0o640 and read_only.stat().st_mode & 0o777 == 0o444  # a plain file keeps its mode
    assert not linked.is_symlink() and linked.stat().st_mode & 0o777 == 0o644 and cache.read_text() == "old"
    assert [p.read_text() for p in (kept, read_only, linked)] == ["new"] * 3


def test_png_tree_from_worker_processes_is_the_tree_one_process_writes(tmp_path):
    rng = np.random.default_rng(0)
    shards = []
    for index in range(3):  # 3 shards of 5 RGB images, labels 0..2 (class "c" gets none in the first shard)
        path = tmp_path / f"shard-{index:05d}.npz"
        save_npz(path, x=rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8), y=rng.integers(0, 2 + (index > 0), 5),
                 sample_id=np.arange(5 * index, 5 * index + 5))
        shards.append(path)
    names = ["a", "b c", "c"]
    assert png_tree.write_tree(shards, tmp_path / "one", names, workers=1) == 15
    assert png_tree.write_tree(shards, tmp_path / "pool", names, workers=2) == 15  # 2 writer processes
    one = {p.relative_to(tmp_path / "one"): p.read_bytes() for p in (tmp_path / "one").rglob("*.png")}
    pool = {p.relative_to(tmp_path / "pool"): p.read_bytes() for p in (tmp_path / "pool").rglob("*.png")}
    assert len(one) == 15 and one == pool
    assert sorted(p.name for p in (tmp_path / "pool").iterdir()) == names  # every class directory, even an empty one
    save_npz(shards[1], x=np.zeros((2, 6, 7, 3), np.uint8), y=np.array([0, 7]), sample_id=np.arange(2))  # label 7 of 3 classes:
    with pytest.raises(RuntimeError, match=r"(?s)shard-00001\.npz.*failed.*IndexError"):  # its writer fails, and says where
        png_tree.write_tree(shards, tmp_path / "broken", names, workers=2)


def test_a_class_without_accepted_samples_keeps_its_folder_through_dvc(tmp_path, sh, dvc):
    shard = tmp_path / "shard-00000.npz"
    save_npz(shard, x=np.zeros((4, 6, 6, 1), np.uint8), y=np.array([0, 0, 2, 2]), sample_id=np.arange(4))
    repo = tmp_path / "repo"
    repo.mkdir()
    sh(repo, "git", "init", "-q")
    dvc(repo, "init", "-q")
    assert png_tree.write_tree([shard], repo / "accepted", ["a", "b", "c"], workers=1) == 4
    assert sorted(p.name for p in (repo / "accepted" / "b").iterdir()) == [".keep"]  # only the empty class
    assert not (repo / "accepted" / "a" / ".keep").exists()
    dvc(repo, "add", "-q", "accepted")
    shutil.rmtree(repo / "accepted")
    dvc(repo, "checkout", "-q")
    assert sorted(p.name for p in (repo / "accepted").iterdir()) == ["a", "b", "c"]
    labels = ImageFolder(str(repo / "accepted"), allow_empty=True)
    assert labels.class_to_idx == {"a": 0, "b": 1, "c": 2} and sorted(set(labels.targets)) == [0, 2]


def test_png_tree_workers_auto_uses_a_pool_only_for_large_trees():
    cores = png_tree.available_cores()
    assert png_tree.resolve_workers("auto", png_tree.AUTO_MIN_IMAGES - 1, 50) == 1
    assert png_tree.resolve_workers("auto", png_tree.AUTO_MIN_IMAGES, 50) == min(cores, 50)
    assert png_tree.resolve_workers(8, 10**6, 3) == 3  # never more processes than shards
    with pytest.raises(ValueError, match="workers"):
        png_tree.resolve_workers(0, 10, 3)

def test_select_keeps_first_quota_and_explains_every_rejection():
    table = pd.DataFrame({
        "sample_id": [5, 1, 2, 3, 4, 0], "label": [0, 0, 0, 1, 1, 0],
        "pass_discriminator": [True, False, True, True, True, True],
        "pass_classifier": [True, False, True, False, True, True],
        "pass_claimed": [True, True, True, True, False, True],
        "pass_novelty": [True, True, False, True, True, True],
    })
    out = flt.select(table, np.array([1, 5]))
    assert out["sample_id"].tolist() == [0, 1, 2, 3, 4, 5]
    assert out["rejected_by"].tolist() == ["", "discriminator", "novelty", "classifier", "claimed", "quota"]
    assert out["accepted"].tolist() == [True, False, False, False, False, False]


def test_outputs_load_with_imagefolder_and_match_the_plan(tiny_prepared, models_root, pool_dir, tmp_path):
    out = tmp_path / "synthetic"
    summary = run_filter(tiny_prepared, models_root, pool_dir, out, **{"filter.discriminator": "false", "filter.classifier": "false", "filter.novelty_threshold": 0.0})
    plan = pd.read_csv(pool_dir / "plan.csv")
    folder = ImageFolder(out / "accepted")
    assert folder.classes == [str(c) for c in range(10)]
    assert np.bincount(folder.targets, minlength=10).tolist() == plan["quota"].tolist()
    image = Image.open(folder.samples[0][0])
    assert image.mode == "L" and image.size == (8, 8)
    accepted = artifacts.load_accepted(out)
    assert accepted.counts().tolist() == plan["quota"].tolist() and summary["shortfalls"] == {}
    first = accepted.index[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "accepted" / "0" / f"{first:09d}.png"))[..., None], accepted.x[0])
    manifest = artifacts.load_manifest(out)
    assert len(manifest) == summary["generated"] == 100 and manifest["d_score"].isna().all()
    assert set(manifest.loc[~manifest["accepted"], "rejected_by"]) == {"quota"}
    assert summary["per_class"]["0"]["discriminator_acceptance"] == "n/a"
    assert {p.name for p in (out / "figures").iterdir()} == {"score_histograms.png", "accepted_vs_rejected.png"}


def test_round_limit_and_shortfalls_when_everything_is_rejected(tiny_prepared, models_root, pool_dir, tmp_path, capsys):
    out = tmp_path / "synthetic"
    summary = run_filter(tiny_prepared, models_root, pool_dir, out, **{"filter.novelty_threshold": 1e6, "generate.max_rounds": 2})
    assert summary["topup_rounds"] == 2 and summary["accepted"] == 0
    line = capsys.readouterr().out.splitlines()[-1]  # what the stage says: every candidate rejected, and by which filter
    assert line.startswith(f"filter: 0 of the 50 asked accepted; of {summary['generated']} candidates {summary['generated']} rejected (")
    assert "novelty" in line and "0 passed but not needed" in line
    assert summary["shortfalls"] == {str(c): 5 for c in range(10)}
    first_request = 10  # ceil(5 x oversample 2)
    for requests in summary["topup_requests"]:
        assert all(0 < r <= flt.TOPUP_CAP * first_request for r in requests)
    manifest = artifacts.load_manifest(out)
    assert sorted(manifest["round"].unique()) == [0, 1, 2]
    assert manifest["sample_id"].is_unique and manifest["sample_id"].min() == 0
    assert (manifest["rejected_by"] != "").all() and set(manifest["rejected_by"]) <= set(flt.FILTERS)
    assert len(artifacts.load_accepted(out).y) == 0


def test_classes_with_fewer_real_images_than_min_class_images_keep_every_candidate(tiny_prepared, models_root, pool_dir, tmp_path):
    # 8 real images per class: at 9 no class is judged, so a novelty cut that rejects everything rejects nothing
    # (the discriminator's own minimum null: it follows min_class_images)
    reject_all = {"filter.novelty_threshold": 1e6, "generate.max_rounds": 1, "filter.discriminator_min_class_images": "null"}
    summary = run_filter(tiny_prepared, models_root, pool_dir, tmp_path / "a", **reject_all, **{"filter.min_class_images": 9})
    assert summary["accepted"] == summary["quota"] and summary["shortfalls"] == {}
    assert all(not entry["judged"] and entry["novelty_acceptance"] == 1.0 for entry in summary["per_class"].values())
    judged = run_filter(tiny_prepared, models_root, pool_dir, tmp_path / "b", **reject_all, **{"filter.min_class_images": 8})
    assert judged["accepted"] == 0 and all(entry["judged"] for entry in judged["per_class"].values())


def test_the_discriminator_skips_the_rare_classes_of_a_long_tail_and_judges_every_class_of_balanced_data():
    config = tiny_config().filter  # discriminator_min_class_images: 20, min_class_images: 5
    long_tail = flt.judging_minimum(config, np.array([50, 30, 18, 11, 6, 4, 2, 1, 1, 1]))
    assert long_tail == {"discriminator": 20, "classifier": 5, "novelty": 5}  # the claim filter judges what "classifier" does not
    assert flt.judging_minimum(config, np.array([10] * 10))["discriminator"] == 10  # capped at the largest class
    assert flt.judging_minimum(tiny_config(**{"filter.discriminator_min_class_images": "null"}).filter, np.array([50, 3])) == dict.fromkeys(["discriminator", "classifier", "novelty"], 5)
    # a largest class under min_class_images: no filter judges anything, the discriminator included (README's promise)
    assert flt.judging_minimum(config, np.array([2, 1, 1]))["discriminator"] == 5


def test_the_filter_stage_applies_the_discriminator_minimum_capped_at_the_largest_class(tiny_prepared, models_root, pool_dir, tmp_path):
    # 8 real images per class; a discriminator cut at the 90% quantile rejects most candidates of a class it judges
    strict = {"filter.discriminator_quantile": 0.9, "generate.max_rounds": 1}
    on = run_filter(tiny_prepared, models_root, pool_dir, tmp_path / "a", **strict)  # the default 20, capped at 8
    assert all(e["discriminator_judged"] is True for e in on["per_class"].values())
    assert min(e["discriminator_acceptance"] for e in on["per_class"].values()) < 0.5
    # the discriminator follows min_class_images when its own minimum is null
    off = run_filter(tiny_prepared, models_root, pool_dir, tmp_path / "b", **strict,
                     **{"filter.discriminator_min_class_images": "null", "filter.min_class_images": 9})
    assert all(e["discriminator_judged"] is False and e["discriminator_acceptance"] == 1.0 for e in off["per_class"].values())


def test_topups_fill_short_classes_from_the_measured_rate(tiny_prepared, models_root, pool_dir, tmp_path):
    out = tmp_path / "synthetic"
    overrides = {"filter.discriminator": "false", "filter.classifier": "false", "filter.novelty_threshold": 0.0, "generate.min_per_class": 25}
    summary = run_filter(tiny_prepared, models_root, pool_dir, out, **overrides)
    # the pool had 10 per class and everything passes: one top-up round of ceil(1.2 x 15 / (11/12)) = 20 fills the rest
    assert summary["topup_requests"] == [[20] * 10] and summary["shortfalls"] == {}
    assert artifacts.load_accepted(out).counts().tolist() == [25] * 10


def test_filter_classifier_never_sees_synthetic_data(tiny_prepared, models_root, pool_dir, tmp_path, monkeypatch):
    seen = []
    original_task = classifier.CNNClassifier._task  # what every CNNClassifier trains on, fitted alone or together

    def recording_task(self, X, y, *args):
        seen.append((np.array(X), np.array(y)))
        return original_task(self, X, y, *args)

    monkeypatch.setattr(classifier.CNNClassifier, "_task", recording_task)
    # the posthoc discriminator learns from generated images by design; this is about the confidence classifier
    run_filter(tiny_prepared, models_root, pool_dir, tmp_path / "synthetic",
               **{"filter.novelty_threshold": 1e6, "generate.max_rounds": 1, "filter.discriminator_source": "model"})
    train = load_prepared(tiny_prepared).train
    assert len(seen) == 1  # fitted once, before scoring; never refitted during the top-up rounds
    np.testing.assert_array_equal(seen[0][0], train.x)
    np.testing.assert_array_equal(seen[0][1], train.y)


def test_in_memory_selection_matches_the_shard_path(tiny_prepared, models_root, pool_dir, tmp_path):
    """select_candidates (the sampler's path) and run_rounds (the stage's) share one selection and top-up loop."""
    config = tiny_config(**{"filter.classifier": "false", "filter.discriminator_quantile": 0.5, "filter.novelty_threshold": 0.0})
    prepared = load_prepared(tiny_prepared)
    model_path = generate.model_path_for(config, models_root)
    model = generate.load_model(model_path, "cpu")
    fakes = flt.reference_samples(model, prepared.n_classes, config.filter, config.generate, "cpu", "prior")
    fitted = flt.fit_filters(config.filter, prepared, model, "cpu", fakes)
    quotas = generate.compute_quotas(prepared.train.counts(), config.generate)
    shard_table, shards, shard_history = flt.run_rounds(pool_dir, tmp_path / "work", fitted, quotas, config.generate, model_path, "cpu")

    def draw(requests, first_id):
        return generate.generate_candidates(model, requests, first_id, config.generate, "cpu")

    accepted, table, history = flt.select_candidates(draw, fitted, quotas, config.generate)
    assert history == shard_history and len(history) >= 1  # the D filter rejected enough to need top-ups
    pd.testing.assert_frame_equal(table.drop(columns="shard"), shard_table.drop(columns="shard"))
    on_disk = {key: np.concatenate([artifacts.read_shard(path)[key] for path in shards]) for key in ("x", "y", "sample_id")}
    keep = np.isin(on_disk["sample_id"], table.loc[table["accepted"], "sample_id"])
    assert 0 < keep.sum() == len(accepted["y"])
    for key in ("x", "y", "sample_id"):
        np.testing.assert_array_equal(accepted[key], on_disk[key][keep])


def test_every_generator_gets_a_discriminator_filter_by_default(tiny_prepared, models_root, pool_dir, tmp_path):
    """The cVAE has no discriminator of its own: the default posthoc one is trained for it, and it rejects something."""
    # an untrained generator's samples all look alike; the median cut shows the filter at work on them
    cvae_pool = tmp_path / "pool"  # the cVAE's own candidates: filter refuses another generator's pool
    generate.main(tiny_config(**{"train.model": "cvae"}), tiny_prepared, models_root, cvae_pool)
    summary = run_filter(tiny_prepared, models_root, cvae_pool, tmp_path / "a",
                         **{"train.model": "cvae", "generate.max_rounds": 1, "filter.discriminator_quantile": 0.5})
    assert summary["filters"]["discriminator"] == "on" and 0.5 <= summary["discriminator_separation"] <= 1
    acceptance = [entry["discriminator_acceptance"] for entry in summary["per_class"].values()]
    assert min(acceptance) < 1 and np.isfinite(artifacts.load_manifest(tmp_path / "a")["d_score"]).all()
    own = run_filter(tiny_prepared, models_root, cvae_pool, tmp_path / "b",
                     **{"train.model": "cvae", "generate.max_rounds": 1, "filter.discriminator_source": "model"})
    assert own["filters"]["discriminator"] == "n/a"  # a cVAE has no discriminator of its own
    assert artifacts.load_manifest(tmp_path / "b")["d_score"].isna().all()


def test_interrupted_filter_keeps_the_previous_accepted_set(tiny_prepared, models_root, pool_dir, tmp_path, monkeypatch):
    out = tmp_path / "synthetic"
    loose = {"filter.discriminator": "false", "filter.classifier": "false", "filter.novelty_threshold": 0.0}
    real_save, calls = png_tree.save_png, []

    def failing_save(image, path):
        calls.append(path)
        if len(calls) == 7:
            raise KeyboardInterrupt("killed while writing PNGs")
        real_save(image, path)

    monkeypatch.setattr(png_tree, "save_png", failing_save)
    with pytest.raises(KeyboardInterrupt):
        run_filter(tiny_prepared, models_root, pool_dir, out, **loose)
    with pytest.raises(DataError, match="has not completed"):
        artifacts.load_accepted(out)  # nothing committed: the accepted set is absent, not half there
    assert not (out / "accepted").exists() and not (out / "manifest.csv").exists()
    monkeypatch.setattr(png_tree, "save_png", real_save)
    run_filter(tiny_prepared, models_root, pool_dir, out, **loose)
    before, manifest_before = artifacts.load_accepted(out), (out / "manifest.csv").read_text()
    calls.clear()
    monkeypatch.setattr(png_tree, "save_png", failing_save)
    with pytest.raises(KeyboardInterrupt):
        run_filter(tiny_prepared, models_root, pool_dir, out, **{**loose, "generate.min_per_class": 3})
    after = artifacts.load_accepted(out)
    np.testing.assert_array_equal(before.index, after.index)
    assert (out / "manifest.csv").read_text() == manifest_before
    assert len(list((out / "accepted").rglob("*.png"))) == len(before.y)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging debris


def test_filter_is_reproducible(tiny_prepared, models_root, pool_dir, tmp_path):
    for name, workers in (("a", "auto"), ("b", 2)):  # b's PNG tree is written by 2 processes; quotas past the pool: top-up shards
        run_filter(tiny_prepared, models_root, pool_dir, tmp_path / name, **{"generate.min_per_class": 12, "filter.write_workers": workers})
    assert (tmp_path / "a" / "manifest.csv").read_text() == (tmp_path / "b" / "manifest.csv").read_text()
    trees = [{p.relative_to(tmp_path / name): p.read_bytes() for p in (tmp_path / name / "accepted").rglob("*.png")} for name in "ab"]
    assert trees[0] and trees[0] == trees[1]
    assert len(list((tmp_path / "b" / "accepted-shards").glob("*.npz"))) >= 2  # so both processes wrote some


@pytest.mark.parametrize("shape", [(28, 28, 1), (5, 9, 1), (32, 32, 3), (7, 3, 4)])
def test_png_encoder_round_trips_through_pillow(tmp_path, shape):
    from synthgen.io import encode_png

    image = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path / "x.png"
    png_tree.save_png(image, path)
    with Image.open(path) as png:
        assert png.mode == {1: "L", 3: "RGB", 4: "RGBA"}[shape[2]] and png.size == (shape[1], shape[0])
        decoded = np.asarray(png)
    np.testing.assert_array_equal(decoded.reshape(shape), image)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(image.astype(np.float32))


def test_posthoc_reference_draws_separate_images_to_calibrate_its_cap_on(tiny_prepared, models_root):
    config = tiny_config()
    prepared = load_prepared(tiny_prepared)
    model = generate.load_model(generate.model_path_for(config, models_root), "cpu")
    fakes = flt.reference_samples(model, prepared.n_classes, config.filter, config.generate, "cpu", "prior")
    assert np.bincount(fakes.y).tolist() == [config.filter.discriminator_samples] * prepared.n_classes
    assert np.bincount(fakes.calibration_y).tolist() == [config.filter.discriminator_calibration_samples] * prepared.n_classes
    assert not np.array_equal(fakes.x, fakes.calibration_x)  # other seeds: no fold learns from the calibration images
    again = flt.reference_samples(model, prepared.n_classes, config.filter, config.generate, "cpu", "prior")
    np.testing.assert_array_equal(again.calibration_x, fakes.calibration_x)
    off = tiny_config(**{"filter.discriminator_source": "model"})
    assert flt.reference_samples(model, prepared.n_classes, off.filter, off.generate, "cpu", "prior") is None
