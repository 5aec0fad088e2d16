"""Accuracy, confusion matrices and the blends: majority vote and probability averaging."""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import fmean
from typing import Any

import numpy as np


def finite_or_none(value: Any) -> Any:
    """``value`` with every float that is not finite (NaN, infinity) as None, in lists,
    tuples and dicts too: JSON has neither (PostgreSQL's JSON refuses them, `status
    --json` must not write them), and SQLite keeps a NaN as NULL."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    return value


def mean_of_finite(values: Sequence[float | None]) -> float | None:
    """The mean of the values that are numbers (not None, NaN or infinite); None if none
    is: a point whose folds did not all report a figure."""
    # float arithmetic (fmean): statistics.mean sums exact fractions, 0.7 s of a
    # 25,000-unit report's point table
    present = [v for v in values if v is not None and math.isfinite(v)]
    return fmean(present) if present else None


def sample_stdev(values: Sequence[float]) -> float:
    """The sample standard deviation of two or more floats, in float arithmetic."""
    centre = fmean(values)
    return math.sqrt(math.fsum((v - centre) ** 2 for v in values) / (len(values) - 1))


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float | None:
    """Accuracy over labelled samples (label >= 0); None when there are none."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    mask = t >= 0
    return float((t[mask] == p[mask]).mean()) if mask.any() else None


def accuracy_interval(
    y_true: Sequence[int], y_pred: Sequence[int], confidence: float = 0.95
) -> tuple[float, float] | None:
    """The Wilson score interval of the accuracy over labelled samples (label >= 0):
    where the accuracy on another set of as many images would likely fall. None when
    there are none. Wilson's rather than the normal approximation: it stays inside
    [0, 1] and holds at accuracies near 100 % and on small sets."""
    from scipy.stats import binomtest  # imported by scikit-learn in every worker anyway

    t, p = np.asarray(y_true), np.asarray(y_pred)
    mask = t >= 0
    n = int(mask.sum())
    if not n:
        return None
    ci = binomtest(int((t[mask] == p[mask]).sum()), n).proportion_ci(confidence, "wilson")
    return float(ci.low), float(ci.high)


def confusion_matrix(
    y_true: Sequence[int], y_pred: Sequence[int], n_classes: int
) -> list[list[int]]:
    """Rows are true classes, columns predicted ones; unlabelled samples are skipped."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    for t, p in zip(y_true, y_pred, strict=True):
        if t >= 0:
            matrix[t, p] += 1
    return matrix.tolist()


def majority_vote(
    predictions: np.ndarray,
    n_classes: int,
    tie_break: np.ndarray | None = None,
    tie_scores: np.ndarray | None = None,
) -> np.ndarray:
    """Uniform blending: each member (row) votes, the most voted class wins.

    ``predictions`` is (members, samples) of class indices. A tie goes to the tied class
    with the highest ``tie_scores`` (samples, classes), e.g. the members' mean
    probabilities; else to the class ``tie_break`` predicts for that sample when it is
    among the tied (a blend of two families ties often, and the better family is a
    fairer referee than class order); otherwise to the lowest tied class index, so the
    blend is deterministic.
    """
    predictions = np.asarray(predictions)
    if predictions.ndim != 2 or predictions.shape[0] == 0:
        raise ValueError(f"expected (members, samples) predictions, got {predictions.shape}")
    if predictions.size and (predictions.min() < 0 or predictions.max() >= n_classes):
        raise ValueError(f"predictions must be class indices in [0, {n_classes})")
    samples = np.arange(predictions.shape[1])
    votes = np.zeros((n_classes, predictions.shape[1]), dtype=np.int64)
    for member in predictions:
        np.add.at(votes, (member, samples), 1)
    winners = votes.argmax(0)  # argmax returns the first maximum: the lowest tied class
    if tie_break is not None and predictions.shape[1]:
        tie_break = np.asarray(tie_break)
        if tie_break.shape != (predictions.shape[1],):
            raise ValueError(f"tie_break must have one class per sample, got {tie_break.shape}")
        top = votes.max(0)
        tied = (votes == top).sum(0) > 1
        referee_tied = votes[tie_break, samples] == top
        winners = np.where(tied & referee_tied, tie_break, winners)
    if tie_scores is not None and predictions.shape[1]:
        tie_scores = np.asarray(tie_scores, dtype=np.float64)
        if tie_scores.shape != (predictions.shape[1], n_classes):
            raise ValueError(
                f"tie_scores must be (samples, classes) = {(predictions.shape[1], n_classes)}, "
                f"got {tie_scores.shape}"
            )
        top = votes.max(0)
        # among the most voted classes only; argmax: the lowest of equal scores. A score
        # that is not finite is no score (argmax would take a NaN for the largest), and
        # a sample without any keeps the lowest most voted class
        tied_scores = (votes == top).T & np.isfinite(tie_scores)
        scores = np.where(tied_scores, tie_scores, -np.inf)
        winners = np.where(tied_scores.any(1), scores.argmax(1), winners)
    return winners


def mean_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Probability averaging: the class with the highest mean probability over members.

    ``probabilities`` is (members, samples, classes); ties go to the lowest class index.
    Returns (samples,) class indices.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 3 or probabilities.shape[0] == 0:
        raise ValueError(
            f"expected (members, samples, classes) probabilities, got {probabilities.shape}"
        )
    if probabilities.shape[1] == 0:
        return np.empty(0, dtype=np.int64)
    return probabilities.mean(0).argmax(1)
