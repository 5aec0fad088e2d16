"""Shaping a fitted model's predictions into the store's :class:`Outcome`."""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from db.store import Artifact, Outcome, Prediction
from shared.manifest import Manifest
from shared.metrics import accuracy, confusion_matrix


@functools.cache
def _blas_threads() -> int | None:
    """The threads of the BLAS this process computes with (read once: each call asks
    every library loaded, a millisecond a unit of a grid of tiny points)."""
    from threadpoolctl import threadpool_info

    counts = [lib["num_threads"] for lib in threadpool_info() if lib.get("user_api") == "blas"]
    return max(counts, default=None)


def threads() -> dict[str, int]:
    """How many threads this worker process's numerical libraries use: a CNN's numbers
    depend on torch's, a PCA's last digits on the BLAS's (README), so each result says
    them (torch's where this process has loaded torch)."""
    used = {} if (blas := _blas_threads()) is None else {"blas": blas}
    if (torch := sys.modules.get("torch")) is not None:
        used["torch"] = torch.get_num_threads()
    return used


def _rows(
    manifest: Manifest, indices: np.ndarray, preds: np.ndarray, probs: np.ndarray | None
) -> list[Prediction]:
    labels = manifest.label_index(indices)
    return [
        Prediction(
            image_id=manifest.entries[i].image_id,
            label=int(labels[j]),
            pred=int(preds[j]),
            probs=None if probs is None else [round(float(p), 6) for p in probs[j]],
        )
        for j, i in enumerate(indices)
    ]


def model_outcome(
    manifest: Manifest,
    *,
    val_idx: np.ndarray,
    test_idx: np.ndarray,
    val_pred: np.ndarray,
    test_pred: np.ndarray,
    val_probs: np.ndarray | None,
    test_probs: np.ndarray | None,
    train_acc: float,
    seconds: float,
    extra: dict[str, Any],
    artifacts: Sequence[Artifact] = (),
) -> Outcome:
    n = len(manifest.classes)
    val_labels = manifest.label_index(val_idx)
    test_labels = manifest.label_index(test_idx)
    test_labelled = bool((test_labels >= 0).any())
    return Outcome(
        fit_seconds=seconds,
        train_acc=train_acc,
        val_acc=accuracy(val_labels, val_pred),
        test_acc=accuracy(test_labels, test_pred),
        val_confusion=confusion_matrix(val_labels, val_pred, n),
        test_confusion=confusion_matrix(test_labels, test_pred, n) if test_labelled else None,
        extra={**extra, "threads": threads()},
        predictions={
            "val": _rows(manifest, val_idx, val_pred, val_probs),
            "test": _rows(manifest, test_idx, test_pred, test_probs),
        },
        artifacts=artifacts,
    )
