"""The two classical families: PCA + RBF SVM at one grid point, a random forest at one
sweep point. Plain functions over uint8 image arrays; no queue, no database.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.svm import SVC


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


def _accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    return float((y == pred).mean()) if len(y) else float("nan")


def fit_svm_point(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    test_x: np.ndarray,
    params: dict[str, Any],
    *,
    seed: int,
) -> FitOutcome:
    """PCA(n_components, whiten) then SVC(kernel='rbf', C, gamma) on pixel features."""
    started = time.perf_counter()
    n_components = params["n_components"]
    limit = min(len(train_x), flatten(train_x[:1]).shape[1])
    if n_components > limit:
        raise ValueError(
            f"n_components={n_components} exceeds what {len(train_x)} training images allow "
            f"(at most {limit})"
        )
    scale = np.float32(1 / 255)
    pca = PCA(
        n_components=n_components,
        whiten=params["whiten"],
        svd_solver="randomized",
        random_state=seed,
    )
    z_train = pca.fit_transform(flatten(train_x).astype(np.float32) * scale)

    def project(x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            return np.empty((0, n_components), dtype=np.float32)
        return pca.transform(flatten(x).astype(np.float32) * scale)

    svc = SVC(kernel="rbf", C=params["C"], gamma=params["gamma"], random_state=seed)
    svc.fit(z_train, train_y)
    val_pred = svc.predict(project(val_x)) if len(val_x) else np.empty(0, dtype=np.int64)
    test_pred = svc.predict(project(test_x)) if len(test_x) else np.empty(0, dtype=np.int64)
    return FitOutcome(
        train_acc=_accuracy(train_y, svc.predict(z_train)),
        val_acc=_accuracy(val_y, val_pred),
        val_pred=val_pred,
        test_pred=test_pred,
        seconds=time.perf_counter() - started,
        extra={
            "explained_variance": float(pca.explained_variance_ratio_.sum()),
            "support_vectors": int(svc.n_support_.sum()),
        },
    )


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
        train_acc=_accuracy(train_y, forest.predict(flatten(train_x))),
        val_acc=_accuracy(val_y, labels(val_probs)),
        val_pred=labels(val_probs),
        test_pred=labels(test_probs),
        seconds=time.perf_counter() - started,
        val_probs=val_probs,
        test_probs=test_probs,
        extra={"oob_score": float(forest.oob_score_)},
    )
