"""The report's figures' data: accuracy against each swept parameter, learning curves
per point and the units' timeline."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from statistics import fmean
from typing import Any

import numpy as np

from db.store import Result, Store, Unit
from shared.report import (
    CurveFigure,
    PointRow,
    SweepPlot,
    TimelineBar,
    family_title,
    param_value,
    swept_params,
)
from workers.reporting.units import reused_from

#: Learning-curve figures per family: the best point, then one per swept value.
MAX_CURVES = 8


CURVE_METRICS = ("train_acc", "val_acc", "train_loss", "val_loss")


def _slug(*parts: str) -> str:
    text = "-".join(parts).lower()
    return re.sub(r"[^a-z0-9_-]+", "-", text).strip("-_") or "x"


def sweep_plots(family: str, points: list[PointRow]) -> list[SweepPlot]:
    plots = []
    scored = [p for p in points if p.succeeded]
    extra_scores = [
        n
        for n in dict.fromkeys(n for p in scored for n in p.extras)
        if "oob" in n and not n.endswith("_coverage")  # a share of rows, not a score
    ]
    # the study plots test score against a sweep (Fig. 16, 17): where the test split has
    # labels, beside validation accuracy and the OOB scores
    test = [p.test_acc for p in scored]
    for param in swept_params(points):
        series: dict[str, list[float | None]] = {"val acc": [p.val_acc for p in scored]}
        if any(v is not None for v in test):
            series["test acc"] = test
        for name in extra_scores:
            values = [
                v if isinstance(v, float) else None for v in (p.extras.get(name) for p in scored)
            ]
            if any(v is not None for v in values):  # none after feature selection
                series[name] = values
        if scored:
            plots.append(
                SweepPlot(
                    slug=_slug(family, param),
                    family=family,
                    param=param,
                    xs=[p.params.get(param) for p in scored],
                    series=series,
                )
            )
    return plots


def _value_key(value: Any) -> str:
    return repr(value)


def _curve_points(points: list[PointRow], best_key: str) -> list[tuple[PointRow, str]]:
    """(point, why) to draw: the best point, then the best point of each swept value."""
    scored = [p for p in points if p.val_acc is not None]
    chosen: dict[str, tuple[PointRow, str]] = {}
    for p in scored:
        if p.key == best_key:
            chosen[p.key] = (p, "best point")
    swept = swept_params(points)
    for param in swept:
        # the first of the highest-ranked points per value, in one pass over the points
        tops: dict[str, PointRow] = {}
        for p in scored:
            value = _value_key(p.params.get(param))
            if value not in tops or p.rank > tops[value].rank:
                tops[value] = p
        for top in tops.values():
            if top.key not in chosen:
                chosen[top.key] = (
                    top,
                    f"best with {param} = {param_value(param, top.params[param])}",
                )
    return list(chosen.values())[:MAX_CURVES]


def _describe(point: PointRow, swept: Sequence[str]) -> str:
    return ", ".join(f"{n}={param_value(n, point.params.get(n))}" for n in swept)


def _mean_curve(
    per_fold: Sequence[dict[str, list[tuple[int, float]]]], name: str
) -> list[tuple[int, float]]:
    by_step: dict[int, list[float]] = defaultdict(list)
    for metrics in per_fold:
        for step, value in metrics.get(name, []):
            if np.isfinite(value):
                by_step[step].append(value)
    return [(step, fmean(values)) for step, values in sorted(by_step.items())]


def learning_curves(
    store: Store,
    campaign_id: str,
    family: str,
    units: list[Unit],
    points: list[PointRow],
    best_key: str,
) -> list[CurveFigure]:
    """Per-fold curves of the chosen points (Fig. 2-5), and per swept parameter the
    validation curves of its values side by side (Fig. 6-7)."""
    chosen = _curve_points(points, best_key)
    if not chosen:
        return []
    folds_of = {
        p.key: [u for u in units if f"{campaign_id}/{family}/{u.params_hash}" == p.key]
        for p, _ in chosen
    }
    keys = [u.key for folds in folds_of.values() for u in folds]
    metrics = store.campaign_metrics(campaign_id, keys)
    if not any(name in metrics.get(k, {}) for k in keys for name in CURVE_METRICS):
        return []
    swept = swept_params(points)
    title = family_title(family)
    curves = []
    for point, why in chosen:
        series = {
            f"fold {u.fold}": {n: metrics[u.key][n] for n in CURVE_METRICS if n in metrics[u.key]}
            for u in folds_of[point.key]
            if u.key in metrics
        }
        if series:
            curves.append(
                CurveFigure(
                    slug=_slug(family, point.key.rsplit("/", 1)[-1][:8]),
                    title=f"{title} {_describe(point, swept)} ({why})"
                    if swept
                    else f"{title}, the only point",
                    series=series,
                )
            )
    over = " (mean over folds)" if any(len(f) > 1 for f in folds_of.values()) else ""
    for param in swept:
        series = {}
        for point, _ in chosen:
            label = param_value(param, point.params.get(param))
            if label in series:
                continue
            per_fold = [metrics.get(u.key, {}) for u in folds_of[point.key]]
            lines = {n: _mean_curve(per_fold, n) for n in ("val_acc", "val_loss")}
            if any(lines.values()):
                series[label] = lines
        if len(series) > 1:
            curves.append(
                CurveFigure(
                    slug=_slug(family, param, "val"),
                    title=f"{title}: validation{over} by {param}",
                    series=series,
                )
            )
    return curves


def timeline(units: Sequence[Unit], results: dict[str, Result]) -> list[TimelineBar]:
    """A bar per unit that ran in this campaign (a reused unit ran in its source's)."""
    ran = [
        u
        for u in units
        if u.family != "report"
        and u.started_at is not None
        and u.finished_at is not None
        and reused_from(results.get(u.key)) is None
    ]
    if not ran:
        return []
    t0: datetime = min(u.started_at for u in ran)  # type: ignore[type-var]
    return [
        TimelineBar(
            key=u.key,
            family=u.family,
            worker=u.worker or "?",
            start=(u.started_at - t0).total_seconds(),  # type: ignore[operator]
            end=max((u.finished_at - t0).total_seconds(), (u.started_at - t0).total_seconds()),  # type: ignore[operator]
            state=u.state,
            seconds=results[u.key].fit_seconds if u.key in results else None,
        )
        for u in ran
    ]
