"""Tiny images for the classical fits (tests/shared/test_forest.py, test_metrics_classic.py)."""

from __future__ import annotations

import numpy as np
import pytest

COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])

Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def colour_images(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """8x8 images of three noisy colours, shuffled; labels 0, 1, 2 by colour."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), per_class)
    noise = rng.normal(0, 25, (len(y), 8, 8, 3))
    x = np.clip(COLOURS[y][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    order = rng.permutation(len(y))
    return x[order], y[order]


@pytest.fixture(scope="module")
def colour_split() -> Split:
    """train_x, train_y, val_x, val_y, test_x: what a fit gets (test images unlabelled)."""
    train_x, train_y = colour_images(20, seed=0)
    val_x, val_y = colour_images(6, seed=1)
    test_x, _ = colour_images(4, seed=2)
    return train_x, train_y, val_x, val_y, test_x
