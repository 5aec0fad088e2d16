"""orchard.fit_svm's shared PCA: one per (variant, fold, whiten, standardize), sliced per point.

The task body runs against a real SQLite store and real cache shards on disk.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from db.store import Artifact, Store
from shared.artifacts import sha256_file
from shared.manifest import Manifest
from shared.plan import TRAIN
from shared.settings import Settings
from shared.svm import fit_pca_basis, fit_svc, project_all
from shared.variants import derive
from tests.workers.conftest import N_TEST, tiny_images
from workers.tasks import svm as svm_task
from workers.tasks.base import UnitContext

CAMPAIGN_ID = "s-1"


@pytest.fixture(autouse=True)
def _forget_loaded_projection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(svm_task, "_last", None)


@pytest.fixture
def env(cached_campaign) -> tuple[Store, Settings, Manifest]:  # noqa: ANN001
    return cached_campaign(
        CAMPAIGN_ID,
        # 1000 is more than 12 training images allow: that point must fail alone
        {
            "svm": {
                "variant": "polar16",
                "n_components": [3, 6, 1000],
                "whiten": [False, True],
                "C": [1.0, 10.0],
                "folds": 2,
            },
        },
    )


def _run(env, **params):
    """Run the task body for the unit with ``params`` (and fold 0 unless given)."""
    store, settings, manifest = env
    fold = params.pop("fold", 0)
    (unit,) = [
        u
        for u in store.units(CAMPAIGN_ID)
        if u.stage == TRAIN
        and u.fold == fold
        and all(u.params.get(name) == value for name, value in params.items())
    ]
    ctx = UnitContext(store.get_campaign(CAMPAIGN_ID), unit, store, settings, _manifest=manifest)
    return svm_task.fit_svm.run.__wrapped__(ctx)


def _pca_records(store: Store) -> list[Artifact]:
    return store.artifacts(CAMPAIGN_ID, kind="pca")


def test_points_of_a_fold_share_one_basis_with_the_largest_k(env):
    store, settings, _ = env
    first = _run(env, n_components=3, whiten=False, C=1.0)
    assert first.extra["pca_fitted"] is True
    # what its numbers depend on besides the seed (README): the BLAS threads of its PCA
    from threadpoolctl import threadpool_info

    blas = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    assert first.extra["threads"]["blas"] == max(blas) >= 1
    (record,) = _pca_records(store)
    # 12 training images in fold 0 allow 12 components: the largest usable k, not 1000
    assert record.path == f"campaigns/{CAMPAIGN_ID}/pca/polar16-f0-w0-k12.npz"
    assert record.unit_key is not None and record.sha256 == sha256_file(
        settings.artifacts / record.path
    )
    for n_components, c in [(6, 1.0), (3, 10.0), (6, 10.0)]:
        later = _run(env, n_components=n_components, whiten=False, C=c)
        assert later.extra["pca_fitted"] is False
        assert later.extra["pca_components"] == 12
    assert len(_pca_records(store)) == 1
    # whiten and the other fold each get their own basis
    assert _run(env, n_components=3, whiten=True, C=1.0).extra["pca_fitted"] is True
    assert _run(env, n_components=3, whiten=False, C=1.0, fold=1).extra["pca_fitted"] is True
    assert [Path(r.path).name for r in _pca_records(store)] == [
        "polar16-f0-w0-k12.npz",
        "polar16-f0-w1-k12.npz",
        "polar16-f1-w0-k12.npz",
    ]


def test_a_sliced_point_equals_its_own_pca(env):
    store, settings, manifest = env
    outcome = _run(env, n_components=6, whiten=True, C=10.0)
    assert outcome.train_acc is not None and outcome.val_acc is not None
    assert len(outcome.predictions["val"]) == 12 and len(outcome.predictions["test"]) == N_TEST
    (record,) = _pca_records(store)
    images = derive(tiny_images()[0], "polar16")
    train, _, _ = manifest.fold_indices(0)
    expected = project_all(fit_pca_basis(images[train], 12, True, seed=0), images)
    blob = (settings.artifacts / record.path).read_bytes()
    assert blob == expected.to_bytes()  # the campaign seed (0) + fold (0) fixes the file
    assert 0 < outcome.extra["explained_variance"] < expected.explained(12)


def _fold0_svc(manifest: Manifest, k_basis: int, k: int, whiten: bool, **svc):  # noqa: ANN003
    """An SVC fitted from scratch on the first ``k`` columns of fold 0's PCA(k_basis)."""
    images = derive(tiny_images()[0], "polar16")
    train, val, test = manifest.fold_indices(0)
    z = project_all(fit_pca_basis(images[train], k_basis, whiten, seed=0), images).features(k)
    labels = manifest.label_index
    return fit_svc(z[train], labels(train), z[val], labels(val), z[test], seed=0, **svc)


def _same_fit(outcome, expected) -> bool:  # noqa: ANN001
    return (
        outcome.train_acc == expected.train_acc
        and outcome.val_acc == expected.val_acc
        and [p.pred for p in outcome.predictions["val"]] == list(expected.val_pred)
        and [p.pred for p in outcome.predictions["test"]] == list(expected.test_pred)
        and outcome.extra["support_vectors"] == expected.extra["support_vectors"]
        and outcome.extra["gamma_scale"] == pytest.approx(expected.extra["gamma_scale"])
    )


def test_a_narrow_point_trains_on_its_first_components_of_the_wide_basis(env):
    # n_components = 3 on the fold's basis of 12 (the most 12 training images allow).
    # Whitened, the 12th component (12 centred images span 11 directions) is round-off
    # divided by a variance of ~0: huge on unseen images, so an SVC that saw all 12
    # columns would judge the validation images by it
    outcome = _run(env, n_components=3, whiten=True, C=1.0)
    assert outcome.extra["pca_components"] == 12
    sliced = _fold0_svc(env[2], 12, 3, True, C=1.0, gamma="scale")
    every = _fold0_svc(env[2], 12, 12, True, C=1.0, gamma="scale")
    assert sliced.val_acc == 1.0 and every.val_acc < 0.5  # the two differ, and visibly
    assert list(sliced.val_pred) != list(every.val_pred)
    assert _same_fit(outcome, sliced)
    assert not _same_fit(outcome, every)


def test_a_file_that_is_not_the_recorded_one_is_fitted_again(env, monkeypatch):
    store, settings, _ = env
    _run(env, n_components=3, whiten=False, C=1.0)
    (record,) = _pca_records(store)
    path = settings.artifacts / record.path
    good = path.read_bytes()
    path.write_bytes(good[:-100])  # truncated behind the store's back
    # the fitting process keeps what it wrote in memory; another process reads the file
    assert _run(env, n_components=3, whiten=False, C=10.0).extra["pca_fitted"] is False
    monkeypatch.setattr(svm_task, "_last", None)
    assert _run(env, n_components=6, whiten=False, C=1.0).extra["pca_fitted"] is True
    assert path.read_bytes() == good
    assert _pca_records(store)[0].sha256 == record.sha256


def test_too_many_components_fails_that_point_in_one_line(env):
    store, _, _ = env
    with pytest.raises(ValueError, match=r"^n_components=1000 exceeds what 12 training images"):
        _run(env, n_components=1000, whiten=False, C=1.0)
    assert _pca_records(store) == []  # nothing fitted for a point that cannot run


def test_largest_n_components_reads_the_stored_spec():
    assert svm_task.largest_n_components({"svm": {"n_components": [50, 1000, 200]}}, 50) == 1000
    assert svm_task.largest_n_components({"svm": {"n_components": 20}}, 5) == 20
    assert svm_task.largest_n_components({}, 7) == 7


def test_standardized_points_fit_a_basis_of_their_own(cached_campaign):
    store, settings, manifest = cached_campaign(
        CAMPAIGN_ID,
        {"svm": {"variant": "polar16", "n_components": 4, "standardize": [False, True]}},
    )
    env = (store, settings, manifest)
    plain = _run(env, standardize=None)  # the point at the default carries no "standardize"
    scaled = _run(env, standardize=True)
    assert plain.extra["pca_fitted"] is True and scaled.extra["pca_fitted"] is True
    paths = sorted(Path(r.path).name for r in _pca_records(store))
    assert paths == ["polar16-f0-w0-k4.npz", "polar16-f0-w0-s1-k4.npz"]
    images = derive(tiny_images()[0], "polar16")
    train, _, _ = manifest.fold_indices(0)
    expected = project_all(fit_pca_basis(images[train], 4, False, 0, standardize=True), images)
    written = settings.artifacts / f"campaigns/{CAMPAIGN_ID}/pca/polar16-f0-w0-s1-k4.npz"
    assert written.read_bytes() == expected.to_bytes()
    # gamma = "scale" (the default) reports the value it took, which standardizing changes
    assert plain.extra["gamma_scale"] != pytest.approx(scaled.extra["gamma_scale"], rel=0.1)


def _searching(cached_campaign, search: dict, **svm):  # noqa: ANN001, ANN202
    store, settings, manifest = cached_campaign(
        CAMPAIGN_ID, {"svm": {"variant": "polar16", "folds": 2, "search": search, **svm}}
    )
    return store, settings, manifest


def _gridsearch(  # noqa: ANN202
    manifest: Manifest, k_max: int, k: int, grid: dict, folds: int, whiten: bool = False
):
    """What sklearn's own GridSearchCV makes of fold 0's training rows on PCA(k_max)[:k]."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.svm import SVC

    images = derive(tiny_images()[0], "polar16")
    train, _, _ = manifest.fold_indices(0)
    z = project_all(fit_pca_basis(images[train], k_max, whiten, seed=0), images).features(k)
    search = GridSearchCV(
        SVC(kernel="rbf", random_state=0),
        grid,
        cv=StratifiedKFold(folds, shuffle=True, random_state=0),
    ).fit(z[train], manifest.label_index(train))
    return search.best_params_, search.best_score_


def test_a_search_chooses_what_gridsearchcv_chooses_and_refits_it(cached_campaign):
    grid = {"C": [0.01, 10.0], "gamma": [1e-9, "scale"]}
    env = _searching(cached_campaign, {"folds": 3, **grid}, n_components=[3, 5])
    store, _, manifest = env
    (unit,) = [u for u in store.units(CAMPAIGN_ID) if u.fold == 0 and u.params["n_components"] == 3]
    assert "C" not in unit.params and "gamma" not in unit.params  # chosen in the unit
    outcome = _run(env, n_components=3)
    best, score = _gridsearch(manifest, 5, 3, grid, folds=3)
    assert best == {"C": 10.0, "gamma": "scale"}  # the tiny gamma and C cannot separate
    assert (outcome.extra["best_C"], outcome.extra["best_gamma"]) == (best["C"], best["gamma"])
    assert outcome.extra["search_cv_acc"] == pytest.approx(score)
    assert outcome.extra["search_combinations"] == 4
    assert outcome.extra["pca_components"] == 5  # the grid's largest n_components
    # the chosen combination refitted on all of the fold's training images and judged on
    # its validation images, as a grid point with those values is
    images = derive(tiny_images()[0], "polar16")
    train, val, test = manifest.fold_indices(0)
    z = project_all(fit_pca_basis(images[train], 5, False, seed=0), images).features(3)
    labels = manifest.label_index
    refit = fit_svc(z[train], labels(train), z[val], labels(val), z[test], seed=0, **best)
    assert (outcome.train_acc, outcome.val_acc) == (refit.train_acc, refit.val_acc)
    assert [p.pred for p in outcome.predictions["test"]] == list(refit.test_pred)


def test_a_search_over_n_components_slices_one_projection(cached_campaign):
    env = _searching(cached_campaign, {"folds": 2, "n_components": [1, 4], "gamma": [1e-9, 0.05]})
    store, _, manifest = env
    (unit,) = [u for u in store.units(CAMPAIGN_ID) if u.fold == 0]
    assert "n_components" not in unit.params and unit.params["C"] == 1.5
    outcome = _run(env)
    # sklearn's own search at each width; the first best wins, as in one GridSearchCV
    found = [_gridsearch(manifest, 4, k, {"gamma": [1e-9, 0.05]}, folds=2) for k in (1, 4)]
    k_index = max(range(2), key=lambda i: found[i][1])
    assert outcome.extra["best_n_components"] == (1, 4)[k_index]
    assert outcome.extra["best_gamma"] == found[k_index][0]["gamma"]
    assert outcome.extra["search_cv_acc"] == pytest.approx(found[k_index][1])
    assert outcome.extra["search_combinations"] == 4
    assert outcome.extra["pca_components"] == 4
    assert [Path(r.path).name for r in _pca_records(store)] == ["polar16-f0-w0-k4.npz"]


def test_a_search_that_picks_the_narrower_width_refits_on_its_first_components(cached_campaign):
    env = _searching(cached_campaign, {"folds": 2, "n_components": [3, 12]}, whiten=True)
    outcome = _run(env)
    assert outcome.extra["pca_components"] == 12
    # whitened, the 12th component is ~0 / ~0 (see above): the search's folds reject it
    assert outcome.extra["best_n_components"] == 3
    # sklearn's own search at each width (C = 1.5, the unit's): the narrower one wins
    found = [_gridsearch(env[2], 12, k, {"C": [1.5]}, folds=2, whiten=True)[1] for k in (3, 12)]
    assert outcome.extra["search_cv_acc"] == pytest.approx(found[0]) and found[0] > found[1]
    sliced = _fold0_svc(env[2], 12, 3, True, C=1.5, gamma="scale")
    every = _fold0_svc(env[2], 12, 12, True, C=1.5, gamma="scale")
    assert sliced.val_acc == 1.0 and every.val_acc < 0.5
    assert _same_fit(outcome, sliced)
    assert not _same_fit(outcome, every)


def test_a_search_with_more_folds_than_a_class_has_images_fails_in_one_line(cached_campaign):
    # 12 training images in fold 0: 4 of each class
    env = _searching(cached_campaign, {"folds": 5, "C": [1.0, 2.0]}, n_components=3)
    with pytest.raises(ValueError, match=r"^\[svm.search\] folds = 5: a class has only 4 "):
        _run(env)
    assert _pca_records(env[0]) == []  # refused before the fold's PCA was fitted


def test_largest_n_components_counts_what_the_search_tries():
    spec = {"svm": {"n_components": [200], "search": [{"n_components": [50, 100]}]}}
    assert svm_task.largest_n_components(spec, 1) == 100  # the points' own 200 is unused
    spec["svm"]["search"].append({"C": [1.0]})  # a second search keeps the points' own
    assert svm_task.largest_n_components(spec, 1) == 200
    assert svm_task.largest_n_components({"svm": {"n_components": [8], "search": [None]}}, 1) == 8
