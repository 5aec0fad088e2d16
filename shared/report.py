"""Campaign reports in the study's shapes: Markdown, one self-contained HTML page, JSON.

The report task gathers a :class:`ReportData` from the store and calls
:func:`write_report`, which writes into one folder

* the figures, PNG via matplotlib's Agg canvas: ``confusion-<slug>.png`` (Fig. 18-20),
  ``curve-<slug>.png`` (learning curves, Fig. 2-7), ``sweep-<slug>.png`` (a metric
  against a swept parameter, Fig. 12-17), ``tsne-svm.png`` (the SVM's features in 2-D,
  section 2.4.2), ``lime-<slug>.png`` (section 1.5) and ``timeline.png`` (units across
  workers),
* ``submission.csv`` when the test set is unlabelled (``image_id,label``),
* ``report.md`` (GitHub-flavoured Markdown, figures linked by file name),
* ``report.html`` (one HTML5 page with no external resources: figures are ``data:`` URIs),
* ``report.json`` (``dataclasses.asdict`` of the data, sorted keys, images left out),

each through :mod:`shared.artifacts`, so a reader never sees half a file.

Both pages are rendered from one list of blocks (:func:`document`), so they always
have the same sections. Accuracies are fractions in ``[0, 1]`` shown as percentages
with three decimals, as in the study (``0.84125`` -> ``84.125%``). Nothing here knows
which parameters a family has: the tables show whichever ones vary across its points.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import functools
import io
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from html import escape
from pathlib import Path
from statistics import mean
from typing import TYPE_CHECKING, Any, ParamSpec

from shared.artifacts import WrittenFile, atomic_write_bytes, atomic_write_text
from shared.errors import visible_controls
from shared.times import as_utc

# matplotlib is imported when a figure is drawn, so that importing this module stays
# cheap for the many processes that never draw
if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "FAILED_STATES",
    "MAX_FAILED_LISTED",
    "MAX_POINT_ROWS",
    "MAX_SWEEP_TICKS",
    "MAX_UNIT_ROWS",
    "SECTION_HEADINGS",
    "BlendRow",
    "Confusion",
    "CurveFigure",
    "Experiment",
    "FamilyRow",
    "LimeItem",
    "LimeSection",
    "PointRow",
    "ReportData",
    "ReportFiles",
    "SkippedInput",
    "Submission",
    "SweepPlot",
    "TimelineBar",
    "TsneSection",
    "UnitSummary",
    "confusion_png",
    "curve_png",
    "document",
    "experiments_csv_name",
    "figure_name",
    "lime_png",
    "param_label",
    "param_value",
    "point_rank",
    "render_html",
    "render_json",
    "render_markdown",
    "submission_csv",
    "swept_params",
    "table_csvs",
    "sweep_png",
    "timeline_colors",
    "timeline_png",
    "tsne_png",
    "validate_slug",
    "write_report",
]

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


def _validate_matrix(matrix: Sequence[Sequence[int]], n_classes: int) -> None:
    if len(matrix) != n_classes or any(len(row) != n_classes for row in matrix):
        raise ValueError(
            f"confusion matrix must be {n_classes}x{n_classes} (one row and column per class)"
        )


def _family_title(family: str) -> str:
    return {"cnn": "CNN", "svm": "SVM", "rf": "RF"}.get(family, family.upper())


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


# --------------------------------------------------------------------------- figures


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


_P = ParamSpec("_P")


def _drawn_literally(draw: Callable[_P, bytes]) -> Callable[_P, bytes]:
    """Draw with every text literal: class names, image ids, parameter values and titles
    are the user's, and a ``$`` in them must not start mathtext (``$\\frac{1}{$`` made
    matplotlib raise). The setting spans the drawing *and* the saving, because tick labels
    and the constrained layout's texts are created only when the figure is drawn."""

    @functools.wraps(draw)
    def literal(*args: _P.args, **kwargs: _P.kwargs) -> bytes:
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
            return draw(*args, **kwargs)

    return literal


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


@_drawn_literally
def confusion_png(confusion: Confusion, classes: Sequence[str]) -> bytes:
    """A confusion-matrix heatmap as PNG bytes (400x400 px, deterministic for the same input).

    x-axis = predicted label, y-axis = true label, each cell annotated with its count
    (white on dark cells, black on light ones).
    """
    classes = [str(c) for c in classes]
    matrix = [[int(v) for v in row] for row in confusion.matrix]
    n = len(classes)
    _validate_matrix(matrix, n)

    fig = _figure(4, 4)
    ax = fig.add_subplot()
    vmax = max([1, *(v for row in matrix for v in row)])
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)

    ticks = list(range(n))
    long_names = max((len(c) for c in classes), default=0) > 6
    ax.set_xticks(
        ticks,
        labels=classes,
        rotation=45 if long_names else 0,
        ha="right" if long_names else "center",
    )
    ax.set_yticks(ticks, labels=classes)
    ax.set_xlabel("Predicted label")
    ax.set_ylabel("True label")
    ax.set_title(confusion.title, fontsize=10)

    threshold = vmax / 2
    fontsize = 10 if n <= 6 else max(5, 10 - (n - 6))
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(
                j,
                i,
                str(value),
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if value > threshold else "black",
            )
    return _png(fig)


@_drawn_literally
def curve_png(curve: CurveFigure) -> bytes:
    """Accuracy (left) and loss (right) per epoch: solid validation, dashed training."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(9, 3.4)
    acc_ax, loss_ax = fig.subplots(1, 2)
    colors = [f"C{i % 10}" for i in range(len(curve.series))]
    # the legend is given its handles: collected from the axes, a label that starts
    # with "_" (a parameter's value may) would be left out
    handles: list[Any] = []
    labels: list[str] = []
    for color, (label, metrics) in zip(colors, curve.series.items(), strict=True):
        for ax, kind in ((acc_ax, "acc"), (loss_ax, "loss")):
            for split, style in (("train", "--"), ("val", "-")):
                points = metrics.get(f"{split}_{kind}") or []
                if not points:
                    continue
                xs = [step + 1 for step, _ in points]  # epochs counted from 1, as plotted
                ys = [value for _, value in points]
                (line,) = ax.plot(xs, ys, style, color=color, linewidth=1.4)
                if ax is acc_ax and (split == "val" or "val_" + kind not in metrics):
                    handles.append(line)
                    labels.append(label)
    acc_ax.set_title("Accuracy")
    loss_ax.set_title("Loss")
    for ax in (acc_ax, loss_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if handles:
        acc_ax.legend(handles, labels, fontsize=7, loc="lower right")
    # the line styles are named only where both are drawn
    drawn = {n.split("_")[0] for lines in curve.series.values() for n, at in lines.items() if at}
    styles = "  (solid: validation, dashed: training)" if {"train", "val"} <= drawn else ""
    fig.suptitle(f"{curve.title}{styles}", fontsize=10)
    return _png(fig)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@_drawn_literally
def sweep_png(plot: SweepPlot) -> bytes:
    """Each metric against the swept parameter: every point, and the mean per value."""
    fig = _figure(5.2, 3.6)
    ax = fig.add_subplot()
    numeric = all(_is_number(x) for x in plot.xs)
    if numeric:
        order = sorted(set(plot.xs))
        positions = {x: x for x in order}
        if min(order) > 0 and max(order) / min(order) >= 50:
            from matplotlib.ticker import FuncFormatter, NullFormatter

            ax.set_xscale("log")
            # the log scale's labels are mathtext ($10^{-3}$), which is drawn literally here
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        labels = list(dict.fromkeys(param_value(plot.param, x) for x in plot.xs))
        positions = {label: i for i, label in enumerate(labels)}
        order = labels
    # the legend is given its handles: collected from the axes, a "_" label would be dropped
    handles: list[Any] = []
    names: list[str] = []
    pooled = False  # some value has several points (other parameters swept too)
    for i, (metric, values) in enumerate(plot.series.items()):
        color = f"C{i % 10}"
        pairs = [
            (x if numeric else param_value(plot.param, x), v)
            for x, v in zip(plot.xs, values, strict=True)
            if v is not None and math.isfinite(v)
        ]
        if not pairs:
            continue
        ax.scatter(
            [positions[x] for x, _ in pairs], [v for _, v in pairs], s=14, color=color, alpha=0.5
        )
        at: dict[Any, list[float]] = {}
        for x, v in pairs:
            at.setdefault(x, []).append(v)
        means = [(x, mean(at[x])) for x in order if x in at]
        pooled = pooled or any(len(v) > 1 for v in at.values())
        (line,) = ax.plot(
            [positions[x] for x, _ in means], [v for _, v in means], "-o", color=color, markersize=4
        )
        handles.append(line)
        names.append(metric)
    if not numeric:
        # a tick mark at every value, labelled only where the labels fit side by side:
        # always the text values ("scale", "auto") and both ends, evenly between them
        named = {param_value(plot.param, x) for x in plot.xs if not _is_number(x)}
        labelled = _even_sample(
            len(order), [i for i, label in enumerate(order) if label in named], MAX_SWEEP_TICKS
        )
        ax.set_xticks(range(len(order)), minor=True)
        ax.set_xticks(
            labelled,
            labels=[order[i] for i in labelled],
            # steeper once the labels are many, so that each clears its neighbours
            rotation=20 if len(labelled) <= 6 else 45,
            ha="right",
            rotation_mode="anchor",
        )
    ax.set_xlabel(param_label(plot.param))
    ax.set_ylabel("score (dots: points, line: their mean)" if pooled else "score")
    ax.grid(alpha=0.3)
    if handles:
        ax.legend(handles, names, fontsize=8)
    ax.set_title(f"{_family_title(plot.family)}: score against {plot.param}", fontsize=10)
    return _png(fig)


def _lanes(bars: Sequence[TimelineBar]) -> list[tuple[str, int]]:
    """(worker, lane) per bar: overlapping units of one worker go on separate lanes."""
    ends: dict[str, list[float]] = {}
    out: list[tuple[str, int]] = [("", 0)] * len(bars)
    for i in sorted(range(len(bars)), key=lambda i: (bars[i].worker, bars[i].start)):
        bar = bars[i]
        lanes = ends.setdefault(bar.worker, [])
        lane = next((j for j, end in enumerate(lanes) if end <= bar.start), len(lanes))
        if lane == len(lanes):
            lanes.append(bar.end)
        else:
            lanes[lane] = bar.end
        out[i] = (bar.worker, lane)
    return out


#: Family colours on the timeline: matplotlib's default cycle without its red (C3) and
#: pink (C6), so that red means one thing only, a failed unit.
TIMELINE_COLORS: tuple[str, ...] = ("C0", "C1", "C2", "C4", "C5", "C7", "C8", "C9")
FAILED_EDGE = "red"
#: Up to this many bars the timeline outlines each one in black; past it only failed ones.
TIMELINE_OUTLINED = 120
#: Lanes (a worker's concurrent slots) the timeline gives full height; past it they shrink.
TIMELINE_LANES = 40


def timeline_colors(families: Sequence[str]) -> dict[str, str]:
    """family -> its bar colour, in order of appearance (never red: red marks failures)."""
    families = list(dict.fromkeys(families))
    return {f: TIMELINE_COLORS[i % len(TIMELINE_COLORS)] for i, f in enumerate(families)}


@_drawn_literally
def timeline_png(bars: Sequence[TimelineBar]) -> bytes:
    """A Gantt chart: a row per worker (and per concurrent slot), a bar per unit."""
    lanes = _lanes(bars)
    rows = sorted(set(lanes))
    # many workers of many slots: the figure stops growing past TIMELINE_LANES lanes, and
    # only each worker's first lane is named
    crowded = len(rows) > TIMELINE_LANES
    fig = _figure(9, 1.4 + 0.32 * min(max(len(rows), 1), TIMELINE_LANES))
    ax = fig.add_subplot()
    families = list(dict.fromkeys(b.family for b in bars))
    color = timeline_colors(families)
    y = {row: i for i, row in enumerate(rows)}
    # one collection per lane, family and outcome, however many units: a bar per call
    # cost a container of artists per unit (a second for 650 units)
    groups: dict[tuple[tuple[str, int], str, bool], list[tuple[float, float]]] = {}
    for bar, lane in zip(bars, lanes, strict=True):
        group = groups.setdefault((lane, bar.family, _is_failed(bar.state)), [])
        group.append((bar.start, max(bar.end - bar.start, 1e-3)))
    # thin black outlines part a few bars; hundreds of short ones they would paint black
    outline = "black" if len(bars) <= TIMELINE_OUTLINED else "none"
    for (lane, family, failed), spans in groups.items():
        ax.broken_barh(
            spans,
            (y[lane] - 0.4, 0.8),
            facecolors=color[family],
            edgecolors=FAILED_EDGE if failed else outline,
            linewidths=1.2 if failed else 0.3,
            hatch="//" if failed else None,
        )
    named = [(w, lane) for w, lane in rows if not crowded or lane == 0]
    ax.set_yticks(
        [y[row] for row in named],
        labels=[w if lane == 0 else f"{w} #{lane + 1}" for w, lane in named],
        fontsize=7 if len(named) <= TIMELINE_LANES else 4,
    )
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first unit started")
    ax.grid(axis="x", alpha=0.3)
    handles = [ax.bar(0, 0, color=color[f]) for f in families]  # zero-size legend proxies
    if handles:
        ax.legend(handles, families, fontsize=7, loc="upper right", ncols=min(len(families), 5))
    ax.set_title("Units across workers (failed: red outline, hatched)", fontsize=10)
    return _png(fig)


@_drawn_literally
def lime_png(section: LimeSection) -> bytes:
    """Each explained image (top) and its LIME explanation with green evidence (bottom)."""
    n = len(section.items)
    fig = _figure(max(2.2 * n, 3), 4.6)
    axes = fig.subplots(2, n, squeeze=False)
    for j, item in enumerate(section.items):
        top, bottom = axes[0][j], axes[1][j]
        top.imshow(item.image, interpolation="nearest")
        bottom.imshow(item.overlay, interpolation="nearest")
        truth = f"true {item.true_label}, " if item.true_label is not None else ""
        top.set_title(f"{item.image_id}\n{truth}explained {item.explained}", fontsize=7)
        bottom.set_title(f"p({item.explained}) = {item.probability:.2f}", fontsize=7)
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("LIME: green segments speak for the explained class", fontsize=9)
    return _png(fig)


@_drawn_literally
def tsne_png(section: TsneSection, classes: Sequence[str]) -> bytes:
    """The t-SNE map: a dot per image in its class's colour, the classes (and how many
    images of each) named beside it. Its axes have no units: they are left bare."""
    fig = _figure(6.4, 4.6)
    ax = fig.add_subplot()
    points = [(float(x), float(y)) for x, y in section.xy]
    labels = [int(label) for label in section.labels]
    # the legend is given its handles: collected from the axes, a class named "_..."
    # would be left out
    handles: list[Any] = []
    names: list[str] = []
    for c, name in enumerate(classes):
        mine = [p for p, label in zip(points, labels, strict=True) if label == c]
        if mine:
            dots = ax.scatter(
                [x for x, _ in mine],
                [y for _, y in mine],
                s=10,
                color=f"C{c % 10}",
                alpha=0.7,
                linewidths=0,
            )
            handles.append(dots)
            names.append(f"{name} ({len(mine)})")
    ax.set_xticks([])
    ax.set_yticks([])
    if handles:
        ax.legend(
            handles,
            names,
            fontsize=7,
            markerscale=1.5,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            borderaxespad=0.0,
        )
    components = f"{section.n_components} PCA component{'s' * (section.n_components != 1)}"
    ax.set_title(
        f"t-SNE of {param_value('variant', section.variant)} images: {len(points)} training "
        f"images, {components}",
        fontsize=10,
    )
    return _png(fig)


def _figure_renderers(data: ReportData) -> dict[str, tuple[str, Callable[[], bytes]]]:
    """file name -> (caption, render); validates every slug before anything is drawn."""
    out: dict[str, tuple[str, Callable[[], bytes]]] = {}

    def add(name: str, caption: str, render: Callable[[], bytes]) -> None:
        if name in out:
            raise ValueError(f"two figures would both be written to {name}")
        out[name] = (caption, render)

    for slug, confusion in data.confusions.items():
        add(
            figure_name(slug),
            confusion.title,
            lambda c=confusion: confusion_png(c, data.classes),
        )
    for curve in data.curves:
        add(figure_name(curve.slug, "curve"), curve.title, lambda c=curve: curve_png(c))
    for plot in data.sweeps:
        caption = f"{_family_title(plot.family)}: {', '.join(plot.series)} against {plot.param}"
        add(figure_name(plot.slug, "sweep"), caption, lambda p=plot: sweep_png(p))
    if data.lime is not None and data.lime.items:
        add(
            figure_name(data.lime.slug, "lime"),
            f"LIME explanations of {data.lime.unit_key}",
            lambda s=data.lime: lime_png(s),
        )
    if data.tsne is not None and data.tsne.drawn:
        add(TSNE_FILE, TSNE_CAPTION, lambda s=data.tsne: tsne_png(s, data.classes))
    if data.timeline:
        add(TIMELINE_FILE, "Units across workers", lambda: timeline_png(data.timeline))
    return out


# --------------------------------------------------------------------------- document
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
#: Extras that are fractions in [0, 1]: four decimals, as the study prints oob_score_.
_FRACTION_EXTRAS = frozenset({"explained_variance", "oob_grouped_coverage"})


def _extra_label(name: str) -> str:
    if name in EXTRA_LABELS:
        return EXTRA_LABELS[name]
    return name.replace("_", " ").capitalize()


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


def _experiment_blocks(exp: Experiment) -> list[Block]:
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
        if _thinly_grouped(point.extras) and _is_number(point.extras.get("oob_grouped")):
            cells[len(cells) - len(extras) + extras.index("oob_grouped")] += "†"
        rows.append(cells)
        if point.key == exp.best_key:
            classes.append("best")
        elif point.succeeded < point.units:
            classes.append("failed" if point.succeeded == 0 else "partial")
        else:
            classes.append("")
    right = frozenset(range(n_params, len(header)))
    blocks.append(Table(tuple(header), rows, right, row_classes=classes))
    notes: list[Inline] = []
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
    if "oob_grouped_coverage" in extras:
        notes.append(
            "Grouped OOB coverage: the share of training rows that got a grouped OOB vote"
            + (
                f"; †: under {GROUPED_OOB_MIN_COVERAGE:.0%} of them, too few for the grouped "
                "score to say much (more trees raise it). "
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
        shown = [values[i] for i in _even_sample(len(values), [first_top], MAX_POINT_ROWS)]
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
                row_classes=["best" if p.rank == top else "" for _, p in shown],
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
    header = _blend_header(data)
    numbers = frozenset({2, 3, 4, 5} | ({6} if _compared_on_common(data) else set()))
    blocks: list[Block] = [Table(header, rows, numbers, row_classes=classes)]
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
            "The test set "
            "chooses nothing, it only measures. A single model is one best point trained on "
            "one fold: nothing is blended."
        )
        blocks.append(Para(tuple(parts)))
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
        header = [*columns[:-1], *named, columns[-1]]
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
        f"{train + val} labelled train and dev images, {per_fold} per fold; a section "
        "with folds = n runs the first n"
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
                    "its mean accuracies; Best unit is that point's fold with "
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
            f"{_family_title(r.family)}'s best point has {r.best_folds[0]} of its "
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
            blocks += _experiment_blocks(exp)
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


# --------------------------------------------------------------------------- markdown


#: What makes a line a heading, a quote, a list item, a rule or a code fence in
#: Markdown (``*`` and ````` are escaped everywhere already).
_MD_BLOCK_START = re.compile(r"#{1,6}(?:\s|$)|>|[-+](?:\s|$)|(?:[-_]\s*){3,}$|~{3,}")
#: An ordered list item's number: the ``.`` or ``)`` after it is what is escaped.
_MD_ORDERED_START = re.compile(r"\d{1,9}(?=[.)](?:\s|$))")


def _md_text(text: str) -> str:
    """Plain text on one Markdown line: ``\\``, ``<``, ``&``, ``*``, `````, ``[`` and ``]``
    escaped: no raw HTML or entity (a class ``A&amp;B`` shown as ``A&B``), no code span,
    and no link or image (a title ``![x](https://host/p.png)`` would make a Markdown
    viewer fetch it)."""
    text = " ".join(str(text).split()).replace("\\", "\\\\").replace("<", "\\<")
    text = text.replace("&", "\\&").replace("`", "\\`")
    return text.replace("*", "\\*").replace("[", "\\[").replace("]", "\\]")


def _md_line_start(text: str) -> str:
    """Markdown text (:func:`_md_text`'s) that starts a line or a list item, with what
    would make it a heading, quote, list, rule or fence there escaped: a description
    ``# Accuracy 99.9%`` made a headline of the report."""
    if number := _MD_ORDERED_START.match(text):
        return f"{text[: number.end()]}\\{text[number.end() :]}"
    return f"\\{text}" if _MD_BLOCK_START.match(text) else text


def _md_cell(text: str) -> str:
    """Plain text for a Markdown table cell: as :func:`_md_text`, and ``|`` escaped."""
    return _md_text(text).replace("|", "\\|")


def _md_fence(text: str) -> str:
    """A code fence longer than any backtick run in ``text``."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _md_code(text: str, table: bool = True) -> str:
    """``text`` as an inline code span (``|`` escaped inside GFM tables)."""
    text = " ".join(str(text).split())
    if table:
        text = text.replace("|", "\\|")
    if not text:
        return _DASH
    fence = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" if len(fence) > 1 else f"`{text}`"


def _md_inline(parts: Sequence[Inline]) -> str:
    """``parts`` as the Markdown of a paragraph or list item, which they start."""
    out = []
    for part in parts:
        if isinstance(part, Code):
            out.append(_md_code(part.text, table=False))
        elif isinstance(part, Strong):
            out.append(f"**{_md_text(part.text)}**")
        else:
            lead = " " if part[:1].isspace() else ""
            trail = " " if part[-1:].isspace() and part.strip() else ""
            out.append(lead + _md_text(part) + trail)
    return _md_line_start("".join(out))


def _md_table(table: Table) -> list[str]:
    def cell(r: int, i: int, text: str) -> str:
        if not text or text == _DASH:
            return _DASH
        body = _md_code(text) if i in table.code_cols else _md_cell(text)
        best = table.row_classes is not None and table.row_classes[r] == "best"
        return f"**{body}**" if best else body

    lines = ["| " + " | ".join(_md_cell(h) for h in table.header) + " |"]
    lines.append(
        "|"
        + "|".join("---:" if i in table.right else "---" for i in range(len(table.header)))
        + "|"
    )
    lines.extend(
        "| " + " | ".join(cell(r, i, c) for i, c in enumerate(row)) + " |"
        for r, row in enumerate(table.rows)
    )
    return lines


def render_markdown(data: ReportData, captions: Mapping[str, str] | None = None) -> str:
    """The report as GitHub-flavoured Markdown; figures are linked by file name. It
    holds no control character but newlines and tabs (:func:`~shared.errors.visible_controls`:
    it is printed to terminals by ``orchard report ID --print``)."""
    if captions is None:
        captions = {name: caption for name, (caption, _) in _figure_renderers(data).items()}
    title, blocks = document(data)
    out: list[str] = [f"# {_md_text(title)}"]
    for block in blocks:
        out.append("")
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {_md_text(block.text)}")
        elif isinstance(block, Para):
            text = _md_inline(block.parts)
            out.append(f"_{text}_" if block.empty else text)
        elif isinstance(block, Table):
            out += _md_table(block)
        elif isinstance(block, Figures):
            for name in block.names:
                alt = " ".join(captions.get(name, name).split())
                alt = alt.replace("[", "\\[").replace("]", "\\]")
                out += [f"![{alt}]({name})", ""]
            out.pop()
        elif isinstance(block, Quote):
            out += [f"> {line}".rstrip() for line in block.markdown.strip().splitlines()]
        elif isinstance(block, Bullets):
            out += [f"- {_md_inline(item)}" for item in block.items]
        elif isinstance(block, ErrorList):
            for what, error in block.items:
                fence = _md_fence(error)
                lines = [f"  {line}".rstrip() for line in error.rstrip().splitlines()]
                out += [f"- {_md_inline(what)}", "", f"  {fence}text", *lines, f"  {fence}", ""]
            out.pop()
    return visible_controls("\n".join(out)) + "\n"


# --------------------------------------------------------------------------- html

_CSS = """
:root { color-scheme: light; }
body {
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #1f2328; line-height: 1.45;
}
h1 { font-size: 1.6rem; border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; }
h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 1.05rem; margin-top: 1.2rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafbfc; }
tr.best td { font-weight: 700; }
tr.failed, tbody tr.failed:nth-child(even) { background: #ffebe9; }
tr.failed td { color: #82071e; }
tr.partial, tbody tr.partial:nth-child(even) { background: #fff8c5; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
code { font-size: .85em; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; padding: .5rem; overflow-x: auto;
      white-space: pre-wrap; }
blockquote { border-left: 4px solid #d0d7de; margin: .5rem 0; padding: .1rem 1rem;
             color: #424a53; }
.figures { display: flex; flex-wrap: wrap; gap: 1rem; }
figure { margin: 0; border: 1px solid #d0d7de; padding: .5rem; }
figure img { display: block; max-width: 100%; height: auto; }
figcaption { font-size: .85rem; text-align: center; margin-top: .3rem; }
.empty { color: #656d76; font-style: italic; }
""".strip()


def _h(text: Any) -> str:
    return escape(str(text), quote=True)


def _html_inline(parts: Sequence[Inline]) -> str:
    out = []
    for part in parts:
        if isinstance(part, Code):
            out.append(f"<code>{_h(part.text)}</code>")
        elif isinstance(part, Strong):
            out.append(f"<strong>{_h(part.text)}</strong>")
        else:
            out.append(_h(part))
    return "".join(out)


def _html_markdown(text: str) -> str:
    """The little Markdown a note uses: paragraphs, ``code`` and **bold**, all escaped."""
    paragraphs = [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    out = []
    for paragraph in paragraphs:
        html = _h(" ".join(paragraph.split()))
        html = re.sub(r"`([^`]+)`", r"<code>\1</code>", html)
        html = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", html)
        out.append(f"<p>{html}</p>")
    return "".join(out)


def _html_table(table: Table) -> list[str]:
    def cls(i: int) -> str:
        return ' class="num"' if i in table.right else ""

    out = ["<table>", "<thead><tr>"]
    out.append("".join(f"<th{cls(i)}>{_h(h)}</th>" for i, h in enumerate(table.header)))
    out += ["</tr></thead>", "<tbody>"]
    for r, row in enumerate(table.rows):
        rc = table.row_classes[r] if table.row_classes else ""
        cells = []
        for i, text in enumerate(row):
            code = i in table.code_cols and text != _DASH
            body = f"<code>{_h(text)}</code>" if code else _h(text)
            title = ""
            if table.titles and i in table.titles and table.titles[i][r]:
                title = f' title="{_h(table.titles[i][r])}"'
            cells.append(f"<td{cls(i)}{title}>{body}</td>")
        opening = f'<tr class="{rc}">' if rc else "<tr>"
        out.append(opening + "".join(cells) + "</tr>")
    out += ["</tbody>", "</table>"]
    return out


def render_html(
    data: ReportData,
    figures: Mapping[str, bytes],
    captions: Mapping[str, str] | None = None,
) -> str:
    """The report as one self-contained HTML5 page.

    ``figures`` maps figure file names to PNG bytes, embedded as ``data:`` URIs; a
    figure that is missing gets a placeholder. No external resources are used.
    """
    if captions is None:
        captions = {name: caption for name, (caption, _) in _figure_renderers(data).items()}
    title, blocks = document(data)
    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_h(title)}</title>",
        f"<style>\n{_CSS}\n</style>",
        "</head>",
        "<body>",
        f"<h1>{_h(title)}</h1>",
    ]
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{_h(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            cls = ' class="empty"' if block.empty else ""
            out.append(f"<p{cls}>{_html_inline(block.parts)}</p>")
        elif isinstance(block, Table):
            out += _html_table(block)
        elif isinstance(block, Figures):
            out.append('<div class="figures">')
            for name in block.names:
                caption = captions.get(name, name)
                png = figures.get(name)
                if png is None:
                    body = '<p class="empty">Figure not rendered.</p>'
                else:
                    b64 = base64.b64encode(png).decode("ascii")
                    body = f'<img alt="{_h(caption)}" src="data:image/png;base64,{b64}">'
                stem = name.removesuffix(".png")
                out.append(
                    f'<figure id="{_h(stem)}">{body}<figcaption>{_h(caption)}</figcaption></figure>'
                )
            out.append("</div>")
        elif isinstance(block, Quote):
            out.append(f"<blockquote>{_html_markdown(block.markdown)}</blockquote>")
        elif isinstance(block, Bullets):
            out.append("<ul>")
            out += [f"<li>{_html_inline(item)}</li>" for item in block.items]
            out.append("</ul>")
        elif isinstance(block, ErrorList):
            out.append("<ul>")
            out += [
                f"<li>{_html_inline(what)}<pre>{_h(error.rstrip())}</pre></li>"
                for what, error in block.items
            ]
            out.append("</ul>")
    out += ["</body>", "</html>"]
    # a browser obeys a right-to-left override in a title as a terminal does an ESC
    # (`cat report.html`): shown escaped, as in report.md
    return visible_controls("\n".join(out)) + "\n"


# --------------------------------------------------------------------------- json, csv


def _jsonable(value: Any) -> Any:
    """Plain JSON: str keys, NaN/inf -> None, tuples/sets -> lists, numpy values unwrapped,
    dataclasses as dicts of their fields (one walk: ``dataclasses.asdict`` first copied
    everything deeply, a third of a big report's writing)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((_jsonable(v) for v in value), key=repr)
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)  # numpy scalar
    if callable(item) and getattr(value, "ndim", 0) == 0:
        try:
            return _jsonable(item())
        except (TypeError, ValueError):
            pass
    tolist = getattr(value, "tolist", None)  # numpy array
    if callable(tolist):
        return _jsonable(tolist())
    return str(value)


def render_json(data: ReportData) -> str:
    """``dataclasses.asdict(data)`` as JSON (sorted keys, indent 2, strictly valid JSON).

    LIME's images and the t-SNE map's points are figures, not data: each becomes its
    shape.
    """
    if data.lime is not None and data.lime.items:
        items = [
            dataclasses.replace(
                item,
                image=list(getattr(item.image, "shape", ())),
                overlay=list(getattr(item.overlay, "shape", ())),
            )
            for item in data.lime.items
        ]
        data = dataclasses.replace(data, lime=dataclasses.replace(data.lime, items=items))
    if data.tsne is not None and data.tsne.drawn:
        tsne = dataclasses.replace(
            data.tsne,
            xy=list(getattr(data.tsne.xy, "shape", (len(data.tsne.xy), 2))),
            labels=list(getattr(data.tsne.labels, "shape", (len(data.tsne.labels),))),
        )
        data = dataclasses.replace(data, tsne=tsne)
    return json.dumps(_jsonable(data), sort_keys=True, indent=2) + "\n"


def submission_csv(submission: Submission) -> str:
    """``image_id,label`` and one row per test image, as the competition expects."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image_id", "label"])
    writer.writerows(submission.rows)
    return buf.getvalue()


# --------------------------------------------------------------------------- write


def write_report(data: ReportData, out_dir: Path) -> ReportFiles:
    """Write the figures, ``submission.csv``, ``report.md``, ``report.html``,
    ``report.json`` and the CSVs of the tables the page cuts (:func:`table_csvs`) into
    ``out_dir``.

    Every slug is validated and every figure drawn before anything is written
    (``ValueError`` otherwise), so a bad input leaves no half report behind.
    """
    out_dir = Path(out_dir)
    renderers = _figure_renderers(data)
    captions = {name: caption for name, (caption, _) in renderers.items()}
    pngs = {name: render() for name, (_, render) in renderers.items()}
    markdown_text = render_markdown(data, captions)
    html_text = render_html(data, pngs, captions)
    json_text = render_json(data)
    csvs = table_csvs(data)

    figures = {name: atomic_write_bytes(out_dir / name, png) for name, png in pngs.items()}
    tables = {name: atomic_write_text(out_dir / name, text) for name, text in csvs.items()}
    submission = None
    if data.submission is not None:
        submission = atomic_write_text(out_dir / SUBMISSION_FILE, submission_csv(data.submission))
    return ReportFiles(
        markdown=atomic_write_text(out_dir / "report.md", markdown_text),
        html=atomic_write_text(out_dir / "report.html", html_text),
        json=atomic_write_text(out_dir / "report.json", json_text),
        figures=figures,
        submission=submission,
        tables=tables,
    )
