"""PCA + RBF SVM at one grid point (the study's section 2)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.svm import SVC

from shared.classic import FitOutcome, accuracy_of, flatten


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
        train_acc=accuracy_of(train_y, svc.predict(z_train)),
        val_acc=accuracy_of(val_y, val_pred),
        val_pred=val_pred,
        test_pred=test_pred,
        seconds=time.perf_counter() - started,
        extra={
            "explained_variance": float(pca.explained_variance_ratio_.sum()),
            "support_vectors": int(svc.n_support_.sum()),
        },
    )
