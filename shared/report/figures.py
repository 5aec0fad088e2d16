"""The report's figures, PNG bytes drawn with matplotlib's Agg canvas (imported when a
figure is drawn): confusion matrices, learning curves, sweep plots, the timeline,
LIME's explanations and the t-SNE map."""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Sequence
from statistics import mean
from typing import TYPE_CHECKING, Any, ParamSpec

from shared.report.model import (
    MAX_SWEEP_TICKS,
    TIMELINE_FILE,
    TSNE_CAPTION,
    TSNE_FILE,
    Confusion,
    CurveFigure,
    LimeSection,
    ReportData,
    SweepPlot,
    TimelineBar,
    TsneSection,
    _even_sample,
    _extra_label,
    _is_failed,
    _is_number,
    _validate_matrix,
    family_title,
    figure_name,
    param_label,
    param_value,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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


#: Legend labels of a sweep plot's own series (its others are result extras)
SERIES_LABELS = {"val acc": "Valid acc", "test acc": "Test acc"}


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
        names.append(SERIES_LABELS.get(metric) or _extra_label(metric))
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
    from matplotlib.ticker import PercentFormatter

    ax.set_xlabel(param_label(plot.param))
    # every series is an accuracy (OOB scores too), in percent as the tables give them
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
    ax.set_ylabel("accuracy (dots: points, line: their mean)" if pooled else "accuracy")
    ax.grid(alpha=0.3)
    if handles:
        ax.legend(handles, names, fontsize=8)
    ax.set_title(
        f"{family_title(plot.family)}: accuracy against {param_label(plot.param)}", fontsize=10
    )
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


#: The families' own colours, the same in every report; another family takes the next
#: colour of :data:`TIMELINE_COLORS` that none of these has.
FAMILY_COLORS = {
    "preprocess": "C7",
    "cnn": "C0",
    "svm": "C1",
    "rf": "C2",
    "rf_shard": "C8",
    "report": "C4",
}


def timeline_colors(families: Sequence[str]) -> dict[str, str]:
    """family -> its bar colour: a known family's own, the others in order of appearance
    (never red: red marks failures)."""
    families = list(dict.fromkeys(families))
    spare = [c for c in TIMELINE_COLORS if c not in FAMILY_COLORS.values()]
    others = [f for f in families if f not in FAMILY_COLORS]
    return {f: FAMILY_COLORS.get(f) or spare[others.index(f) % len(spare)] for f in families}


#: The narrowest bar of the timeline, as a fraction of the campaign's span.
TIMELINE_MIN_WIDTH = 0.004


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
    # a unit of milliseconds in a campaign of minutes is wide enough to be seen (about
    # 3 px): drawn to scale, the preprocessing shards and reports were hairlines
    span = max((b.end for b in bars), default=0.0) - min((b.start for b in bars), default=0.0)
    narrowest = max(span * TIMELINE_MIN_WIDTH, 1e-3)
    for bar, lane in zip(bars, lanes, strict=True):
        group = groups.setdefault((lane, bar.family, _is_failed(bar.state)), [])
        group.append((bar.start, max(bar.end - bar.start, narrowest)))
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
    if handles:  # below the chart, where it covers no bar
        fig.legend(handles, families, fontsize=7, loc="outside lower center", ncols=6)
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
        shown = (SERIES_LABELS.get(name) or _extra_label(name) for name in plot.series)
        caption = (
            f"{family_title(plot.family)}: {', '.join(shown)} against {param_label(plot.param)}"
        )
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
