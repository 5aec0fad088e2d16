"""The report's tables: one row per sweep point (folds averaged, the published figures
beside), the preprocessing summary, the validation line and the notes under the tables."""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from db.store import Result, Unit
from shared.manifest import Manifest, ManifestError
from shared.metrics import mean_of_finite, sample_stdev
from shared.report import (
    PointRow,
    PreprocessingSummary,
    SkippedInput,
    validation_line,
)
from shared.spec import (
    Published,
    params_hash,
    parse_campaign,
    published_figures,
    restore_omitted,
    sweep_points,
)
from workers.reporting.units import PART_FAMILIES, reused_from

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


def oob_note() -> str:
    try:
        from shared import forest
    except Exception:  # a broken optional import must not cost the report
        return OOB_NOTE_FALLBACK
    return getattr(forest, "OOB_NOTE", None) or OOB_NOTE_FALLBACK


def projection_note(units: Sequence[Unit], results: dict[str, Result]) -> str | None:
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
    return mean_of_finite([float(v) for v in numbers])


def with_choices(
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
                train_acc=mean_of_finite([r.train_acc for r in done]),
                val_acc=mean_of_finite(vals),
                val_spread=sample_stdev(vals) if len(vals) > 1 else None,
                test_acc=mean_of_finite([r.test_acc for r in done]),
                seconds=mean_of_finite(
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


def validation_of(spec: dict[str, Any], manifest: Manifest | None) -> str:
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


def skipped_inputs(manifest: Manifest | None) -> list[SkippedInput]:
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
