"""The study's experiments (/work/shared/study.md) as the campaigns in ``campaigns/study/``.

Each test names a section of the study and checks that some shipped campaign runs what
that section reports: the values it compared, the fixed parameters it names, and its
validation scheme (the dev split where the study's accuracies are out of its 800 dev
images). A study experiment without a campaign, or a campaign that drifts from the
study's values, fails here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared.spec import (
    FAMILIES,
    Campaign,
    load_campaign,
    published_figures,
    restore_omitted,
    sweep_points,
)

REPO = Path(__file__).resolve().parents[2]
STUDY = REPO / "campaigns" / "study"


def _campaigns() -> dict[str, Campaign]:
    return {path.stem: load_campaign(path) for path in sorted(STUDY.glob("*.toml"))}


@pytest.fixture(scope="module")
def campaigns() -> dict[str, Campaign]:
    return _campaigns()


def _points(campaign: Campaign, family: str) -> list[dict[str, Any]]:
    """Every point of a section, with the parameters left out at their defaults back."""
    omitted = set(getattr(FAMILIES[family], "OMIT_AT_DEFAULT", ()))
    return [restore_omitted(family, p, omitted) for p in sweep_points(getattr(campaign, family))]


def _values(points: list[dict[str, Any]], name: str) -> list[Any]:
    return list(dict.fromkeys(p[name] for p in points))


def _sweeping(campaigns: dict[str, Campaign], family: str, name: str) -> list[str]:
    """The campaigns whose ``family`` section sweeps ``name`` (two or more values)."""
    return [
        stem
        for stem, c in campaigns.items()
        if getattr(c, family) is not None and len(getattr(getattr(c, family), name)) > 1
    ]


# ---------------------------------------------------------------- CNN (section 1)


@pytest.mark.parametrize(
    ("name", "compared"),
    [
        ("norm_order", ["bn_act", "act_bn"]),  # 1.3.1 B -> R against R -> B
        ("activation", ["relu", "leakyrelu", "prelu"]),  # 1.3.1 ReLU, LeakyReLU, PReLU
        ("pool", ["max", "conv"]),  # 1.3.1 MaxPool2d against Conv2d stride 2
        ("optimizer", ["sgd", "adam"]),  # 1.3.1 SGD against Adam
        ("dropout", [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]),  # 1.3.1 none, then 0.1 ... 0.5
        ("stride", [1, 3, 5, 7]),  # 1.3.1 Others: stride 3, 5, 7 (the table's 1)
        ("image_size", [192, 224]),  # 1.2: "several sizes, e.g. 192 x 192, 224 x 224"
        ("input", ["crop", "resize"]),  # 1.2: the centre crop against resizing directly
    ],
)
def test_each_cnn_comparison_of_the_study_has_a_campaign(campaigns, name, compared):
    stems = _sweeping(campaigns, "cnn", name)
    assert len(stems) == 1, f"one campaign should sweep [cnn] {name}, found {stems}"
    campaign = campaigns[stems[0]]
    points = _points(campaign, "cnn")
    assert _values(points, name) == compared
    # a single model per setting, scored on the dev split as the study's tables are
    assert campaign.validation == "dev"
    assert campaign.cnn.folds == 1
    # everything else is the study's final model
    study = {
        "norm_order": "act_bn",
        "activation": "prelu",
        "pool": "max",
        "stride": 1,
        "dense": "512,256,64",
        "dropout": 0.5,
        "image_size": 224,
        "width": 1.0,
        "augment": True,
        "input": "crop",
    }
    for point in points:
        for other, value in study.items():
            if other != name:
                assert point[other] == value, (stems[0], other)


def test_the_optimizer_campaign_holds_the_baseline_s_sgd_and_adam_at_its_usual_rate(campaigns):
    # 1.3.1: "SGD outperformed Adam ... so we adopted SGD": the SGD arm must be the model
    # every other table shows (the default rate), and Adam is seen at its own usual rate
    points = _points(campaigns["cnn-optimizer"], "cnn")
    pairs = {(p["optimizer"], p["lr"]) for p in points}
    default_lr = type(campaigns["cnn-optimizer"].cnn).model_fields["lr"].default[0]
    assert default_lr == 0.01
    assert {("sgd", 0.01), ("adam", 0.001)} <= pairs


def test_the_final_cnn_is_five_folds_blended_by_vote(campaigns):
    campaign = campaigns["cnn-final"]
    assert campaign.validation == "folds" and campaign.folds == 5
    assert campaign.cnn.folds == 5
    assert campaign.blend.method in ("vote", "both")
    (point,) = _points(campaign, "cnn")
    assert (point["width"], point["image_size"], point["dropout"]) == (1.0, 224, 0.5)


# ---------------------------------------------------------------- SVM (section 2)


def test_svm_preprocessing_is_the_study_s_three_inputs_at_its_fixed_point(campaigns):
    campaign = campaigns["svm-preprocessing"]
    assert campaign.validation == "dev"
    points = _points(campaign, "svm")
    assert _values(points, "variant") == ["original", "polarized", "cropped"]
    for point in points:
        assert (point["n_components"], point["C"], point["gamma"]) == (200, 1.5, "scale")
        assert point["whiten"] is False


def test_svm_linear_is_the_study_s_linear_try_with_its_iteration_limit(campaigns):
    # 2.5: "linear SVM didn't converge on training data, even if num_of_iter was set to
    # 100,000. Thus, we turned to kernel SVM"
    campaign = campaigns["svm-linear"]
    assert campaign.validation == "dev"
    points = _points(campaign, "svm")
    assert [(p["kernel"], p["max_iter"]) for p in points] == [
        ("linear", 100_000),
        ("rbf", 100_000),
    ]
    for point in points:  # the study's final features (2.6)
        assert (point["variant"], point["n_components"], point["whiten"]) == (
            "polarized",
            200,
            False,
        )


def test_svm_tsne_maps_the_study_s_final_svm_features(campaigns):
    # 2.4.2: "We've tried to decrease the data to a dimension of 2 or 3. After visualizing
    # the data, we found that there's no clustering on the training set"
    campaign = campaigns["svm-tsne"]
    assert campaign.validation == "dev"
    assert campaign.report.tsne is True
    # the map is drawn of the features the study settled on (2.6), with its SVM
    assert [
        (p["variant"], p["n_components"], p["whiten"], p["standardize"], p["C"], p["gamma"])
        for p in _points(campaign, "svm")
    ] == [("polarized", 200, False, True, 1.5, "scale")]
    # no other study campaign pays for a map
    assert [stem for stem, c in campaigns.items() if c.report.tsne] == ["svm-tsne"]


def test_svm_pca_components_searches_c_and_gamma_per_width_as_the_study_did(campaigns):
    # 2.4.1: GridSearchCV over C x gamma for each n_component, then the validation set
    campaign = campaigns["svm-pca-components"]
    assert campaign.validation == "dev"
    points = _points(campaign, "svm")
    assert _values(points, "n_components") == [50, 100, 200, 500, 700, 800]
    for point in points:
        assert "C" not in point and "gamma" not in point  # each point chooses its own
        assert point["search"] == {
            "folds": 5,
            "C": (1.0, 1.5, 2.0),
            "gamma": (1e-6, 1e-5, 1e-4, 1e-3),
        }


def test_svm_grid_covers_every_row_of_the_study_s_table(campaigns):
    campaign = campaigns["svm-grid"]
    assert campaign.validation == "dev"
    grid = {(p["n_components"], p["C"], p["gamma"]) for p in _points(campaign, "svm")}
    rows = [(k, c, "scale") for k in (100, 200, 500, 1000) for c in (0.1, 1.0, 10.0)]
    rows += [(100, c, "scale") for c in (0.001, 0.01)]
    rows += [(k, 1.0, g) for k in (100, 200, 500, 1000) for g in (3e-6, 1e-5, 3e-5)]
    rows += [(k, 1.0, g) for k in (100, 200) for g in (1e-6, 1e-4)]
    assert set(rows) <= grid


def test_svm_whiten_searches_width_c_and_gamma_for_each_choice(campaigns):
    # 2.4.1: "for the two choices, we search for the best n_component in PCA, C and gamma"
    campaign = campaigns["svm-whiten"]
    assert campaign.validation == "dev"
    points = _points(campaign, "svm")
    assert _values(points, "whiten") == [True, False]
    for point in points:
        search = point["search"]
        assert set(search) == {"folds", "n_components", "C", "gamma"}
        # 2.4.1's n_component values and its C x gamma grid, with the 5e-3 the whitened
        # row chose (the study's search must have held it)
        assert search["n_components"] == (50, 100, 200, 500, 700, 800)
        assert search["C"] == (1.0, 1.5, 2.0)
        assert search["gamma"] == (1e-6, 1e-5, 1e-4, 1e-3, 5e-3)


# ---------------------------------------------------------------- random forest (section 3)


def test_rf_preprocessing_has_the_study_s_six_rows(campaigns):
    rows = {
        (p["variant"], p["augment"])
        for stem in ("rf-preprocessing", "rf-preprocessing-polarized")
        for p in _points(campaigns[stem], "rf")
    }
    study = {
        ("resize128", "none"),
        ("resize192", "none"),
        ("resize128", "flip"),
        ("resize128", "rotate"),
        ("resize128", "rotate_flip"),
        ("polarcrop192", "none"),  # 55,296 features: the polar image's upper half
    }
    assert study <= rows
    for stem in ("rf-preprocessing", "rf-preprocessing-polarized"):
        for point in _points(campaigns[stem], "rf"):  # "default parameters"
            assert point["n_estimators"] == 100 and point["max_depth"] is None


def test_rf_max_depth_reaches_unlimited_trees(campaigns):
    # 3.4.4: "if the tree has not yet reached max_depth but already fully grown, max_depth
    # does not affect the model anymore": the sweep ends at sklearn's None
    depths = _values(_points(campaigns["rf-max-depth"], "rf"), "max_depth")
    assert depths[-1] is None and depths[:-1] == sorted(depths[:-1])


def test_rf_best_is_the_study_s_best_forest_judged_out_of_bag(campaigns):
    # 3.6: "RandomForestClassifier(n_estimators=1000) trained by resize 128, rotate,
    # flip data", its table the training accuracy and the OOB score
    campaign = campaigns["rf-best"]
    assert campaign.validation == "oob" and campaign.rf.folds == 1
    (point,) = _points(campaign, "rf")
    assert (point["variant"], point["augment"], point["n_estimators"]) == (
        "resize128",
        "rotate_flip",
        1000,
    )
    defaults = {"max_depth": None, "min_samples_leaf": 1, "min_samples_split": 2}
    assert {name: point[name] for name in defaults} == defaults


@pytest.mark.parametrize("stem", ["rf-feature-selection", "rf-pca"])
def test_rf_selection_and_pca_use_the_study_s_prediction_forest(campaigns, stem):
    for point in _points(campaigns[stem], "rf"):
        assert (point["n_estimators"], point["min_samples_leaf"], point["max_depth"]) == (
            1000,
            2,
            48,
        )
        assert point["variant"] == "resize128" and point["augment"] == "none"


def test_feature_selection_forest_is_the_study_s():
    # SelectFromModel(RandomForestClassifier(n_estimators=400, max_depth=64))
    from shared.forest import TrainingRows, _transform

    rows = TrainingRows(x=np.zeros((4, 4)), y=np.zeros(4), source=np.arange(4), n_images=4)
    select = _transform({"select_scaling": 1.0}, rows, seed=0).named_steps["select"]
    assert select.threshold == "1.0*median"
    assert (select.estimator.n_estimators, select.estimator.max_depth) == (400, 64)


def test_final_comparison_is_the_study_s_three_best_models(campaigns):
    campaign = campaigns["final-comparison"]
    (cnn,) = _points(campaign, "cnn")
    assert campaign.cnn.folds == 5 and cnn["image_size"] == 224
    svm = _points(campaign, "svm")
    assert {p["variant"] for p in svm} == {"polarized"}
    # 2.6: "n_component = 200 and whiten = False", "C = 1.5 and gamma = 'scale'": one
    # point, so the blend is not given a C chosen on the folds that then score it
    assert [(p["n_components"], p["whiten"], p["C"], p["gamma"]) for p in svm] == [
        (200, False, 1.5, "scale")
    ]
    (rf,) = _points(campaign, "rf")
    assert (rf["variant"], rf["augment"], rf["n_estimators"]) == ("resize128", "rotate_flip", 1000)
    assert set(campaign.blend.families) == {"cnn", "svm", "rf"}


def test_report_names_the_input_size_as_the_study_does():
    from shared.report import param_label, param_value

    assert param_label("image_size") == "Image size"
    assert param_value("image_size", 224) == "224 × 224"
    assert param_label("stride") == "Stride" and param_value("stride", 3) == "3"
    assert param_label("input") == "Input"
    assert param_value("input", "crop") == "resize, centre crop"


# ---------------------------------------------------------------- validation schemes


@pytest.mark.parametrize(
    "stem",
    [
        "rf-preprocessing",
        "rf-preprocessing-polarized",
        "rf-n-estimators",
        "rf-max-features",
        "rf-min-samples",
        "rf-max-depth",
    ],
)
def test_forests_judged_by_oob_score_train_on_every_labelled_image(campaigns, stem):
    # 3.3-3.4: "data size 6400", scored by oob_score_
    assert campaigns[stem].validation == "oob"


@pytest.mark.parametrize("stem", ["rf-feature-selection", "rf-pca"])
def test_forests_judged_on_held_out_images_keep_them_out(campaigns, stem):
    # 3.5: "we use transformed testing data for evaluation": images the forest never saw
    assert campaigns[stem].validation == "folds"


def _stand_in(path: Path) -> str | None:
    """The campaign file with its dataset section replaced as its comment says ("To run
    on generated photos instead, replace this section with: ..."); None without one."""
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if "replace this section with" in line)
    except StopIteration:
        return None
    block = []
    for line in lines[start + 1 :]:
        if not line.startswith("#   "):
            break
        block.append(line[4:].split("#", 1)[0].rstrip())
    section = next(i for i, line in enumerate(lines) if line.startswith("[dataset]"))
    end = next((i for i in range(section + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    return "\n".join(lines[:section] + block + [""] + lines[end:]) + "\n"


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An artifact folder the campaigns' generated datasets are kept in between tests."""
    return tmp_path_factory.mktemp("artifacts")


@pytest.mark.parametrize(
    "path", sorted(REPO.glob("campaigns/**/*.toml")), ids=lambda p: p.relative_to(REPO).as_posix()
)
def test_each_campaign_s_generated_photos_are_enough_for_it(
    path: Path, tmp_path: Path, generated: Path
) -> None:
    """A user who swaps in the synthetic dataset a campaign's comment gives gets a
    campaign that can run: enough images for its largest PCA and its search folds."""
    from scheduler.api import plan
    from shared.manifest import open_campaign_dataset

    text = _stand_in(path)
    if text is None:
        assert 'kind = "aicup"' not in path.read_text(), "an aicup campaign without a stand-in"
        return
    # small photos: the check counts images, not pixels
    text = text.replace('kind = "synthetic"\n', 'kind = "synthetic"\nwidth = 32\nheight = 32\n', 1)
    swapped = tmp_path / path.name
    swapped.write_text(text, encoding="utf-8")
    dataset = load_campaign(swapped).dataset
    assert dataset.kind == "synthetic"
    # the campaigns share five datasets: each is generated once, where a submit puts it
    open_campaign_dataset(dataset, generated)
    assert plan(swapped, artifacts=generated).units


# ---------------------------------------------------------------- the study's figures

#: The study's tables as it prints them: campaign -> (the point's parameters, its figures).
STUDY_FIGURES: dict[str, list[tuple[dict[str, Any], dict[str, str]]]] = {
    "cnn-order": [  # 1.3.1
        ({"norm_order": "bn_act"}, {"val_acc": "83.125%"}),
        ({"norm_order": "act_bn"}, {"val_acc": "84.125%"}),
    ],
    "cnn-activation": [
        ({"activation": "relu"}, {"val_acc": "83.25%"}),
        ({"activation": "leakyrelu"}, {"val_acc": "83.125%"}),
        ({"activation": "prelu"}, {"val_acc": "84.125%"}),
    ],
    "cnn-pooling": [
        ({"pool": "max"}, {"val_acc": "84.125%"}),
        ({"pool": "conv"}, {"val_acc": "83.5%"}),
    ],
    "cnn-final": [  # 1.4: one model, then its five folds' vote
        ({}, {"val_acc": "84.125%", "test_acc": "79.6875%"}),
        ({"blend": "vote"}, {"test_acc": "80.0625%"}),
    ],
    "svm-preprocessing": [  # 2.3
        ({"variant": "original"}, {"val_acc": "68.25%"}),
        ({"variant": "polarized"}, {"val_acc": "69.875%"}),
        ({"variant": "cropped"}, {"val_acc": "64.875%"}),
    ],
    "svm-pca-components": [  # 2.4.1
        ({"n_components": k}, {"val_acc": v})
        for k, v in [
            (50, "68.000%"),
            (100, "69.250%"),
            (200, "69.000%"),
            (500, "68.500%"),
            (700, "68.250%"),
            (800, "68.250%"),
        ]
    ],
    "svm-whiten": [
        ({"whiten": True}, {"val_acc": "66.000%"}),
        ({"whiten": False}, {"val_acc": "69.250%"}),
    ],
    "svm-grid": [  # 2.5: n_component, C, gamma -> train, valid
        ({"n_components": k, "C": c, "gamma": g}, {"train_acc": t, "val_acc": v})
        for k, rows in {
            100: [
                (1e-3, "scale", "36.875%", "37.000%"),
                (1e-2, "scale", "37.428%", "37.625%"),
                (1e-1, "scale", "64.875%", "63.25%"),
                (1, "scale", "79.875%", "69.000%"),
                (10, "scale", "97.767%", "67.375%"),
                (1, 1e-6, "62.732%", "63.625%"),
                (1, 3e-6, "67.392%", "65.625%"),
                (1, 1e-5, "78.017%", "69.125%"),
                (1, 3e-5, "91.696%", "68.125%"),
                (1, 1e-4, "99.696%", "52.875%"),
            ],
            200: [
                (1e-1, "scale", "64.875%", "63.000%"),
                (1, "scale", "80.732%", "69.625%"),
                (10, "scale", "99.17%", "67.625%"),
                (1, 1e-6, "63.732%", "63.375%"),
                (1, 3e-6, "68.553%", "65.875%"),
                (1, 1e-5, "80.339%", "69.750%"),
                (1, 3e-5, "94.053%", "67.875%"),
                (1, 1e-4, "99.946%", "47.500%"),
            ],
            500: [
                (1e-1, "scale", "64.553%", "62.500%"),
                (1, "scale", "82.035%", "69.500%"),
                (10, "scale", "99.678%", "66.500%"),
                (1, 3e-6, "69.482%", "66.125%"),
                (1, 1e-5, "80.339%", "69.375%"),
                (1, 3e-5, "95.714%", "68.250%"),
            ],
            1000: [
                (1e-1, "scale", "64.375%", "62.750%"),
                (1, "scale", "83.125%", "69.500%"),
                (10, "scale", "99.875%", "67.125%"),
                (1, 3e-6, "70.196%", "65.875%"),
                (1, 1e-5, "83.750%", "69.125%"),
                (1, 3e-5, "96.446%", "68.250%"),
            ],
        }.items()
        for c, g, t, v in rows
    ],
    "rf-preprocessing": [  # 3.3: oob_score_
        ({"variant": "resize128", "augment": "none"}, {"oob_score": "0.6279"}),
        ({"variant": "resize192", "augment": "none"}, {"oob_score": "0.6249"}),
        ({"variant": "resize128", "augment": "flip"}, {"oob_score": "0.6252"}),
        ({"variant": "resize128", "augment": "rotate"}, {"oob_score": "0.6170"}),
        ({"variant": "resize128", "augment": "rotate_flip"}, {"oob_score": "0.8065"}),
    ],
    "rf-preprocessing-polarized": [({"augment": "none"}, {"oob_score": "0.6188"})],
    "rf-best": [  # 3.6
        ({}, {"train_acc": "1.0", "oob_score": "0.8235", "test_acc": "0.61"}),
    ],
}


def _as_fraction(printed: str) -> float:
    return float(printed[:-1]) / 100 if printed.endswith("%") else float(printed)


def test_the_campaigns_quote_the_study_s_figures_for_their_points(campaigns):
    quoted = {
        stem: [
            ({**f.params, **({"blend": f.blend} if f.blend else {})}, f.figures())
            for f in c.report.published
        ]
        for stem, c in campaigns.items()
        if c.report.published
    }
    assert set(quoted) == set(STUDY_FIGURES)
    for stem, rows in STUDY_FIGURES.items():
        assert campaigns[stem].report.published_in.startswith("the study, "), stem
        expected = [
            (params, {name: _as_fraction(value) for name, value in figures.items()})
            for params, figures in rows
        ]
        assert len(quoted[stem]) == len(expected), stem
        for (params, figures), (want_params, want) in zip(quoted[stem], expected, strict=True):
            assert params == want_params, stem
            assert figures == pytest.approx(want, abs=1e-12), (stem, params)
        # each names one of the campaign's points, as the file was checked when loaded
        points, blends = published_figures(campaigns[stem])
        assert sum(len(v) for v in points.values()) + len(blends) == len(rows)


def test_the_svm_grid_s_rows_are_read_in_groups_whose_training_accuracy_rises():
    """2.5's table gives n_component in merged cells; read as groups of 10, 8, 6 and 6
    rows, the training accuracy of each (C, gamma) with C >= 1 rises with the components,
    as more features let an RBF SVM fit more (at C = 0.1 it underfits, near 64 % at every
    width), and no row repeats (a reading that put each label on its group's first row
    would give 1000 gamma 3e-5 twice)."""
    train: dict[tuple[float, Any], list[tuple[int, float]]] = {}
    for params, figures in STUDY_FIGURES["svm-grid"]:
        key = (params["C"], params["gamma"])
        train.setdefault(key, []).append(
            (params["n_components"], _as_fraction(figures["train_acc"]))
        )
    for key, values in train.items():
        if key[0] < 1:
            continue
        accs = [acc for _, acc in sorted(values)]
        assert accs == sorted(accs), key
    assert (
        len({(p["n_components"], p["C"], p["gamma"]) for p, _ in STUDY_FIGURES["svm-grid"]}) == 30
    )
