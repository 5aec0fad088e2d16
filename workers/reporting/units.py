"""The report's units and families: their names and order, which are models, which point
and fold are the best, and which unit a reused result was copied from."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

from db.store import Result, Unit
from shared.metrics import mean_of_finite
from shared.report import FAMILY_TITLES, point_rank

#: Families that are parts of another unit's model (tree shards merged into their
#: forest): listed with the units and on the timeline, never as a model of their own.
PART_FAMILIES = frozenset({"rf_shard"})


NOT_MODELS = frozenset({"preprocess", "report"}) | PART_FAMILIES


def in_study_order(families: Iterable[str]) -> list[str]:
    """The families once each, in one order in every report (the study's: CNN, SVM,
    RF), whatever order the plan sends their units in."""
    order = list(FAMILY_TITLES)
    return sorted(set(families), key=lambda f: (order.index(f) if f in order else len(order), f))


def best_point(units: list[Unit], results: dict[str, Result]) -> list[Unit]:
    """The succeeded folds of the best point: the most folds succeeded, then the highest
    mean validation accuracy (``point_rank``)."""
    points: dict[str, list[Unit]] = defaultdict(list)
    for unit in units:
        if unit.key in results:
            points[unit.params_hash].append(unit)
    if not points:
        return []

    def rank(folds: list[Unit]) -> tuple[bool, int, float]:
        return point_rank(len(folds), mean_of_finite([results[u.key].val_acc for u in folds]))

    # max() keeps the first of equals, and dicts keep plan order: ties go to the earlier point
    return max(points.values(), key=rank)


def best_fold(folds: Sequence[Unit], results: dict[str, Result]) -> Unit:
    """The best point's unit that the report names and LIME explains: the highest
    validation accuracy, ties to the lowest fold."""

    def rank(unit: Unit) -> tuple[float, int, str]:
        value = results[unit.key].val_acc
        score = value if value is not None and np.isfinite(value) else -1.0
        return (-score, unit.fold if unit.fold is not None else -1, unit.key)

    return min(folds, key=rank)


def reused_from(result: Result | None) -> str | None:
    """The earlier campaign's unit a result was copied from (``submit --reuse``)."""
    source = (result.extra or {}).get("reused_from") if result is not None else None
    return str(source) if source else None
