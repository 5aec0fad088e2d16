"""Random forests at one sweep point (the study's section 3)."""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
from sklearn.ensemble import RandomForestClassifier

from shared.classic import FitOutcome, accuracy_of, flatten


def fit_rf_point(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    test_x: np.ndarray,
    params: dict[str, Any],
    *,
    seed: int,
) -> FitOutcome:
    """RandomForestClassifier on raw uint8 pixels, with ``oob_score_``."""
    started = time.perf_counter()
    forest = RandomForestClassifier(
        n_estimators=params["n_estimators"],
        max_depth=params["max_depth"],
        min_samples_leaf=params["min_samples_leaf"],
        min_samples_split=params["min_samples_split"],
        max_features=params["max_features"],
        oob_score=True,
        bootstrap=True,
        n_jobs=1,  # parallelism comes from running many units at once
        random_state=seed,
    )
    with warnings.catch_warnings():
        # few trees leave some samples never out of bag; oob_score_ is still reported
        warnings.simplefilter("ignore", UserWarning)
        forest.fit(flatten(train_x), train_y)
    val_probs = forest.predict_proba(flatten(val_x)) if len(val_x) else None
    test_probs = forest.predict_proba(flatten(test_x)) if len(test_x) else None

    def labels(probs: np.ndarray | None) -> np.ndarray:
        if probs is None:
            return np.empty(0, dtype=np.int64)
        return forest.classes_[probs.argmax(1)]

    return FitOutcome(
        train_acc=accuracy_of(train_y, forest.predict(flatten(train_x))),
        val_acc=accuracy_of(val_y, labels(val_probs)),
        val_pred=labels(val_probs),
        test_pred=labels(test_probs),
        seconds=time.perf_counter() - started,
        val_probs=val_probs,
        test_probs=test_probs,
        extra={"oob_score": float(forest.oob_score_)},
    )
