"""What a report is made of: its data (:class:`ReportData` and the rows, figures and
sections in it), the limits of its tables, and how parameters and values are named."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from shared.artifacts import WrittenFile
from shared.times import as_utc

#: Unit states listed under "Failed units" (and highlighted in the HTML).
FAILED_STATES: frozenset[str] = frozenset({"FAILED", "FAILURE", "ERROR", "CANCELLED"})

#: The report's ``##`` sections, in order. "t-SNE" appears only when ``[report] tsne``
#: asks for it, "Failed units" only when a unit failed.
SECTION_HEADINGS: tuple[str, ...] = (
    "Model families",
    "Experiments",
    "Learning curves",
    "Sweep plots",
    "Blending",
    "Confusion matrices",
    "t-SNE",
    "Explanations (LIME)",
    "Efficiency",
    "Submission",
    "Skipped inputs",
    "Units",
    "Failed units",
)

#: Errors are cut to this many characters in the units table.
ERROR_CELL_CHARS = 120

#: Rows an experiment table shows at most: a larger sweep shows its best points by
#: validation accuracy, and every point is in ``experiments-<family>.csv``.
MAX_POINT_ROWS = 50
#: Labelled ticks a sweep plot's axis of named values ("scale" beside numbers) shows at
#: most: more do not fit side by side in the figure's width, and overlap into a smear.
MAX_SWEEP_TICKS = 12
#: Rows the Units table shows at most (failed and unfinished units first); every unit is
#: in ``units.csv``.
MAX_UNIT_ROWS = 100
#: Failed units listed with their errors at most; the others' errors are in ``units.csv``.
MAX_FAILED_LISTED = 20
UNITS_CSV = "units.csv"

SUBMISSION_FILE = "submission.csv"
TIMELINE_FILE = "timeline.png"
TSNE_FILE = "tsne-svm.png"
TSNE_CAPTION = (
    "Fold 0's training images, PCA features of the best SVM point, embedded by t-SNE; "
    "the study (2.4.2) saw no clustering"
)

_SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_DASH = "—"


# --------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class PreprocessingSummary:
    """What the preprocessing shards did: image counts by decoder, of the shards that ran."""

    size: int  # the cache's side in pixels
    shards: int
    by_opencv: int = 0  # images OpenCV decoded on a worker's CPU
    by_nvjpeg: dict[str, int] = field(default_factory=dict)  # device -> images
    cached: int = 0  # images of shards found in the cache (an earlier campaign wrote them)
    unfinished: int = 0  # shards without a result (failed, cancelled)


@dataclass(frozen=True, slots=True)
class UnitSummary:
    key: str  # e.g. "quick-1a2b3c/cnn/5f3e2a1b9c0d/f2"
    family: str  # "cnn" | "svm" | "rf" | "rf_shard" | ...
    fold: int | None
    params: dict[str, Any]
    state: str  # "SUCCESS", "FAILED", "PENDING", ...
    worker: str | None
    seconds: float | None  # fit/train time the unit reported
    train_acc: float | None
    val_acc: float | None
    test_acc: float | None
    error: str | None
    # the earlier campaign's unit this one was copied from (`submit --reuse`): it did not
    # run here, and its worker, seconds and accuracies are that unit's
    reused_from: str | None = None


@dataclass(frozen=True, slots=True)
class FamilyRow:
    """One row per model family: its best point (by mean validation accuracy)."""

    family: str
    best_key: str  # the best point's fold with the highest validation accuracy
    params: dict[str, Any]
    units: int  # units of this family
    succeeded: int
    train_acc: float | None  # the best point's means over its folds
    val_acc: float | None
    test_acc: float | None
    fit_seconds: float  # summed fit time of the family's units (and tree shards) run here
    reused: int = 0  # units copied from an earlier campaign, not counted in fit_seconds
    # (folds with a result, folds planned) of the best point: fewer only when no point of
    # the family has every fold (a point with a failed fold ranks after those without)
    best_folds: tuple[int, int] | None = None


def point_rank(succeeded: int, val_acc: float | None) -> tuple[bool, int, float]:
    """How a sweep's points are ranked (the highest first): a point with a validation
    accuracy before one without, then by how many of its folds succeeded, then by mean
    validation accuracy. A point with a fold that did not succeed thus ranks after every
    point whose folds all did, as GridSearchCV ranks one whose score is NaN, and cannot
    win on its stronger folds alone."""
    return (val_acc is not None, succeeded, -1.0 if val_acc is None else val_acc)


@dataclass(frozen=True, slots=True)
class PointRow:
    """One sweep point of a family: its folds' results, averaged."""

    key: str  # the units' common key prefix, "<campaign>/<family>/<params hash>"
    params: dict[str, Any]
    units: int
    succeeded: int
    train_acc: float | None
    val_acc: float | None  # mean over the folds
    val_spread: float | None  # standard deviation over the folds; None with one fold
    test_acc: float | None
    seconds: float | None  # mean fit time of one fold
    # numeric extras: a fraction or a time is the mean over the folds; a count the folds
    # agree on is that count, else its range as text ("17–20"); a per-fold flag or event
    # is text naming the folds ("f0 from 9")
    extras: dict[str, float | str | None] = field(default_factory=dict)
    # figures published elsewhere for this point (the campaign's [[report.published]]):
    # "train_acc", "val_acc", "test_acc" or "oob_score" -> value
    published: dict[str, float] = field(default_factory=dict)

    @property
    def rank(self) -> tuple[bool, int, float]:
        """Its place among its sweep's points, the highest first (``point_rank``)."""
        return point_rank(self.succeeded, self.val_acc)


@dataclass(frozen=True, slots=True)
class Experiment:
    """A family's table over its sweep points, like the study's tables."""

    family: str
    title: str
    points: list[PointRow]
    best_key: str | None  # the bold row
    note: str | None = None  # Markdown quoted under the table (e.g. why OOB is inflated)


@dataclass(frozen=True, slots=True)
class CurveFigure:
    """Learning curves: one line per series (a fold, or a point), accuracy and loss."""

    slug: str
    title: str
    # series label -> metric name (train_acc, val_acc, train_loss, val_loss) -> (epoch, value)
    series: dict[str, dict[str, list[tuple[int, float]]]]


@dataclass(frozen=True, slots=True)
class SweepPlot:
    """Metrics of a family's points against one swept parameter."""

    slug: str
    family: str
    param: str
    xs: list[Any]  # the parameter's value at each point
    series: dict[str, list[float | None]]  # metric label -> its value at each point


@dataclass(frozen=True, slots=True)
class BlendRow:
    """A blend of several models, e.g. "CNN 5-fold vote", or a single model ("SVM best
    point", method ``"single"``) that takes part in the comparison."""

    name: str
    family: str  # a family, or several joined by "+"
    method: str  # "vote" | "mean" | "single" (one model, nothing blended)
    members: int
    test_acc: float | None
    val_acc: float | None = None  # on out-of-fold validation predictions
    note: str = ""  # why an accuracy is missing, how ties are broken, ...
    val_images: int | None = None  # the labelled images val_acc is over
    # where the blends' validation covers different images: val_acc on those every blend
    # covers (ReportData.best_compared_on of them), on which the best blend is chosen
    common_acc: float | None = None
    test_images: int | None = None  # the labelled test images test_acc is over
    test_ci: tuple[float, float] | None = None  # test_acc's 95 % Wilson interval
    # figures published elsewhere for this blend ([[report.published]] with its blend):
    # "test_acc" or "val_acc" -> value
    published: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Confusion:
    title: str  # e.g. "CNN 5-fold vote (test)", "SVM best point (test)"
    matrix: list[list[int]]  # rows = true class, columns = predicted class
    split: str  # "test" or "val"


@dataclass(frozen=True, slots=True)
class TimelineBar:
    """One unit's run on a worker, in seconds since the campaign's first unit started."""

    key: str
    family: str
    worker: str
    start: float
    end: float
    state: str
    seconds: float | None = None  # the fit time the unit reported, if it finished


@dataclass(frozen=True, slots=True)
class LimeItem:
    image_id: str
    true_label: str | None
    explained: str  # the class whose evidence is shown
    probability: float  # the model's probability for it
    image: Any = field(repr=False)  # (H, W, 3) uint8; left out of report.json
    overlay: Any = field(repr=False)  # (H, W, 3) uint8 with the helpful segments in green


@dataclass(frozen=True, slots=True)
class LimeSection:
    slug: str
    unit_key: str  # the model explained
    num_samples: int
    items: list[LimeItem]
    note: str = ""  # why there is nothing to show, or what went wrong


@dataclass(frozen=True, slots=True)
class TsneSection:
    """The study's 2.4.2: fold 0's training images, as the best SVM point's PCA features,
    embedded in 2-D by t-SNE. Without ``xy``, ``note`` says why there is no map."""

    unit_key: str = ""  # the SVM unit (the best point's fold 0) whose projection was used
    variant: str = ""
    n_components: int = 0  # the projection's first components t-SNE was given
    available: int = 0  # fold 0's labelled training images, of which the map shows a sample
    xy: Any = field(default=None, repr=False)  # (n, 2) floats; left out of report.json
    labels: Any = field(default=None, repr=False)  # (n,) class indices, row for row
    perplexity: float = 0.0
    seed: int = 0
    note: str = ""

    @property
    def drawn(self) -> bool:
        return self.xy is not None and len(self.xy) > 0


@dataclass(frozen=True, slots=True)
class SkippedInput:
    image_id: str
    path: str
    reason: str
    split: str | None = None


@dataclass(frozen=True, slots=True)
class Submission:
    """``submission.csv``: the best blend's test predictions as class names."""

    blend: str
    rows: list[tuple[str, str]]  # (image_id, class name)
    missing: int = 0  # test images with no prediction (skipped as bad input)


@dataclass(frozen=True, slots=True)
class ReportData:
    campaign_id: str
    campaign_name: str
    created_at: str  # ISO 8601 timestamp, UTC ("2026-11-28T04:49:47+00:00")
    classes: tuple[str, ...]
    families: list[FamilyRow]
    blends: list[BlendRow]
    confusions: dict[str, Confusion]  # keyed by a file-name slug, e.g. "cnn", "svm", "rf"
    units: list[UnitSummary]
    experiments: list[Experiment] = field(default_factory=list)
    curves: list[CurveFigure] = field(default_factory=list)
    sweeps: list[SweepPlot] = field(default_factory=list)
    # the headline model: the blend (or single model) with the best out-of-fold validation
    # accuracy; by test accuracy only when no blend has a validation accuracy
    best_blend: str | None = None
    best_by: str = "val"  # "val" | "test": which accuracy chose best_blend
    # when the blends' validation covers different images (families with other folds,
    # a failed fold): they are compared on the images all of them cover, this many, on
    # which the best scores best_compared_acc
    best_compared_on: int | None = None
    best_compared_acc: float | None = None
    best_tied_with: list[str] = field(default_factory=list)  # as good by that measure
    # chosen by out-of-bag accuracy of a point trained on augmented copies, which their
    # siblings in the trees' samples inflate (the study's 3.3 picked rotate_flip so)
    best_inflated: bool = False
    timeline: list[TimelineBar] = field(default_factory=list)
    lime: LimeSection | None = None
    lime_note: str = ""  # why there is no LIME section (disabled, no CNN, ...)
    tsne: TsneSection | None = None  # None: not asked for ([report] tsne), no section
    skipped: list[SkippedInput] = field(default_factory=list)
    submission: Submission | None = None
    test_labelled: bool = True
    # units that are not in ``units`` (no model, no result): {"preprocess": 3, "report": 1}
    other_units: dict[str, int] = field(default_factory=dict)
    preprocessing: PreprocessingSummary | None = None
    # preprocessing shards that failed or were cancelled, with their errors: listed
    # under "Failed units" before the model units that failed for want of them
    failed_shards: list[UnitSummary] = field(default_factory=list)
    validation: str = ""  # what the models validate on (:func:`validation_line`)
    # what validation accuracies are measured on: "folds" (out of fold), "dev" (the dev
    # split), "oob" (forests judged on their training images, out of bag)
    held_out: str = "folds"
    description: str = ""  # the campaign file's, under the title
    # where the points' and blends' published figures come from ([report] published_in)
    published_in: str | None = None


@dataclass(frozen=True, slots=True)
class ReportFiles:
    markdown: WrittenFile
    html: WrittenFile
    json: WrittenFile
    figures: dict[str, WrittenFile]  # file name -> figure
    submission: WrittenFile | None = None
    # file name -> CSV of a table the page cuts (:data:`MAX_POINT_ROWS`, :data:`MAX_UNIT_ROWS`)
    tables: dict[str, WrittenFile] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def validate_slug(slug: str) -> str:
    """Return ``slug`` if it is a safe file-name part (``^[a-z0-9][a-z0-9_-]*$``)."""
    if not isinstance(slug, str) or not _SLUG_RE.fullmatch(slug):
        raise ValueError(f"invalid figure slug {slug!r}: must match {_SLUG_RE.pattern}")
    return slug


def figure_name(slug: str, kind: str = "confusion") -> str:
    """The file name of a figure: ``<kind>-<slug>.png``."""
    return f"{kind}-{validate_slug(slug)}.png"


def _is_failed(state: str) -> bool:
    return state.upper() in FAILED_STATES


def _fmt_pct(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return _DASH
    return f"{value * 100:.3f}%"


def _fmt_pct_spread(value: float | None, spread: float | None) -> str:
    """``61.667% ± 13.6 pp``: the spread in percentage points, one decimal."""
    text = _fmt_pct(value)
    if text != _DASH and spread is not None and math.isfinite(spread):
        text += f" ± {spread * 100:.1f} pp"
    return text


def _fmt_pct_range(bounds: tuple[float, float] | None) -> str:
    """``58.1–81.2%``: an interval, one decimal, as spreads are."""
    if bounds is None or not all(math.isfinite(b) for b in bounds):
        return _DASH
    low, high = bounds
    return f"{low * 100:.1f}–{high * 100:.1f}%"


def _fmt_duration(seconds: float | None) -> str:
    """``3.6 ms``, ``42 ms``, ``12.3 s``, ``4 min 05 s``, ``2 h 07 min``; ``None`` -> an
    em dash. Below 0.1 s in milliseconds: a grid's SVM points fit in a few, which
    ``0.0 s`` would hide."""
    if seconds is None or not math.isfinite(seconds):
        return _DASH
    if 0 < seconds < 0.0995:
        millis = seconds * 1000
        return f"{millis:.1f} ms" if millis < 9.95 else f"{millis:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    total = int(round(seconds))
    if total < 3600:
        minutes, secs = divmod(total, 60)
        return f"{minutes} min {secs:02d} s"
    hours, rest = divmod(total, 3600)
    return f"{hours} h {rest // 60:02d} min"


def _fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # a sub-table ([svm.search]) as the campaign file writes it
        return "{" + ", ".join(f"{k} = {_fmt_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_fmt_value(v) for v in value) + "]"
    return str(value)


def _fmt_params(params: Mapping[str, Any]) -> str:
    if not params:
        return _DASH
    return ", ".join(f"{k}={_fmt_value(params[k])}" for k in sorted(params, key=str))


def _fmt_utc(timestamp: str) -> str:
    """An ISO timestamp as ``2026-11-28 04:49:47 UTC``; a naive one is taken as UTC
    (SQLite drops the offset of what orchard wrote in UTC), anything else is shown as is."""
    try:
        moment = datetime.fromisoformat(timestamp)
    except (TypeError, ValueError):
        return str(timestamp)
    return as_utc(moment).strftime("%Y-%m-%d %H:%M:%S UTC")


def _fmt_opt(value: Any) -> str:
    return _DASH if value is None else str(value)


def _truncate(text: str | None, limit: int = ERROR_CELL_CHARS) -> str:
    if not text:
        return _DASH
    text = " ".join(text.split())  # one line
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _validate_matrix(matrix: Sequence[Sequence[int]], n_classes: int) -> None:
    if len(matrix) != n_classes or any(len(row) != n_classes for row in matrix):
        raise ValueError(
            f"confusion matrix must be {n_classes}x{n_classes} (one row and column per class)"
        )


#: How the report names the study's model families, in the study's order (CNN, SVM,
#: RF); another family is named in capitals.
FAMILY_TITLES = {"cnn": "CNN", "svm": "SVM", "rf": "RF"}


def family_title(family: str) -> str:
    return FAMILY_TITLES.get(family, family.upper())


# --------------------------------------------------------------------------- parameters

#: How the study names the parameters it swept; any other shows its own name.
PARAM_LABELS: dict[str, str] = {
    "norm_order": "Order",
    "activation": "Activation function",
    "pool": "Pooling",
    "optimizer": "Optimizer",
    "dropout": "Dropout",
    "stride": "Stride",
    "image_size": "Image size",
    "input": "Input",
    "dense": "Dense layers",
    "lr": "Learning rate",
    "n_components": "n_component",
    "variant": "preprocessing",  # with augment, one "method" column in the tables
    "augment": "augmentation",
    "pca_components": "n_components",
    "select_scaling": "scaling",
    "standardize": "Standardized",
}
_VALUE_NAMES: dict[str, dict[Any, str]] = {
    "norm_order": {"act_bn": "R → B", "bn_act": "B → R"},
    "activation": {"prelu": "PReLU", "relu": "ReLU", "leakyrelu": "LeakyReLU"},
    "pool": {"max": "MaxPool2d", "conv": "Conv2d with stride=2"},
    "optimizer": {"sgd": "SGD", "adam": "Adam"},
    "input": {"crop": "resize, centre crop", "resize": "resize"},
    "augment": {"none": "none", "flip": "flip", "rotate": "rotate", "rotate_flip": "rotate, flip"},
}
_VARIANT_WORDS = {"polar": "polarized", "polarcrop": "polarized, cropped", "crop": "crop"}
_METHOD_PARAMS = ("variant", "augment")  # shown together as one "method" column


#: Labels of known numeric result extras; any other numeric extra shows its own name.
EXTRA_LABELS: dict[str, str] = {
    "oob_score": "oob_score_",
    "oob_grouped": "Grouped OOB",
    "oob_grouped_coverage": "Grouped OOB coverage",
    "train_seconds": "Tree fit time",
    "train_wall_seconds": "Tree fit wall time",
    "epochs": "Epochs",
    "resumed_from_epoch": "Resumed",
    "pca_fitted": "Fitted the PCA",
    "gamma_scale": "γ scale ≈",  # the value gamma="scale" took, as the study's grid gives it
    "stopped_at_max_iter": "Stopped at max_iter",  # the solver did not converge (2.5)
    "iterations": "Solver iterations",
    # what a point's [svm.search] chose, as the study's 2.4.1 tables give it
    "best_n_components": "Best n_component",
    "best_C": "Best C",
    "best_gamma": "Best γ",
    "search_cv_acc": "Search CV acc",
    "search_combinations": "Searched",
}


def _extra_label(name: str) -> str:
    if name in EXTRA_LABELS:
        return EXTRA_LABELS[name]
    return name.replace("_", " ").capitalize()


def param_label(name: str) -> str:
    """The column header of a parameter, as the study writes it."""
    return PARAM_LABELS.get(name, name)


def param_value(name: str, value: Any) -> str:
    """A parameter's value as the study writes it (``act_bn`` -> ``R → B``)."""
    names = _VALUE_NAMES.get(name)
    if names is not None and isinstance(value, str) and value in names:
        return names[value]
    if name == "variant" and isinstance(value, str):
        match = re.fullmatch(r"([a-z]+?)(\d+)", value)
        if match:
            word, size = match.groups()
            return f"{_VARIANT_WORDS.get(word, word)} {size}"
        return {"polarized": "polarized", "original": "original"}.get(value, value)
    if name == "image_size" and isinstance(value, int) and not isinstance(value, bool):
        return f"{value} × {value}"  # the study's "224 × 224"
    if value is None:
        return "None"
    return _fmt_value(value)


def _method(params: Mapping[str, Any]) -> str:
    """The study's "method": the variant, then the augmentation if there is one."""
    parts = [
        param_value(n, params[n])
        for n in _METHOD_PARAMS
        if n in params and not (n == "augment" and params[n] == "none")
    ]
    return " ".join(p for p in parts if p) or _DASH


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def swept_params(points: Sequence[PointRow]) -> list[str]:
    """The parameters whose value differs between ``points``, in parameter order."""
    names: list[str] = []
    for point in points:
        names += [n for n in point.params if n not in names]
    return [n for n in names if len({_key(p.params.get(n, "\0absent")) for p in points}) > 1]


def _param_columns(swept: Sequence[str]) -> list[str]:
    """Swept parameters as columns; variant and augment merge into one "method"."""
    columns: list[str] = []
    for name in swept:
        column = "method" if name in _METHOD_PARAMS else name
        if column not in columns:
            columns.append(column)
    return columns


def _even_sample(count: int, keep: Sequence[int], limit: int) -> list[int]:
    """At most ``limit`` (at least 2) of the indices ``0 .. count - 1``, in order: all of
    them when they fit, else an even spread from the first to the last in which each
    index of ``keep`` takes the place of the spread's nearest one. A reader then still
    sees the whole range, at an even step, and the rows or ticks that must be there
    (the best value, the named ones); more of ``keep`` than fit are spread in turn."""
    if count <= limit:
        return list(range(count))
    kept = sorted(set(keep) | {0, count - 1})
    if len(kept) > limit:
        return [kept[i] for i in _even_sample(len(kept), (), limit)]
    # distinct, since the step (count - 1) / (limit - 1) is at least 1
    chosen = {round(i * (count - 1) / (limit - 1)) for i in range(limit)}
    for index in kept:
        if index not in chosen:
            # the nearest index that is not itself kept, the lower on a tie
            spare = sorted(chosen.difference(kept), key=lambda i: (abs(i - index), i))
            chosen.remove(spare[0])
            chosen.add(index)
    return sorted(chosen)
