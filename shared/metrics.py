"""Accuracy, confusion matrices and the uniform blend (majority vote)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float | None:
    """Accuracy over labelled samples (label >= 0); None when there are none."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    mask = t >= 0
    return float((t[mask] == p[mask]).mean()) if mask.any() else None


def confusion_matrix(
    y_true: Sequence[int], y_pred: Sequence[int], n_classes: int
) -> list[list[int]]:
    """Rows are true classes, columns predicted ones; unlabelled samples are skipped."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    for t, p in zip(y_true, y_pred, strict=True):
        if t >= 0:
            matrix[t, p] += 1
    return matrix.tolist()


def majority_vote(predictions: np.ndarray, n_classes: int) -> np.ndarray:
    """Uniform blending: each member (row) votes, the most voted class wins.

    ``predictions`` is (members, samples) of class indices. A tie goes to the lowest
    class index among the tied, so the blend is deterministic.
    """
    predictions = np.asarray(predictions)
    if predictions.ndim != 2 or predictions.shape[0] == 0:
        raise ValueError(f"expected (members, samples) predictions, got {predictions.shape}")
    if predictions.size and (predictions.min() < 0 or predictions.max() >= n_classes):
        raise ValueError(f"predictions must be class indices in [0, {n_classes})")
    votes = np.zeros((n_classes, predictions.shape[1]), dtype=np.int64)
    for member in predictions:
        np.add.at(votes, (member, np.arange(predictions.shape[1])), 1)
    return votes.argmax(0)  # argmax returns the first maximum: the lowest tied class
