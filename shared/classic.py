"""What the two classical families share: the outcome of one fit and pixel features.

The fits themselves live in ``shared.svm`` (PCA + RBF SVC) and ``shared.forest``
(random forests). Plain functions over uint8 image arrays; no queue, no database.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class FitOutcome:
    train_acc: float
    val_acc: float
    val_pred: np.ndarray
    test_pred: np.ndarray
    seconds: float
    val_probs: np.ndarray | None = None
    test_probs: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def flatten(images: np.ndarray) -> np.ndarray:
    """(n, H, W, 3) uint8 -> (n, H*W*3) uint8, a view when possible (no float copy)."""
    return images.reshape(len(images), -1)


def accuracy_of(y: np.ndarray, pred: np.ndarray) -> float:
    return float((y == pred).mean()) if len(y) else float("nan")
