from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib import image as mpimg

from shared.metrics import majority_vote, mean_probabilities
from shared.report import (
    MAX_FAILED_LISTED,
    MAX_POINT_ROWS,
    MAX_UNIT_ROWS,
    SECTION_HEADINGS,
    BlendRow,
    Confusion,
    CurveFigure,
    Experiment,
    FamilyRow,
    LimeItem,
    LimeSection,
    PointRow,
    ReportData,
    SkippedInput,
    Submission,
    SweepPlot,
    TimelineBar,
    TsneSection,
    UnitSummary,
    confusion_png,
    param_value,
    render_html,
    render_markdown,
    swept_params,
    table_csvs,
    timeline_png,
    tsne_png,
    validation_line,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ("extra", "class_i", "class_ii")
BAD_ERROR = "ValueError: bad | value <script>alert('x')</script> " + "x" * 200
CID = "quick-1a2b3c"
OOB_NOTE = "`oob_score_` is inflated by augmented **siblings**."


def _unit(key: str, family: str, fold: int | None, state: str = "SUCCESS", **kw) -> UnitSummary:
    defaults = dict(
        params={},
        worker="w1@host",
        seconds=12.34,
        train_acc=0.9,
        val_acc=0.85,
        test_acc=0.84125,
        error=None,
    )
    defaults.update(kw)
    return UnitSummary(key=key, family=family, fold=fold, state=state, **defaults)


def _point(key: str, params: dict, val: float | None, **kw) -> PointRow:
    defaults = dict(
        units=1,
        succeeded=1,
        train_acc=0.95,
        val_acc=val,
        val_spread=None,
        test_acc=None if val is None else val - 0.05,
        seconds=3.0,
        extras={},
    )
    defaults.update(kw)
    return PointRow(key=key, params=params, **defaults)


def _curve(slope: float) -> dict[str, list[tuple[int, float]]]:
    return {
        "train_acc": [(e, 0.5 + slope * e) for e in range(4)],
        "val_acc": [(e, 0.45 + slope * e) for e in range(4)],
        "train_loss": [(e, 1.0 - 0.2 * e) for e in range(4)],
        "val_loss": [(e, 1.1 - 0.15 * e) for e in range(4)],
    }


def _tsne(classes: tuple[str, ...] = CLASSES, per_class: int = 20) -> TsneSection:
    """A map of well-apart classes, as t-SNE draws fold 0's training images."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(classes)), per_class)
    xy = rng.normal(size=(len(labels), 2)) + 8.0 * labels[:, None]
    return TsneSection(
        unit_key=f"{CID}/svm/aa1/f0",
        variant="polar192",
        n_components=50,
        available=300,
        xy=xy,
        labels=labels,
        perplexity=19.667,
        seed=0,
    )


def _lime_item(label: str) -> LimeItem:
    image = np.full((16, 16, 3), 120, dtype=np.uint8)
    overlay = image.copy()
    overlay[4:12, 4:12] = (60, 200, 60)
    return LimeItem(f"t-{label}.jpg", label, label, 0.9, image, overlay)


@pytest.fixture
def data() -> ReportData:
    cnn_params = [
        {"lr": 0.02, "norm_order": order, "activation": "prelu", "epochs": 3}
        for order in ("act_bn", "bn_act")
    ]
    units = [
        _unit(f"{CID}/cnn/p{j}/f{i}", "cnn", i, params=cnn_params[j])
        for j in range(2)
        for i in range(3)
    ]
    units += [
        _unit(f"{CID}/svm/aa{i}/f0", "svm", 0, params={"C": 10.0 * (i + 1), "gamma": 0.01})
        for i in range(2)
    ]
    units += [
        _unit(f"{CID}/rf/bb0/f0", "rf", 0, params={"n_estimators": 200, "max_depth": 8}),
        _unit(
            f"{CID}/rf/bb1/f0",
            "rf",
            0,
            state="FAILED",
            params={"n_estimators": 400, "max_depth": None},
            seconds=None,
            train_acc=None,
            val_acc=None,
            test_acc=None,
            error=BAD_ERROR,
        ),
    ]
    families = [
        FamilyRow("cnn", units[0].key, cnn_params[0], 6, 6, 0.95, 0.9, 0.84125, 245.0),
        FamilyRow("svm", units[7].key, {"C": 20.0, "gamma": 0.01}, 2, 2, 0.9, 0.8, 0.79, 3.5),
        FamilyRow("rf", units[8].key, {"n_estimators": 200}, 2, 1, 1.0, 0.75, 0.7125, 12.34),
    ]
    experiments = [
        Experiment(
            "cnn",
            "CNN (2 points, 3 folds each)",
            [
                _point(
                    f"{CID}/cnn/p0",
                    cnn_params[0],
                    0.84125,
                    units=3,
                    succeeded=3,
                    val_spread=0.01,
                    extras={"epochs": 3.0},
                ),
                _point(
                    f"{CID}/cnn/p1",
                    cnn_params[1],
                    0.83125,
                    units=3,
                    succeeded=3,
                    val_spread=0.02,
                    extras={"epochs": 3.0},
                ),
            ],
            best_key=f"{CID}/cnn/p0",
        ),
        Experiment(
            "svm",
            "SVM (2 points, 1 fold each)",
            [
                _point(f"{CID}/svm/aa0", {"n_components": 100, "C": 10.0, "gamma": 0.01}, 0.69),
                _point(f"{CID}/svm/aa1", {"n_components": 100, "C": 20.0, "gamma": 0.01}, 0.6975),
            ],
            best_key=f"{CID}/svm/aa1",
        ),
        Experiment(
            "rf",
            "RF (2 points, 1 fold each)",
            [
                _point(
                    f"{CID}/rf/bb0",
                    {"variant": "resize128", "augment": "rotate_flip", "n_estimators": 200},
                    0.61,
                    extras={
                        "oob_score": 0.8065,
                        "oob_grouped": 0.6012,
                        "oob_grouped_coverage": 0.25,
                        "train_seconds": 240.0,
                    },
                ),
                _point(
                    f"{CID}/rf/bb1",
                    {"variant": "resize128", "augment": "none", "n_estimators": 400},
                    None,
                    succeeded=0,
                    train_acc=None,
                    test_acc=None,
                    seconds=None,
                ),
            ],
            best_key=f"{CID}/rf/bb0",
            note=OOB_NOTE,
        ),
    ]
    blends = [
        BlendRow(
            "CNN 3-fold vote",
            "cnn",
            "vote",
            3,
            0.86,
            0.84,
            "ties by mean probability",
            300,
            test_images=100,
            test_ci=(0.7786, 0.9147),
        ),
        BlendRow(
            "CNN 3-fold mean",
            "cnn",
            "mean",
            3,
            0.87,
            0.85,
            "",
            300,
            test_images=100,
            test_ci=(0.7902, 0.9224),
        ),
        BlendRow(
            "SVM best point",
            "svm",
            "single",
            1,
            0.9,
            0.79,
            "",
            300,
            test_images=100,
            test_ci=(0.8256, 0.9448),
        ),
        BlendRow(
            "CNN + SVM vote",
            "cnn+svm",
            "vote",
            2,
            0.85,
            0.8,
            "ties go to CNN",
            300,
            test_images=100,
            test_ci=(0.7672, 0.9069),
        ),
        BlendRow(
            "CNN + SVM mean", "cnn+svm", "mean", 2, None, None, "n/a: SVM predicts labels only"
        ),
    ]
    confusions = {
        "cnn": Confusion("CNN 3-fold vote (test)", [[30, 2, 1], [3, 25, 4], [0, 5, 30]], "test"),
        "svm": Confusion("SVM best point (test)", [[28, 4, 1], [5, 22, 5], [1, 6, 28]], "test"),
        "rf": Confusion("RF best point (val)", [[0, 0, 0], [0, 0, 0], [0, 0, 0]], "val"),
    }
    timeline = [
        TimelineBar(f"{CID}/preprocess/s00000", "preprocess", "cpu@h", 0.0, 2.0, "SUCCESS", 1.5),
        *(
            TimelineBar(
                u.key,
                u.family,
                "gpu@h" if u.family == "cnn" else "cpu@h",
                2.0 + i,
                4.0 + i,
                u.state,
                u.seconds,
            )
            for i, u in enumerate(units)
        ),
        TimelineBar(f"{CID}/rf_shard/cc0/f0", "rf_shard", "cpu@h", 3.0, 5.0, "SUCCESS", 2.0),
    ]
    return ReportData(
        campaign_id=CID,
        campaign_name="Quick | test",
        created_at="2024-05-01T12:00:00+00:00",
        classes=CLASSES,
        families=families,
        blends=blends,
        confusions=confusions,
        units=units,
        experiments=experiments,
        curves=[
            CurveFigure(
                "cnn-p0",
                "CNN order=R → B (best point)",
                {f"fold {i}": _curve(0.05 + 0.01 * i) for i in range(3)},
            ),
            CurveFigure(
                "cnn-norm_order-val",
                "CNN: validation by norm_order",
                {"R → B": _curve(0.06), "B → R": _curve(0.04)},
            ),
        ],
        sweeps=[
            SweepPlot("svm-c", "svm", "C", [10.0, 20.0], {"val acc": [0.69, 0.6975]}),
            SweepPlot(
                "rf-augment",
                "rf",
                "augment",
                ["rotate_flip"],
                {"val acc": [0.61], "oob_score": [0.8065]},
            ),
        ],
        best_blend="CNN 3-fold mean",
        timeline=timeline,
        lime=LimeSection("cnn", f"{CID}/cnn/p0/f1", 30, [_lime_item(c) for c in CLASSES]),
        tsne=_tsne(),
        skipped=[SkippedInput("bad.jpg", "/data/test/bad.jpg", "truncated JPEG", "test")],
        submission=Submission("CNN 3-fold mean", [("t1.jpg", "extra"), ("t2.jpg", "class_ii")], 1),
        test_labelled=True,
    )


def _section(md: str, heading: str) -> str:
    start = md.index(f"\n## {heading}\n")
    nxt = md.find("\n## ", start + 1)
    return md[start : nxt if nxt != -1 else len(md)]


def _table_rows(section: str) -> list[list[str]]:
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", r)[1:-1]] for r in rows]


EXPECTED_FILES = {
    "report.md",
    "report.html",
    "report.json",
    "submission.csv",
    "timeline.png",
    "lime-cnn.png",
    "curve-cnn-p0.png",
    "curve-cnn-norm_order-val.png",
    "sweep-svm-c.png",
    "sweep-rf-augment.png",
    "tsne-svm.png",
} | {f"confusion-{s}.png" for s in ("cnn", "svm", "rf")}


def test_write_report_creates_all_files(data: ReportData, tmp_path: Path) -> None:
    out = tmp_path / "report"
    files = write_report(data, out)
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES  # no temp files left behind
    assert files.markdown.path == out / "report.md"
    assert files.html.path == out / "report.html"
    assert files.json.path == out / "report.json"
    assert set(files.figures) == {n for n in EXPECTED_FILES if n.endswith(".png")}
    for written in [files.markdown, files.html, files.json, *files.figures.values()]:
        assert written.path.is_file()
        assert written.size == written.path.stat().st_size > 0
        assert len(written.sha256) == 64
    for written in files.figures.values():
        assert written.path.read_bytes().startswith(PNG_SIGNATURE)
    assert files.submission is not None
    assert files.submission.path.read_text() == "image_id,label\nt1.jpg,extra\nt2.jpg,class_ii\n"


def test_sections_in_order(data: ReportData) -> None:
    md = render_markdown(data)
    headings = re.findall(r"^## (.+)$", md, flags=re.M)
    assert headings == list(SECTION_HEADINGS)
    ok = dataclasses.replace(data, units=[u for u in data.units if u.state == "SUCCESS"])
    assert re.findall(r"^## (.+)$", render_markdown(ok), flags=re.M) == list(SECTION_HEADINGS[:-1])


@pytest.mark.parametrize(
    "created",
    ["2026-11-28T04:49:47", "2026-11-28T04:49:47+00:00", "2026-11-28T05:49:47+01:00"],
)
def test_created_is_printed_in_utc(data: ReportData, created: str) -> None:
    # SQLite hands the time back naive, PostgreSQL with its offset: both print the same
    md = render_markdown(dataclasses.replace(data, created_at=created))
    assert "- Created: 2026-11-28 04:49:47 UTC\n" in md


def test_family_fit_time_says_it_is_the_total(data: ReportData) -> None:
    fam = _section(render_markdown(data), "Model families")
    header = _table_rows(fam)[0]
    assert header[1] == "Best unit" and header[-1] == "Total fit time"
    assert "Best unit is that point's fold with the highest validation accuracy" in fam
    assert "(ties go to the lowest fold)" in fam
    # its accuracies are the folds' mean, not a blend's: said, as the Blending table differs
    assert "Test acc each fold's model alone: the Blending table has the folds' vote" in fam
    assert '<th class="num">Total fit time</th>' in render_html(data, {})


def test_a_family_with_nothing_finished_has_no_fit_time_and_its_sweep_says_why(
    data: ReportData,
) -> None:
    """Every unit of a family failed: its time is not known, not 0.0 s; and a sweep
    with no point to plot is not "no swept parameters"."""
    families = [
        dataclasses.replace(f, succeeded=0, fit_seconds=0.0, best_key="", params={})
        for f in data.families
    ]
    md = render_markdown(dataclasses.replace(data, families=families, sweeps=[]))
    rows = _table_rows(_section(md, "Model families"))[1:]
    assert rows and all(row[-1] == "—" for row in rows), rows
    assert "_No point of a sweep succeeded._" in _section(md, "Sweep plots")
    alone = [dataclasses.replace(e, points=e.points[:1]) for e in data.experiments]
    md = render_markdown(dataclasses.replace(data, experiments=alone, sweeps=[]))
    assert "_No swept parameters._" in _section(md, "Sweep plots")


def test_reused_units_are_marked(data: ReportData) -> None:
    source = "quick-0ld/cnn/p0/f0"
    units = [dataclasses.replace(data.units[0], reused_from=source), *data.units[1:]]
    families = [dataclasses.replace(data.families[0], reused=1), *data.families[1:]]
    md = render_markdown(dataclasses.replace(data, units=units, families=families))
    assert "Units: 10 model units (1 failed, 1 reused from earlier campaigns)" in md
    assert "| 6/6 (1 reused) |" in _section(md, "Model families")
    assert "reused units left out." in _section(md, "Model families")
    table = _table_rows(_section(md, "Units"))
    assert table[0][-1] == "Reused from"
    assert table[1][-1] == f"`{source}`" and table[2][-1] == "—"
    assert "1 unit was reused from earlier campaigns" in _section(md, "Units")
    eff = _section(md, "Efficiency")
    assert "1 model unit was reused from earlier campaigns (their fit time there: 12.3 s" in eff
    assert "not counted below" in eff


def test_family_and_unit_tables(data: ReportData) -> None:
    md = render_markdown(data)
    assert md.startswith("# orchard report — Quick | test\n")
    assert CID in md
    fam = _section(md, "Model families")
    assert (
        "| Family | Best unit | Params | Units (ok/total) | Train acc | Val acc | Test acc" in fam
    )
    assert f"\n| cnn | `{CID}/cnn/" in fam
    rows = _table_rows(fam)[1:]
    assert [r[0] for r in rows] == ["cnn", "svm", "rf"]
    assert "84.125%" in rows[0] and "95.000%" in rows[0] and "4 min 05 s" in rows[0]
    assert rows[2][3] == "1/2"
    assert "C=20, gamma=0.01" in rows[1]
    pcts = re.findall(r"\d+\.\d+%", fam)
    assert pcts and all(re.fullmatch(r"\d{1,3}\.\d{3}%", p) for p in pcts)

    units = _section(md, "Units")
    assert units.count(f"`{CID}/") == 10
    failed_row = next(line for line in units.splitlines() if "rf/bb1" in line)
    assert "bad \\| value" in failed_row
    assert "\\<script>" in failed_row  # no raw HTML in the Markdown table
    assert "x" * 200 not in failed_row  # truncated
    for line in units.splitlines():  # escaped pipes don't split cells
        if line.startswith("|"):
            assert len(re.split(r"(?<!\\)\|", line)) == 12


def test_experiment_tables_show_swept_params_like_the_study(data: ReportData) -> None:
    exp = _section(render_markdown(data), "Experiments")
    cnn = exp[exp.index("### CNN") : exp.index("### SVM")]
    header, best, other = _table_rows(cnn)
    # only the swept parameter gets a column, labelled and valued as the study does
    assert header[:2] == ["Order", "Folds"]
    assert header[2:5] == ["Train acc", "Valid acc", "Test acc"]
    assert "Training time / fold" in header and "Epochs" in header
    assert best[0] == "**R → B**" and other[0] == "B → R"
    assert best[3] == "**84.125% ± 1.0 pp**" and other[3] == "83.125% ± 2.0 pp"
    assert "± its standard deviation in percentage points (pp)" in cnn
    assert "Fixed: `activation=prelu, epochs=3, lr=0.02`" in cnn
    assert "B = BatchNorm, R = the activation" in cnn

    svm = exp[exp.index("### SVM") : exp.index("### RF")]
    header, first, best = _table_rows(svm)
    assert header[0] == "C" and "n_component" not in header  # n_components is not swept
    assert first[0] == "10" and best[0] == "**20**" and best[3] == "**69.750%**"

    rf = exp[exp.index("### RF") :]
    header, best, failed = _table_rows(rf)
    assert header[:2] == ["method", "n_estimators"]
    assert "oob_score_" in header and "Grouped OOB" in header
    # the unit's time and the trees' fit time, each named, each explained
    assert "Unit time" in header and "Tree fit time" in header and "Training time" not in header
    assert "Train seconds" not in header and "Oob grouped coverage" not in header
    assert "Grouped OOB coverage" in header
    assert "Tree fit time only fitting the transform and the trees" in rf
    assert "Grouped OOB coverage: the share of training rows" in rf
    assert best[0] == "**resize 128 rotate, flip**" and failed[0] == "resize 128"
    assert "**0.8065**" in best and "**0.6012**" in best and "**4 min 00 s**" in best
    assert "**0.2500**" in best
    assert failed[2] == "0/1"  # the failed point is marked
    assert "> `oob_score_` is inflated by augmented **siblings**." in rf


def test_published_figures_stand_beside_the_run_s_own(data: ReportData) -> None:
    cnn, svm, rf = data.experiments
    experiments = [
        dataclasses.replace(
            cnn,
            points=[
                dataclasses.replace(cnn.points[0], published={"val_acc": 0.84125}),
                cnn.points[1],  # no figure for this point: a dash
            ],
        ),
        svm,  # none at all: no column, no note
        dataclasses.replace(
            rf,
            points=[
                dataclasses.replace(
                    rf.points[0], published={"train_acc": 1.0, "oob_score": 0.8235}
                ),
                *rf.points[1:],
            ],
        ),
    ]
    published = dataclasses.replace(data, experiments=experiments, published_in="the study, 1.3.1")
    exp = _section(render_markdown(published), "Experiments")
    header, best, other = _table_rows(exp[exp.index("### CNN") : exp.index("### SVM")])
    at = header.index("Valid acc")
    assert header[at + 1] == "Published valid acc"
    assert best[at + 1] == "**84.125%**" and other[at + 1] == "—"
    assert (
        "Published: figures for these points from the study, 1.3.1, as the campaign's "
        "`[[report.published]]` quotes them, beside this run's;" in exp
    )
    svm_table = exp[exp.index("### SVM") : exp.index("### RF")]
    assert "Published" not in svm_table
    header, best, failed = _table_rows(exp[exp.index("### RF") :])
    train, oob = header.index("Train acc"), header.index("oob_score_")
    assert header[train + 1] == "Published train acc" and best[train + 1] == "**100.000%**"
    assert header[oob + 1] == "Published oob_score_" and best[oob + 1] == "**0.8235**"
    assert failed[oob + 1] == "—"
    assert "Published: figures for these points from the study, 1.3.1," in exp.split("### RF")[1]
    html = render_html(published, {})
    assert ">Published valid acc</th>" in html and "84.125%" in html
    assert json.loads(json.dumps(dataclasses.asdict(published.experiments[0].points[0])))[
        "published"
    ] == {"val_acc": 0.84125}
    # a sweep past the table's rows: the figures are in its CSV too
    n = MAX_POINT_ROWS + 1
    points = [
        _point(
            f"{CID}/svm/p{i:04d}",
            {"C": float(i)},
            0.5,
            published={"val_acc": i / n} if i % 2 else {},
        )
        for i in range(n)
    ]
    big = Experiment("svm", "SVM", points, points[0].key)
    lines = table_csvs(dataclasses.replace(data, experiments=[big]))["experiments-svm.csv"]
    header_line, first, second = lines.splitlines()[:3]
    assert header_line.endswith(",seconds,published_val_acc,best")
    assert first.endswith(",,1") and second.endswith(f",{1 / n!r},0")


def test_single_point_family_gets_a_one_row_table(data: ReportData) -> None:
    single = Experiment("svm", "SVM (1 point)", [_point("c/svm/x", {"C": 1.5}, 0.7)], "c/svm/x")
    md = render_markdown(dataclasses.replace(data, experiments=[single]))
    rows = _table_rows(_section(md, "Experiments"))
    assert rows[0][0] == "Point" and rows[1][0] == "**x**"
    assert "Fixed: `C=1.5`" in _section(md, "Experiments")


def test_param_labels_and_values() -> None:
    assert param_value("norm_order", "bn_act") == "B → R"
    assert param_value("activation", "leakyrelu") == "LeakyReLU"
    assert param_value("pool", "conv") == "Conv2d with stride=2"
    assert param_value("optimizer", "adam") == "Adam"
    assert param_value("variant", "polar192") == "polarized 192"
    assert param_value("gamma", "scale") == "scale"
    assert param_value("max_depth", None) == "None"
    points = [
        _point("a", {"C": 1.0, "g": "scale"}, 0.5),
        _point("b", {"C": 2.0, "g": "scale"}, 0.6),
    ]
    assert swept_params(points) == ["C"]


def test_blending_section_bolds_the_best_and_says_na(data: ReportData) -> None:
    blend = _section(render_markdown(data), "Blending")
    assert (
        "| Blend | Method | Members | Test acc | Test 95% CI | OOF val acc | OOF images | Note |"
        in blend
    )
    assert (
        "| CNN 3-fold vote | vote | 3 | 86.000% | 77.9–91.5% | 84.000% | 300 | ties by mean "
        "probability |" in blend
    )
    assert "| **CNN 3-fold mean** | **mean** | **3** | **87.000%** |" in blend
    assert (
        "| CNN + SVM mean | mean | 2 | n/a | — | n/a | — | n/a: SVM predicts labels only |" in blend
    )
    assert (
        "| CNN + SVM vote | vote | 2 | 85.000% | 76.7–90.7% | 80.000% | 300 | ties go to CNN |"
        in blend
    )
    assert (
        "Bold: the best by out-of-fold validation accuracy, **CNN 3-fold mean**, "
        "whose test accuracy is 87.000%." in blend
    )
    assert "Best blend by test accuracy" not in blend
    # a test set without labels: its accuracies are missing, not "n/a" as for a blend
    # that cannot be made, whatever its note says
    unlabelled = [
        dataclasses.replace(b, test_acc=None, test_images=None, test_ci=None) for b in data.blends
    ]
    blend = _section(render_markdown(dataclasses.replace(data, blends=unlabelled)), "Blending")
    assert "| CNN + SVM vote | vote | 2 | — | — | 80.000% | 300 | ties go to CNN |" in blend
    assert (
        "| CNN + SVM mean | mean | 2 | n/a | — | n/a | — | n/a: SVM predicts labels only |" in blend
    )
    assert "Wilson" not in blend  # no interval, no word of one


def test_the_blending_note_says_what_the_test_interval_is(data: ReportData) -> None:
    """Each test accuracy has its interval; the note names the images it is over, once
    when every blend predicted as many, else in general."""
    blend = _section(render_markdown(data), "Blending")
    assert (
        "Test 95% CI is the Wilson interval of the test accuracy over its 100 labelled test images"
        in blend
    )
    fewer = [
        dataclasses.replace(b, test_images=80) if b.method == "single" else b for b in data.blends
    ]
    blend = _section(render_markdown(dataclasses.replace(data, blends=fewer)), "Blending")
    assert "over the labelled test images each blend predicted:" in blend


def test_the_blending_note_says_a_best_picked_on_its_own_images_is_optimistic(
    data: ReportData,
) -> None:
    """The best CNN point was picked among two on the folds' held-out images, which its
    OOF accuracy is over; a family of one point was picked among nothing. The single
    model's sentence comes only with a single model's row."""
    blend = _section(render_markdown(data), "Blending")
    assert (
        "Its best point was picked among 2 on these same held-out images, so its OOF val acc "
        "is optimistic by that choice; the test accuracy is not." in blend
    )
    assert "A single model is a best point trained once: nothing is blended." in blend
    (cnn,) = [e for e in data.experiments if e.family == "cnn"]
    one = dataclasses.replace(cnn, points=cnn.points[:1])
    no_single = [b for b in data.blends if b.method != "single"]
    others = [e for e in data.experiments if e.family != "cnn"]
    blend = _section(
        render_markdown(dataclasses.replace(data, experiments=[one, *others], blends=no_single)),
        "Blending",
    )
    assert "picked among" not in blend and "A single model" not in blend


def test_a_blend_s_published_figures_stand_beside_its_own(data: ReportData) -> None:
    """The study's 1.4: its five folds' vote on the test set, beside the run's vote."""
    blends = [dataclasses.replace(data.blends[0], published={"test_acc": 0.800625})]
    blends += data.blends[1:]
    blend = _section(
        render_markdown(dataclasses.replace(data, blends=blends, published_in="the study, 1.4")),
        "Blending",
    )
    assert (
        "| Blend | Method | Members | Test acc | Test 95% CI | Published test acc | OOF val acc "
        "| OOF images | Note |" in blend
    )
    assert (
        f"| CNN 3-fold vote | vote | 3 | 86.000% | 77.9–91.5% | {0.800625 * 100:.3f}% | "
        "84.000% | 300 | ties by mean probability |" in blend
    )
    assert "| **CNN 3-fold mean** | **mean** | **3** | **87.000%** | **79.0–92.2%** | — |" in blend
    assert "Published: figures for these blends from the study, 1.4, as the campaign's" in blend
    both = [dataclasses.replace(blends[0], published={"test_acc": 0.8, "val_acc": 0.81})]
    blend = _section(
        render_markdown(dataclasses.replace(data, blends=both + blends[1:])), "Blending"
    )
    assert (
        "| Test acc | Test 95% CI | Published test acc | OOF val acc | Published OOF val acc "
        "| OOF images |" in blend
    )
    assert "| 86.000% | 77.9–91.5% | 80.000% | 84.000% | 81.000% | 300 |" in blend
    assert "Published: figures for these blends as the campaign's" in blend
    assert "Published" not in _section(render_markdown(data), "Blending")


def test_blends_compared_on_the_images_all_of_them_cover_say_so(data: ReportData) -> None:
    compared = dataclasses.replace(
        data, best_compared_on=60, best_compared_acc=0.9, best_tied_with=["SVM best point"]
    )
    md = render_markdown(compared)
    assert (
        "- Best model: **CNN 3-fold mean** (a mean of 3, chosen by out-of-fold validation "
        "accuracy on the 60 images that every blend predicted; OOF val acc 90.000% on them, "
        "85.000% on its own 300, test acc 87.000%)" in md
    )
    blend = _section(md, "Blending")
    assert (
        "Bold: the best by out-of-fold validation accuracy on the 60 images that every "
        "blend predicted, **CNN 3-fold mean** (90.000% on them), whose test accuracy is "
        "87.000%; as good by that measure: SVM best point (the first row is taken)." in blend
    )
    # the best's own images are those compared on: its accuracy once
    own = dataclasses.replace(compared, best_compared_on=300, best_compared_acc=0.85)
    md = render_markdown(own)
    assert "that every blend predicted; OOF val acc 85.000%, test acc 87.000%)" in md
    assert "**CNN 3-fold mean**, whose test accuracy" in md


def test_figure_sections_link_their_pngs(data: ReportData) -> None:
    md = render_markdown(data)
    curves = _section(md, "Learning curves")
    assert "(curve-cnn-p0.png)" in curves and "(curve-cnn-norm_order-val.png)" in curves
    sweeps = _section(md, "Sweep plots")
    assert "(sweep-svm-c.png)" in sweeps and "(sweep-rf-augment.png)" in sweeps
    conf = _section(md, "Confusion matrices")
    assert "![CNN 3-fold vote (test)](confusion-cnn.png)" in conf
    assert conf.count("![") == 3
    lime = _section(md, "Explanations (LIME)")
    assert "(lime-cnn.png)" in lime and f"`{CID}/cnn/p0/f1`" in lime and "green" in lime
    assert len(_table_rows(lime)) == 1 + 3  # header, one image per class


def test_efficiency_section_and_timeline(data: ReportData) -> None:
    eff = _section(render_markdown(data), "Efficiency")
    assert "Campaign wall time" in eff and "in parallel" in eff
    fams = eff[eff.index("### Per family") : eff.index("### Per worker")]
    assert [r[0] for r in _table_rows(fams)[1:]] == ["preprocess", "cnn", "svm", "rf", "rf_shard"]
    cnn = next(r for r in _table_rows(fams) if r[0] == "cnn")
    assert cnn[1] == "6" and cnn[2] == "1 min 14 s" and cnn[3] == "12.3 s"
    workers = eff[eff.index("### Per worker") :]
    assert [r[0] for r in _table_rows(workers)[1:]] == ["`cpu@h`", "`gpu@h`"]
    # the columns' words are said under each table
    assert "Span: the family's first unit started to its last finished." in fams
    assert "Busy: the worker's units start to finish, added up;" in workers
    assert "(timeline.png)" in eff
    png = timeline_png(data.timeline)
    assert png.startswith(PNG_SIGNATURE)
    img = mpimg.imread(io.BytesIO(png), format="png")
    assert img.std() > 0


def test_submission_and_skipped_inputs_sections(data: ReportData) -> None:
    md = render_markdown(data)
    sub = _section(md, "Submission")
    assert "`submission.csv`: 2 test images" in sub and "**CNN 3-fold mean**" in sub
    assert "1 test images have no prediction" in sub
    skipped = _section(md, "Skipped inputs")
    assert "| `bad.jpg` | test | `/data/test/bad.jpg` | truncated JPEG |" in skipped
    none = dataclasses.replace(data, skipped=[], submission=None)
    md = render_markdown(none)
    assert "No input was skipped." in _section(md, "Skipped inputs")
    assert "the test set is labelled" in _section(md, "Submission")


def test_failed_units_section(data: ReportData) -> None:
    failed = _section(render_markdown(data), "Failed units")
    assert f"{CID}/rf/bb1" in failed
    assert "FAILED" in failed
    assert "alert('x')" in failed
    assert f"{CID}/rf/bb0" not in failed


def test_empty_report_says_so() -> None:
    empty = ReportData(
        CID, "empty", "2024-05-01", CLASSES, [], [], {}, [], lime_note="LIME is off."
    )
    md = render_markdown(empty)
    assert "_No model families._" in md and "_No blends._" in md and "_LIME is off._" in md
    assert "_No unit has run yet._" in md
    assert "data:image" not in render_html(empty, {})


def test_html_self_contained_and_escaped(data: ReportData, tmp_path: Path) -> None:
    files = write_report(data, tmp_path)
    html = files.html.path.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert "http://" not in html and "https://" not in html
    # nothing fetched: data: URIs, and links within the page (its contents)
    assert not re.search(r"""(?:src|href)\s*=\s*(?!["']?(?:data:|#))""", html, flags=re.I)
    assert "url(" not in html and "@import" not in html
    assert "<script" not in html
    assert "&lt;script&gt;" in html
    assert "<style>" in html

    srcs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(srcs) == len([n for n in EXPECTED_FILES if n.endswith(".png")])
    pngs = {base64.b64decode(s) for s in srcs}
    assert {f.path.read_bytes() for f in files.figures.values()} == pngs

    for heading in SECTION_HEADINGS:
        assert re.search(f'<h2 id="section-[a-z0-9-]+">{re.escape(heading)}</h2>', html), heading
    assert "84.125%" in html
    assert 'class="failed"' in html and 'class="best"' in html
    assert "Quick | test" in html
    assert "<blockquote><p><code>oob_score_</code> is inflated by augmented " in html


def test_html_contents_link_every_section_once(data: ReportData) -> None:
    """The page opens with its sections' names, each a link to its heading."""
    html = render_html(data, {})
    nav = html.split('<nav class="contents"', 1)[1].split("</nav>", 1)[0]
    links = re.findall(r'<a href="#([a-z0-9-]+)">([^<]+)</a>', nav)
    headings = re.findall(r'<h2 id="([a-z0-9-]+)">([^<]+)</h2>', html)
    assert links == headings and len(headings) >= len(SECTION_HEADINGS)
    assert len({anchor for anchor, _ in links}) == len(links)
    assert ("section-blending", "Blending") in links
    # no id of a figure's is a section's
    figures = set(re.findall(r'<figure id="([^"]+)"', render_html(data, {"timeline.png": b""})))
    assert figures and not figures & {anchor for anchor, _ in links}


def test_section_ids_of_a_repeated_or_wordless_heading_differ() -> None:
    from shared.report.document import Heading
    from shared.report.render import section_ids

    blocks = [Heading(2, "Units"), Heading(3, "Units"), Heading(2, "Units"), Heading(2, "…")]
    assert section_ids(blocks) == {0: "section-units", 2: "section-units-2", 3: "section-x"}


def test_html_without_figure_uses_placeholder(data: ReportData) -> None:
    html = render_html(data, {})
    assert "data:image/png" not in html
    assert html.count("Figure not rendered.") == len(
        [n for n in EXPECTED_FILES if n.endswith(".png")]
    )


def test_confusion_png_deterministic_and_decodable(data: ReportData) -> None:
    conf = data.confusions["cnn"]
    a = confusion_png(conf, CLASSES)
    assert a == confusion_png(conf, CLASSES)
    assert a.startswith(PNG_SIGNATURE)
    img = mpimg.imread(io.BytesIO(a), format="png")
    h, w = img.shape[:2]
    assert 300 <= h <= 600 and 300 <= w <= 600
    assert img.std() > 0  # not blank
    assert confusion_png(data.confusions["svm"], CLASSES) != a


def test_confusion_png_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError):
        confusion_png(Confusion("bad", [[1, 2], [3, 4]], "test"), CLASSES)


def test_report_json_round_trips(data: ReportData, tmp_path: Path) -> None:
    files = write_report(data, tmp_path)
    loaded = json.loads(files.json.path.read_text(encoding="utf-8"))
    assert loaded["campaign_id"] == CID
    assert [f["family"] for f in loaded["families"]] == ["cnn", "svm", "rf"]
    assert loaded["classes"] == list(CLASSES)
    assert loaded["confusions"]["cnn"]["matrix"][0] == [30, 2, 1]
    assert len(loaded["units"]) == 10
    assert loaded["units"][-1]["error"] == BAD_ERROR
    assert loaded["best_blend"] == "CNN 3-fold mean"
    assert loaded["experiments"][2]["points"][0]["extras"]["oob_score"] == 0.8065
    assert loaded["lime"]["items"][0]["overlay"] == [16, 16, 3]  # images stay out of the JSON
    assert loaded["tsne"]["xy"] == [60, 2] and loaded["tsne"]["labels"] == [60]  # so do points
    assert loaded["tsne"]["unit_key"] == f"{CID}/svm/aa1/f0"
    assert loaded["tsne"]["n_components"] == 50
    assert loaded["submission"]["rows"][0] == ["t1.jpg", "extra"]
    assert list(loaded) == sorted(loaded)


@pytest.mark.parametrize("slug", ["", "CNN", "../x", "a/b", "-cnn", "cnn.png", "c n"])
def test_invalid_slug_raises(data: ReportData, tmp_path: Path, slug: str) -> None:
    bad = dataclasses.replace(data, confusions={**data.confusions, slug: data.confusions["cnn"]})
    with pytest.raises(ValueError):
        write_report(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written before validation


# --------------------------------------------------------------------------- blend metrics


def test_mean_probabilities_averages_members() -> None:
    probs = np.array(
        [
            [[0.6, 0.4, 0.0], [0.1, 0.2, 0.7]],
            [[0.1, 0.9, 0.0], [0.2, 0.5, 0.3]],
        ]
    )
    # sample 0: vote would tie (0 vs 1); the mean says 1. sample 1: mean [.15, .35, .5] -> 2
    assert mean_probabilities(probs).tolist() == [1, 2]
    assert mean_probabilities(np.zeros((2, 0, 3))).tolist() == []
    with pytest.raises(ValueError):
        mean_probabilities(np.zeros((2, 3)))


def test_majority_vote_tie_break_by_scores_among_the_tied_only() -> None:
    preds = np.array([[0, 1, 2], [2, 1, 0]])  # samples 0 and 2 tie (0 vs 2)
    scores = np.array([[0.2, 0.5, 0.3], [0.1, 0.8, 0.1], [0.45, 0.1, 0.45]])
    # sample 0: class 1 scores highest but got no vote: 2 beats 0; sample 2: equal
    # scores, the lowest class; scores settle ties before a referee
    assert majority_vote(preds, 3, tie_scores=scores).tolist() == [2, 1, 0]
    assert majority_vote(preds, 3, np.array([0, 1, 2]), scores).tolist() == [2, 1, 0]
    three = np.array([[0, 1], [0, 1], [1, 2], [1, 2], [2, 0]])  # 2-2-1: 0 vs 1, 1 vs 2
    assert majority_vote(three, 3, tie_scores=np.array([[0.3, 0.4, 0.3]] * 2)).tolist() == [1, 1]
    with pytest.raises(ValueError, match="tie_scores"):
        majority_vote(preds, 3, tie_scores=np.zeros((3, 2)))


def test_majority_vote_tie_break_by_a_referee() -> None:
    preds = np.array([[0, 1, 2], [2, 1, 0]])
    assert majority_vote(preds, 3).tolist() == [0, 1, 0]  # ties to the lowest class
    assert majority_vote(preds, 3, tie_break=np.array([2, 1, 2])).tolist() == [2, 1, 2]
    # a referee outside the tie does not win it
    three = np.array([[0], [0], [1], [1], [2]])
    assert majority_vote(three, 3, tie_break=np.array([2])).tolist() == [0]
    with pytest.raises(ValueError):
        majority_vote(preds, 3, tie_break=np.array([0]))


# ---------------------------------------------------------------- what the numbers mean


def test_fold_events_and_counts_are_shown_as_text_not_averaged(data: ReportData) -> None:
    cnn = data.experiments[0]
    points = [
        dataclasses.replace(
            cnn.points[0], extras={"epochs": "17–20", "resumed_from_epoch": "f0 from 9"}
        ),
        dataclasses.replace(cnn.points[1], extras={"epochs": 20.0, "resumed_from_epoch": None}),
    ]
    exp = dataclasses.replace(cnn, points=points)
    md = render_markdown(dataclasses.replace(data, experiments=[exp]))
    header, best, other = _table_rows(_section(md, "Experiments"))
    assert "Resumed from epoch" not in header
    resumed, epochs = header.index("Resumed"), header.index("Epochs")
    assert best[resumed] == "**f0 from 9**" and other[resumed] == "—"
    assert best[epochs] == "**17–20**" and other[epochs] == "20"
    assert "the folds that resumed from a checkpoint and the epoch" in md


def test_fractions_have_four_decimals(data: ReportData) -> None:
    svm = data.experiments[1]
    points = [dataclasses.replace(p, extras={"explained_variance": 0.947938}) for p in svm.points]
    md = render_markdown(
        dataclasses.replace(data, experiments=[dataclasses.replace(svm, points=points)])
    )
    rows = _table_rows(_section(md, "Experiments"))
    column = rows[0].index("Explained variance")
    assert [r[column].strip("*") for r in rows[1:]] == ["0.9479", "0.9479"]


def test_svm_table_says_which_point_fitted_the_shared_pca(data: ReportData) -> None:
    svm = data.experiments[1]
    points = [
        dataclasses.replace(svm.points[0], extras={"pca_fitted": "yes"}),
        dataclasses.replace(svm.points[1], extras={"pca_fitted": None}),
    ]
    md = render_markdown(
        dataclasses.replace(data, experiments=[dataclasses.replace(svm, points=points)])
    )
    exp = _section(md, "Experiments")
    header, first, second = _table_rows(exp)
    column = header.index("Fitted the PCA")
    assert first[column] == "yes" and second[column].strip("*") == "—"
    assert "its Training time includes that fit" in exp


def test_headline_model_is_chosen_by_validation_and_shows_its_test_acc(
    data: ReportData,
) -> None:
    md = render_markdown(data)
    assert (
        "- Best model: **CNN 3-fold mean** (a mean of 3, chosen by out-of-fold validation "
        "accuracy; OOF val acc 85.000%, test acc 87.000%)\n" in md
    )
    assert "Best blend" not in md
    single = dataclasses.replace(data, best_blend="SVM best point")
    md = render_markdown(single)
    assert "- Best model: **SVM best point** (a single model, chosen by" in md
    blend = _section(md, "Blending")
    assert "| **SVM best point** | **single model** | **1** | **90.000%** |" in blend
    assert "| vote | 1 |" not in blend
    # without validation predictions the test set chooses, and the report says so
    by_test = dataclasses.replace(data, best_by="test")
    assert "chosen by test accuracy (no blend has validation predictions)" in render_markdown(
        by_test
    )


def test_parallel_factor_only_when_it_means_something(data: ReportData) -> None:
    eff = _section(render_markdown(data), "Efficiency")
    assert re.search(r"\d\.\dx in parallel\.", eff)  # 14 units in 14 s on two workers

    # one unit after another, idle between them: less than 1x is no parallelism
    serial = [
        TimelineBar(f"{CID}/cnn/p0/f{i}", "cnn", "gpu@h", 10.0 * i, 10.0 * i + 4, "SUCCESS", 4.0)
        for i in range(3)
    ]
    eff = _section(render_markdown(dataclasses.replace(data, timeline=serial)), "Efficiency")
    assert "in parallel" not in eff and "12.0 s in all." in eff

    # every model unit reused: only the preprocessing ran, for a tenth of a second
    pre = [
        TimelineBar(f"{CID}/preprocess/s{i:05d}", "preprocess", "cpu@h", 0.0, 0.07, "SUCCESS")
        for i in range(2)
    ]
    units = [dataclasses.replace(u, reused_from="old/" + u.key) for u in data.units]
    families = [dataclasses.replace(r, reused=r.succeeded, fit_seconds=0.0) for r in data.families]
    md = render_markdown(dataclasses.replace(data, timeline=pre, units=units, families=families))
    eff = _section(md, "Efficiency")
    assert "in parallel" not in eff and "no model unit ran in this campaign" in eff
    fam = _section(md, "Model families")
    assert all(row[-1] == "—" for row in _table_rows(fam)[1:])
    assert "0.0 s" not in fam
    assert "— where every unit was reused" in fam and "Reused from" in fam


def test_timeline_family_colours_are_never_red() -> None:
    from matplotlib.colors import to_rgb

    from shared.report.figures import FAILED_EDGE, timeline_colors

    families = ["preprocess", "cnn", "svm", "rf", "rf_shard", "a", "b", "c", "d", "e", "f"]
    colors = timeline_colors(families)
    assert list(colors) == families
    # a family has the same colour whatever ran before it
    assert timeline_colors(["svm", "rf"]) == {"svm": colors["svm"], "rf": colors["rf"]}
    assert len(set(colors[f] for f in ("preprocess", "cnn", "svm", "rf", "rf_shard", "a"))) == 6
    red = to_rgb(FAILED_EDGE)
    for family, color in colors.items():
        r, g, b = to_rgb(color)
        assert not (r > 0.6 and g < 0.45 and b < 0.45), (family, color)  # nothing reddish
        assert (r, g, b) != red


def test_units_line_says_what_it_counts(data: ReportData) -> None:
    counted = dataclasses.replace(data, other_units={"preprocess": 3, "report": 1})
    md = render_markdown(counted)
    assert "- Units: 10 model units (1 failed), plus 3 preprocessing shards and the report\n" in md
    one = dataclasses.replace(data, other_units={"preprocess": 1})
    assert "- Units: 10 model units (1 failed), plus 1 preprocessing shard\n" in render_markdown(
        one
    )
    shards = [
        *data.units,
        _unit(f"{CID}/rf_shard/cc0/f0", "rf_shard", 0),
        _unit(f"{CID}/rf_shard/cc1/f0", "rf_shard", 0),
    ]
    md = render_markdown(dataclasses.replace(data, units=shards))
    assert "- Units: 10 model units and 2 tree shards (1 failed)\n" in md


def test_the_header_says_what_the_models_validate_on(data: ReportData) -> None:
    assert "Validation" not in render_markdown(data)  # no manifest, no line
    dev = validation_line("dev", 5, 0, 5600, 800)
    assert dev == (
        "Validation: the dev split (800 images); every model trains on the train split "
        "(5600 images)"
    )
    assert f"- {dev}\n" in render_markdown(dataclasses.replace(data, validation=dev))
    folds = validation_line("folds", 5, 3, 5120, 1280)
    assert folds.startswith(
        "Validation: 5-fold stratified cross-validation (seed 3) over the 6400 labelled "
        "train and dev images, 1280 per fold"
    )
    uneven = validation_line("folds", 5, 3, 45, 12, fold_sizes=[12, 11, 11, 11, 11])
    assert "over the 57 labelled train and dev images, 11–12 per fold;" in uneven
    assert "a family whose section sets fewer folds (folds = n) trains on the first n" in uneven
    oob = validation_line("oob", 5, 0, 6400, 6400)
    assert oob == (
        "Validation: out of bag; every forest trains on all 6400 labelled train and dev "
        "images and judges each by the trees that did not draw it"
    )
    # the note on augmented siblings is under the RF table only when some point augments
    augmented = validation_line("oob", 5, 0, 6400, 6400, augmented=True)
    assert augmented.startswith(oob) and "see the note under the RF table" in augmented


def test_a_sweep_of_two_parameters_gets_its_best_point_per_value(data: ReportData) -> None:
    """The study's "num_comp | best C | best γ | Acc" table: per value of each swept
    parameter, the best point that has it."""
    grid = [
        (50, 1.0, 0.5),
        (50, 2.0, 0.68),
        (100, 1.0, 0.6925),
        (100, 2.0, 0.69),
        (200, 1.0, None),  # failed: not a candidate
        (200, 2.0, 0.66),
    ]
    points = [
        _point(f"{CID}/svm/g{i}", {"n_components": n, "C": c, "gamma": "scale"}, val)
        for i, (n, c, val) in enumerate(grid)
    ]
    exp = Experiment("svm", "SVM grid", points, f"{CID}/svm/g2")
    md = render_markdown(dataclasses.replace(data, experiments=[exp]))
    section = _section(md, "Experiments")
    per_components = section[section.index("Best point per n_component") :]
    rows = _table_rows(per_components)
    assert rows[0][0] == "n_component" and rows[0][1:] == ["best C", "Valid acc"]
    assert rows[1:4] == [
        ["50", "2", "68.000%"],
        ["**100**", "**1**", "**69.250%**"],
        ["200", "2", "66.000%"],
    ]
    assert "Best point per C" in section
    one = Experiment("svm", "SVM C", points[:2], None)  # one swept parameter: no such table
    md = render_markdown(dataclasses.replace(data, experiments=[one]))
    assert "Best point per" not in md


def test_tied_values_of_a_best_point_table_bold_one_row(data: ReportData) -> None:
    """Two values whose best points tie: the first in sweep order is the best, and only
    its row is bold."""
    grid = [(1.5, 10.0, 0.52), (1.5, 1.0, 0.5), (10.0, 10.0, 0.52), (10.0, 1.0, 0.4)]
    points = [
        _point(f"{CID}/svm/t{i}", {"C": c, "gamma": g}, val) for i, (c, g, val) in enumerate(grid)
    ]
    exp = Experiment("svm", "SVM grid", points, f"{CID}/svm/t0")
    section = _section(render_markdown(dataclasses.replace(data, experiments=[exp])), "Experiments")
    rows = _table_rows(section[section.index("Best point per C") :])
    assert rows[1:3] == [["**1.5**", "**10**", "**52.000%**"], ["10", "10", "52.000%"]]


def test_a_point_that_lost_a_fold_is_not_the_best_of_its_value(data: ReportData) -> None:
    """Per value, as for the family's best point: the most folds succeeded first, so a
    point's two better folds of three (0.9) do not outrank another's three (0.7)."""
    grid = [(50, 1.0, 0.7, 3), (50, 2.0, 0.9, 2), (100, 1.0, 0.6, 3), (100, 2.0, 0.65, 3)]
    points = [
        _point(
            f"{CID}/svm/g{i}",
            {"n_components": n, "C": c, "gamma": "scale"},
            val,
            units=3,
            succeeded=folds,
        )
        for i, (n, c, val, folds) in enumerate(grid)
    ]
    assert max(points, key=lambda p: p.rank) is points[0]
    exp = Experiment("svm", "SVM grid", points, f"{CID}/svm/g0")
    section = _section(render_markdown(dataclasses.replace(data, experiments=[exp])), "Experiments")
    rows = _table_rows(section[section.index("Best point per n_component") :])
    assert rows[1:3] == [["**50**", "**1**", "**70.000%**"], ["100", "2", "65.000%"]]


def test_markdown_holds_no_terminal_control_characters(data: ReportData) -> None:
    """report.md is printed to terminals (`orchard report ID --print`, `cat`): a campaign
    title, class name, image id or error text carrying ESC sequences (set the window
    title, write the clipboard with OSC 52, hide lines) is written escaped, visibly."""
    evil = "\x1b]52;c;ZWNobyBwd25lZA==\x07\x1b[2Jgone\x9b1m\x00"
    failed = dataclasses.replace(data.units[-1], state="FAILED", error=f"boom {evil}\ttab")
    md = render_markdown(
        dataclasses.replace(data, campaign_name=f"Mango {evil}", units=[*data.units[:-1], failed])
    )
    controls = {c for c in md if unicodedata.category(c) == "Cc"} - {"\n", "\t"}
    assert not controls, controls
    # (the title's brackets are escaped too: a title is no link)
    assert "Mango \\x1b\\]52;c;ZWNobyBwd25lZA==\\x07\\x1b\\[2Jgone\\x9b1m\\x00" in md


def test_markdown_shows_bidirectional_overrides_rather_than_obeying_them(
    data: ReportData,
) -> None:
    """A right-to-left override makes a name show as another ("gpj.exe" read backwards):
    written escaped, as the control characters are."""
    md = render_markdown(dataclasses.replace(data, campaign_name="Mango \u202egpj.exe\u2066x"))
    assert not {"\u202e", "\u2066"} & set(md)
    assert "Mango \\u202egpj.exe\\u2066x" in md


def test_the_html_page_shows_control_characters_and_overrides_as_the_markdown_does(
    data: ReportData,
) -> None:
    """A browser obeys a right-to-left override too, and `cat report.html` an ESC."""
    evil = "Mango \u202egpj.exe\u2066x \x1b[2J\x07"
    failed = dataclasses.replace(data.units[-1], state="FAILED", error=f"boom {evil}\ttab")
    page = render_html(
        dataclasses.replace(data, campaign_name=evil, units=[*data.units[:-1], failed]), {}
    )
    controls = {c for c in page if unicodedata.category(c) in ("Cc", "Cf")} - {"\n", "\t"}
    assert not controls, controls
    assert "Mango \\u202egpj.exe\\u2066x \\x1b[2J\\x07" in page
    assert "boom Mango" in page and "\ttab" in page


def test_markdown_text_makes_no_link_or_image(data: ReportData) -> None:
    """A title such as ![x](https://host/p.png) would make a Markdown viewer fetch the
    image (a tracking pixel) when someone opens report.md."""
    title = "Mango ![x](https://host/p.png) [y](https://host/)"
    md = render_markdown(dataclasses.replace(data, campaign_name=title))
    assert "Mango !\\[x\\](https://host/p.png) \\[y\\](https://host/)" in md
    assert "![x](" not in md and "[y](" not in md


def _timeline_artists(bars: list[TimelineBar], monkeypatch: pytest.MonkeyPatch) -> int:
    import shared.report.figures as report

    drawn = []
    with monkeypatch.context() as patched:
        patched.setattr(report, "_png", lambda fig: drawn.append(fig) or b"png")
        timeline_png(bars)
    (ax,) = drawn[0].axes
    return len(ax.collections) + len(ax.patches) + len(ax.containers)


def test_timeline_artists_do_not_grow_with_the_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bar per unit used to be an artist per unit (a second for 650 units): now one
    collection per lane, family and outcome draws them all."""

    def bars(n: int) -> list[TimelineBar]:
        return [
            TimelineBar(
                f"{CID}/svm/p{i}/f0",
                "svm" if i % 3 else "rf",
                f"w{i % 2}@h",
                0.01 * i,
                0.01 * i + 0.008,
                "FAILED" if i % 50 == 7 else "SUCCESS",
                0.004,
            )
            for i in range(n)
        ]

    assert _timeline_artists(bars(60), monkeypatch) == _timeline_artists(bars(3000), monkeypatch)
    assert timeline_png(bars(3000)).startswith(PNG_SIGNATURE)


def test_a_unit_of_milliseconds_is_no_hairline_on_the_timeline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 20 ms report after a 100 s fold is drawn 0.4 s wide (about 3 px), the fold to
    scale."""
    import shared.report.figures as report

    drawn = []
    monkeypatch.setattr(report, "_png", lambda fig: drawn.append(fig) or b"png")
    timeline_png(
        [
            TimelineBar(f"{CID}/cnn/p0/f0", "cnn", "gpu@h", 0.0, 100.0, "SUCCESS", 99.0),
            TimelineBar(f"{CID}/report", "report", "cpu@h", 100.0, 100.02, "SUCCESS", 0.02),
        ]
    )
    (ax,) = drawn[0].axes
    widths = sorted(
        round(float(path.get_extents().width), 3)
        for collection in ax.collections
        for path in collection.get_paths()
    )
    assert widths == [100 * report.TIMELINE_MIN_WIDTH, 100.0]


def _many_units(n: int, failed: int) -> list[UnitSummary]:
    return [
        _unit(
            f"{CID}/svm/p{i:04d}/f0",
            "svm",
            0,
            state="FAILED" if i >= n - failed else "SUCCESS",
            error="ValueError: no" if i >= n - failed else None,
        )
        for i in range(n)
    ]


def test_a_long_units_table_is_cut_and_every_unit_is_in_a_csv(
    data: ReportData, tmp_path: Path
) -> None:
    units = _many_units(MAX_UNIT_ROWS + 400, failed=MAX_FAILED_LISTED + 5)
    big = dataclasses.replace(data, units=units, timeline=[])
    md = render_markdown(big)
    section = _section(md, "Units")
    rows = _table_rows(section)[1:]
    assert len(rows) == MAX_UNIT_ROWS
    assert sum(r[3] == "FAILED" for r in rows) == MAX_FAILED_LISTED + 5  # every failed one
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)  # in plan order
    assert (
        f"{MAX_UNIT_ROWS} of {len(units)} units shown, in plan order: every unit that did "
        f"not succeed, then the first of the others; 400 more are left out here. Every "
        "unit is in `units.csv`." in section
    )
    failed = _section(md, "Failed units")
    assert failed.count("ValueError: no") == MAX_FAILED_LISTED
    assert f"The first {MAX_FAILED_LISTED} of {MAX_FAILED_LISTED + 5} failed units" in failed

    files = write_report(big, tmp_path)
    assert set(files.tables) == {"units.csv"}
    lines = files.tables["units.csv"].path.read_text().splitlines()
    assert lines[0].startswith("key,family,fold,state")
    assert len(lines) == 1 + len(units) and lines[-1].endswith(
        ",FAILED,w1@host,12.34,0.9,0.85,0.84125,,ValueError: no"
    )

    # more failed units than rows: the note says which are shown
    worse = dataclasses.replace(
        data, units=_many_units(MAX_UNIT_ROWS + 50, failed=MAX_UNIT_ROWS + 20)
    )
    assert (
        f"{MAX_UNIT_ROWS} of {MAX_UNIT_ROWS + 50} units shown, in plan order: the first "
        f"{MAX_UNIT_ROWS} of the {MAX_UNIT_ROWS + 20} units that did not succeed; 50 more "
        in _section(render_markdown(dataclasses.replace(worse, timeline=[])), "Units")
    )

    # at the limit nothing is cut, and no CSV is written
    few = dataclasses.replace(data, units=_many_units(MAX_UNIT_ROWS, failed=2), timeline=[])
    assert len(_table_rows(_section(render_markdown(few), "Units"))) == 1 + MAX_UNIT_ROWS
    assert table_csvs(few) == {}


def test_a_large_sweep_shows_its_best_points_and_every_point_in_a_csv(data: ReportData) -> None:
    n = MAX_POINT_ROWS * 4
    points = [
        _point(f"{CID}/svm/p{i:04d}", {"C": float(i), "gamma": 0.01}, (i * 37 % n) / n)
        for i in range(n)
    ]
    best = max(points, key=lambda p: p.val_acc)
    exp = Experiment("svm", f"SVM ({n} points, 1 fold each)", points, best.key)
    md = render_markdown(dataclasses.replace(data, experiments=[exp]))
    table = md.split("### SVM", 1)[1].split("\n## ", 1)[0]
    rows = _table_rows(table.split("\n\n")[1])[1:]
    assert len(rows) == MAX_POINT_ROWS
    vals = [float(r[3].strip("*%")) for r in rows]
    assert vals == sorted(vals, reverse=True) and rows[0][0].startswith("**")  # best first
    assert f"The {MAX_POINT_ROWS} best of {n} points by validation accuracy, best first; " in table
    assert (
        f"{n - MAX_POINT_ROWS} more are left out here. Every point is in `experiments-svm.csv`."
        in table
    )

    csvs = table_csvs(dataclasses.replace(data, experiments=[exp]))
    lines = csvs["experiments-svm.csv"].splitlines()
    assert lines[0] == (
        "key,C,gamma,units,succeeded,train_acc,val_acc,val_spread,test_acc,seconds,best"
    )
    assert len(lines) == 1 + n and sum(line.endswith(",1") for line in lines[1:]) == 1

    # a CNN's extra "epochs" (run) beside its parameter "epochs" (asked for): two columns
    cnn = [
        _point(f"{CID}/cnn/p{i:04d}", {"epochs": 30, "lr": 0.001 * (i + 1)}, 0.5,
               extras={"epochs": 17.0})
        for i in range(MAX_POINT_ROWS + 1)
    ]  # fmt: skip
    wide = Experiment("cnn", "CNN", cnn, cnn[0].key)
    header = table_csvs(dataclasses.replace(data, experiments=[wide]))["experiments-cnn.csv"]
    assert header.splitlines()[0] == (
        "key,epochs,lr,units,succeeded,train_acc,val_acc,val_spread,test_acc,seconds,"
        "epochs (result),best"
    )


def test_report_csv_cells_are_text_not_formulas_or_terminal_commands() -> None:
    from shared.report.document import _csv_text

    text = _csv_text(
        ["key", "error", "n", "x"],
        [
            ["c/svm/p1", '=HYPERLINK("http://x","y")', -3, -0.5],
            ["c/svm/p2", "bad \x1b[2J", 1, 2.0],
            ["c/svm/p3", "\t=1+2", 0, 0.0],  # a tab first, on OWASP's list too
        ],
    )
    assert text.splitlines() == [
        "key,error,n,x",
        'c/svm/p1,"\'=HYPERLINK(""http://x"",""y"")",-3,-0.5',  # numbers stay numbers
        "c/svm/p2,bad \\x1b[2J,1,2.0",
        "c/svm/p3,'\t=1+2,0,0.0",
    ]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0036, "3.6 ms"), (0.042, "42 ms"), (0.25, "0.2 s"), (12.34, "12.3 s"), (0, "0.0 s")],
)
def test_short_times_are_in_milliseconds(seconds: float, text: str) -> None:
    from shared.report.model import _fmt_duration

    assert _fmt_duration(seconds) == text


def test_out_of_bag_blends_say_what_their_validation_accuracy_is(data: ReportData) -> None:
    """Under validation = "oob" nothing was held out: the text must not say so."""
    folds = render_markdown(data)
    assert "OOF val acc pools each fold's predictions on the images it held out" in folds
    oob = render_markdown(dataclasses.replace(data, held_out="oob"))
    assert "held out" not in oob.split("## Blending", 1)[1].split("\n## ", 1)[0]
    assert "Bold: the best by out-of-bag accuracy" in oob
    assert "each image predicted by the trees that did not draw it" in oob
    assert "| Test acc | Test 95% CI | OOB acc | OOB images | Note |" in oob and "OOF" not in oob


def test_dev_split_blends_say_what_their_validation_accuracy_is(data: ReportData) -> None:
    """Under validation = "dev" there are no folds: nothing is out of fold."""
    dev = render_markdown(dataclasses.replace(data, held_out="dev"))
    assert "OOF" not in dev and "out-of-fold" not in dev
    assert "| Test acc | Test 95% CI | Dev acc | Dev images | Note |" in dev
    assert "Bold: the best by accuracy on the dev split, **CNN 3-fold mean**" in dev
    assert "(a mean of 3, chosen by accuracy on the dev split; Dev acc 85.000%," in dev
    assert "Dev acc is each model's predictions on the labelled dev split" in dev


#: Class names, image ids and parameter values a user may give: mathtext errors, mathtext,
#: or a label a legend would hide ("_..."), were matplotlib to read them rather than show them.
MATH_LIKE = ("$\\frac{1}{$", "t0$\\x$.png", "a^b_c {x}", "$x$ \\alpha%", "_hidden")


def _draw(kind: str, names: list[str]) -> bytes:
    from shared.report import curve_png, lime_png, sweep_png

    n = len(names)
    if kind == "confusion":
        return confusion_png(Confusion(f"vote {names[0]}", [[1] * n for _ in names], "test"), names)
    if kind == "curve":
        return curve_png(CurveFigure("c", f"CNN {names[1]}", {x: _curve(0.05) for x in names}))
    if kind == "sweep":
        return sweep_png(SweepPlot("s", "svm", names[3], names, {x: [0.5] * n for x in names}))
    if kind == "timeline":
        bars = [
            TimelineBar(f"{CID}/{x}/p{i}", x, x, i, i + 1, "SUCCESS") for i, x in enumerate(names)
        ]
        return timeline_png(bars)
    if kind == "tsne":
        return tsne_png(dataclasses.replace(_tsne(tuple(names), 3), variant=names[2]), names)
    items = [dataclasses.replace(_lime_item(x), image_id=f"id {x}") for x in names]
    return lime_png(LimeSection("cnn", f"{CID}/cnn/p0/f1", 30, items))


@pytest.mark.parametrize("kind", ["confusion", "curve", "sweep", "timeline", "lime", "tsne"])
def test_figures_show_dollars_carets_and_backslashes_as_typed(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A class folder or test image named with a `$` started mathtext, and `$\\frac{1}{$`
    made matplotlib raise: the report task failed. Every user text is drawn as typed, in
    titles, tick labels and legends alike."""
    import matplotlib
    import matplotlib.text

    import shared.report.figures as report

    drawn = []
    save = report._png
    monkeypatch.setattr(report, "_png", lambda fig: drawn.append(fig) or save(fig))
    png = _draw(kind, list(MATH_LIKE))
    assert png.startswith(PNG_SIGNATURE)
    assert mpimg.imread(io.BytesIO(png), format="png").std() > 0
    texts = drawn[0].findobj(matplotlib.text.Text)
    assert not [t.get_text() for t in texts if t.get_parse_math()]
    shown = "\n".join(t.get_text() for t in texts if t.get_visible())
    assert [name for name in MATH_LIKE if name not in shown] == []
    assert matplotlib.rcParams["text.parse_math"]  # the setting is the figure's only


def _drawn_texts(draw: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The visible texts of the figure ``draw()`` makes, as drawn (tick labels too)."""
    import matplotlib.text

    import shared.report.figures as report

    drawn = []
    save = report._png
    monkeypatch.setattr(report, "_png", lambda fig: drawn.append(fig) or save(fig))
    draw()
    return [t.get_text() for t in drawn[0].findobj(matplotlib.text.Text) if t.get_visible()]


def test_a_log_axis_labels_its_ticks_as_plain_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The log scale's own labels are mathtext (`$\\mathdefault{10^{-3}}$`), which the
    figures draw literally: a sweep of C or of n_estimators gets plain numbers."""
    from shared.report import sweep_png

    cs = [0.001, 0.01, 0.1, 1.0, 10.0]
    plot = SweepPlot("s", "svm", "C", cs, {"val_acc": [0.5, 0.6, 0.7, 0.6, 0.5]})
    texts = _drawn_texts(lambda: sweep_png(plot), monkeypatch)
    assert not [t for t in texts if "$" in t or "mathdefault" in t]
    assert {"0.001", "0.01", "0.1", "1", "10"} <= set(texts)
    assert "accuracy" in texts  # a point per value: no mean drawn
    # in percent, as the tables; the table's names for the parameter and the series
    assert "60.0%" in texts and "SVM: accuracy against C" in texts
    # another parameter swept too: several points per value, and the line their mean
    series = {"val acc": [0.5, 0.6, 0.7, 0.6, 0.5] * 2, "oob_grouped": [0.4] * 10}
    pooled = SweepPlot("s", "rf", "n_components", cs + cs, series)
    texts = _drawn_texts(lambda: sweep_png(pooled), monkeypatch)
    assert "accuracy (dots: points, line: their mean)" in texts
    assert {"Valid acc", "Grouped OOB", "RF: accuracy against n_component"} <= set(texts)


def test_no_augmentation_is_a_tick_of_its_own_and_not_in_the_method(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from shared.report import param_label, param_value, sweep_png
    from shared.report.model import _method

    assert param_value("augment", "none") == "none"
    assert _method({"variant": "resize128", "augment": "none"}) == "resize 128"
    assert _method({"variant": "resize128", "augment": "flip"}) == "resize 128 flip"
    augments = ["none", "flip", "rotate_flip"]
    plot = SweepPlot("s", "rf", "augment", augments, {"val_acc": [0.5, 0.6, 0.7]})
    texts = _drawn_texts(lambda: sweep_png(plot), monkeypatch)
    assert {"none", "flip", "rotate, flip", param_label("augment")} <= set(texts)
    assert param_label("augment") != param_label("variant")


def test_the_line_styles_are_named_only_where_both_are_drawn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from shared.report import curve_png

    both = {"fold 0": _curve(0.05)}
    val_only = {"a": {"val_acc": [(0, 0.5), (1, 0.6)], "val_loss": [(0, 1.0), (1, 0.8)]}}
    named = "(solid: validation, dashed: training)"
    texts = _drawn_texts(lambda: curve_png(CurveFigure("c", "CNN", both)), monkeypatch)
    assert any(named in t for t in texts)
    texts = _drawn_texts(lambda: curve_png(CurveFigure("v", "CNN", val_only)), monkeypatch)
    assert "CNN" in texts and not any(named in t for t in texts)


def test_a_report_whose_class_names_hold_dollars_is_written_with_its_figures(
    data: ReportData, tmp_path: Path
) -> None:
    classes = MATH_LIKE[:3]
    lime = dataclasses.replace(data.lime, items=[_lime_item(c) for c in classes])
    files = write_report(dataclasses.replace(data, classes=classes, lime=lime), tmp_path)
    html = files.html.path.read_text(encoding="utf-8")
    assert "Figure not rendered." not in html
    assert all((tmp_path / n).read_bytes().startswith(PNG_SIGNATURE) for n in files.figures)


def test_the_cnn_table_says_what_its_train_acc_is(data: ReportData) -> None:
    """Train acc (the trained model on the training images as they are) and the curves'
    training accuracy (running, over augmented batches) differ: the table says why."""
    md = render_markdown(data)
    cnn = md.split("### CNN", 1)[1].split("###", 1)[0]
    assert "the learning curves' training accuracy is the running one" in cnn
    svm = md.split("### SVM", 1)[1].split("###", 1)[0]
    assert "learning curves' training accuracy" not in svm


def test_a_grouped_oob_over_few_rows_is_marked(data: ReportData) -> None:
    """A grouped OOB score judged on a sliver of the training rows (few trees drew none
    of a photo's copies) is marked and the mark explained; one over a quarter is not."""
    md = render_markdown(data)
    rf = md.split("### RF", 1)[1].split("###", 1)[0]
    assert "0.6012" in rf and "0.6012†" not in rf and "†: under 10%" not in rf
    exp = data.experiments[-1]
    thin = dataclasses.replace(
        exp.points[0], extras={**exp.points[0].extras, "oob_grouped_coverage": 0.0083}
    )
    thin_exp = dataclasses.replace(exp, points=[thin, *exp.points[1:]])
    md = render_markdown(dataclasses.replace(data, experiments=[*data.experiments[:-1], thin_exp]))
    rf = md.split("### RF", 1)[1].split("###", 1)[0]
    assert "0.6012†" in rf and "0.0083" in rf
    assert "†: under 10% of them, too few for the grouped score to say much" in rf
    # no row covered at all: no score, but its column, marked, beside a coverage of 0
    none = dataclasses.replace(
        exp.points[0],
        extras={**exp.points[0].extras, "oob_grouped": None, "oob_grouped_coverage": 0.0},
    )
    none_exp = dataclasses.replace(exp, points=[none, *exp.points[1:]])
    md = render_markdown(dataclasses.replace(data, experiments=[*data.experiments[:-1], none_exp]))
    rf = md.split("### RF", 1)[1].split("###", 1)[0]
    assert "| **—†** | **0.0000** |" in rf and "(— †: none)" in rf


def test_the_campaign_s_description_stands_under_the_title_escaped(data: ReportData) -> None:
    from dataclasses import replace

    described = replace(data, description="Mangoes <b>graded</b> *by* vote")
    md = render_markdown(described)
    html = render_html(described, {})
    assert "Mangoes <b>graded</b> *by* vote" not in md  # Markdown's marks escaped
    assert "Mangoes &lt;b&gt;graded&lt;/b&gt; *by* vote" in html
    assert md.index("graded") < md.index(f"Campaign: `{CID}`")
    assert "graded" not in render_markdown(data)


@pytest.mark.parametrize(
    "description",
    [
        "# Accuracy 99.9%",
        "> quoted",
        "1. first",
        "2) second",
        "- item",
        "+ item",
        "---",
        "_ _ _",
        "~~~ code",
    ],
)
def test_a_description_that_reads_as_a_markdown_block_stays_text(
    data: ReportData, description: str
) -> None:
    """First in its list item, a description "# Accuracy 99.9%" was a headline in the
    Markdown report (CommonMark renders a heading inside an item), "1. first" a nested
    list: each is shown as written."""
    from dataclasses import replace

    from markdown_it import MarkdownIt

    md = render_markdown(replace(data, description=description))
    item = next(line for line in md.splitlines() if line.startswith("- "))  # the first
    html = MarkdownIt("commonmark").render(item)
    inner = html.strip().removeprefix("<ul>\n<li>").removesuffix("</li>\n</ul>")
    assert inner == description.replace(">", "&gt;"), html


def test_text_in_the_middle_of_a_line_keeps_its_marks_unescaped() -> None:
    """Only what starts a line can make it a heading or a list: a part further on is as
    it was written (a stray backslash showed in `orchard report --print`)."""
    from shared.report.document import Strong
    from shared.report.render import _md_inline

    assert _md_inline(["best ", Strong("svm"), " - 2 points"]) == "best **svm** - 2 points"
    assert _md_inline(["- 2 points"]) == "\\- 2 points"


def test_the_t_sne_section_draws_the_map_with_its_classes_named(
    data: ReportData, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Study 2.4.2: the map of fold 0's training images, one colour per class, a legend
    naming each, a title with the variant and the image and component counts."""
    md = render_markdown(data)
    tsne = _section(md, "t-SNE")
    assert md.index("\n## Confusion matrices\n") < md.index("\n## t-SNE\n")
    assert md.index("\n## t-SNE\n") < md.index("\n## Explanations (LIME)\n")
    assert (
        "![Fold 0's training images, PCA features of the best SVM point, embedded by t-SNE; "
        "the study (2.4.2) saw no clustering](tsne-svm.png)" in tsne
    )
    assert "60 of fold 0's 300 training images, sampled per class (seed 0)" in tsne
    assert f"the first 50 components of the PCA projection that `{CID}/svm/aa1/f0`" in tsne
    assert "(polarized 192)" in tsne and "perplexity 19.7" in tsne
    everything = dataclasses.replace(data.tsne, available=60)
    all_of_them = render_markdown(dataclasses.replace(data, tsne=everything))
    assert "All 60 of fold 0's training images:" in _section(all_of_them, "t-SNE")

    texts = _drawn_texts(lambda: tsne_png(data.tsne, CLASSES), monkeypatch)
    assert {"extra (20)", "class_i (20)", "class_ii (20)"} <= set(texts)
    assert "t-SNE of polarized 192 images: 60 training images, 50 PCA components" in texts
    png = tsne_png(data.tsne, CLASSES)
    assert png == tsne_png(data.tsne, CLASSES)
    image = mpimg.imread(io.BytesIO(png), format="png")
    assert image.std() > 0
    # each class in its own colour: three hues beside the greys of text and frame
    rgb = (image[..., :3] * 255).astype(int).reshape(-1, 3)
    coloured = rgb[(rgb.max(1) - rgb.min(1)) > 60]
    assert len({tuple(c // 32) for c in coloured}) >= 3


def test_a_t_sne_that_cannot_be_drawn_says_why_in_one_line(
    data: ReportData, tmp_path: Path
) -> None:
    why = "Not drawn: /a/pca/polar192-f0-w0-s1-k12.npz, the PCA projection, is missing."
    missing = dataclasses.replace(data, tsne=TsneSection(f"{CID}/svm/aa1/f0", note=why))
    md = render_markdown(missing)
    tsne = _section(md, "t-SNE")
    assert [line for line in tsne.splitlines() if line.strip()] == ["## t-SNE", f"_{why}_"]
    files = write_report(missing, tmp_path)
    assert "tsne-svm.png" not in files.figures and not (tmp_path / "tsne-svm.png").exists()
    html = files.html.path.read_text(encoding="utf-8")
    assert '<h2 id="section-t-sne">t-SNE</h2>' in html and f'<p class="empty">{why}</p>' in html
    assert json.loads(files.json.path.read_text(encoding="utf-8"))["tsne"]["note"] == why


def test_no_t_sne_section_unless_it_was_asked_for(data: ReportData, tmp_path: Path) -> None:
    unasked = dataclasses.replace(data, tsne=None)
    md = render_markdown(unasked)
    assert "## t-SNE" not in md and "tsne-svm.png" not in md
    headings = re.findall(r"^## (.+)$", md, flags=re.M)
    assert headings == [h for h in SECTION_HEADINGS if h != "t-SNE"]
    files = write_report(unasked, tmp_path)
    assert "tsne-svm.png" not in files.figures
    assert "t-SNE" not in files.html.path.read_text(encoding="utf-8")
    assert json.loads(files.json.path.read_text(encoding="utf-8"))["tsne"] is None


def test_markdown_text_holds_no_entity_or_code_span(data: ReportData) -> None:
    """A title or class written ``A&amp;B`` shows as written, not as ``A&B``, and
    backticks in it start no code span."""
    md = render_markdown(dataclasses.replace(data, campaign_name="A&amp;B `tick`"))
    assert "— A\\&amp;B \\`tick\\`\n" in md
