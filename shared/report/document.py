"""The report as one list of blocks (headings, paragraphs, tables, figures), from which
both pages are rendered, so they always have the same sections; and the CSVs of the
tables the page cuts."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import mean
from typing import Any

from shared.errors import visible_controls
from shared.report.model import (
    _DASH,
    MAX_FAILED_LISTED,
    MAX_POINT_ROWS,
    MAX_UNIT_ROWS,
    SUBMISSION_FILE,
    TIMELINE_FILE,
    TSNE_FILE,
    UNITS_CSV,
    Experiment,
    FamilyRow,
    PointRow,
    PreprocessingSummary,
    ReportData,
    TsneSection,
    UnitSummary,
    _even_sample,
    _extra_label,
    _fmt_duration,
    _fmt_opt,
    _fmt_params,
    _fmt_pct,
    _fmt_pct_range,
    _fmt_pct_spread,
    _fmt_utc,
    _is_failed,
    _method,
    _param_columns,
    _truncate,
    family_title,
    figure_name,
    param_label,
    param_value,
    swept_params,
    validate_slug,
)

# Both pages are rendered from these blocks; inline text is a tuple of plain strings,
# Code and Strong pieces.


@dataclass(frozen=True, slots=True)
class Code:
    text: str


@dataclass(frozen=True, slots=True)
class Strong:
    text: str


Inline = str | Code | Strong


@dataclass(frozen=True, slots=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True, slots=True)
class Para:
    parts: tuple[Inline, ...]
    empty: bool = False  # a placeholder ("No blends.")


@dataclass(frozen=True, slots=True)
class Table:
    header: tuple[str, ...]
    rows: list[list[str]]
    right: frozenset[int] = frozenset()
    row_classes: list[str] | None = None  # "best" rows are bold, "failed" red
    code_cols: frozenset[int] = frozenset()
    titles: dict[int, list[str]] | None = None  # HTML tooltips per column


@dataclass(frozen=True, slots=True)
class Figures:
    names: list[str]  # figure file names; captions come from the renderers


@dataclass(frozen=True, slots=True)
class Quote:
    markdown: str


@dataclass(frozen=True, slots=True)
class Bullets:
    items: list[tuple[Inline, ...]]


@dataclass(frozen=True, slots=True)
class ErrorList:
    items: list[tuple[tuple[Inline, ...], str]]  # (what failed, its error text)


Block = Heading | Para | Table | Figures | Quote | Bullets | ErrorList


def _empty(text: str) -> Para:
    return Para((text,), empty=True)


_FAMILY_HEADER = (
    "Family",
    "Best unit",
    "Params",
    "Units (ok/total)",
    "Train acc",
    "Val acc",
    "Test acc",
    "Total fit time",
)
#: The validation accuracy's name, by what it is measured on (``ReportData.held_out``).
_VAL_NAME = {"folds": "OOF val acc", "dev": "Dev acc", "oob": "OOB acc"}


def _val_name(data: ReportData) -> str:
    """``OOF val acc``, ``Dev acc`` or ``OOB acc``: what the blends' validation is."""
    return _VAL_NAME.get(data.held_out, "Val acc")


def _val_images_name(data: ReportData) -> str:
    return f"{_val_name(data).split()[0]} images"


#: The Blending table's column of each test accuracy's interval.
TEST_CI_HEADER = "Test 95% CI"


def _blend_header(data: ReportData) -> tuple[str, ...]:
    common = ()
    if _compared_on_common(data):
        n = data.best_compared_on
        common = (f"{_val_name(data)} on the {n} common image{'s' * (n != 1)}",)
    return (
        "Blend",
        "Method",
        "Members",
        "Test acc",
        TEST_CI_HEADER,
        _val_name(data),
        _val_images_name(data),
        *common,
        "Note",
    )


def _compared_on_common(data: ReportData) -> bool:
    """The blends were compared on the images they all cover, fewer than some cover."""
    return data.best_compared_on is not None and any(b.common_acc is not None for b in data.blends)


_UNIT_HEADER = (
    "Key",
    "Family",
    "Fold",
    "State",
    "Worker",
    "Time",
    "Train acc",
    "Val acc",
    "Test acc",
    "Error",
)
_REUSED_HEADER = "Reused from"  # a last column, only when a unit was reused

#: Extras that are fractions in [0, 1]: four decimals, as the study prints oob_score_.
_FRACTION_EXTRAS = frozenset({"explained_variance", "oob_grouped_coverage"})


#: Under this coverage a grouped OOB score rests on too few rows to say much: marked.
GROUPED_OOB_MIN_COVERAGE = 0.1


def _thinly_grouped(extras: Mapping[str, Any]) -> bool:
    coverage = extras.get("oob_grouped_coverage")
    return isinstance(coverage, int | float) and coverage < GROUPED_OOB_MIN_COVERAGE


def _fmt_extra(name: str, value: float | str | None) -> str:
    if isinstance(value, str):
        return value or _DASH  # already text: a range of counts, the folds that resumed
    if value is None or not math.isfinite(value):
        return _DASH
    if name.endswith("seconds") or name.endswith("_time"):
        return _fmt_duration(value)
    if name.endswith("_acc"):  # an accuracy, as the table's own (a search's CV accuracy)
        return _fmt_pct(value)
    if name in _FRACTION_EXTRAS or name.startswith("oob") or name.endswith("_score"):
        return f"{value:.4f}"  # the study prints oob_score_ as a fraction
    if float(value).is_integer():
        return f"{value:.0f}"
    return f"{value:.4g}"


def _experiment_blocks(exp: Experiment, published_in: str | None = None) -> list[Block]:
    blocks: list[Block] = [Heading(3, exp.title)]
    if not exp.points:
        return [*blocks, _empty("No points.")]
    swept = swept_params(exp.points)
    columns = _param_columns(swept)
    fixed = {n: v for n, v in exp.points[0].params.items() if n not in swept}
    folds = max(p.units for p in exp.points)
    extras = list(dict.fromkeys(n for p in exp.points for n in p.extras))
    # what a point chose ([svm.search]) first: the study's tables give it beside the score
    extras.sort(key=lambda n: not (n.startswith("best_") or n.startswith("search_")))
    # nothing swept: the parameters are all in the "Fixed" line below the table
    header = [param_label(c) for c in columns] if columns else ["Point"]
    header += ["Folds", "Train acc", "Valid acc", "Test acc"]
    # a forest reports its trees' fit time apart: the unit's own time is then named so
    time_name = "Unit time" if "train_seconds" in extras else "Training time"
    header += [f"{time_name} / fold" if folds > 1 else time_name]
    header += [_extra_label(n) for n in extras]
    n_params = max(len(columns), 1)
    shown = _shown_points(exp)
    rows, classes = [], []
    for point in shown:
        if columns:
            cells = [_cell(c, point.params) for c in columns]
        else:
            cells = [point.key.rsplit("/", 1)[-1]]
        ok = (
            f"{point.succeeded}"
            if point.succeeded == point.units
            else (f"{point.succeeded}/{point.units}")
        )
        cells += [
            ok,
            _fmt_pct(point.train_acc),
            _fmt_pct_spread(point.val_acc, point.val_spread),
            _fmt_pct(point.test_acc),
            _fmt_duration(point.seconds),
        ]
        cells += [_fmt_extra(n, point.extras.get(n)) for n in extras]
        if _thinly_grouped(point.extras) and "oob_grouped" in extras:
            cells[len(cells) - len(extras) + extras.index("oob_grouped")] += "†"
        rows.append(cells)
        if point.key == exp.best_key:
            classes.append("best")
        elif point.succeeded < point.units:
            classes.append("failed" if point.succeeded == 0 else "partial")
        else:
            classes.append("")
    published = _published_metrics(shown)
    for metric in reversed(published):
        # each published figure beside the column of the run's own (an OOB score the
        # points did not report: at the end)
        own = _PUBLISHED_BESIDE[metric]
        _insert_beside(
            header,
            rows,
            own,
            f"Published {own[0].lower()}{own[1:]}",
            [_fmt_published(metric, point.published.get(metric)) for point in shown],
        )
    right = frozenset(range(n_params, len(header)))
    blocks.append(Table(tuple(header), rows, right, row_classes=classes))
    notes: list[Inline] = []
    if published:
        notes += _published_note("these points", published_in)
    if len(shown) < len(exp.points):
        left = len(exp.points) - len(shown)
        notes += [
            f"The {len(shown)} best of {len(exp.points)} points by validation accuracy, "
            f"best first; {left} more are left out here. Every point is in ",
            Code(experiments_csv_name(exp.family)),
            ". ",
        ]
    if fixed:
        notes += ["Fixed: ", Code(_fmt_params(fixed)), ". "]
    if folds > 1:
        notes.append(
            "Valid acc is the mean over folds ± its standard deviation in percentage "
            "points (pp); the other accuracies and the times are means over the folds. "
        )
    if exp.family == "cnn":
        notes.append(
            "Train acc is the trained model's on the fold's training images as they are "
            "(no augmentation, dropout off); the learning curves' training accuracy is the "
            "running one over each epoch's augmented batches. "
        )
    if "resumed_from_epoch" in extras:
        notes.append(
            "Resumed: the folds that resumed from a checkpoint and the epoch they resumed "
            "from (— : every fold trained from the start). "
        )
    if "train_seconds" in extras:
        notes.append(
            "Unit time is the whole unit (loading the data, fitting, scoring)"
            + (
                ", of a forest in tree shards its shards' units and the merge together"
                if "train_wall_seconds" in extras
                else ""
            )
            + "; Tree fit time only fitting the transform and the trees (the study's "
            "training time)"
            + (
                ", summed over the tree shards; Tree fit wall time the longest shard's. "
                if "train_wall_seconds" in extras
                else ". "
            )
        )
    if exp.family == "rf" and any(p.params.get("select_scaling") is not None for p in shown):
        notes.append(
            "No OOB scores after feature selection: its forest was fitted on every "
            "training row with its label, the out-of-bag rows included, so their OOB "
            "score would be optimistic; judge these points by Valid acc. "
        )
    if "oob_grouped_coverage" in extras:
        notes.append(
            "Grouped OOB coverage: the share of training rows that got a grouped OOB vote"
            + (
                f"; †: under {GROUPED_OOB_MIN_COVERAGE:.0%} of them, too few for the grouped "
                "score to say much (— †: none); more trees raise it. "
                if any(_thinly_grouped(p.extras) for p in shown)
                else ". "
            )
        )
    if "pca_fitted" in extras:
        notes.append(
            "Fitted the PCA: the folds for which this point fitted the grid's shared PCA "
            "projection; its Training time includes that fit, the other points only "
            "slice the projection. "
        )
    if "norm_order" in swept:
        notes.append("B = BatchNorm, R = the activation. ")
    if exp.best_key:
        notes.append("Bold: the best point by validation accuracy.")
    if notes:
        blocks.append(Para(tuple(notes)))
    if exp.note:
        blocks.append(Quote(exp.note))
    return blocks + _best_per_value_blocks(exp, columns)


#: The column of the run's own figure that each published figure is shown beside.
_PUBLISHED_BESIDE = {
    "train_acc": "Train acc",
    "val_acc": "Valid acc",
    "test_acc": "Test acc",
    "oob_score": _extra_label("oob_score"),
}


def _published_metrics(points: Sequence[PointRow]) -> list[str]:
    """The published figures some of ``points`` have, in the table's column order."""
    given = {metric for point in points for metric in point.published}
    return [metric for metric in _PUBLISHED_BESIDE if metric in given]


def _fmt_published(metric: str, value: float | None) -> str:
    return _fmt_extra(metric, value) if metric == "oob_score" else _fmt_pct(value)


def _insert_beside(
    header: list[str], rows: list[list[str]], own: str, label: str, cells: list[str]
) -> None:
    """A column ``label`` of ``cells`` (one per row) right after the column ``own``, or
    at the end where the table has none."""
    at = header.index(own) + 1 if own in header else len(header)
    header.insert(at, label)
    for row, cell in zip(rows, cells, strict=True):
        row.insert(at, cell)


def _published_note(what: str, published_in: str | None) -> list[Inline]:
    """The sentence under a table with published figures: where they come from."""
    where = f"from {published_in}, " if published_in else ""
    return [
        f"Published: figures for {what} {where}as the campaign's ",
        Code("[[report.published]]"),
        " quotes them, beside this run's; they compare only where the data and the "
        "splits are the same. ",
    ]


def experiments_csv_name(family: str) -> str:
    """The CSV that holds every point of a family whose table the page cuts."""
    return f"experiments-{validate_slug(family)}.csv"


def _shown_points(exp: Experiment) -> list[PointRow]:
    """The rows of an experiment's table: every point in sweep order, or for a sweep of
    more than :data:`MAX_POINT_ROWS` points the best ones by validation accuracy, best
    first (ties in sweep order; the bold best point always among them)."""
    if len(exp.points) <= MAX_POINT_ROWS:
        return list(exp.points)

    def rank(i: int) -> tuple[int, float, int]:
        point = exp.points[i]
        val = point.val_acc if point.val_acc is not None and math.isfinite(point.val_acc) else None
        return (0 if point.key == exp.best_key else 1, -(val if val is not None else -1.0), i)

    order = sorted(range(len(exp.points)), key=rank)[:MAX_POINT_ROWS]
    return [exp.points[i] for i in order]


def _cell(column: str, params: Mapping[str, Any]) -> str:
    return _method(params) if column == "method" else param_value(column, params.get(column))


def _best_per_value_blocks(exp: Experiment, columns: Sequence[str]) -> list[Block]:
    """For a sweep of two or more parameters, one small table per parameter: each of its
    values with the best point among those that have it (the other parameters' values
    and its validation accuracy), as the study's "num_comp | best C | best γ | Acc"
    tables. Ties go to the first point in sweep order.

    Past :data:`MAX_POINT_ROWS` values a table shows that many, evenly spread in sweep
    order with the first, the last and the best: such a table is read for how accuracy
    moves across the parameter's range, which the best rows alone (bunched about the
    peak, and already in the experiments table) would hide. Every point is then in
    ``experiments-<family>.csv``, written for the experiments table, which has at least
    as many points as this one has values."""
    if len(columns) < 2:
        return []
    blocks: list[Block] = []
    for column in columns:
        best: dict[str, PointRow] = {}
        for point in exp.points:
            if point.val_acc is None:
                continue
            value = _cell(column, point.params)
            if value not in best or point.rank > best[value].rank:
                best[value] = point
        if len(best) < 2:
            continue
        others = [c for c in columns if c != column]
        header = (
            param_label(column),
            *(f"best {param_label(c)}" for c in others),
            "Valid acc",
        )
        values = list(best.items())
        top = max(point.rank for point in best.values())
        first_top = next(i for i, (_, point) in enumerate(values) if point.rank == top)
        picked = _even_sample(len(values), [first_top], MAX_POINT_ROWS)
        shown = [values[i] for i in picked]
        rows = [
            [value, *(_cell(c, point.params) for c in others), _fmt_pct(point.val_acc)]
            for value, point in shown
        ]
        blocks += [
            Para((f"Best point per {param_label(column)}:",)),
            Table(
                header,
                rows,
                frozenset({len(header) - 1}),
                # one row in bold, as tied points go to the first in sweep order
                row_classes=["best" if i == first_top else "" for i in picked],
            ),
        ]
        if len(shown) < len(values):
            left = len(values) - len(shown)
            blocks.append(
                Para(
                    (
                        f"{len(shown)} of the {len(values)} values of {param_label(column)}, "
                        "evenly spread in sweep order with the first, the last and the best "
                        f"among them; {left} more are left out here. Every point is in ",
                        Code(experiments_csv_name(exp.family)),
                        ".",
                    )
                )
            )
    return blocks


def _reused_para(data: ReportData) -> list[Block]:
    """Units copied from earlier campaigns: said, and their original time kept apart."""
    reused = [u for u in data.units if u.reused_from]
    if not reused:
        return []
    seconds = [u.seconds for u in reused if u.seconds is not None]
    source = f" (their fit time there: {_fmt_duration(sum(seconds))} in all)" if seconds else ""
    many = len(reused) != 1
    return [
        Para(
            (
                f"{len(reused)} model unit{'s' * many} {'were' if many else 'was'} reused "
                f"from earlier campaigns{source} and did not run in this one: "
                f"{'they are' if many else 'it is'} not counted below "
                "(see Reused from under Units).",
            )
        )
    ]


#: Below this campaign span (seconds) no parallelism factor is printed.
MIN_PARALLEL_SPAN = 1.0
#: Families of units that are not models: how the Units line names them.
_SUPPORT_FAMILIES: dict[str, tuple[str, str]] = {
    "preprocess": ("preprocessing shard", "preprocessing shards"),
    "report": ("the report", "reports"),
}


def _efficiency_blocks(data: ReportData) -> list[Block]:
    # reused units never ran here, so they have no bars (see the report task's timeline)
    bars = data.timeline
    if not bars:
        return [*_reused_para(data), _empty("No unit has run yet.")]
    span = max(b.end for b in bars) - min(b.start for b in bars)
    busy = sum(b.end - b.start for b in bars)
    # a factor says something only over a real span, when more ran than one unit at a
    # time; below 1 the workers merely idled between units
    factor = busy / span if span >= MIN_PARALLEL_SPAN else 0.0
    ran_models = any(b.family not in _SUPPORT_FAMILIES for b in bars)
    if not ran_models:
        tail = "; no model unit ran in this campaign."
    elif factor >= 1.05:
        tail = f", {factor:.1f}x in parallel."
    else:
        tail = "."
    blocks: list[Block] = [
        Para(
            (
                f"Campaign wall time {_fmt_duration(span)} (first unit started to last "
                f"finished); units ran for {_fmt_duration(busy)} in all",
                tail,
            )
        ),
        *_reused_para(data),
        Heading(3, "Per family"),
    ]
    rows = []
    for family in dict.fromkeys(b.family for b in bars):
        mine = [b for b in bars if b.family == family]
        fit = [b.seconds for b in mine if b.seconds is not None]
        rows.append(
            [
                family,
                str(len(mine)),
                _fmt_duration(sum(fit)) if fit else _DASH,
                _fmt_duration(mean(fit)) if fit else _DASH,
                _fmt_duration(sum(b.end - b.start for b in mine)),
                _fmt_duration(max(b.end for b in mine) - min(b.start for b in mine)),
            ]
        )
    blocks.append(
        Table(
            ("Family", "Units", "Fit time (sum)", "Fit time (mean)", "Wall time (sum)", "Span"),
            rows,
            frozenset(range(1, 6)),
        )
    )
    blocks.append(
        Para(
            (
                "Fit time: what each unit recorded of its own work; Wall time: each unit's "
                "start to finish on its worker (loading its data, writing its results too); "
                "Span: the family's first unit started to its last finished.",
            )
        )
    )
    blocks.append(Heading(3, "Per worker"))
    rows = []
    for worker in sorted({b.worker for b in bars}):
        mine = [b for b in bars if b.worker == worker]
        rows.append(
            [
                worker,
                str(len(mine)),
                ", ".join(dict.fromkeys(b.family for b in mine)),
                _fmt_duration(sum(b.end - b.start for b in mine)),
                _fmt_duration(min(b.start for b in mine)),
                _fmt_duration(max(b.end for b in mine)),
            ]
        )
    blocks.append(
        Table(
            ("Worker", "Units", "Families", "Busy", "First start", "Last finish"),
            rows,
            frozenset({1, 3, 4, 5}),
            code_cols=frozenset({0}),
        )
    )
    blocks.append(
        Para(
            (
                "Busy: the worker's units start to finish, added up; its idle time is what "
                "is left of the span between its first start and last finish (times since "
                "the campaign's first unit started).",
            )
        )
    )
    blocks += [Heading(3, "Timeline"), Figures([TIMELINE_FILE])]
    return blocks


def _all_reused(row: FamilyRow) -> bool:
    """Every unit of the family that succeeded was copied from an earlier campaign."""
    return row.reused > 0 and row.reused >= row.succeeded


def _best_by_text(data: ReportData) -> str:
    if data.best_by != "val":
        return "test accuracy (no blend has validation predictions)"
    text = {
        "oob": "out-of-bag accuracy",
        "dev": "accuracy on the dev split",
    }.get(data.held_out, "out-of-fold validation accuracy")
    if data.best_compared_on is not None:
        n = data.best_compared_on
        text += f" on the {n} image{'s' * (n != 1)} that every blend predicted"
    if data.best_inflated:
        text += ", which its augmented training set inflates (see the note under the RF table)"
    return text


def _is_missing(note: str) -> bool:
    """A blend note that says why its accuracies are missing (not a tie rule)."""
    return note.startswith("n/a")


def _blend_blocks(data: ReportData) -> list[Block]:
    if not data.blends:
        return [_empty("No blends.")]
    rows = [
        [
            b.name,
            "single model" if b.method == "single" else b.method,
            str(b.members),
            _fmt_pct(b.test_acc)
            if b.test_acc is not None
            else ("n/a" if _is_missing(b.note) else _DASH),
            _fmt_pct_range(b.test_ci),
            _fmt_pct(b.val_acc)
            if b.val_acc is not None
            else ("n/a" if _is_missing(b.note) else _DASH),
            _DASH if b.val_images is None else str(b.val_images),
            *([_fmt_pct(b.common_acc)] if _compared_on_common(data) else []),
            b.note or _DASH,
        ]
        for b in data.blends
    ]
    classes = ["best" if b.name == data.best_blend else "" for b in data.blends]
    header = list(_blend_header(data))
    published = [m for m in ("test_acc", "val_acc") if any(m in b.published for b in data.blends)]
    for metric in reversed(published):
        # beside the blend's own: its test accuracy's interval, its validation accuracy
        own = TEST_CI_HEADER if metric == "test_acc" else _val_name(data)
        label = "test acc" if metric == "test_acc" else _val_name(data)
        values = [_fmt_pct(blend.published.get(metric)) for blend in data.blends]
        _insert_beside(header, rows, own, f"Published {label}", values)
    # every column but the blend's name, its method and the note is a number
    numbers = frozenset(range(2, len(header) - 1))
    blocks: list[Block] = [Table(tuple(header), rows, numbers, row_classes=classes)]
    if data.best_blend:
        best = next(b for b in data.blends if b.name == data.best_blend)
        parts: list[Inline] = [
            "Bold: the best by ",
            _best_by_text(data),
            ", ",
            Strong(data.best_blend),
        ]
        if data.best_compared_acc is not None and best.val_images != data.best_compared_on:
            parts.append(f" ({_fmt_pct(data.best_compared_acc)} on them)")
        if data.best_by == "val" and best.test_acc is not None:
            parts.append(f", whose test accuracy is {_fmt_pct(best.test_acc)}")
        if data.best_tied_with:
            parts.append(
                f"; as good by that measure: {', '.join(data.best_tied_with)} (the first row "
                "is taken)"
            )
        val = _val_name(data)
        held_out = {
            "oob": f"{val} is each image predicted by the trees that did not draw it (every "
            "forest trained on every labelled image)",
            "dev": f"{val} is each model's predictions on the labelled dev split (every "
            "model trained on the train split)",
        }.get(
            data.held_out,
            f"{val} pools each fold's predictions on the images it held out (so a family's "
            "vote and mean share it; the Model families table's val acc is the mean of its "
            "folds' accuracies instead)",
        )
        parts.append(
            f". {held_out}; {_val_images_name(data)} counts the labelled images it is over. "
            "The test set chooses nothing, it only measures."
        )
        swept = sum(
            len(exp.points) for exp in data.experiments if exp.family in best.family.split("+")
        )
        if data.best_by == "val" and swept > 1:
            parts.append(
                f" Its best point{'s were' if '+' in best.family else ' was'} picked among "
                f"{swept} on these same held-out images, so its {val} is optimistic by that "
                "choice; the test accuracy is not."
            )
        tested = {b.test_images for b in data.blends if b.test_ci is not None}
        if tested:
            over = (
                f"its {tested.pop()} labelled test images"
                if len(tested) == 1
                else "the labelled test images each blend predicted"
            )
            parts.append(
                f" {TEST_CI_HEADER} is the Wilson interval of the test accuracy over {over}: "
                "what the test set's size alone leaves uncertain. Blends are measured on the "
                "same images, so two whose intervals overlap may still differ, but a "
                "difference well inside one interval says little."
            )
        if any(b.method == "single" for b in data.blends):
            parts.append(" A single model is a best point trained once: nothing is blended.")
        blocks.append(Para(tuple(parts)))
    if published:
        blocks.append(Para(tuple(_published_note("these blends", data.published_in))))
    return blocks


def _lime_blocks(data: ReportData) -> list[Block]:
    lime = data.lime
    if lime is None:
        return [_empty(data.lime_note or "No CNN was explained.")]
    if not lime.items:
        return [_empty(lime.note or "Nothing to explain.")]
    blocks: list[Block] = [
        Para(
            (
                "LIME on ",
                Code(lime.unit_key),
                f" ({lime.num_samples} perturbed samples per image). The parts coloured "
                "green are the segments that pushed the model towards the explained class.",
                f" {lime.note}" if lime.note else "",
            )
        ),
        Figures([figure_name(lime.slug, "lime")]),
        Table(
            ("Image", "True class", "Explained class", "Probability"),
            [
                [i.image_id, i.true_label or _DASH, i.explained, f"{i.probability:.3f}"]
                for i in lime.items
            ],
            frozenset({3}),
            code_cols=frozenset({0}),
        ),
    ]
    return blocks


def _tsne_blocks(tsne: TsneSection) -> list[Block]:
    if not tsne.drawn:
        return [_empty(tsne.note or "No map was drawn.")]
    n = len(tsne.xy)
    which = (
        f"{n} of fold 0's {tsne.available} training images, sampled per class (seed {tsne.seed})"
        if n < tsne.available
        else f"All {n} of fold 0's training images"
    )
    components = f"{tsne.n_components} component{'s' * (tsne.n_components != 1)}"
    return [
        Para(
            (
                f"{which}: the first {components} of the PCA projection that ",
                Code(tsne.unit_key),
                f" used ({param_value('variant', tsne.variant)}), embedded in 2-D by t-SNE "
                f"(perplexity {tsne.perplexity:.3g}).",
            )
        ),
        Figures([TSNE_FILE]),
    ]


def _submission_blocks(data: ReportData) -> list[Block]:
    sub = data.submission
    if sub is None:
        if data.test_labelled:
            return [_empty("Not written: the test set is labelled (see the blends' test acc).")]
        return [_empty("Not written: no blend predicted the test set.")]
    counts = {c: 0 for c in data.classes}
    for _, label in sub.rows:
        counts[label] = counts.get(label, 0) + 1
    parts: list[Inline] = [
        Code(SUBMISSION_FILE),
        f": {len(sub.rows)} test images (header ",
        Code("image_id,label"),
        "), predicted by the best model, ",
        Strong(sub.blend),
        ". Per class: " + ", ".join(f"{c} {n}" for c, n in counts.items()) + ".",
    ]
    if sub.missing:
        parts.append(f" {sub.missing} test images have no prediction (skipped inputs).")
    return [Para(tuple(parts))]


def _shown_units(units: Sequence[UnitSummary]) -> list[UnitSummary]:
    """The Units table's rows: every unit, or past :data:`MAX_UNIT_ROWS` the units that
    did not succeed and then the first of the others, in plan order."""
    if len(units) <= MAX_UNIT_ROWS:
        return list(units)
    first = [i for i, u in enumerate(units) if u.state != "SUCCESS"][:MAX_UNIT_ROWS]
    rest = [i for i, u in enumerate(units) if u.state == "SUCCESS"]
    keep = set(first) | set(rest[: MAX_UNIT_ROWS - len(first)])
    return [u for i, u in enumerate(units) if i in keep]


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else _csv_value(v) for v in row])
    return buf.getvalue()


#: What a spreadsheet takes as the start of a formula in a text cell.
_FORMULA_START = ("=", "+", "-", "@", "\t")  # OWASP's list (a CR is escaped before)


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    if isinstance(value, list | tuple | dict):
        value = json.dumps(value, default=str)
    if isinstance(value, str):
        # text from campaign files, datasets and errors: shown, not obeyed, by a terminal
        # (control characters) or a spreadsheet (a leading "=" would be a formula)
        value = visible_controls(value)
        return f"'{value}" if value.startswith(_FORMULA_START) else value
    return value


def table_csvs(data: ReportData) -> dict[str, str]:
    """file name -> CSV text of each table the page cuts: ``experiments-<family>.csv``
    (every point: its parameters, fold counts, mean accuracies as fractions, mean fit
    seconds and extras) and ``units.csv`` (every unit, with its whole error)."""
    out: dict[str, str] = {}
    for exp in data.experiments:
        if len(exp.points) <= MAX_POINT_ROWS:
            continue
        params = list(dict.fromkeys(n for p in exp.points for n in p.params))
        extras = list(dict.fromkeys(n for p in exp.points for n in p.extras))
        columns = ["key", *params, "units", "succeeded", "train_acc", "val_acc"]
        columns += ["val_spread", "test_acc", "seconds", "best"]
        # an extra named as another column (a CNN's epochs run, beside its epochs asked
        # for) gets a name of its own: a CSV reader keeps one column per name
        named = [f"{n} (result)" if n in columns else n for n in extras]
        published = _published_metrics(exp.points)
        header = [*columns[:-1], *named, *(f"published_{m}" for m in published), columns[-1]]
        rows = [
            [
                p.key,
                *(p.params.get(n) for n in params),
                p.units,
                p.succeeded,
                p.train_acc,
                p.val_acc,
                p.val_spread,
                p.test_acc,
                p.seconds,
                *(p.extras.get(n) for n in extras),
                *(p.published.get(m) for m in published),
                int(p.key == exp.best_key),
            ]
            for p in exp.points
        ]
        out[experiments_csv_name(exp.family)] = _csv_text(header, rows)
    failed = len(data.failed_shards) + sum(_is_failed(u.state) for u in data.units)
    if len(data.units) > MAX_UNIT_ROWS or failed > MAX_FAILED_LISTED:
        header = [
            "key",
            "family",
            "fold",
            "state",
            "worker",
            "seconds",
            "train_acc",
            "val_acc",
            "test_acc",
            "reused_from",
            "error",
        ]
        rows = [
            [
                u.key,
                u.family,
                u.fold,
                u.state,
                u.worker,
                u.seconds,
                u.train_acc,
                u.val_acc,
                u.test_acc,
                u.reused_from,
                u.error,
            ]
            for u in [*data.failed_shards, *data.units]
        ]
        out[UNITS_CSV] = _csv_text(header, rows)
    return out


def _unit_cells(unit: UnitSummary) -> list[str]:
    return [
        unit.key,
        unit.family,
        _fmt_opt(unit.fold),
        unit.state,
        _fmt_opt(unit.worker),
        _fmt_duration(unit.seconds),
        _fmt_pct(unit.train_acc),
        _fmt_pct(unit.val_acc),
        _fmt_pct(unit.test_acc),
        _truncate(unit.error),
    ]


def _units_line(data: ReportData, failed: list[UnitSummary], reused: list[UnitSummary]) -> str:
    """``Units: 11 model units (0 failed), plus 3 preprocessing shards and the report``:
    what the report counts, and what else the campaign ran (as ``orchard status`` counts)."""
    parts = sum(u.family.endswith("_shard") for u in data.units)  # tree shards of a forest
    models = len(data.units) - parts
    text = f"Units: {models} model unit{'s' * (models != 1)}"
    if parts:
        text += f" and {parts} tree shard{'s' * (parts != 1)}"
    text += f" ({len(failed)} failed"
    text += f", {len(reused)} reused from earlier campaigns)" if reused else ")"
    others = []
    for family, count in data.other_units.items():
        if not count:
            continue
        one, many = _SUPPORT_FAMILIES.get(family, (f"{family} unit", f"{family} units"))
        if family == "report" and count == 1:
            others.append(one)
        else:
            others.append(f"{count} {one if count == 1 else many}")
    if others:
        text += ", plus " + (
            others[0] if len(others) == 1 else ", ".join(others[:-1]) + " and " + others[-1]
        )
    return text


def validation_line(
    validation: str,
    folds: int,
    seed: int,
    train: int,
    val: int,
    *,
    augmented: bool = False,
    fold_sizes: Sequence[int] = (),
) -> str:
    """What the models validate on, for the report's header: ``validation`` is the
    campaign's setting, ``train`` and ``val`` the image counts of fold 0,
    ``fold_sizes`` every fold's held-out images; ``augmented``: some forest trains on
    augmented copies."""
    if validation == "dev":
        return (
            f"Validation: the dev split ({val} images); every model trains on the train "
            f"split ({train} images)"
        )
    if validation == "oob":
        line = (
            f"Validation: out of bag; every forest trains on all {train} labelled train and "
            "dev images and judges each by the trees that did not draw it"
        )
        if augmented:
            line += (
                " (an image with augmented copies pools its copies' out-of-bag votes, which "
                "siblings in a tree's sample inflate: see the note under the RF table)"
            )
        return line
    sizes = [val, *fold_sizes]
    per_fold = f"{min(sizes)}–{max(sizes)}" if min(sizes) != max(sizes) else str(val)
    return (
        f"Validation: {folds}-fold stratified cross-validation (seed {seed}) over the "
        f"{train + val} labelled train and dev images, {per_fold} per fold; a family "
        "whose section sets fewer folds (folds = n) trains on the first n only, as its "
        "Folds column says"
    )


def _preprocessing_line(summary: PreprocessingSummary) -> str:
    """``Preprocessing: 190 images to 256×256 in 3 shards: 190 by OpenCV on the CPU``."""
    parts = [f"{n} by nvJPEG on {device}" for device, n in summary.by_nvjpeg.items()]
    if summary.by_opencv:
        parts.append(f"{summary.by_opencv} by OpenCV on the CPU")
    if summary.cached:
        parts.append(f"{summary.cached} found in the cache")
    images = summary.by_opencv + sum(summary.by_nvjpeg.values()) + summary.cached
    shards = f"{summary.shards} shard{'s' * (summary.shards != 1)}"
    text = f"Preprocessing: {images} images to {summary.size}×{summary.size} in {shards}"
    if parts:
        text += ": " + ", ".join(parts)
    if summary.unfinished:
        text += f" ({summary.unfinished} of the shards without a result)"
    return text


def document(data: ReportData) -> tuple[str, list[Block]]:
    """The report's title and blocks; :data:`SECTION_HEADINGS` are its ``##`` headings."""
    failed = [u for u in data.units if _is_failed(u.state)]
    reused = [u for u in data.units if u.reused_from]
    title = f"orchard report — {data.campaign_name}"
    meta: list[tuple[Inline, ...]] = [
        *([(data.description,)] if data.description else []),
        ("Campaign: ", Code(data.campaign_id)),
        (f"Created: {_fmt_utc(data.created_at)}",),
        (f"Classes: {', '.join(data.classes) or _DASH}",),
        (_units_line(data, failed, reused),),
    ]
    if data.validation:
        meta.append((data.validation,))
    if data.preprocessing is not None:
        meta.append((_preprocessing_line(data.preprocessing),))
    if data.best_blend:
        best = next(b for b in data.blends if b.name == data.best_blend)
        what = (
            "a single model"
            if best.members == 1 or best.method == "single"
            else f"a {best.method} of {best.members}"
        )
        val = _val_name(data)
        accs = [f"{val} {_fmt_pct(best.val_acc)}"] if best.val_acc is not None else []
        if (
            data.best_compared_acc is not None
            and best.val_acc is not None
            and best.val_images != data.best_compared_on
        ):
            accs = [
                f"{val} {_fmt_pct(data.best_compared_acc)} on them, "
                f"{_fmt_pct(best.val_acc)} on its own {best.val_images}"
            ]
        if best.test_acc is not None:
            accs.append(f"test acc {_fmt_pct(best.test_acc)}")
        meta.append(
            (
                "Best model: ",
                Strong(data.best_blend),
                f" ({what}, chosen by {_best_by_text(data)}; {', '.join(accs) or _DASH})",
            )
        )
    blocks: list[Block] = [Bullets(meta), Heading(2, "Model families")]

    if data.families:
        blocks.append(
            Table(
                _FAMILY_HEADER,
                [
                    [
                        r.family,
                        r.best_key or _DASH,
                        _fmt_params(r.params),
                        f"{r.succeeded}/{r.units}" + (f" ({r.reused} reused)" if r.reused else ""),
                        _fmt_pct(r.train_acc),
                        _fmt_pct(r.val_acc),
                        _fmt_pct(r.test_acc),
                        # nothing ran to the end here: no time to sum
                        _DASH
                        if _all_reused(r) or not (r.succeeded or r.fit_seconds)
                        else _fmt_duration(r.fit_seconds),
                    ]
                    for r in data.families
                ],
                frozenset({3, 4, 5, 6, 7}),
                row_classes=["partial" if r.succeeded < r.units else "" for r in data.families],
                code_cols=frozenset({1}),
            )
        )
        left_out = any(r.reused for r in data.families)
        all_reused = any(_all_reused(r) for r in data.families)
        blocks.append(
            Para(
                (
                    "Per family its best point (the highest mean validation accuracy over "
                    "its folds, among the points with the most folds that succeeded) with "
                    "its accuracies averaged over its folds (Val acc each fold's on the "
                    "images it held out, Test acc each fold's model alone: the Blending "
                    "table has the folds' vote); Best unit is that point's fold with "
                    "the highest validation accuracy (ties go to the lowest fold). Total fit "
                    "time is the family's units' fit time summed"
                    + (", reused units left out" if left_out else "")
                    + (
                        "; — where every unit was reused: they ran in an earlier campaign "
                        "(see Reused from under Units)."
                        if all_reused
                        else "."
                    ),
                )
            )
        )
        short = [
            f"{family_title(r.family)}'s best point has {r.best_folds[0]} of its "
            f"{r.best_folds[1]} folds"
            for r in data.families
            if r.best_folds is not None and r.best_folds[0] < r.best_folds[1]
        ]
        if short:
            blocks.append(
                Para(
                    (
                        "Ranked on the folds that succeeded: "
                        + "; ".join(short)
                        + " (the others did not succeed, and no point has more that did: "
                        "see Units), so its mean is over fewer folds than planned: compare "
                        "it with care.",
                    )
                )
            )
    else:
        blocks.append(_empty("No model families."))

    blocks.append(Heading(2, "Experiments"))
    if data.experiments:
        for exp in data.experiments:
            blocks += _experiment_blocks(exp, data.published_in)
    else:
        blocks.append(_empty("No experiments."))

    blocks.append(Heading(2, "Learning curves"))
    if data.curves:
        blocks.append(Figures([figure_name(c.slug, "curve") for c in data.curves]))
    else:
        blocks.append(_empty("No per-epoch metrics recorded."))

    blocks.append(Heading(2, "Sweep plots"))
    if data.sweeps:
        blocks.append(Figures([figure_name(s.slug, "sweep") for s in data.sweeps]))
    else:
        # points of a sweep there are, but none with a score to plot
        swept = any(swept_params(e.points) for e in data.experiments)
        blocks.append(_empty("No point of a sweep succeeded." if swept else "No swept parameters."))

    blocks += [Heading(2, "Blending"), *_blend_blocks(data)]

    blocks.append(Heading(2, "Confusion matrices"))
    if data.confusions:
        blocks.append(Para(("Rows: true class; columns: predicted class.",)))
        blocks.append(Figures([figure_name(slug) for slug in data.confusions]))
    else:
        blocks.append(_empty("No confusion matrices."))

    if data.tsne is not None:  # only when [report] tsne asked for it
        blocks += [Heading(2, "t-SNE"), *_tsne_blocks(data.tsne)]

    blocks += [Heading(2, "Explanations (LIME)"), *_lime_blocks(data)]
    blocks += [Heading(2, "Efficiency"), *_efficiency_blocks(data)]
    blocks += [Heading(2, "Submission"), *_submission_blocks(data)]

    blocks.append(Heading(2, "Skipped inputs"))
    if data.skipped:
        blocks.append(
            Table(
                ("Image", "Split", "Path", "Reason"),
                [[s.image_id, s.split or _DASH, s.path, s.reason] for s in data.skipped],
                code_cols=frozenset({0, 2}),
            )
        )
    else:
        blocks.append(_empty("No input was skipped."))

    blocks.append(Heading(2, "Units"))
    if data.units:
        shown = _shown_units(data.units)
        header, rows = _UNIT_HEADER, [_unit_cells(u) for u in shown]
        if reused:
            header += (_REUSED_HEADER,)
            rows = [cells + [u.reused_from or _DASH] for cells, u in zip(rows, shown, strict=True)]
        blocks.append(
            Table(
                header,
                rows,
                frozenset({2, 5, 6, 7, 8}),
                row_classes=["failed" if _is_failed(u.state) else "" for u in shown],
                code_cols=frozenset({0, len(_UNIT_HEADER)}),
                titles={9: [u.error or "" for u in shown]},
            )
        )
        if len(shown) < len(data.units):
            unsuccessful = sum(u.state != "SUCCESS" for u in data.units)
            which = (
                "every unit that did not succeed, then the first of the others"
                if unsuccessful < len(shown)
                else "every unit that did not succeed"
                if unsuccessful == len(shown)
                else f"the first {len(shown)} of the {unsuccessful} units that did not succeed"
            )
            blocks.append(
                Para(
                    (
                        f"{len(shown)} of {len(data.units)} units shown, in plan order: "
                        f"{which}; {len(data.units) - len(shown)} more are left out here. "
                        "Every unit is in ",
                        Code(UNITS_CSV),
                        ".",
                    )
                )
            )
        if reused:
            many = len(reused) != 1
            blocks.append(
                Para(
                    (
                        f"{len(reused)} unit{'s' * many} {'were' if many else 'was'} reused "
                        "from earlier campaigns (",
                        Code("orchard submit --reuse"),
                        f") and did not run in this one: {'their' if many else 'its'} worker, "
                        f"time and accuracies are those of the unit in {_REUSED_HEADER}.",
                    )
                )
            )
    else:
        blocks.append(_empty("No units."))

    # a shard's error is the cause of its model units' ("preprocessing failed: ..."): first
    listed = [*data.failed_shards, *failed]
    if listed:
        blocks += [
            Heading(2, "Failed units"),
            ErrorList(
                [
                    (
                        (
                            Code(u.key),
                            f" ({u.state}{f' on {u.worker}' if u.worker else ''})",
                        ),
                        u.error or "(no error recorded)",
                    )
                    for u in listed[:MAX_FAILED_LISTED]
                ]
            ),
        ]
        if len(listed) > MAX_FAILED_LISTED:
            more = len(listed) - MAX_FAILED_LISTED
            blocks.append(
                Para(
                    (
                        f"The first {MAX_FAILED_LISTED} of {len(listed)} failed units; "
                        f"{more} more are left out here. Every error is in ",
                        Code(UNITS_CSV),
                        ".",
                    )
                )
            )
    return title, blocks
