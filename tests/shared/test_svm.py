"""PCA + RBF SVM: the shared basis and its slices, grid points, the best point."""

from __future__ import annotations

import io
import math
import tomllib

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from shared.spec import CampaignError, load_campaign, parse_campaign, sweep_points
from shared.svm import (
    GridPoint,
    PcaBasis,
    PcaProjection,
    best_point,
    check_gamma,
    check_n_components,
    fit_pca_basis,
    fit_svc,
    fit_svm_point,
    grid_table,
    pixel_features,
    project_all,
    search_svc,
)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """60 tiny uint8 'photos' with a few strong directions of variance plus noise."""
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(60, 6)) * np.array([40, 30, 20, 10, 5, 2])
    mixing = rng.normal(size=(6, 8 * 8 * 3)) / 4
    pixels = 128 + latent @ mixing + rng.normal(0, 3, (60, 192))
    return np.clip(pixels, 0, 255).astype(np.uint8).reshape(60, 8, 8, 3)


# ---------------------------------------------------------------- the shared basis


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("k", [1, 5, 12])
def test_slice_of_larger_basis_is_pca_k(images, whiten, k):
    train, other = images[:45], images[45:]
    basis = fit_pca_basis(train, 30, whiten, seed=0, svd_solver="full")
    reference = PCA(n_components=k, whiten=whiten, svd_solver="full").fit(pixel_features(train))
    for x in (train, other):
        expected = reference.transform(pixel_features(x))
        np.testing.assert_allclose(basis.project(x, k), expected, rtol=1e-3, atol=1e-4)
    # the stored projection of every image, sliced, is the same thing
    projection = project_all(basis, images)
    assert projection.z.dtype == np.float32
    np.testing.assert_allclose(
        projection.features(k), reference.transform(pixel_features(images)), rtol=1e-3, atol=1e-4
    )
    np.testing.assert_allclose(
        projection.explained(k), reference.explained_variance_ratio_.sum(), rtol=1e-5
    )


def test_randomized_slice_agrees_with_randomized_pca_k(images):
    # the campaign's solver: the leading components agree up to the solver's accuracy
    basis = fit_pca_basis(images, 40, False, seed=3)
    reference = PCA(n_components=4, svd_solver="randomized", random_state=3)
    expected = reference.fit_transform(pixel_features(images))
    np.testing.assert_allclose(np.abs(basis.project(images, 4)), np.abs(expected), atol=1e-3)


def test_whitened_projection_has_unit_variance(images):
    z = fit_pca_basis(images, 6, True, seed=0).project(images)
    np.testing.assert_allclose(z.var(axis=0, ddof=1), 1.0, rtol=1e-3)


def test_whiten_with_null_components_stays_finite():
    # 4 images span a 3-dimensional affine space: the 4th component has no variance
    x = np.random.default_rng(1).integers(0, 256, (4, 12), dtype=np.uint8)
    z = fit_pca_basis(x, 4, True, seed=0, svd_solver="full").project(x)
    assert np.isfinite(z).all()


def test_uint8_and_float_inputs_mean_the_same(images):
    basis = fit_pca_basis(images, 5, False, seed=0)
    as_float = images.astype(np.float32) / 255
    np.testing.assert_allclose(basis.project(as_float), basis.project(images), atol=1e-5)


def test_projection_is_chunked_without_changing_results(images):
    many = np.concatenate([images] * 12)  # 720 rows: more than one chunk
    basis = fit_pca_basis(images, 5, True, seed=0)
    z = basis.project(many)
    np.testing.assert_array_equal(z[:60], z[660:])
    assert z.shape == (720, 5)


def test_randomized_fit_is_deterministic_in_seed(images):
    a = project_all(fit_pca_basis(images, 10, False, seed=7), images).to_bytes()
    b = project_all(fit_pca_basis(images, 10, False, seed=7), images).to_bytes()
    assert a == b  # two workers fitting the same basis write the same file


@pytest.mark.parametrize("whiten", [False, True])
def test_basis_npz_round_trip(images, whiten):
    basis = fit_pca_basis(images, 8, whiten, seed=0)
    blob = basis.to_bytes()
    again = PcaBasis.from_bytes(blob)
    assert again.whiten is whiten and again.n_train == 60 and again.n_components == 8
    np.testing.assert_array_equal(again.components, basis.components)
    np.testing.assert_array_equal(again.project(images, 3), basis.project(images, 3))
    assert again.to_bytes() == blob


@pytest.mark.parametrize("whiten", [False, True])
def test_projection_npz_round_trip(images, whiten):
    projection = project_all(fit_pca_basis(images, 8, whiten, seed=0), images)
    blob = projection.to_bytes()
    again = PcaProjection.from_bytes(blob)
    assert again.z.dtype == np.float32
    assert (again.whiten, again.n_train, again.n_features) == (whiten, 60, 192)
    np.testing.assert_array_equal(again.features(5), projection.features(5))
    assert again.explained(8) == projection.explained(8)
    assert again.to_bytes() == blob


# ---------------------------------------------------------------- standardized features


@pytest.mark.parametrize("whiten", [False, True])
def test_standardized_basis_is_scaler_then_pca(images, whiten):
    x = images.copy()
    x[:, 0, 0, 0] = 77  # a pixel that never varies: the scaler keeps it at scale 1
    train = x[:45]
    basis = fit_pca_basis(train, 30, whiten, seed=0, standardize=True, svd_solver="full")
    assert basis.standardized
    reference = Pipeline(
        [("scale", StandardScaler()), ("pca", PCA(5, whiten=whiten, svd_solver="full"))]
    ).fit(pixel_features(train))
    expected = reference.transform(pixel_features(x))
    np.testing.assert_allclose(basis.project(x, 5), expected, rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose(
        basis.explained_variance_ratio[:5], reference["pca"].explained_variance_ratio_, rtol=1e-4
    )
    again = PcaBasis.from_bytes(basis.to_bytes())
    assert again.standardized and again.to_bytes() == basis.to_bytes()


def test_standardizing_leaves_float_input_as_it_was(images):
    x = images.astype(np.float32) / 255
    before = x.copy()
    basis = fit_pca_basis(x, 5, False, seed=0, standardize=True)
    np.testing.assert_array_equal(x, before)
    # and uint8 pixels mean the same as their [0, 1] floats
    np.testing.assert_allclose(
        basis.project(images),
        fit_pca_basis(images, 5, False, seed=0, standardize=True).project(images),
        atol=1e-3,
    )


def test_a_basis_stored_before_standardizing_reads_as_plain(images):
    basis = fit_pca_basis(images, 4, False, seed=0)
    arrays = dict(np.load(io.BytesIO(basis.to_bytes())))
    del arrays["standardized"]
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    assert PcaBasis.from_bytes(buffer.getvalue()).standardized is False


def test_gamma_scale_is_the_value_svc_used(images):
    y = np.arange(60) % 3
    z = fit_pca_basis(images, 6, False, seed=0).project(images)
    outcome = fit_svc(z, y, z[:0], y[:0], z[:0], C=1.0, gamma="scale", seed=0)
    svc = SVC(gamma="scale").fit(z, y)
    assert outcome.extra["gamma_scale"] == pytest.approx(svc._gamma, rel=1e-9)
    numeric = fit_svc(z, y, z[:0], y[:0], z[:0], C=1.0, gamma=1e-3, seed=0)
    assert "gamma_scale" not in numeric.extra


def test_standardized_gamma_scale_is_one_over_the_kept_variance(images):
    # why the study's gamma = "scale" of about 1e-5 at 100 components means standardized
    # features: 1 / gamma is the variance the k components keep, which for standardized
    # features is their explained share of d (the number of features)
    y = np.arange(60) % 3
    basis = fit_pca_basis(images, 6, False, seed=0, standardize=True, svd_solver="full")
    z = basis.project(images)
    gamma = fit_svc(z, y, z[:0], y[:0], z[:0], C=1.0, gamma="scale", seed=0).extra["gamma_scale"]
    kept = basis.explained_variance_ratio.sum() * 8 * 8 * 3  # each feature's variance is 1
    assert gamma == pytest.approx(1 / kept, rel=1e-4)


def test_too_many_components_is_one_clear_line(images):
    with pytest.raises(ValueError, match=r"^n_components=61 exceeds what 60 training images "):
        fit_pca_basis(images, 61, False, seed=0)
    with pytest.raises(ValueError, match=r"n_components=200 .* \(at most 192\)"):
        check_n_components(200, 1000, 192)
    with pytest.raises(ValueError, match="at least 1"):
        check_n_components(0, 10, 10)


def test_slicing_beyond_the_basis_names_the_limit(images):
    projection = project_all(fit_pca_basis(images, 8, False, seed=0), images[:8])
    with pytest.raises(ValueError, match="this projection has 8"):
        projection.features(9)
    with pytest.raises(ValueError, match="exceeds what 60 training images allow"):
        projection.features(1000)
    with pytest.raises(ValueError, match="this basis has 8"):
        fit_pca_basis(images, 8, False, seed=0).project(images, 9)


# ---------------------------------------------------------------- gamma and grid points


@pytest.mark.parametrize(
    ("gamma", "expected"),
    [("scale", "scale"), ("auto", "auto"), (1e-6, 1e-6), (1, 1.0), ("1e-5", 1e-5)],
)
def test_check_gamma_accepts(gamma, expected):
    assert check_gamma(gamma) == expected


@pytest.mark.parametrize("gamma", [0, -1e-3, "Scale", None, math.nan, math.inf, "fast"])
def test_check_gamma_rejects_in_one_line(gamma):
    with pytest.raises(ValueError, match=r"^gamma=.*: expected 'scale', 'auto' or a number > 0$"):
        check_gamma(gamma)


def test_fit_svc_on_sliced_features_matches_the_single_point_fit(images):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 60)
    train, val = slice(0, 45), slice(45, 60)
    params = {"n_components": 5, "whiten": False, "C": 1.5, "gamma": 1e-3}
    single = fit_svm_point(images[train], y[train], images[val], y[val], images[:0], params, seed=0)
    basis = fit_pca_basis(images[train], 20, False, seed=0, svd_solver="full")
    z = project_all(basis, images).features(5)
    shared = fit_svc(z[train], y[train], z[val], y[val], z[:0], C=1.5, gamma=1e-3, seed=0)
    assert shared.train_acc == pytest.approx(single.train_acc, abs=1 / 45)
    assert shared.val_acc == pytest.approx(single.val_acc, abs=1 / 15)
    assert shared.test_pred.shape == (0,)


def test_a_linear_kernel_and_an_iteration_limit_say_whether_the_solver_stopped_there(images):
    """The study's linear SVM (2.5) "didn't converge ... even if num_of_iter was set to
    100,000": the point records whether its solver stopped at ``max_iter``, and its
    figures are those of sklearn's SVC with the same kernel and limit."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 60)  # labels the features cannot separate linearly
    z = fit_pca_basis(images, 12, False, seed=0).project(images)
    for max_iter in (5, 100_000):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)  # none escapes the fit
            out = fit_svc(
                z, y, z[:0], y[:0], z[:0], C=1.5, gamma="scale", seed=0,
                kernel="linear", max_iter=max_iter,
            )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            svc = SVC(kernel="linear", C=1.5, max_iter=max_iter, random_state=0).fit(z, y)
        assert out.extra["iterations"] == int(svc.n_iter_.max())
        assert out.extra["stopped_at_max_iter"] is (int(svc.n_iter_.max()) >= max_iter)
        assert out.train_acc == pytest.approx(float(np.mean(svc.predict(z) == y)))
        assert "gamma_scale" not in out.extra  # a linear kernel has no gamma
    assert out.extra["stopped_at_max_iter"] is False  # 100,000 is plenty here
    stopped = fit_svc(z, y, z[:0], y[:0], z[:0], C=1.5, gamma="scale", seed=0, max_iter=5)
    assert stopped.extra["stopped_at_max_iter"] is True and stopped.extra["iterations"] == 5
    # no limit: nothing to say
    plain = fit_svc(z, y, z[:0], y[:0], z[:0], C=1.5, gamma="scale", seed=0, kernel="linear")
    assert "stopped_at_max_iter" not in plain.extra and "iterations" not in plain.extra


def test_kernel_and_max_iter_at_their_defaults_leave_the_points_as_they_were(tmp_path):
    """Added after campaigns were stored: a point at the defaults keeps its parameters
    (and so its hash, and the results a twin campaign reuses)."""
    base = (
        'name = "k"\n[dataset]\nkind = "synthetic"\ntrain_per_class = 4\ntest_per_class = 1\n'
        "[svm]\nn_components = 2\n"
    )
    (plain,) = sweep_points(parse_campaign(tomllib.loads(base), source="k").svm)
    assert "kernel" not in plain and "max_iter" not in plain
    linear = base + 'kernel = ["linear", "rbf"]\nmax_iter = 100000\n'
    points = sweep_points(parse_campaign(tomllib.loads(linear), source="k").svm)
    # each point leaves out what is at its default (the rbf point's kernel)
    assert [(p.get("kernel"), p["max_iter"]) for p in points] == [
        ("linear", 100000),
        (None, 100000),
    ]
    # a search of gamma under a linear kernel would fit ties for nothing
    searched = linear + "[svm.search]\nfolds = 2\ngamma = [1e-3, 1e-2]\n"
    with pytest.raises(CampaignError, match=r"\[svm\]: a linear kernel uses no gamma"):
        parse_campaign(tomllib.loads(searched), source="k")


def test_fit_svm_point_rejects_bad_gamma_before_fitting(images):
    y = np.arange(60) % 3
    params = {"n_components": 5, "whiten": False, "C": 1.0, "gamma": -1.0}
    with pytest.raises(ValueError, match="gamma=-1.0"):
        fit_svm_point(images, y, images[:5], y[:5], images[:0], params, seed=0)


# ---------------------------------------------------------------- the best point


def _rows(table: list[tuple[dict, list[float | None]]]) -> list[dict]:
    return [
        {"params": params, "fold": fold, "val_acc": acc, "train_acc": 1.0}
        for params, accs in table
        for fold, acc in enumerate(accs)
    ]


def test_best_point_is_the_highest_mean_across_folds():
    rows = _rows(
        [
            ({"C": 1.0}, [0.9, 0.5, 0.5]),  # best single fold, mean 0.633
            ({"C": 2.0}, [0.7, 0.7, 0.7]),  # best mean
            ({"C": 3.0}, [0.6, 0.6, 0.6]),
        ]
    )
    best = best_point(rows)
    assert best == GridPoint({"C": 2.0}, pytest.approx(0.7), 1.0, 3)


def test_best_point_ties_go_to_the_first_in_file_order():
    rows = _rows([({"C": 1.0}, [0.5, 0.5]), ({"C": 2.0}, [0.6, 0.8]), ({"C": 3.0}, [0.8, 0.6])])
    assert best_point(rows).params == {"C": 2.0}
    assert best_point(list(reversed(rows))).params == {"C": 3.0}


def test_best_point_groups_rows_in_any_order_and_key_order():
    rows = [
        {"params": {"C": 1.0, "gamma": "scale"}, "val_acc": 0.6},
        {"params": {"C": 2.0, "gamma": "scale"}, "val_acc": 0.7},
        {"params": {"gamma": "scale", "C": 1.0}, "val_acc": 1.0},  # same point, keys reordered
        {"params": {"C": 2.0, "gamma": "scale"}, "val_acc": 0.7},
    ]
    table = grid_table(rows)
    assert [p.params["C"] for p in table] == [1.0, 2.0]
    assert [p.folds for p in table] == [2, 2]
    assert best_point(rows).params == {"C": 1.0, "gamma": "scale"}
    assert best_point(rows).mean_val_acc == pytest.approx(0.8)
    assert table[0].mean_train_acc is None


def test_best_point_skips_missing_accuracies():
    rows = _rows([({"C": 1.0}, [None, math.nan]), ({"C": 2.0}, [0.4, None])])
    table = grid_table(rows)
    assert table[0].mean_val_acc is None
    assert table[1].mean_val_acc == pytest.approx(0.4)
    assert best_point(rows).params == {"C": 2.0}
    assert best_point(_rows([({"C": 1.0}, [None])])) is None
    assert best_point([]) is None


# ---------------------------------------------------------------- the study's grid in a campaign


def test_the_studys_grid_is_a_valid_campaign():
    campaign = parse_campaign(
        {
            "name": "study",
            "dataset": {"kind": "synthetic"},
            "svm": {
                "variant": ["original", "polarized", "cropped"],
                "n_components": [50, 100, 200, 500, 700, 800, 1000],
                "whiten": [False, True],
                "C": [1.0, 1.5, 2.0],
                "gamma": [1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 1e-3, "scale"],
            },
        },
        source="study.toml",
    )
    points = sweep_points(campaign.svm)
    assert len(points) == 3 * 7 * 2 * 3 * 7
    assert points[0] == {
        "variant": "original",
        "n_components": 50,
        "whiten": False,
        "C": 1.0,
        "gamma": 1e-6,
    }
    assert {p["gamma"] for p in points} >= {1e-6, "scale"}
    assert campaign.model_dump(mode="json")["svm"]["n_components"][-1] == 1000


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        (
            "gamma",
            "true",
            r"gamma: Input should be a valid number or 'scale' or 'auto' \(got "
            r"True\)",
        ),
        ("gamma", "inf", r"gamma: Input should be a finite number"),
        ("C", "true", r"C: Input should be a valid number \(got True\)"),
        ("n_components", '"200"', r"n_components: Input should be a valid integer"),
        ("n_components", "[100, 0]", r"n_components\[1\]: Input should be greater than or eq"),
        ("whiten", '"yes"', r"whiten: Input should be a valid boolean"),
    ],
)
def test_svm_numbers_are_strict(tmp_path, field, value, fragment):
    path = tmp_path / "c.toml"
    path.write_text(f'name = "c"\n[dataset]\nkind = "synthetic"\n[svm]\n{field} = {value}\n')
    with pytest.raises(ValueError, match=rf"c.toml: \[svm\] {fragment}") as info:
        load_campaign(path)
    assert "\n" not in str(info.value)


def test_bad_gamma_in_a_campaign_is_one_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('name = "c"\n[dataset]\nkind = "synthetic"\n[svm]\ngamma = [1e-5, "fast"]\n')
    with pytest.raises(ValueError, match=r"c.toml: \[svm\] gamma\[1\]: ") as info:
        load_campaign(path)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- the benchmark, smoke-run


@pytest.mark.parametrize("flags", [[], ["--standardize"]])
def test_svm_grid_benchmark_smoke(tmp_path, flags):
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "svm_grid.json"
    done = subprocess.run(
        [sys.executable, "bench/svm_grid.py", "--size", "smoke", "--jobs", "1", "--json", out]
        + flags,
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "baseline GridSearchCV" in done.stdout and "orchard shared PCA" in done.stdout
    assert "speed-up: " in done.stdout
    figures = json.loads(out.read_text())
    assert figures["speedup"] > 0 and figures["orchard"]["pca_fits"] == 6
    assert figures["args"]["standardize"] is bool(flags)
    baseline, orchard = figures["baseline"], figures["orchard"]
    assert set(baseline["best"]) == set(orchard["best"]) == {"n_components", "whiten", "C", "gamma"}
    # correctness, not timing: slicing a shared basis finds as good a point as refitting
    assert abs(baseline["best_val_acc"] - orchard["best_val_acc"]) <= 0.005
    assert figures["accuracy_difference"] <= 0.005
    # and the point it finds scores, in the baseline's own search, within 0.5 % of its best
    assert figures["baseline_at_orchard_best"] >= baseline["best_val_acc"] - 0.005
    assert figures["machine"]["cpu"]


def _informative_second_column(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Column 0 is noise, column 1 holds the class, column 2 is noise again."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    z = rng.normal(0, 1, (n, 3)).astype(np.float32)
    z[:, 1] = y * 4 + rng.normal(0, 0.3, n)
    return z, y


def test_search_takes_the_width_with_the_best_cv_accuracy():
    z, y = _informative_second_column()
    kw = {"folds": 3, "seed": 0, "n_components": 1, "C": 1.0, "gamma": "scale"}
    choice = search_svc(z, y, {"n_components": [1, 2]}, **kw)
    assert choice.params == {"n_components": 2}  # column 0 alone is noise
    assert choice.cv_acc == 1.0 and choice.combinations == 2
    # equal scores: the first of the grid, as GridSearchCV's best_index_
    assert search_svc(z, y, {"n_components": [3, 2]}, **kw).params == {"n_components": 3}
    assert search_svc(z, y, {"n_components": [2, 3]}, **kw).params == {"n_components": 2}


def test_search_over_c_and_gamma_is_gridsearchcv():
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    z, y = _informative_second_column(seed=1)
    grid = {"C": [0.01, 1.0, 100.0], "gamma": [1e-6, 0.1, "scale"]}
    choice = search_svc(z, y, grid, folds=4, seed=3, n_components=2, C=1.0, gamma="scale")
    cv = StratifiedKFold(4, shuffle=True, random_state=3)
    expected = GridSearchCV(SVC(kernel="rbf", random_state=3), grid, cv=cv).fit(z[:, :2], y)
    assert choice.params == expected.best_params_
    assert choice.cv_acc == pytest.approx(expected.best_score_)
    assert choice.combinations == 9


def test_a_single_point_with_a_search_fits_the_widest_pca_and_refits_its_choice(images):
    y = np.arange(60) % 3
    train, val = slice(0, 45), slice(45, 60)
    search = {"folds": 3, "n_components": [2, 6], "gamma": [1e-9, "scale"]}
    params = {"whiten": False, "C": 1.0, "search": search}
    out = fit_svm_point(images[train], y[train], images[val], y[val], images[:0], params, seed=0)
    basis = fit_pca_basis(images[train], 6, False, seed=0)
    z = basis.project(images)
    grid = {"n_components": [2, 6], "gamma": [1e-9, "scale"]}
    kw = {"folds": 3, "seed": 0, "n_components": 2, "C": 1.0, "gamma": "scale"}
    choice = search_svc(z[train], y[train], grid, **kw)
    assert {n: out.extra[f"best_{n}"] for n in choice.params} == choice.params
    assert out.extra["search_cv_acc"] == choice.cv_acc
    k, gamma = choice.params["n_components"], choice.params["gamma"]
    refit = fit_svc(
        z[train, :k], y[train], z[val, :k], y[val], z[:0, :k], C=1.0, gamma=gamma, seed=0
    )
    assert (out.train_acc, out.val_acc) == (refit.train_acc, refit.val_acc)
    assert out.extra["explained_variance"] == pytest.approx(
        basis.explained_variance_ratio[:k].sum()
    )
