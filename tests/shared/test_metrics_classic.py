"""Accuracy, confusion matrices, majority vote, and the SVM fit on tiny images (RF: test_forest)."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from shared.classic import flatten
from shared.metrics import (
    accuracy,
    accuracy_interval,
    confusion_matrix,
    majority_vote,
    mean_of_finite,
    sample_stdev,
)
from shared.spec import SvmParams
from shared.svm import fit_svm_point
from tests.shared.conftest import colour_images

# ---------------------------------------------------------------- metrics


def test_accuracy_ignores_unlabelled():
    assert accuracy([0, 1, -1, 2], [0, 2, 1, 2]) == pytest.approx(2 / 3)
    assert accuracy([-1, -1, 0], [2, 2, 0]) == 1.0


def test_accuracy_none_without_labels():
    assert accuracy([-1, -1], [0, 1]) is None
    assert accuracy([], []) is None


def test_accuracy_interval_is_wilson_s_over_the_labelled_samples():
    # 80 of 100 right: the Wilson 95 % interval is 71.1-86.7 % (Newcombe 1998, method 3)
    truth = [0] * 100 + [-1] * 7  # the unlabelled ones count for nothing
    low, high = accuracy_interval(truth, [0] * 80 + [1] * 20 + [2] * 7)
    assert (low, high) == (pytest.approx(0.7112, abs=1e-4), pytest.approx(0.8666, abs=1e-4))
    # all right: the interval stays under 100 % and inside [0, 1], unlike the normal one's
    low, high = accuracy_interval([1] * 10, [1] * 10)
    assert low == pytest.approx(0.7225, abs=1e-4) and high == 1.0
    assert accuracy_interval([-1, -1], [0, 1]) is None


def test_confusion_matrix_rows_true_cols_pred():
    matrix = confusion_matrix([0, 0, 1, 2, -1], [1, 1, 1, 0, 2], n_classes=3)
    assert matrix == [[0, 2, 0], [0, 1, 0], [1, 0, 0]]
    assert all(isinstance(v, int) for row in matrix for v in row)


def test_confusion_matrix_length_mismatch():
    with pytest.raises(ValueError):
        confusion_matrix([0, 1], [0], n_classes=2)


def test_majority_vote_basic():
    predictions = np.array([[0, 1, 2, 2], [0, 1, 1, 2], [1, 1, 2, 0]])
    assert majority_vote(predictions, 3).tolist() == [0, 1, 2, 2]


def test_majority_vote_tie_goes_to_lowest_class():
    predictions = np.array([[2, 1, 0], [1, 2, 2], [0, 0, 1]])  # one vote each everywhere
    assert majority_vote(predictions, 3).tolist() == [0, 0, 0]
    assert majority_vote(np.array([[2, 1], [1, 2]]), 3).tolist() == [1, 1]


def test_majority_vote_a_tie_score_that_is_not_finite_is_no_score():
    """argmax takes a NaN for the largest: a member's NaN probabilities would win ties."""
    three = np.array([[0, 1], [1, 2], [2, 0]])  # one vote each for three classes
    scores = np.array([[0.2, np.nan, 0.5], [np.nan, np.nan, np.nan]])
    assert majority_vote(three, 3, tie_scores=scores).tolist() == [2, 0]


def test_majority_vote_single_member_is_identity():
    assert majority_vote(np.array([[2, 0, 1]]), 3).tolist() == [2, 0, 1]


@pytest.mark.parametrize(
    "predictions",
    [np.array([0, 1, 2]), np.zeros((0, 3), np.int64), np.zeros((2, 2, 2), np.int64)],
    ids=["1d", "no-members", "3d"],
)
def test_majority_vote_shape_errors(predictions):
    with pytest.raises(ValueError, match="members, samples"):
        majority_vote(predictions, 3)


# ---------------------------------------------------------------- classical fits


def test_flatten_is_a_view():
    x = np.zeros((4, 8, 8, 3), np.uint8)
    flat = flatten(x)
    assert flat.shape == (4, 192)
    assert flat.dtype == np.uint8
    assert np.shares_memory(flat, x)


def test_svm_fits_separable_colours(colour_split):
    train_x, train_y, val_x, val_y, test_x = colour_split
    params = SvmParams(n_components=10, C=1.0).model_dump()
    out = fit_svm_point(train_x, train_y, val_x, val_y, test_x, params, seed=0)
    assert out.train_acc > 0.8
    assert out.val_acc > 0.8
    assert out.val_pred.shape == (len(val_x),)
    assert out.test_pred.shape == (len(test_x),)
    assert set(out.test_pred.tolist()) <= {0, 1, 2}
    assert 0 < out.extra["explained_variance"] <= 1
    assert out.extra["support_vectors"] >= 3
    assert out.seconds >= 0


def test_svm_is_deterministic_in_seed(colour_split):
    params = SvmParams(n_components=5, whiten=True, C=10.0).model_dump()
    a = fit_svm_point(*colour_split, params, seed=1)
    b = fit_svm_point(*colour_split, params, seed=1)
    np.testing.assert_array_equal(a.val_pred, b.val_pred)
    assert a.extra == b.extra


def test_svm_too_many_components(colour_split):
    train_x, train_y, val_x, val_y, test_x = colour_split
    params = SvmParams(n_components=61).model_dump()
    with pytest.raises(ValueError, match=r"n_components=61 exceeds .* 60 training images"):
        fit_svm_point(train_x, train_y, val_x, val_y, test_x, params, seed=0)


def test_svm_components_limited_by_features(colour_split):
    _, _, val_x, val_y, test_x = colour_split
    train_x, train_y = colour_images(80, seed=5)  # 240 images, 192 features
    params = SvmParams(n_components=193).model_dump()
    with pytest.raises(ValueError, match="at most 192"):
        fit_svm_point(train_x, train_y, val_x, val_y, test_x, params, seed=0)


def test_svm_with_empty_test_set(colour_split):
    train_x, train_y, val_x, val_y, test_x = colour_split
    params = SvmParams(n_components=10).model_dump()
    out = fit_svm_point(train_x, train_y, val_x, val_y, test_x[:0], params, seed=0)
    assert out.test_pred.shape == (0,)
    assert out.val_acc > 0.8


def test_majority_vote_rejects_non_class_predictions():
    with pytest.raises(ValueError, match="class indices"):
        majority_vote(np.array([[0, -1], [1, 1]]), 3)


def test_gamma_sweep_error_names_the_element(tmp_path):
    from shared.spec import CampaignError, load_campaign

    path = tmp_path / "c.toml"
    path.write_text('name = "c"\n[dataset]\nkind = "synthetic"\n[svm]\ngamma = ["scale", -1.0]\n')
    with pytest.raises(CampaignError, match=r"\[svm\] gamma\[1\]"):
        load_campaign(path)


def test_the_mean_of_a_point_leaves_out_the_folds_without_a_figure() -> None:
    assert mean_of_finite([0.5, None, 0.7, math.nan, math.inf]) == pytest.approx(0.6)
    assert mean_of_finite([None, math.nan]) is None
    assert mean_of_finite([]) is None


def test_the_sample_deviation_is_the_statistics_modules() -> None:
    values = [0.81, 0.79, 0.84, 0.8, 0.77]
    assert sample_stdev(values) == pytest.approx(statistics.stdev(values), rel=1e-12)
