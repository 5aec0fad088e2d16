"""Random forests: augmentation, OOB (plain and grouped), feature selection / PCA,
sweep parameters, and tree shards merged into one forest, on tiny images."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier

from shared.forest import (
    AUGMENT_COPIES,
    OOB_NOTE,
    ForestError,
    augmented_rows,
    fit_model,
    fit_rf_point,
    fit_scored_shard,
    fit_shard,
    load_model,
    merge_models,
    merge_rf_point,
    oob_scores,
    save_model,
    score_model,
    shard_seed,
    shard_trees,
    training_rows,
)
from shared.spec import RfParams
from tests.shared.conftest import colour_images


def _symmetric(n: int, side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Radially symmetric images (every rotation and flip is the same image), random labels.

    A forest cannot learn random labels, but an OOB vote from a tree trained on a
    sibling "predicts" them perfectly: the worst case of the study's inflated OOB.
    """
    rng = np.random.default_rng(seed)
    centre = (side - 1) / 2
    rows, cols = np.mgrid[:side, :side]
    ring = np.hypot(rows - centre, cols - centre).astype(int)
    profiles = rng.integers(0, 256, (n, ring.max() + 1, 3))
    return profiles[:, ring, :].astype(np.uint8), rng.integers(0, 3, n)


def _params(**overrides) -> dict:
    return RfParams(**overrides).model_dump()


def _without_timing(extra: dict) -> dict:
    return {k: v for k, v in extra.items() if not k.endswith("seconds")}


# ---------------------------------------------------------------- augmentation


@pytest.mark.parametrize("augment", list(AUGMENT_COPIES))
def test_augmented_rows_counts_and_sources(augment):
    images = np.random.default_rng(0).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    rows, source = augmented_rows(images, augment)
    copies = AUGMENT_COPIES[augment]
    assert rows.shape == (5 * copies, 6 * 6 * 3)
    assert rows.dtype == np.float32
    assert source.tolist() == list(range(5)) * copies
    np.testing.assert_array_equal(rows[:5], images.reshape(5, -1))  # copy 0: the images


def test_augmented_rows_are_flips_and_rotations():
    images = np.random.default_rng(1).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    rows, _ = augmented_rows(images, "rotate_flip", dtype=np.uint8)
    copies = rows.reshape(8, 3, 4, 4, 3)
    flipped = images[:, :, ::-1]
    expected = [np.rot90(images, k, axes=(1, 2)) for k in range(4)]
    expected += [np.rot90(flipped, k, axes=(1, 2)) for k in range(4)]
    for got, want in zip(copies, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    rows, _ = augmented_rows(images, "flip", dtype=np.uint8)
    np.testing.assert_array_equal(rows[3:].reshape(images.shape), flipped)


def test_augmented_rows_make_no_intermediate_copy():
    images = np.zeros((64, 32, 32, 3), np.uint8)
    output = 8 * images.size * 4  # the float32 rows themselves
    tracemalloc.start()
    try:
        rows, _ = augmented_rows(images, "rotate_flip")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows.nbytes == output
    assert peak < output * 1.05  # no float64, no uint8 copy of the 8x set


def test_fit_on_8x_set_holds_one_float32_matrix(monkeypatch):
    """sklearn fits the float32 rows in place; OOB and predictions go in small chunks."""
    import shared.forest

    monkeypatch.setattr(shared.forest, "CHUNK_BYTES", 256 << 10)
    x = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    y = np.arange(64) % 3
    matrix = 8 * x.size * 4
    tracemalloc.start()
    try:
        fit_rf_point(
            x, y, x[:8], y[:8], x[:8], _params(n_estimators=4, augment="rotate_flip"), seed=0
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < matrix * 1.2  # no second copy (sklearn's float32 conversion, float64)


def test_a_pca_before_the_forest_fits_the_rows_in_place_and_predicts_without_changing_them(
    monkeypatch,
):
    """sklearn's PCA copied the float32 rows it fitted: twice the unit's largest matrix."""
    from sklearn.decomposition import PCA

    import shared.forest

    monkeypatch.setattr(shared.forest, "CHUNK_BYTES", 256 << 10)
    x = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    y = np.arange(64) % 3
    params = _params(n_estimators=4, augment="rotate_flip", pca_components=8)
    train = training_rows(x, y, "rotate_flip")
    rows = train.x.copy()
    fit_rf_point(x[:8], y[:8], x[:8], y[:8], x[:8], params, seed=0)  # what a first fit imports
    tracemalloc.start()
    try:
        model, _ = fit_model(train, params, seed=0, n_estimators=4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < train.x.nbytes * 0.5  # the SVD's working set; a copy of the rows was 1.0
    # the same basis as a PCA fitted on a copy
    alone = PCA(n_components=8, svd_solver="randomized", random_state=0).fit(rows)
    np.testing.assert_allclose(
        model.transform.named_steps["pca"].components_, alone.components_, atol=1e-4
    )
    before = rows.copy()
    model.transform.transform(rows)
    np.testing.assert_array_equal(rows, before)  # predicting leaves its input alone


def test_rotation_needs_square_images():
    images = np.zeros((2, 4, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="square images.*4x8"):
        augmented_rows(images, "rotate")
    assert augmented_rows(images, "flip")[0].shape == (4, 96)


def test_augmentation_touches_training_rows_only(colour_split):
    train_x, train_y, val_x, val_y, test_x = colour_split
    out = fit_rf_point(*colour_split, _params(n_estimators=10, augment="rotate_flip"), seed=0)
    assert out.extra["train_rows"] == 8 * len(train_x)
    assert out.val_pred.shape == (len(val_x),)
    assert out.test_pred.shape == (len(test_x),)
    assert out.val_acc > 0.8


# ---------------------------------------------------------------- whole-forest fits


def test_rf_fits_separable_colours(colour_split):
    train_x, train_y, val_x, val_y, test_x = colour_split
    out = fit_rf_point(train_x, train_y, val_x, val_y, test_x, _params(n_estimators=25), seed=0)
    assert out.train_acc > 0.8
    assert out.val_acc > 0.8
    assert out.val_pred.shape == (len(val_x),)
    assert out.test_pred.shape == (len(test_x),)
    assert out.val_probs.shape == (len(val_x), 3)
    assert out.test_probs.shape == (len(test_x), 3)
    np.testing.assert_allclose(out.val_probs.sum(1), 1.0)
    np.testing.assert_array_equal(out.val_pred, out.val_probs.argmax(1))
    assert 0.0 <= out.extra["oob_score"] <= 1.0
    assert out.extra["train_seconds"] > 0
    assert out.extra["trees"] == 25
    assert out.extra["kept_features"] == out.extra["pixel_features"] == 8 * 8 * 3


def test_rf_is_deterministic_in_seed(colour_split):
    params = _params(n_estimators=10, max_features=0.5)
    a = fit_rf_point(*colour_split, params, seed=4)
    b = fit_rf_point(*colour_split, params, seed=4)
    np.testing.assert_array_equal(a.val_probs, b.val_probs)
    assert _without_timing(a.extra) == _without_timing(b.extra)


def test_rf_with_empty_test_set(colour_split):
    train_x, train_y, val_x, val_y, test_x = colour_split
    out = fit_rf_point(train_x, train_y, val_x, val_y, test_x[:0], _params(n_estimators=10), seed=0)
    assert out.test_pred.shape == (0,)
    assert out.test_probs is None
    assert out.val_pred.shape == (len(val_x),)


def test_rf_labels_are_original_class_values():
    train_x, train_y = colour_images(10, seed=0)
    shifted = train_y + 5  # classes 5, 6, 7
    params = _params(n_estimators=10)
    out = fit_rf_point(train_x, shifted, train_x[:3], shifted[:3], train_x[:2], params, seed=0)
    assert set(out.val_pred.tolist()) <= {5, 6, 7}
    assert out.val_acc > 0.5
    assert 0.0 <= out.extra["oob_score"] <= 1.0


@pytest.mark.parametrize(
    "sweep",
    [
        {"n_estimators": 7},
        {"max_features": 0.25},
        {"max_features": "log2"},
        {"min_samples_leaf": 5},
        {"min_samples_split": 9},
        {"max_depth": 2},
    ],
)
def test_sweep_parameters_reach_the_forest(colour_split, sweep):
    train_x, train_y, *_ = colour_split
    params = _params(**{"n_estimators": 5, **sweep})
    model, _ = fit_model(
        training_rows(train_x, train_y, "none"), params, seed=0, n_estimators=params["n_estimators"]
    )
    forest = model.forest
    for name, value in sweep.items():
        assert getattr(forest, name) == value
    assert len(forest.estimators_) == params["n_estimators"]
    if "max_depth" in sweep:
        assert max(t.get_depth() for t in forest.estimators_) <= 2
    if "min_samples_leaf" in sweep:
        leaves = [t.tree_.n_node_samples[t.tree_.children_left == -1] for t in forest.estimators_]
        assert min(leaf.min() for leaf in leaves) >= 5


# ---------------------------------------------------------------- OOB, plain and grouped


def test_oob_score_is_sklearns(colour_split):
    train_x, train_y, *_ = colour_split
    train = training_rows(train_x, train_y, "none")
    model, x = fit_model(train, _params(n_estimators=40), seed=3, n_estimators=40)
    reference = RandomForestClassifier(n_estimators=40, oob_score=True, random_state=3, n_jobs=1)
    reference.fit(train.x, train.y)
    scores = oob_scores(model, x, train.y, train.source, train.n_images)
    assert scores["oob_score"] == pytest.approx(reference.oob_score_, abs=1e-12)
    # without augmentation every group is one row: the grouped score is the plain one
    assert scores["oob_grouped_coverage"] == 1.0
    assert scores["oob_grouped"] == pytest.approx(reference.oob_score_, abs=1e-12)


def test_grouped_oob_removes_sibling_votes_on_8x_set():
    x, y = _symmetric(40, 8, seed=0)
    params = _params(n_estimators=300, augment="rotate_flip")
    out = fit_rf_point(x, y, x[:4], y[:4], x[:0], params, seed=0)
    assert out.extra["train_rows"] == 320
    assert out.extra["oob_score"] > 0.9  # siblings vote for the random labels
    assert out.extra["oob_grouped"] is not None
    assert out.extra["oob_grouped"] <= out.extra["oob_score"]
    assert 0 < out.extra["oob_grouped_coverage"] < 1  # all 8 copies rarely out of bag


def test_grouped_oob_is_near_chance_for_random_labels_with_flips():
    x, y = _symmetric(60, 8, seed=1)
    out = fit_rf_point(x, y, x[:4], y[:4], x[:0], _params(n_estimators=60, augment="flip"), seed=0)
    assert out.extra["oob_score"] > 0.9
    assert out.extra["oob_grouped_coverage"] > 0.95
    assert out.extra["oob_grouped"] < 0.6  # three classes: chance is 1/3


def test_oob_note_explains_the_inflation():
    assert "sibling" in OOB_NOTE and "`oob_grouped`" in OOB_NOTE
    assert "\n\n" not in OOB_NOTE.strip()  # one paragraph


# ---------------------------------------------------------------- selection and PCA


def _noise(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random pixels and labels: a forest uses every pixel somewhere, so importances vary."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 3, n)


def test_feature_selection_keeps_fewer_features():
    x, y = _noise(60, seed=0)
    kept = []
    for scaling in (0.5, 1.0, 2.0):
        params = _params(n_estimators=10, select_scaling=scaling, select_estimators=20)
        kept.append(fit_rf_point(x, y, x[:3], y[:3], x[:0], params, seed=0).extra["kept_features"])
    assert 0 < kept[2] < kept[1] < kept[0] < 192
    assert kept[1] == pytest.approx(96, abs=2)  # "1.0*median" keeps about half


def test_a_forest_after_feature_selection_reports_no_oob_score():
    """The selection's forest saw every row's label, out-of-bag rows too: on random
    labels the OOB score read 0.46 (chance 0.33). Whole, merged from scored shards or
    from plain ones, such a forest reports no OOB figures; without selection it does."""
    x, y = _noise(90, seed=4)
    oob = ("oob_score", "oob_grouped", "oob_grouped_coverage")
    selecting = _params(n_estimators=6, select_scaling=1.0, select_estimators=20)
    whole = fit_rf_point(x, y, x[:3], y[:3], x[:0], selecting, seed=0).extra
    sharded = {**selecting, "tree_shards": 2}
    scored = [fit_scored_shard(x, y, x[:3], x[:0], sharded, seed=0, shard=k)[0] for k in (0, 1)]
    plain = [fit_shard(x, y, sharded, seed=0, shard=k) for k in (0, 1)]
    for extra in (
        whole,
        merge_rf_point(scored, x, y, x[:3], y[:3], x[:0], sharded).extra,
        merge_rf_point(plain, x, y, x[:3], y[:3], x[:0], sharded).extra,
    ):
        assert {name: extra[name] for name in oob} == dict.fromkeys(oob)
        assert 0 < extra["kept_features"] < 192
    unselected = fit_rf_point(x, y, x[:3], y[:3], x[:0], _params(n_estimators=6), seed=0).extra
    assert all(isinstance(unselected[name], float) for name in oob)


def test_feature_selection_keeping_nothing_is_a_clear_error():
    x, y = _noise(60, seed=0)
    params = _params(n_estimators=5, select_scaling=1000.0, select_estimators=40)
    with pytest.raises(ValueError, match="select_scaling=1000.0 keeps no features"):
        fit_rf_point(x, y, x[:3], y[:3], x[:0], params, seed=0)


def test_pca_before_the_forest(colour_split):
    out = fit_rf_point(*colour_split, _params(n_estimators=10, pca_components=6), seed=0)
    assert out.extra["kept_features"] == 6
    assert out.val_acc > 0.8
    with pytest.raises(ValueError, match=r"pca_components=61 exceeds .*at most 60"):
        fit_rf_point(*colour_split, _params(n_estimators=5, pca_components=61), seed=0)


# ---------------------------------------------------------------- tree shards


def test_shard_trees_and_seeds():
    assert shard_trees(10, 3) == [4, 3, 3]
    assert shard_trees(5, 5) == [1] * 5
    with pytest.raises(ValueError, match="tree_shards=4 .* n_estimators=3"):
        shard_trees(3, 4)
    assert shard_seed(7, 0, 1) == 7  # one shard is the unsharded forest
    seeds = {shard_seed(7, k, 4) for k in range(4)}
    assert len(seeds) == 4 and all(0 <= s < 2**32 for s in seeds)


def test_one_shard_is_the_whole_forest(colour_split):
    train_x, train_y, val_x, val_y, test_x = colour_split
    params = _params(n_estimators=12, augment="flip")
    whole = fit_rf_point(*colour_split, params, seed=5)
    shard = fit_shard(train_x, train_y, params, seed=5, shard=0)
    merged = merge_rf_point([shard], *colour_split, params)
    np.testing.assert_array_equal(merged.val_probs, whole.val_probs)
    assert _without_timing(merged.extra) == {**_without_timing(whole.extra), "shards": 1}


def test_merged_shards_are_one_forest_with_every_trees_bootstrap(colour_split):
    train_x, train_y, val_x, val_y, test_x = colour_split
    params = _params(n_estimators=9, tree_shards=2, augment="rotate")
    shards = [fit_shard(train_x, train_y, params, seed=1, shard=k) for k in range(2)]
    assert [s.trees for s in shards] == [5, 4]
    merged = merge_models(shards)
    assert merged.trees == merged.forest.n_estimators == 9
    # the merged forest votes as the trees of both shards together
    rows = training_rows(val_x, val_y, "none").x
    expected = (
        5 * shards[0].forest.predict_proba(rows) + 4 * shards[1].forest.predict_proba(rows)
    ) / 9
    np.testing.assert_allclose(merged.forest.predict_proba(rows), expected)
    # each tree keeps its own bootstrap sample, as sklearn regenerates it from its seed
    n = merged.n_rows
    for tree_in_bag, samples in zip(merged.in_bag, merged.forest.estimators_samples_, strict=True):
        expected_mask = np.zeros(n, bool)
        expected_mask[samples] = True
        np.testing.assert_array_equal(
            np.unpackbits(tree_in_bag, count=n).astype(bool), expected_mask
        )
    out = merge_rf_point(shards, *colour_split, params, shard_seconds=[1.0, 2.0])
    assert out.extra["trees"] == 9
    assert out.extra["shards"] == 2
    assert out.extra["train_seconds"] == 3.0 and out.extra["train_wall_seconds"] == 2.0
    assert 0 <= out.extra["oob_score"] <= 1 and out.extra["oob_grouped"] is not None
    assert out.val_acc > 0.8


def test_merging_shards_of_other_rows_fails(colour_split):
    train_x, train_y, *_ = colour_split
    params = _params(n_estimators=4, tree_shards=2)
    first = fit_shard(train_x, train_y, params, seed=0, shard=0)
    other = fit_shard(train_x[:-3], train_y[:-3], params, seed=0, shard=1)
    with pytest.raises(ForestError, match="shard 1 was trained on other rows"):
        merge_models([first, other])


def test_shards_with_selection_share_one_transform():
    x, y = _noise(60, seed=2)
    params = _params(n_estimators=4, tree_shards=2, select_scaling=1.0, select_estimators=40)
    shards = [fit_shard(x, y, params, seed=2, shard=k) for k in range(2)]
    merged = merge_rf_point(shards, x, y, x[:3], y[:3], x[:0], params)
    assert 0 < merged.extra["kept_features"] < 192
    # a shard fitted with another transform cannot join
    other = fit_shard(x, y, {**params, "select_scaling": 2.0}, seed=2, shard=1)
    with pytest.raises(ForestError, match="another feature transform"):
        merge_models([shards[0], other])


def test_shard_files_are_byte_identical_and_checked(colour_split, tmp_path):
    train_x, train_y, *_ = colour_split
    params = _params(n_estimators=6, tree_shards=2)
    first = save_model(fit_shard(train_x, train_y, params, seed=0, shard=1), tmp_path / "a.joblib")
    again = save_model(fit_shard(train_x, train_y, params, seed=0, shard=1), tmp_path / "b.joblib")
    assert first.sha256 == again.sha256  # a shard task run twice writes the same file
    loaded = load_model(first.path, first.sha256)
    assert loaded.trees == 3
    with pytest.raises(ForestError, match="checksum mismatch"):
        load_model(first.path, "0" * 64)
    with pytest.raises(ForestError, match="missing"):
        load_model(tmp_path / "none.joblib", first.sha256)


# ---------------------------------------------------------------- shard scores, added at the merge


def _score_merged_forest(shards, train_x, train_y, val_x, val_y, test_x, params):
    """The reference: score_model on the merged forest, as the merge did before."""
    model = merge_models(shards)
    train = training_rows(train_x, train_y, params["augment"])
    x = train.x if model.transform is None else model.transform.transform(train.x)
    return score_model(model, train, x, val_x, val_y, test_x, started=0.0, train_seconds=0.0)


def _assert_same_scores(got, want):
    assert got.train_acc == want.train_acc and got.val_acc == want.val_acc
    for key in ("oob_score", "oob_grouped", "oob_grouped_coverage"):
        assert got.extra[key] == pytest.approx(want.extra[key], abs=1e-12), key
    for key in ("train_rows", "pixel_features", "kept_features", "trees"):
        assert got.extra[key] == want.extra[key], key
    np.testing.assert_allclose(got.val_probs, want.val_probs, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got.val_pred, want.val_pred)
    np.testing.assert_array_equal(got.test_pred, want.test_pred)
    if want.test_probs is None:
        assert got.test_probs is None
    else:
        np.testing.assert_allclose(got.test_probs, want.test_probs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "options",
    [
        {"augment": "rotate_flip"},
        {"augment": "flip", "max_depth": 3, "pca_components": 6},
        {"augment": "none", "min_samples_leaf": 4},
    ],
)
def test_added_shard_scores_are_the_merged_forests_scores(colour_split, options):
    train_x, train_y, val_x, val_y, test_x = colour_split
    params = _params(n_estimators=9, tree_shards=3, **options)
    shards = [
        fit_scored_shard(train_x, train_y, val_x, test_x, params, seed=1, shard=k)[0]
        for k in range(3)
    ]
    assert all(s.scores is not None and s.scores.trees == 3 for s in shards)
    got = merge_rf_point(shards, *colour_split, params, shard_seconds=[1.0, 2.0, 3.0])
    want = _score_merged_forest(shards, *colour_split, params)
    _assert_same_scores(got, want)
    assert 0 <= got.extra["oob_grouped_coverage"] <= 1  # 9 trees rarely miss all 8 copies
    assert got.extra["shards"] == 3 and got.extra["train_seconds"] == 6.0
    # the merge used the shards' scores: scoring the merged forest is never called
    import shared.forest

    def no_scoring(*args, **kwargs):
        raise AssertionError("the merge scored the merged forest")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shared.forest, "score_model", no_scoring)
        again = merge_rf_point(shards, *colour_split, params)
    np.testing.assert_array_equal(again.val_probs, got.val_probs)


def test_one_scored_shard_is_the_whole_forest(colour_split):
    train_x, train_y, val_x, val_y, test_x = colour_split
    params = _params(n_estimators=12, augment="flip")
    whole = fit_rf_point(*colour_split, params, seed=5)
    shard, _ = fit_scored_shard(train_x, train_y, val_x, test_x, params, seed=5, shard=0)
    merged = merge_rf_point([shard], *colour_split, params)
    np.testing.assert_array_equal(merged.val_probs, whole.val_probs)
    np.testing.assert_array_equal(merged.test_probs, whole.test_probs)
    assert merged.train_acc == whole.train_acc
    assert _without_timing(merged.extra) == {**_without_timing(whole.extra), "shards": 1}


def test_merge_scores_the_forest_when_a_shard_has_no_usable_scores(colour_split, tmp_path):
    train_x, train_y, val_x, val_y, test_x = colour_split
    params = _params(n_estimators=6, tree_shards=2, augment="flip")
    scored = fit_scored_shard(train_x, train_y, val_x, test_x, params, seed=3, shard=0)[0]
    # a shard file written by older code: its pickle has no ``scores`` attribute at all
    old = fit_shard(train_x, train_y, params, seed=3, shard=1)
    del old.__dict__["scores"]
    written = save_model(old, tmp_path / "old.joblib")
    old = load_model(written.path, written.sha256)
    assert "scores" not in vars(old) and old.scores is None
    shards = [scored, old]
    _assert_same_scores(
        merge_rf_point(shards, *colour_split, params),
        _score_merged_forest(shards, *colour_split, params),
    )
    # scores computed on other validation images are not used for these
    both = [scored, fit_scored_shard(train_x, train_y, val_x, test_x, params, seed=3, shard=1)[0]]
    other_val = val_x[::-1].copy()
    _assert_same_scores(
        merge_rf_point(both, train_x, train_y, other_val, val_y, test_x, params),
        _score_merged_forest(both, train_x, train_y, other_val, val_y, test_x, params),
    )


def test_scored_shard_files_are_byte_identical(colour_split, tmp_path):
    train_x, train_y, val_x, val_y, test_x = colour_split
    params = _params(n_estimators=6, tree_shards=2, augment="rotate")
    written = [
        save_model(
            fit_scored_shard(train_x, train_y, val_x, test_x, params, seed=0, shard=1)[0],
            tmp_path / f"{run}.joblib",
        )
        for run in ("a", "b")
    ]
    assert written[0].sha256 == written[1].sha256  # a shard task run twice writes the same file
    loaded = load_model(written[0].path, written[0].sha256)
    assert loaded.scores is not None and loaded.scores.oob_sum.shape == (4 * len(train_x), 3)


class _Planted:
    """A pickle that, when loaded, touches a marker file: what a replaced shard could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_a_shard_replaced_after_its_checksum_is_never_unpickled(
    colour_split, tmp_path, monkeypatch
):
    """The bytes that are unpickled are the bytes whose sha256 was checked: a file
    swapped on the share between the check and the load (someone who can write the
    artifact folder racing the merge) is not what joblib reads."""
    import pickle

    import shared.forest as forest

    train_x, train_y, *_ = colour_split
    params = _params(n_estimators=4, tree_shards=2)
    shard = fit_shard(train_x, train_y, params, seed=0, shard=0)
    written = save_model(shard, tmp_path / "t.joblib")
    marker = tmp_path / "ran"
    real = forest.read_if_intact

    def check_then_swap(path, sha256):
        checked = real(path, sha256)
        path.write_bytes(pickle.dumps(_Planted(marker)))  # replaced right after the check
        return checked

    monkeypatch.setattr(forest, "read_if_intact", check_then_swap)
    loaded = load_model(written.path, written.sha256)
    assert not marker.exists()
    assert loaded.trees == 2
    with pytest.raises(ForestError, match="checksum mismatch"):  # the swapped file, now
        load_model(written.path, written.sha256)
    assert not marker.exists()


# ---------------------------------------------------------------- validation = "oob"


def test_out_of_bag_validation_is_sklearns_oob_decision_function():
    train_x, train_y = _noise(60, seed=4)  # random labels: out of bag is near chance
    params = _params(n_estimators=40)
    # validation = "oob": the validation images are the training images
    out = fit_rf_point(
        train_x, train_y, train_x, train_y, train_x[:0], params, seed=3, out_of_bag=True
    )
    reference = RandomForestClassifier(n_estimators=40, oob_score=True, random_state=3, n_jobs=1)
    reference.fit(training_rows(train_x, train_y, "none").x, train_y)
    np.testing.assert_allclose(out.val_probs, reference.oob_decision_function_, atol=1e-12)
    assert out.val_acc == pytest.approx(reference.oob_score_, abs=1e-12)
    assert out.val_acc == pytest.approx(out.extra["oob_score"], abs=1e-12)
    # not what the forest says of the images it was trained on
    assert out.train_acc == 1.0 and out.val_acc < 1.0


@pytest.mark.parametrize("augment", ["none", "rotate_flip"])
def test_out_of_bag_validation_of_merged_shards_is_the_whole_forests(augment):
    train_x, train_y = _noise(60, seed=4)
    split = (train_x, train_y, train_x, train_y, train_x[:0])
    params = _params(n_estimators=9, tree_shards=3, augment=augment)
    shards = [
        fit_scored_shard(train_x, train_y, train_x, train_x[:0], params, seed=1, shard=k)[0]
        for k in range(3)
    ]
    got = merge_rf_point(shards, *split, params, out_of_bag=True)
    model = merge_models(shards)
    train = training_rows(train_x, train_y, augment)
    want = score_model(
        model, train, train.x, *split[2:], started=0.0, train_seconds=0.0, out_of_bag=True
    )
    _assert_same_scores(got, want)
    # pooled over an image's copies: each copy's out-of-bag votes, all of them
    plain = merge_rf_point(shards, *split, params)
    assert not np.array_equal(got.val_probs, plain.val_probs)  # in-sample there
    assert got.val_probs.shape == (len(train_x), 3)
