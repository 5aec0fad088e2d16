"""orchard.report: read the store, blend, explain, and write the campaign's report.

Everything comes from the store (units, results, predictions, per-epoch metrics,
artifacts) plus the manifest, the preprocessing cache and the best CNN's model file
for LIME. Per family it picks the best point (highest mean validation accuracy),
blends its folds by uniform vote (the study's "five models vote for the final
answer") and by probability averaging, votes the families of ``[blend] families``
together, and names the blend (or single model: a family's best point on one fold)
with the best out-of-fold validation accuracy, reporting its test accuracy beside it;
with an unlabelled test set its predictions become ``submission.csv``. With
``[report] tsne`` it also embeds fold 0's training images, as the best SVM point's PCA
features, in 2-D by t-SNE (study 2.4.2). The layout lives in :mod:`shared.report`; this
module only gathers the numbers.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from statistics import fmean
from typing import Any

import numpy as np

from db.store import Artifact, Outcome, Prediction, Result, Store, StoreUnreachableError, Unit
from shared.artifacts import ArtifactWriteError, WrittenFile
from shared.embedding import lime_candidates
from shared.errors import OrchardError
from shared.manifest import Manifest, ManifestError
from shared.metrics import (
    accuracy,
    accuracy_interval,
    confusion_matrix,
    majority_vote,
    mean_probabilities,
)
from shared.report import (
    FAILED_STATES,
    BlendRow,
    Confusion,
    CurveFigure,
    Experiment,
    FamilyRow,
    LimeItem,
    LimeSection,
    PointRow,
    PreprocessingSummary,
    ReportData,
    ReportFiles,
    SkippedInput,
    Submission,
    SweepPlot,
    TimelineBar,
    TsneSection,
    UnitSummary,
    param_value,
    point_rank,
    swept_params,
    validation_line,
    write_report,
)
from shared.settings import Settings
from shared.spec import (
    Published,
    params_hash,
    parse_campaign,
    published_figures,
    restore_omitted,
    sweep_points,
)
from shared.times import as_utc
from workers.config import reliability
from workers.tasks.base import ManifestGoneError, UnitAborted, UnitContext, log, unit_task

FAMILY_TITLES = {"cnn": "CNN", "svm": "SVM", "rf": "RF"}
#: Families that are parts of another unit's model (tree shards merged into their
#: forest): listed with the units and on the timeline, never as a model of their own.
PART_FAMILIES = frozenset({"rf_shard"})
NOT_MODELS = frozenset({"preprocess", "report"}) | PART_FAMILIES
#: Learning-curve figures per family: the best point, then one per swept value.
MAX_CURVES = 8
CURVE_METRICS = ("train_acc", "val_acc", "train_loss", "val_loss")
#: Per family, result extras that describe what its points share, not the point: left
#: out of the experiment tables (the SVM grid's PCA width goes in a note under its table).
SHARED_EXTRAS: dict[str, frozenset[str]] = {"svm": frozenset({"pca_components"})}

OOB_NOTE_FALLBACK = (
    "`oob_score_` is measured on the training samples each tree did not draw. With "
    "augmented copies (flips, rotations) in the training set, a sample's siblings are "
    "usually in the tree's bootstrap, so its OOB prediction is nearly a training "
    "prediction: the score is inflated, as in the study's `resize 128, rotate, flip` "
    "row (OOB 0.8065, test 0.61). The grouped OOB score counts a sample as out of bag "
    "only when all its siblings are too; trust it, and the validation accuracy, instead."
)


def _oob_note() -> str:
    try:
        from shared import forest
    except Exception:  # a broken optional import must not cost the report
        return OOB_NOTE_FALLBACK
    return getattr(forest, "OOB_NOTE", None) or OOB_NOTE_FALLBACK


def _projection_note(units: Sequence[Unit], results: dict[str, Result]) -> str | None:
    """Under the SVM table: every point slices one shared PCA projection per fold, whose
    width is the grid's, not the point's ``n_components``."""
    widths = sorted(
        {
            int(results[u.key].extra["pca_components"])
            for u in units
            if u.key in results and isinstance(results[u.key].extra.get("pca_components"), int)
        }
    )
    if not widths:
        return None
    width = f"{widths[0]}" if len(widths) == 1 else f"{widths[0]} to {widths[-1]}"
    return (
        f"Every point uses the first `n_components` of one PCA projection per fold, "
        f"shared by the whole grid and {width} components wide; Explained variance is "
        "the share of the variance that the point's own components keep."
    )


def _title(family: str) -> str:
    return FAMILY_TITLES.get(family, family.upper())


def in_study_order(families: Iterable[str]) -> list[str]:
    """The families once each, in one order in every report (the study's: CNN, SVM,
    RF), whatever order the plan sends their units in."""
    order = list(FAMILY_TITLES)
    return sorted(set(families), key=lambda f: (order.index(f) if f in order else len(order), f))


def _mean(values: Sequence[float | None]) -> float | None:
    # float arithmetic (fmean): statistics.mean sums exact fractions, 0.7 s of a
    # 25,000-unit report's point table
    present = [v for v in values if v is not None and math.isfinite(v)]
    return fmean(present) if present else None


def _stdev(values: Sequence[float]) -> float:
    """The sample standard deviation of two or more floats, in float arithmetic."""
    centre = fmean(values)
    return math.sqrt(math.fsum((v - centre) ** 2 for v in values) / (len(values) - 1))


def _slug(*parts: str) -> str:
    text = "-".join(parts).lower()
    return re.sub(r"[^a-z0-9_-]+", "-", text).strip("-_") or "x"


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
        return point_rank(len(folds), _mean([results[u.key].val_acc for u in folds]))

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


def utc_iso(moment: datetime) -> str:
    """``moment`` in UTC as ISO 8601 with its offset; SQLite hands back naive UTC, PostgreSQL
    aware, and the report must print the same for both."""
    return as_utc(moment).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- blends


@dataclass
class Predicted:
    """One model's (or blend's) predictions on a split, aligned by image id."""

    ids: list[str]
    labels: np.ndarray
    preds: np.ndarray
    probs: np.ndarray | None  # (samples, classes), None when a member had none

    def take(self, ids: Sequence[str]) -> Predicted:
        index = {image_id: i for i, image_id in enumerate(self.ids)}
        rows = np.array([index[i] for i in ids], dtype=np.int64)
        return Predicted(
            list(ids),
            self.labels[rows],
            self.preds[rows],
            None if self.probs is None else self.probs[rows],
        )


def _predicted(rows: Sequence[Prediction]) -> Predicted:
    probs = None
    if rows and all(p.probs is not None for p in rows):
        probs = np.array([p.probs for p in rows], dtype=np.float64)
    return Predicted(
        [p.image_id for p in rows],
        np.array([p.label for p in rows], dtype=np.int64),
        np.array([p.pred for p in rows], dtype=np.int64),
        probs,
    )


def _common(members: Sequence[Predicted]) -> list[str]:
    ids = set(members[0].ids)
    for member in members[1:]:
        ids &= set(member.ids)
    return sorted(ids)


def blend_members(
    members: Sequence[Predicted],
    n_classes: int,
    tie_break: int | None = None,
    *,
    ties_by_mean: bool = False,
) -> tuple[Predicted, Predicted | None]:
    """(vote, probability mean) of ``members`` over the images they all predicted.

    The mean is None when a member has no probabilities (an SVM predicts labels only).
    A tied vote goes, with ``ties_by_mean`` and every member's probabilities, to the
    tied class of highest mean probability; else to the prediction of the member
    ``tie_break`` names; else to the lowest class.
    """
    ids = _common(members)
    aligned = [m.take(ids) for m in members]
    labels = aligned[0].labels
    if not ids:
        empty = np.empty(0, dtype=np.int64)
        return Predicted([], empty, empty, None), None
    stacked = np.stack([m.preds for m in aligned])
    referee = None if tie_break is None else aligned[tie_break].preds
    probs = None
    if all(m.probs is not None for m in aligned):
        probs = np.stack([m.probs for m in aligned])  # type: ignore[misc]
    scores = probs.mean(0) if ties_by_mean and probs is not None else None
    vote = Predicted(ids, labels, majority_vote(stacked, n_classes, referee, scores), None)
    if probs is None:
        return vote, None
    averaged = Predicted(ids, labels, mean_probabilities(probs), probs.mean(0))
    return vote, averaged


def _pooled(store: Store, units: Sequence[Unit], split: str) -> Predicted:
    """Each unit's predictions on ``split``, pooled (first unit wins a repeated image)."""
    rows: dict[str, Prediction] = {}
    for unit in units:
        for p in store.predictions(unit.key, split):
            rows.setdefault(p.image_id, p)
    return _predicted([rows[k] for k in sorted(rows)])


@dataclass
class FamilyBlend:
    family: str
    members: int
    test_vote: Predicted
    test_mean: Predicted | None
    oof: Predicted  # pooled out-of-fold validation predictions
    val_acc: float | None  # the best point's mean validation accuracy
    ties: str = ""  # how the vote settles a tie, for the report's note


def family_blend(
    store: Store,
    best: Sequence[Unit],
    results: dict[str, Result],
    n_classes: int,
    val: float | None,
) -> FamilyBlend:
    """The best point's folds blended on the test split. A tied vote (two folds of
    four for one class, two for another) goes to the tied class of highest mean
    probability, or, for a family without probabilities, to the best fold's class."""
    per_member = [_predicted(store.predictions(u.key, "test")) for u in best]
    referee = best_fold(best, results)
    vote, averaged = blend_members(
        per_member, n_classes, list(best).index(referee), ties_by_mean=True
    )
    if averaged is not None:
        ties = "ties by mean probability"
    else:
        ties = f"ties go to fold {referee.fold} (best validation)"
    oof = _pooled(store, best, "val")
    return FamilyBlend(best[0].family, len(best), vote, averaged, oof, val, ties)


def _acc(p: Predicted | None) -> float | None:
    return None if p is None or not len(p.ids) else accuracy(p.labels, p.preds)


def _labelled(p: Predicted | None) -> set[str]:
    """The images of ``p`` with a label: those its accuracy is over."""
    if p is None:
        return set()
    return {i for i, label in zip(p.ids, p.labels.tolist(), strict=True) if label >= 0}


def _blend_row(
    name: str,
    family: str,
    method: str,
    members: int,
    test: Predicted | None,
    val: Predicted | None,
    note: str = "",
) -> BlendRow:
    labelled = len(_labelled(val)) if val is not None else None
    tested = len(_labelled(test)) if test is not None else 0
    return BlendRow(
        name,
        family,
        method,
        members,
        _acc(test),
        _acc(val),
        note,
        labelled or None,
        test_images=tested or None,
        test_ci=accuracy_interval(test.labels, test.preds) if tested else None,
    )


@dataclass(frozen=True)
class BestBlend:
    name: str | None
    by: str  # "val" | "test"
    compared_on: int | None = None  # the images all blends' validation covers, if fewer
    compared_acc: float | None = None  # the best's accuracy on them
    tied_with: tuple[str, ...] = ()
    compared: dict[str, float] = field(default_factory=dict)  # every blend's on them


def _inflated(
    spec: dict[str, Any],
    families: Sequence[FamilyRow],
    blends: Sequence[BlendRow],
    best: str | None,
) -> bool:
    """The best blend was chosen by out-of-bag accuracy and one of its families' best
    point trained on augmented copies, whose siblings inflate that accuracy."""
    if spec.get("validation") != "oob" or best is None:
        return False
    family = next(b.family for b in blends if b.name == best)
    augmented = {r.family for r in families if r.params.get("augment") not in (None, "none")}
    return bool(set(family.split("+")) & augmented)


def choose_best(blends: Sequence[BlendRow], oof: dict[str, Predicted]) -> BestBlend:
    """The headline model: the best validation accuracy, never the test set's, which
    then measures it (test accuracy only when no blend has validation predictions).

    Blends whose validation covers different images (a 5-fold CNN beside one-fold
    forests, a fold that failed) are compared on the images every one of them covers,
    and where none is common, each on its own. Equals: the first row, the others named.
    """
    by = "val" if any(b.val_acc is not None for b in blends) else "test"
    scored = [b for b in blends if (b.val_acc if by == "val" else b.test_acc) is not None]
    if not scored:
        return BestBlend(None, by)
    score = {b.name: (b.val_acc if by == "val" else b.test_acc) or 0.0 for b in scored}
    compared_on = None
    if by == "val":
        covers = [_labelled(oof.get(b.name)) for b in scored]
        common = set.intersection(*covers)
        if common and any(len(c) > len(common) for c in covers):
            ids = sorted(common)
            for b in scored:
                taken = oof[b.name].take(ids)
                score[b.name] = accuracy(taken.labels, taken.preds) or 0.0
            compared_on = len(common)
    best = max(scored, key=lambda b: score[b.name])  # the first of equals
    tied = tuple(b.name for b in scored if b is not best and score[b.name] == score[best.name])
    compared_acc = score[best.name] if compared_on is not None else None
    compared = score if compared_on is not None else {}
    return BestBlend(best.name, by, compared_on, compared_acc, tied, compared)


# --------------------------------------------------------------------------- tables, plots


#: Extras that record an event of some folds (the epoch a fold resumed from; 0: none):
#: shown as the folds it happened to, never averaged.
FOLD_EVENTS = frozenset({"resumed_from_epoch"})
#: Extras that record a value each fold chose (``[svm.search]``'s ``best_C``, ...):
#: the value when the folds agree, else each fold's, never averaged.
CHOICE_PREFIX = "best_"


def _fold_extra(name: str, values: Sequence[tuple[int | None, Any]]) -> float | str | None:
    """One extra of a point's folds as one cell: a mean only where a mean means something.

    An event (:data:`FOLD_EVENTS`) or a flag names the folds it holds for (``f0 from 9``,
    ``f0, f2``; ``yes`` with one fold), None when it holds for none; a choice
    (:data:`CHOICE_PREFIX`) is the value the folds agree on, else each fold's
    (``f0 1, f1 2``); a count is the count when the folds agree, else its range
    ``17–20``; a fraction or a time the mean.
    """

    def fold(f: int | None) -> str:
        return "?" if f is None else f"f{f}"

    if name.startswith(CHOICE_PREFIX):
        distinct = list(dict.fromkeys(v for _, v in values))
        if len(distinct) == 1:
            value = distinct[0]
            return value if isinstance(value, str) else float(value)
        return ", ".join(f"{fold(f)} {v if isinstance(v, str) else f'{v:g}'}" for f, v in values)
    if name in FOLD_EVENTS:
        hits = [(f, int(v)) for f, v in values if v]
        return ", ".join(f"{fold(f)} from {v}" for f, v in hits) or None
    if all(isinstance(v, bool) for _, v in values):
        hits_ = [f for f, v in values if v]
        if not hits_:
            return None
        return "yes" if len(values) == 1 else ", ".join(fold(f) for f in hits_)
    numbers = [v for _, v in values if not isinstance(v, bool)]
    if numbers and all(isinstance(v, int) for v in numbers):
        low, high = min(numbers), max(numbers)
        return float(low) if low == high else f"{low}–{high}"
    return _mean([float(v) for v in numbers])


def _with_choices(
    params: dict[str, Any], folds: Sequence[Unit], results: dict[str, Result]
) -> dict[str, Any]:
    """A point's parameters with what its search chose (``best_<name>`` in its results)
    where its folds agree: the parameters its model ran with."""
    chosen: dict[str, Any] = {}
    names = {n for u in folds if u.key in results for n in results[u.key].extra or {}}
    for name in sorted(n for n in names if n.startswith(CHOICE_PREFIX)):
        values = {json.dumps(results[u.key].extra.get(name)) for u in folds if u.key in results}
        if len(values) == 1:
            chosen[name.removeprefix(CHOICE_PREFIX)] = json.loads(values.pop())
    return {**params, **chosen}


def shard_seconds(units: Sequence[Unit], results: dict[str, Result]) -> dict[str, list[float]]:
    """The key of each forest trained in tree shards -> its shards' fit seconds: all of
    them, and those spent in this campaign (a reused shard's were spent in its source's).
    A sharded forest's own unit only merges; the work is in its shards' units."""
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for u in units:
        if u.family in PART_FAMILIES and (r := results.get(u.key)) is not None:
            spent = out[u.key.rsplit("/", 1)[0]]  # the forest's key: its shards' less /t<k>
            spent[0] += r.fit_seconds
            spent[1] += r.fit_seconds if reused_from(r) is None else 0.0
    return dict(out)


def point_rows(
    campaign_id: str,
    family: str,
    units: list[Unit],
    results: dict[str, Result],
    shards: dict[str, list[float]] | None = None,
) -> list[PointRow]:
    """A row per point of ``family``'s sweep, its folds' figures averaged; ``shards``
    (:func:`shard_seconds`) adds a sharded forest's shards' time to its unit's."""
    shards = shards or {}
    points: dict[str, list[Unit]] = defaultdict(list)
    for unit in units:
        points[unit.params_hash].append(unit)
    per_point: list[dict[str, float | str | None]] = []
    for folds in points.values():
        extras: dict[str, list[tuple[int | None, Any]]] = defaultdict(list)
        for u in folds:
            if u.key not in results:
                continue
            for name, value in (results[u.key].extra or {}).items():
                if name in SHARED_EXTRAS.get(family, ()):
                    continue
                # bool included: a per-fold flag; text only as a choice ("scale")
                if isinstance(value, int | float) or (
                    isinstance(value, str) and name.startswith(CHOICE_PREFIX)
                ):
                    extras[name].append((u.fold, value))
        per_point.append({name: _fold_extra(name, values) for name, values in extras.items()})
    # an event or flag that held for no fold of any point gets no column
    names = {n for extras in per_point for n in extras}
    empty = {n for n in names if all(extras.get(n) is None for extras in per_point)}
    # what the table shows already: a forest's trees (its n_estimators) and, without a
    # selection or a PCA, its kept features (its pixel features)
    params = [folds[0].params for folds in points.values()]
    if all(
        e.get("trees") in (None, p.get("n_estimators"))
        for e, p in zip(per_point, params, strict=True)
    ):
        empty.add("trees")
    if all(e.get("kept_features") in (None, e.get("pixel_features")) for e in per_point):
        empty.add("kept_features")
    if "oob_grouped_coverage" in names - empty:
        # a grouped OOB score that no row got (few trees, many copies) is recorded as
        # null: its column stays beside the coverage, marked
        empty.discard("oob_grouped")
        per_point = [_with_grouped_oob(extras) for extras in per_point]
    mentioned = {name for unit in units for name in unit.params}
    rows = []
    for (phash, folds), extras in zip(points.items(), per_point, strict=True):
        done = [results[u.key] for u in folds if u.key in results]
        vals = [r.val_acc for r in done if r.val_acc is not None and np.isfinite(r.val_acc)]
        rows.append(
            PointRow(
                key=f"{campaign_id}/{family}/{phash}",
                params=restore_omitted(family, folds[0].params, mentioned),
                units=len(folds),
                succeeded=len(done),
                train_acc=_mean([r.train_acc for r in done]),
                val_acc=_mean(vals),
                val_spread=_stdev(vals) if len(vals) > 1 else None,
                test_acc=_mean([r.test_acc for r in done]),
                seconds=_mean(
                    [
                        results[u.key].fit_seconds + shards.get(u.key, [0.0])[0]
                        for u in folds
                        if u.key in results
                    ]
                ),
                extras={n: v for n, v in extras.items() if n not in empty},
            )
        )
    return rows


def _with_grouped_oob(extras: dict[str, Any]) -> dict[str, Any]:
    """``extras`` with ``oob_grouped`` (None where no row got a grouped vote) just
    before its coverage, where the tables show it."""
    out: dict[str, Any] = {}
    for name, value in extras.items():
        if name == "oob_grouped_coverage":
            out.setdefault("oob_grouped", None)
        out[name] = value
    return out


@dataclass(frozen=True)
class FileFacts:
    """What the report takes from the stored campaign file itself, beyond the units."""

    # family -> params hash -> the point's place in the file's sweep (its cartesian
    # product in file order)
    orders: dict[str, dict[str, int]] = field(default_factory=dict)
    # the figures [[report.published]] gives points and blends
    published: Published = field(default_factory=lambda: Published({}, {}))
    published_in: str | None = None


def file_facts(spec: dict[str, Any]) -> FileFacts:
    """The sweeps' order and the published figures of the stored campaign; empty when it
    no longer parses (an old campaign's spec: the plan's order, no published figures)."""
    try:
        campaign = parse_campaign(spec, source="the stored campaign")
        orders = {
            family: {
                params_hash({"family": family, **params}): i
                for i, params in enumerate(sweep_points(section))
            }
            for family, section in campaign.families()
        }
        return FileFacts(orders, published_figures(campaign), campaign.report.published_in)
    except Exception:
        return FileFacts()


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
    title = _title(family)
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


# --------------------------------------------------------------------------- timeline


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


def preprocessing_summary(
    units: Sequence[Unit], results: dict[str, Result], size: int
) -> PreprocessingSummary | None:
    """Where the campaign's images were decoded, from its shards' results."""
    shards = [u for u in units if u.family == "preprocess"]
    if not shards:
        return None
    by_nvjpeg: dict[str, int] = defaultdict(int)
    by_opencv = cached = unfinished = 0
    for unit in shards:
        if unit.key not in results:
            unfinished += 1
            continue
        extra = results[unit.key].extra or {}
        images = int(extra.get("images", 0))
        if extra.get("reused"):
            cached += images
            continue
        nvjpeg = int(extra.get("by_nvjpeg", 0))  # shards of earlier versions: OpenCV
        if nvjpeg:
            by_nvjpeg[str(extra.get("decoded_on", "a GPU"))] += nvjpeg
        by_opencv += images - nvjpeg
    return PreprocessingSummary(size, len(shards), by_opencv, dict(by_nvjpeg), cached, unfinished)


# --------------------------------------------------------------------------- LIME


def _validation(spec: dict[str, Any], manifest: Manifest | None) -> str:
    if manifest is None:
        return ""
    try:
        train, val, _ = manifest.fold_indices(0)
    except ManifestError:  # a manifest without folds
        return ""
    rf = spec.get("rf") or {}
    augments = rf.get("augment", []) if isinstance(rf, dict) else []
    augments = augments if isinstance(augments, list) else [augments]
    folds = int(spec.get("folds", 5))
    sizes = []
    if spec.get("validation", "folds") == "folds":
        with contextlib.suppress(ManifestError):  # fewer folds than the spec says
            sizes = [len(manifest.fold_indices(f)[1]) for f in range(folds)]
    return validation_line(
        spec.get("validation", "folds"),
        folds,
        int(spec.get("seed", 0)),
        len(train),
        len(val),
        augmented=any(a not in (None, "none") for a in augments),
        fold_sizes=sizes,
    )


def _skipped(manifest: Manifest | None) -> list[SkippedInput]:
    out = []
    for entry in getattr(manifest, "skipped", None) or ():
        get = entry.get if isinstance(entry, dict) else lambda k, e=entry: getattr(e, k, None)
        path = str(get("path") or "")
        out.append(
            SkippedInput(
                image_id=str(get("image_id") or Path(path).name or "?"),
                path=path,
                reason=str(get("reason") or "unreadable"),
                split=get("split"),
            )
        )
    return out


def explain_cnn(
    store: Store,
    settings: Settings,
    manifest: Manifest,
    best: Sequence[Unit],
    results: dict[str, Result],
    *,
    per_class: int,
    num_samples: int,
    seed: int,
) -> LimeSection:
    """LIME on the best CNN point's :func:`best_fold`, ``per_class`` test images per class.

    With test labels it explains images the model got right (the study's "parts that
    are helpful to the model for correct predictions"), most confident first; without,
    the images it predicted most confidently per class. It picks them among the test
    images :func:`lime_candidates` samples of a large test set.
    """
    from shared.artifacts import read_if_intact
    from shared.cnn import build_model, normalise, resize_batch
    from shared.explain import explain_images
    from shared.variants import cnn_variant
    from workers.data import load_rows
    from workers.tasks.cnn import torch_module

    torch = torch_module()

    fold = best_fold(best, results)
    # a fold reused from an earlier campaign (`submit --reuse`) kept its model there
    source = reused_from(results[fold.key]) or fold.key
    source_campaign = source.split("/", 1)[0]
    models = [a for a in store.artifacts(source_campaign, kind="model") if a.unit_key == source]
    if not models:
        return LimeSection(
            "cnn", fold.key, num_samples, [], f"no model file recorded for {fold.key}"
        )
    path = settings.artifacts / models[0].path
    try:
        blob = read_if_intact(path, models[0].sha256)  # what is loaded is what was checked
    except FileNotFoundError:
        return LimeSection("cnn", fold.key, num_samples, [], f"{path}: model file missing")
    if blob is None:
        return LimeSection("cnn", fold.key, num_samples, [], f"{path}: checksum mismatch")
    checkpoint = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    classes = list(manifest.classes)
    model = build_model(checkpoint["params"], len(classes))
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()

    test = manifest.test_indices()
    if not len(test):
        return LimeSection("cnn", fold.key, num_samples, [], "no test images to explain")
    # scored on the CPU to pick the images it explains: of a large test set a sample, so
    # that 40,000 test images are neither scored (an hour) nor held in this process
    test = test[lime_candidates(manifest.label_index(test), seed)]
    framing = checkpoint["params"].get("input", "crop")
    images = load_rows(store, settings, manifest, cnn_variant(manifest.size, framing), test)
    images = resize_batch(images, int(checkpoint["params"]["image_size"]))

    @torch.no_grad()
    def predict(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
        return torch.softmax(model(normalise(x)).float(), dim=1).numpy()

    probs = np.concatenate([predict(images[s : s + 256]) for s in range(0, len(images), 256)])
    labels = manifest.label_index(test)
    labelled = bool((labels >= 0).any())
    picked: list[tuple[int, int]] = []  # (row in test, class explained)
    for c in range(len(classes)):
        if labelled:
            rows = np.flatnonzero(labels == c)
            right = rows[probs[rows].argmax(1) == c]
            rows = right if len(right) else rows
        else:
            rows = np.flatnonzero(probs.argmax(1) == c)
        rows = rows[np.argsort(-probs[rows, c], kind="stable")][:per_class]
        picked += [(int(r), c) for r in rows]
    if not picked:
        return LimeSection("cnn", fold.key, num_samples, [], "no test image to explain")
    explanations = explain_images(
        images[[r for r, _ in picked]],
        predict,
        labels=[c for _, c in picked],
        num_samples=num_samples,
        seed=seed,
    )
    items = [
        LimeItem(
            image_id=manifest.entries[test[r]].image_id,
            true_label=classes[labels[r]] if labels[r] >= 0 else None,
            explained=classes[c],
            probability=float(e.probabilities[c]),
            image=e.image,
            overlay=e.overlay,
        )
        for (r, c), e in zip(picked, explanations, strict=True)
    ]
    # an unlabelled test set is explained per predicted class: say which it never predicted
    explained = {c for _, c in picked}
    unseen = [name for c, name in enumerate(classes) if c not in explained]
    note = ""
    if unseen:
        why = (
            "none is labelled so"
            if labelled
            else f"the model predicted none of the {len(test):,} it scored as such"
        )
        note = f"No test image of {', '.join(unseen)}: {why}."
    return LimeSection("cnn", fold.key, num_samples, items, note)


# --------------------------------------------------------------------------- t-SNE


def embed_svm_features(
    store: Store,
    settings: Settings,
    manifest: Manifest,
    best: Sequence[Unit],
    results: dict[str, Result],
    *,
    max_images: int,
    seed: int,
) -> TsneSection:
    """Fold 0's training images as the best SVM point's features, embedded by t-SNE.

    The features are the fold's shared PCA projection that the point's fold-0 unit
    used (the file it, or another point of the fold, recorded; a unit copied with
    ``submit --reuse`` used its source campaign's), checked against the store's sha256,
    and of it the first ``n_components`` of the point, at most
    :data:`~shared.embedding.MAX_COMPONENTS`. Where that cannot be had, the section
    says why instead.
    """
    from shared.artifacts import read_if_intact
    from shared.embedding import MAX_COMPONENTS, MIN_IMAGES, perplexity_for, tsne_map
    from shared.svm import PcaProjection
    from workers.tasks.svm import pca_path

    zero = next((u for u in best if u.fold == 0), None)
    if zero is None:
        return TsneSection(note="Not drawn: the best SVM point's fold 0 did not succeed.")
    result = results[zero.key]
    width = (result.extra or {}).get("pca_components")
    if not isinstance(width, int):
        return TsneSection(zero.key, note=f"Not drawn: {zero.key} recorded no PCA projection.")
    params = zero.params
    variant = str(params["variant"])
    source_campaign = (reused_from(result) or zero.key).split("/", 1)[0]
    path = pca_path(
        settings.artifacts / "campaigns" / source_campaign,
        variant,
        0,
        bool(params.get("whiten", False)),
        width,
        bool(params.get("standardize", False)),  # absent from earlier campaigns' units
    )

    def not_drawn(why: str) -> TsneSection:
        return TsneSection(zero.key, variant, note=f"Not drawn: {why}.")

    record = store.find_artifact(path.relative_to(settings.artifacts).as_posix())
    if record is None:
        return not_drawn(f"{path}, the PCA projection, is not recorded in the store")
    try:
        blob = read_if_intact(path, record.sha256)  # what is loaded is what was checked
    except FileNotFoundError:
        return not_drawn(f"{path}, the PCA projection, is missing")
    if blob is None:
        return not_drawn(f"{path}, the PCA projection, differs from its record (checksum)")
    projection = PcaProjection.from_bytes(blob)
    if len(projection.z) != len(manifest.entries):
        return not_drawn(
            f"{path} projects {len(projection.z)} images, the manifest has {len(manifest.entries)}"
        )
    # the point's own width, or the one its [svm.search] chose on this fold
    chosen = params.get("n_components") or result.extra.get("best_n_components") or width
    k = min(int(chosen), MAX_COMPONENTS, projection.n_components)
    train, _, _ = manifest.fold_indices(0)
    labels = manifest.label_index(train)
    train, labels = train[labels >= 0], labels[labels >= 0]
    if len(train) < MIN_IMAGES:
        return not_drawn(f"fold 0 has {len(train)} labelled training images, too few to map")
    xy, shown = tsne_map(projection.features(k)[train], labels, max_images=max_images, seed=seed)
    return TsneSection(
        unit_key=zero.key,
        variant=variant,
        n_components=k,
        available=len(train),
        xy=xy,
        labels=shown,
        perplexity=perplexity_for(len(xy)),
        seed=seed,
    )


# --------------------------------------------------------------------------- the report


def build_report_data(
    store: Store,
    campaign_id: str,
    *,
    manifest: Manifest | None = None,
    settings: Settings | None = None,
) -> ReportData:
    """Everything the report shows. LIME needs ``manifest`` and ``settings`` (the
    model file and the image cache); without them the section says so."""
    campaign = store.get_campaign(campaign_id)
    classes = campaign.classes
    n_classes = len(classes)
    all_units = store.units(campaign_id)
    units = [u for u in all_units if u.family not in ("preprocess", "report")]
    results = store.results(campaign_id)
    spec = campaign.spec
    blend_spec = spec.get("blend") or {}
    report_spec = spec.get("report") or {}
    method = blend_spec.get("method", "both")
    methods = ("vote", "mean") if method == "both" else (method,)
    cross_families = list(blend_spec.get("families", ["cnn"]))

    # a parameter some points of a family's sweep name is shown for all its points
    mentioned: dict[str, set[str]] = defaultdict(set)
    for u in units:
        mentioned[u.family].update(u.params)
    summaries = [
        UnitSummary(
            key=u.key,
            family=u.family,
            fold=u.fold,
            params=restore_omitted(u.family, u.params, mentioned[u.family]),
            state=u.state,
            worker=u.worker,
            seconds=results[u.key].fit_seconds if u.key in results else None,
            train_acc=results[u.key].train_acc if u.key in results else None,
            val_acc=results[u.key].val_acc if u.key in results else None,
            test_acc=results[u.key].test_acc if u.key in results else None,
            error=u.error,
            reused_from=reused_from(results.get(u.key)),
        )
        for u in units
    ]

    families: list[FamilyRow] = []
    experiments: list[Experiment] = []
    sweeps: list[SweepPlot] = []
    curves: list[CurveFigure] = []
    fam_blends: dict[str, FamilyBlend] = {}
    best_units: dict[str, list[Unit]] = {}
    # the campaign file's order (the plan sends costly points first), published figures
    from_file = file_facts(spec)
    shards = shard_seconds(units, results)
    for family in in_study_order(u.family for u in units if u.family not in NOT_MODELS):
        order = from_file.orders.get(family, {})
        mine = sorted(
            (u for u in units if u.family == family),
            key=lambda u: order.get(u.params_hash, len(order)),
        )
        best = best_point(mine, results)
        best_units[family] = best
        points = point_rows(campaign_id, family, mine, results, shards)
        if published := from_file.published.points.get(family):
            points = [
                replace(p, published=published[h])
                if (h := p.key.rsplit("/", 1)[-1]) in published
                else p
                for p in points
            ]
        best_key = f"{campaign_id}/{family}/{best[0].params_hash}" if best else None
        best_row = next((p for p in points if p.key == best_key), None)
        done = [results[u.key] for u in mine if u.key in results]
        families.append(
            FamilyRow(
                family=family,
                best_key=best_fold(best, results).key if best else "",
                params=_with_choices(
                    restore_omitted(family, best[0].params, mentioned[family]), best, results
                )
                if best
                else {},
                units=len(mine),
                succeeded=len(done),
                train_acc=best_row.train_acc if best_row else None,
                val_acc=best_row.val_acc if best_row else None,
                test_acc=best_row.test_acc if best_row else None,
                # this campaign's work: a reused unit's seconds were spent in its source's
                fit_seconds=sum(r.fit_seconds for r in done if reused_from(r) is None)
                + sum(shards[u.key][1] for u in mine if u.key in shards),
                reused=sum(reused_from(r) is not None for r in done),
                best_folds=(len(best), sum(u.params_hash == best[0].params_hash for u in mine))
                if best
                else None,
            )
        )
        # units per point: one pass (a scan per point was quadratic in a grid's size)
        folds = max(Counter(u.params_hash for u in mine).values())
        table_note = None
        if family == "rf" and any(u.params.get("augment") not in (None, "none") for u in mine):
            table_note = _oob_note()  # about augmented siblings: only when there are some
        elif family == "svm":
            table_note = _projection_note(mine, results)
        experiments.append(
            Experiment(
                family=family,
                title=f"{_title(family)} ({len(points)} point{'s' * (len(points) != 1)}, "
                f"{folds} fold{'s' * (folds != 1)} each)",
                points=points,
                best_key=best_key,
                note=table_note,
            )
        )
        sweeps += sweep_plots(family, points)
        if best_key:
            curves += learning_curves(store, campaign_id, family, mine, points, best_key)
            fam_blends[family] = family_blend(
                store, best, results, n_classes, best_row.val_acc if best_row else None
            )

    # -- blends: per family (vote, mean), then across families
    blends: list[BlendRow] = []
    predicted: dict[str, Predicted] = {}  # blend name -> its test predictions
    oof: dict[str, Predicted] = {}
    for family, fb in fam_blends.items():
        title = _title(family)
        if fb.members == 1:
            # one fold: nothing to blend, whichever the method; a single model, one row
            name = f"{title} best point"
            blends.append(_blend_row(name, family, "single", 1, fb.test_vote, fb.oof))
            predicted[name] = fb.test_vote
            oof[name] = fb.oof
            continue
        for m in methods:
            name = f"{title} {fb.members}-fold {m}"
            test = fb.test_vote if m == "vote" else fb.test_mean
            val = fb.oof if m == "vote" or fb.oof.probs is not None else None
            note = fb.ties if m == "vote" else ""
            if test is None:
                note = f"n/a: {title} predicts labels only"
            blends.append(_blend_row(name, family, m, fb.members, test, val, note))
            if test is not None:
                predicted[name] = test
            if val is not None:
                oof[name] = val

    if len(cross_families) > 1:
        ran = [f for f in cross_families if f in fam_blends]
        joined = "+".join(cross_families)
        label = " + ".join(_title(f) for f in cross_families)
        if len(ran) < 2:
            missing = ", ".join(_title(f) for f in cross_families if f not in fam_blends)
            for m in methods:
                blends.append(
                    BlendRow(
                        f"{label} {m}",
                        joined,
                        m,
                        len(ran),
                        None,
                        None,
                        f"n/a: {missing} did not succeed",
                    )
                )
        else:
            members = [fam_blends[f] for f in ran]
            referee = max(range(len(members)), key=lambda i: members[i].val_acc or -1.0)
            tests = [fb.test_mean if fb.test_mean is not None else fb.test_vote for fb in members]
            vote_members = [fb.test_vote for fb in members]
            test_vote, _ = blend_members(vote_members, n_classes, referee)
            oof_vote, oof_mean = blend_members([fb.oof for fb in members], n_classes, referee)
            mean_ok = all(fb.test_mean is not None for fb in members)
            test_mean = blend_members(tests, n_classes)[1] if mean_ok else None
            tie = f"ties go to {_title(ran[referee])}"
            if len(ran) == 2:
                # two voters agree or tie: the vote is the referee's predictions
                tie = (
                    f"two families: each disagreement is a tie, which goes to "
                    f"{_title(ran[referee])}, so the vote is {_title(ran[referee])}'s "
                    "predictions"
                )
            for m in methods:
                name = f"{label} {m}"
                if m == "vote":
                    test, val, note = test_vote, oof_vote, tie
                else:
                    test, val = test_mean, oof_mean
                    no_probs = [_title(fb.family) for fb in members if fb.test_mean is None]
                    note = f"n/a: {', '.join(no_probs)} predicts labels only" if no_probs else ""
                blends.append(_blend_row(name, joined, m, len(ran), test, val, note))
                if test is not None:
                    predicted[name] = test
                if val is not None:
                    oof[name] = val

    by_test = any(b.test_acc is not None for b in blends)
    headline = choose_best(blends, oof)
    best_blend = headline.name
    blends = [
        replace(
            b,
            common_acc=headline.compared.get(b.name),
            published=from_file.published.blends.get((b.family, b.method), {}),
        )
        for b in blends
    ]

    # -- confusion matrices
    confusions: dict[str, Confusion] = {}
    for family, fb in fam_blends.items():
        title = _title(family)
        # the blend the table shows: the vote, or the mean where only it is asked for
        shown, what = fb.test_vote, f"{fb.members}-fold vote"
        if "vote" not in methods and fb.test_mean is not None:
            shown, what = fb.test_mean, f"{fb.members}-fold mean"
        if fb.members == 1:
            what = "best point"
        if by_test and len(shown.ids):
            matrix = confusion_matrix(shown.labels, shown.preds, n_classes)
            confusions[family] = Confusion(f"{title} {what} (test)", matrix, "test")
        else:
            best = best_units[family]
            matrices = [results[u.key].val_confusion for u in best if results[u.key].val_confusion]
            if matrices:
                matrix = np.sum(matrices, axis=0).tolist()
                # each fold's model on the images it held out, added up: no blend
                pooled = f", its {len(matrices)} folds' models pooled" if len(matrices) > 1 else ""
                confusions[family] = Confusion(
                    f"{title} best point{pooled} (validation)", matrix, "val"
                )
    if best_blend and "+" in next(b.family for b in blends if b.name == best_blend):
        chosen = predicted.get(best_blend) if by_test else oof.get(best_blend)
        if chosen is not None and len(chosen.ids):
            split = "test" if by_test else "val"
            matrix = confusion_matrix(chosen.labels, chosen.preds, n_classes)
            named = "test" if by_test else "validation"
            confusions["blend"] = Confusion(f"{best_blend} ({named})", matrix, split)

    # -- submission: the best blend's predictions of every unlabelled image (the test
    # split's when it has no labels, and any unlabelled image of the other splits)
    submission = None
    if best_blend and best_blend in predicted and predicted[best_blend].ids:
        chosen = predicted[best_blend]
        pred_of = dict(zip(chosen.ids, chosen.preds.tolist(), strict=True))
        if manifest is not None:
            unlabelled = (manifest.entries[i] for i in manifest.test_indices())
            order = [e.image_id for e in unlabelled if e.label is None]
        else:
            order = [i for i, label in zip(chosen.ids, chosen.labels, strict=True) if label < 0]
        if order:
            rows = [(i, classes[pred_of[i]]) for i in order if i in pred_of]
            submission = Submission(best_blend, rows, missing=len(order) - len(rows))

    # -- LIME
    lime, lime_note = None, ""
    cnn_best = best_units.get("cnn") or []
    if not report_spec.get("lime", True):
        lime_note = "LIME is off ([report] lime = false)."
    elif "cnn" not in best_units:
        lime_note = "No CNN in this campaign."
    elif not cnn_best:
        lime_note = "No CNN fold succeeded."
    elif int(report_spec.get("lime_per_class", 1)) < 1:
        lime_note = "LIME is off ([report] lime_per_class = 0)."
    elif manifest is None or settings is None:
        lime_note = "LIME needs the model files and the image cache (run by the report task)."
    else:
        try:
            lime = explain_cnn(
                store,
                settings,
                manifest,
                cnn_best,
                results,
                per_class=int(report_spec.get("lime_per_class", 1)),
                num_samples=int(report_spec.get("lime_samples", 1000)),
                seed=int(spec.get("seed", 0)),
            )
        except (StoreUnreachableError, UnitAborted):
            # the database away (the unit is handed back), or the unit no longer this
            # delivery's (cancelled, deleted, taken over): not written without LIME
            raise
        except Exception as exc:
            # an explanation is a figure, not a result: the report goes on without it
            log.warning("%s: LIME failed: %s", campaign_id, exc)
            lime = LimeSection(
                "cnn",
                best_fold(cnn_best, results).key,
                0,
                [],
                f"LIME failed: {type(exc).__name__}: {exc}",
            )

    # -- t-SNE (study 2.4.2): only when asked; a figure, so it never costs the report
    tsne = None
    if report_spec.get("tsne", False):
        svm_best = best_units.get("svm") or []
        if "svm" not in best_units:
            tsne = TsneSection(note="Not drawn: no SVM in this campaign, whose features it maps.")
        elif not svm_best:
            tsne = TsneSection(note="Not drawn: no SVM unit succeeded.")
        elif manifest is None or settings is None:
            tsne = TsneSection(
                note="Not drawn: t-SNE needs the manifest and the PCA projection (run by the "
                "report task)."
            )
        else:
            try:
                tsne = embed_svm_features(
                    store,
                    settings,
                    manifest,
                    svm_best,
                    results,
                    max_images=int(report_spec.get("tsne_images", 2000)),
                    seed=int(spec.get("seed", 0)),
                )
            except (StoreUnreachableError, UnitAborted):
                raise  # as for LIME above: the unit stops, or is handed back
            except Exception as exc:
                log.warning("%s: t-SNE failed: %s", campaign_id, exc)
                tsne = TsneSection(note=f"t-SNE failed: {type(exc).__name__}: {exc}")

    return ReportData(
        campaign_id=campaign.id,
        campaign_name=report_spec.get("title") or campaign.name,
        description=" ".join(str(spec.get("description") or "").split()),  # one line
        created_at=utc_iso(campaign.created_at),
        classes=classes,
        families=families,
        blends=blends,
        confusions=confusions,
        units=summaries,
        experiments=experiments,
        curves=curves,
        sweeps=sweeps,
        best_blend=best_blend,
        best_by=headline.by,
        best_compared_on=headline.compared_on,
        best_compared_acc=headline.compared_acc,
        best_tied_with=list(headline.tied_with),
        best_inflated=_inflated(spec, families, blends, best_blend),
        timeline=timeline(all_units, results),
        lime=lime,
        lime_note=lime_note,
        tsne=tsne,
        skipped=_skipped(manifest),
        validation=_validation(spec, manifest),
        held_out=spec.get("validation", "folds"),
        published_in=from_file.published_in,
        submission=submission,
        test_labelled=by_test,
        other_units={
            family: sum(u.family == family for u in all_units)
            for family in ("preprocess", "report")
            if any(u.family == family for u in all_units)
        },
        preprocessing=preprocessing_summary(
            all_units,
            results,
            manifest.size if manifest else int((spec.get("preprocessing") or {}).get("size", 256)),
        ),
        failed_shards=[
            UnitSummary(
                key=u.key,
                family=u.family,
                fold=None,
                params={},
                state=u.state,
                worker=u.worker,
                seconds=None,
                train_acc=None,
                val_acc=None,
                test_acc=None,
                error=u.error,
            )
            for u in all_units
            if u.family == "preprocess" and u.state in FAILED_STATES
        ],
    )


def _manifest_or_none(ctx: UnitContext) -> Manifest | None:
    try:
        return ctx.manifest()
    except StoreUnreachableError:
        raise  # the database away: the unit is handed back, not written without it
    except ManifestGoneError as exc:
        # the shared folder, without the campaign's folder (removed by hand): the report,
        # from the store alone, says what failed, in a folder made anew there
        log.warning("%s: report without the manifest: %s", ctx.campaign.id, exc)
        return None
    except OrchardError as exc:
        if not ctx.campaign_dir.is_dir():
            # no campaign folder at all: this worker's ORCHARD_ARTIFACTS is not the one
            # the campaign was submitted with, and a report written here would be lost
            raise
        # a damaged or missing manifest: the tables need only the store
        log.warning("%s: report without the manifest: %s", ctx.campaign.id, exc)
        return None


#: The prefix of the folder, inside ``report/``, that a run writes its files into before
#: it moves them into place.
STAGING_PREFIX = ".run-"


def _move_into(folder: Path, file: WrittenFile) -> WrittenFile:
    """``file`` renamed into ``folder`` (the same file system: nothing to fill)."""
    target = folder / file.path.name
    try:
        os.replace(file.path, target)
    except OSError as exc:
        raise ArtifactWriteError(
            f"cannot move {file.path} to {target}: {exc.strerror or exc}"
        ) from None
    return replace(file, path=target)


def write_then_publish(ctx: UnitContext, data: ReportData) -> ReportFiles:
    """Write the whole report into a folder of this run's own, then, if this delivery
    still holds the unit, move every file into ``report/``.

    A run that fails while writing (a full disk) leaves the report that was there
    whole, with the records that describe it; a run that lost its unit meanwhile (a
    ``resume`` reset it, another delivery took it over) writes nothing over the report
    of the run that holds it. The moves are renames in one folder, milliseconds for
    every file; the pages go last, so a reader who sees the new page finds its figures.
    Only a ``resume`` in those milliseconds can slip between the lease's renewal and
    the moves.
    """
    folder = ctx.campaign_dir / "report"
    # left by runs that died: untouched for a lease period, so none of them is at work
    # (a run cut off from the database may still write, its lease run out meanwhile)
    idle = time.time() - reliability().lease_seconds
    for old in folder.glob(f"{STAGING_PREFIX}*"):
        with contextlib.suppress(OSError):
            if old.stat().st_mtime < idle:
                shutil.rmtree(old, ignore_errors=True)
    staging = folder / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
    try:
        files = write_report(data, staging)
        # the lease renewed now, for a lease period: no other delivery takes the unit
        # while the files move (milliseconds); a store that does not answer, or a
        # lease lost, moves nothing
        ctx.confirm_lease()
        return ReportFiles(
            figures={n: _move_into(folder, f) for n, f in files.figures.items()},
            tables={n: _move_into(folder, f) for n, f in files.tables.items()},
            submission=files.submission and _move_into(folder, files.submission),
            json=_move_into(folder, files.json),
            markdown=_move_into(folder, files.markdown),
            html=_move_into(folder, files.html),
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@unit_task("orchard.report")
def report(ctx: UnitContext) -> Outcome:
    started = time.perf_counter()
    data = build_report_data(
        ctx.store, ctx.campaign.id, manifest=_manifest_or_none(ctx), settings=ctx.settings
    )
    files = write_then_publish(ctx, data)
    written: list[tuple[Any, str]] = [
        (f, "report")
        for f in (
            files.markdown,
            files.html,
            files.json,
            *files.figures.values(),
            *files.tables.values(),
        )
    ]
    if files.submission is not None:
        written.append((files.submission, "submission"))
    # what an earlier run of this report recorded and this one did not write (a table
    # no longer cut, the curve of a point no longer best): removed, with its record,
    # once this run's files are recorded; nothing else in the folder is touched
    kept = {ctx.relative(f.path) for f, _ in written}
    stale = sorted(
        a.path
        for a in ctx.store.artifacts(ctx.campaign.id)
        if a.unit_key == ctx.unit.key
        and a.path not in kept
        and not (ctx.settings.artifacts / a.path).is_symlink()
    )
    return Outcome(
        fit_seconds=time.perf_counter() - started,
        extra={
            "report": ctx.relative(files.html.path),
            "blends": {b.name: b.test_acc for b in data.blends},
            "best_blend": data.best_blend,
            "submission": ctx.relative(files.submission.path) if files.submission else None,
        },
        artifacts=[
            Artifact(ctx.relative(f.path), kind, f.sha256, f.size, ctx.campaign.id, ctx.unit.key)
            for f, kind in written
        ],
        scratch=stale,
    )


__all__ = [
    "best_fold",
    "best_point",
    "blend_members",
    "build_report_data",
    "embed_svm_features",
    "explain_cnn",
    "report",
]
