"""Reports of campaigns with hundreds of values per parameter stay readable: the
per-value best-point tables are cut like the experiments table, and a sweep plot of
named values ("scale" beside numbers) labels only as many ticks as fit."""

from __future__ import annotations

import re
from typing import Any

import pytest

from shared.report import (
    MAX_POINT_ROWS,
    MAX_SWEEP_TICKS,
    Experiment,
    ReportData,
    SweepPlot,
    param_value,
    render_html,
    render_markdown,
    sweep_png,
    table_csvs,
)
from tests.shared.test_report import CID, CLASSES, _point, _section, _table_rows

N_C = 250  # the audit's SVM grid: 250 values of C, each with two values of gamma
BEST_C = 138  # off the evenly spread rows (137 and 142 are on them): kept for being best


def _c(i: int) -> float:
    return (i + 1) / 4


def _grid_report() -> ReportData:
    """An SVM grid of 250 C values x {0.01, "scale"}, best at C index 138 with "scale"."""
    points = []
    for i in range(N_C):
        peak = 1 - abs(i - BEST_C) / N_C  # one hill over C, highest at BEST_C
        for gamma, level in ((0.01, 0.5), ("scale", 0.6)):
            key = f"{CID}/svm/c{i:03d}-{gamma}"
            points.append(_point(key, {"C": _c(i), "gamma": gamma}, level + 0.3 * peak))
    best = max(points, key=lambda p: p.rank)
    exp = Experiment("svm", f"SVM ({len(points)} points)", points, best.key)
    return ReportData(CID, "grid", "2024-05-01", CLASSES, [], [], {}, [], experiments=[exp])


def _per_value_block(text: str, label: str) -> str:
    """The "Best point per <label>" table of ``text`` and the lines under it, up to the
    next such table."""
    start = text.index(f"Best point per {label}:")
    end = text.find("Best point per ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_a_best_point_per_value_table_of_250_values_is_cut_and_says_so() -> None:
    data = _grid_report()
    md = render_markdown(data)
    block = _per_value_block(_section(md, "Experiments"), "C")
    rows = _table_rows(block)[1:]
    assert len(rows) == MAX_POINT_ROWS
    cs = [float(r[0].strip("*")) for r in rows]
    # in sweep order, from the first value to the last, with the best (bold) among them
    assert cs == sorted(cs) and cs[0] == _c(0) and cs[-1] == _c(N_C - 1)
    bold = [r for r in rows if r[0].startswith("**")]
    assert [float(r[0].strip("*")) for r in bold] == [_c(BEST_C)]
    assert bold[0][1:] == ["**scale**", "**90.000%**"]
    # evenly spread: no gap between neighbouring rows much wider than the even step
    step = (N_C - 1) / (MAX_POINT_ROWS - 1)
    gaps = [(b - a) * 4 for a, b in zip(cs, cs[1:], strict=False)]
    assert max(gaps) <= 2 * step
    left = N_C - MAX_POINT_ROWS
    assert (
        f"{MAX_POINT_ROWS} of the {N_C} values of C, evenly spread in sweep order with the "
        f"first, the last and the best among them; {left} more are left out here. "
        "Every point is in `experiments-svm.csv`."
    ) in block
    # the CSV the line names is written
    assert "experiments-svm.csv" in table_csvs(data)

    # two values of gamma: the whole table, and no such line
    gamma = _per_value_block(_section(md, "Experiments"), "gamma")
    assert len(_table_rows(gamma)) == 1 + 2 and "left out" not in gamma

    html = render_html(data, {})
    block = _per_value_block(html, "C")
    table = block[: block.index("</table>")]
    assert table.count("<tr") == 1 + MAX_POINT_ROWS  # header row + body rows
    assert f"{left} more are left out here." in block


def test_a_table_of_as_many_values_as_the_cap_is_whole() -> None:
    points = [
        _point(f"{CID}/svm/c{i:03d}-{g}", {"C": _c(i), "gamma": g}, 0.5 + i / 1000)
        for i in range(MAX_POINT_ROWS)
        for g in (0.01, 0.1)
    ]
    exp = Experiment("svm", "SVM", points, points[-1].key)
    data = ReportData(CID, "grid", "2024-05-01", CLASSES, [], [], {}, [], experiments=[exp])
    block = _per_value_block(_section(render_markdown(data), "Experiments"), "C")
    assert len(_table_rows(block)) == 1 + MAX_POINT_ROWS and "left out" not in block


def _sweep_axis(plot: SweepPlot, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The x axis of the sweep figure of ``plot``, as drawn."""
    import shared.report.figures as report

    figures = []
    save = report._png
    monkeypatch.setattr(report, "_png", lambda fig: figures.append(fig) or save(fig))
    sweep_png(plot)
    return figures[0].axes[0].xaxis


def _labels(axis: Any) -> list[str]:
    return [t.get_text() for t in axis.get_majorticklabels() if t.get_text()]


GAMMAS = [1e-6 * 1.5**i for i in range(38)]


def test_a_sweep_of_40_named_and_numeric_values_labels_at_most_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """svm-grid.toml mixes gamma "scale" with numbers: the axis is one of names, and 40 of
    them side by side were a smear. The labels shown keep the named values and the ends."""
    xs: list[Any] = [*GAMMAS[:7], "auto", *GAMMAS[7:20], "scale", *GAMMAS[20:]]
    plot = SweepPlot("s", "svm", "gamma", xs, {"val acc": [0.5 + i / 100 for i in range(40)]})
    axis = _sweep_axis(plot, monkeypatch)
    labels = _labels(axis)
    assert len(labels) <= MAX_SWEEP_TICKS
    first, last = param_value("gamma", GAMMAS[0]), param_value("gamma", GAMMAS[-1])
    assert {"scale", "auto", first, last} <= set(labels)
    # the labels in sweep order, and every value still has a tick mark
    assert labels == [param_value("gamma", x) for x in xs if param_value("gamma", x) in labels]
    ticks = {round(t) for t in [*axis.get_majorticklocs(), *axis.get_minorticklocs()]}
    assert ticks == set(range(len(xs)))


def test_a_sweep_of_named_values_only_labels_at_most_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """More names than the cap: an even choice of them, with both ends."""
    names = [f"kernel{i:02d}" for i in range(30)]
    plot = SweepPlot("s", "svm", "kernel", names, {"val acc": [0.5] * 30})
    labels = _labels(_sweep_axis(plot, monkeypatch))
    assert len(labels) <= MAX_SWEEP_TICKS and {names[0], names[-1]} <= set(labels)
    assert len({int(re.sub(r"\D", "", n)) for n in labels}) == len(labels)


def test_a_short_sweep_of_named_values_labels_every_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    xs: list[Any] = ["scale", 1e-6, 3e-6, 1e-5, 3e-5, 1e-4]  # campaigns/study/svm-grid.toml
    plot = SweepPlot("s", "svm", "gamma", xs, {"val acc": [0.5] * 6})
    assert _labels(_sweep_axis(plot, monkeypatch)) == [param_value("gamma", x) for x in xs]
