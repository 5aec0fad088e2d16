from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
from pathlib import Path

import pytest
from matplotlib import image as mpimg

from shared.report import (
    BlendRow,
    Confusion,
    FamilyRow,
    ReportData,
    UnitSummary,
    confusion_png,
    render_html,
    render_markdown,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ("extra", "class_i", "class_ii")
BAD_ERROR = "ValueError: bad | value <script>alert('x')</script> " + "x" * 200
CID = "quick-1a2b3c"


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


@pytest.fixture
def data() -> ReportData:
    units = [
        _unit(f"{CID}/cnn/5f3e2a1b9c0d/f{i}", "cnn", i, params={"lr": 0.001}) for i in range(5)
    ]
    units += [
        _unit(f"{CID}/svm/aa{i}", "svm", None, params={"C": 10.0 * (i + 1), "gamma": 0.01})
        for i in range(2)
    ]
    units += [
        _unit(f"{CID}/rf/bb0", "rf", None, params={"n_estimators": 200, "max_depth": 8}),
        _unit(
            f"{CID}/rf/bb1",
            "rf",
            None,
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
        FamilyRow("cnn", units[0].key, {"lr": 0.001}, 5, 5, 0.95, 0.9, 0.84125, 245.0),
        FamilyRow("svm", units[6].key, {"C": 20.0, "gamma": 0.01}, 2, 2, 0.9, 0.8, 0.79, 3.5),
        FamilyRow("rf", units[7].key, {"n_estimators": 200}, 2, 1, 1.0, 0.75, 0.7125, 12.34),
    ]
    blends = [BlendRow("CNN 5-fold vote", "cnn", "vote", 5, 0.86)]
    confusions = {
        "cnn": Confusion("CNN 5-fold vote (test)", [[30, 2, 1], [3, 25, 4], [0, 5, 30]], "test"),
        "svm": Confusion("SVM best point (test)", [[28, 4, 1], [5, 22, 5], [1, 6, 28]], "test"),
        "rf": Confusion("RF best point (val)", [[0, 0, 0], [0, 0, 0], [0, 0, 0]], "val"),
    }
    return ReportData(
        campaign_id=CID,
        campaign_name="Quick | test",
        created_at="2024-05-01T12:00:00+00:00",
        classes=CLASSES,
        families=families,
        blends=blends,
        confusions=confusions,
        units=units,
    )


def _section(md: str, heading: str) -> str:
    start = md.index(f"## {heading}\n")
    nxt = md.find("\n## ", start + 1)
    return md[start : nxt if nxt != -1 else len(md)]


def test_write_report_creates_all_files(data: ReportData, tmp_path: Path) -> None:
    out = tmp_path / "report"
    files = write_report(data, out)
    expected = {"report.md", "report.html", "report.json"} | {
        f"confusion-{s}.png" for s in ("cnn", "svm", "rf")
    }
    assert {p.name for p in out.iterdir()} == expected  # no temp files left behind
    assert files.markdown.path == out / "report.md"
    assert files.html.path == out / "report.html"
    assert files.json.path == out / "report.json"
    assert set(files.figures) == {"cnn", "svm", "rf"}
    for written in [files.markdown, files.html, files.json, *files.figures.values()]:
        assert written.path.is_file()
        assert written.size == written.path.stat().st_size > 0
    assert files.figures["cnn"].path.read_bytes().startswith(PNG_SIGNATURE)


def test_markdown_tables(data: ReportData) -> None:
    md = render_markdown(data, {s: f"confusion-{s}.png" for s in data.confusions})
    assert md.startswith("# orchard report — Quick | test\n")
    assert CID in md

    fam = _section(md, "Model families")
    assert (
        "| Family | Best unit | Params | Units (ok/total) | Train acc | Val acc | Test acc" in fam
    )
    rows = [line for line in fam.splitlines() if line.startswith("| ") and "Family" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["cnn", "svm", "rf"]
    assert "84.125%" in rows[0] and "95.000%" in rows[0]
    assert "4 min 05 s" in rows[0]
    assert "1/2" in rows[2]
    assert "C=20, gamma=0.01" in rows[1]
    pcts = re.findall(r"\d+\.\d+%", fam)
    assert pcts and all(re.fullmatch(r"\d{1,3}\.\d{3}%", p) for p in pcts)

    blend = _section(md, "Blending")
    assert "| CNN 5-fold vote | vote | 5 | 86.000% |" in blend

    conf = _section(md, "Confusion matrices")
    assert "![CNN 5-fold vote (test)](confusion-cnn.png)" in conf
    assert conf.count("![") == 3

    units = _section(md, "Units")
    assert units.count(f"`{CID}/") == 9
    failed_row = next(line for line in units.splitlines() if "rf/bb1" in line)
    assert "bad \\| value" in failed_row
    assert "\\<script>" in failed_row  # no raw HTML in the Markdown table
    assert "x" * 200 not in failed_row  # truncated
    # every table row has the header's number of cells (escaped pipes don't split cells)
    for line in units.splitlines():
        if line.startswith("|"):
            assert len(re.split(r"(?<!\\)\|", line)) == 12


def test_failed_units_section(data: ReportData) -> None:
    md = render_markdown(data, {})
    failed = _section(md, "Failed units")
    assert f"{CID}/rf/bb1" in failed
    assert "FAILED" in failed
    assert "alert('x')" in failed
    assert f"{CID}/rf/bb0" not in failed

    ok = dataclasses.replace(data, units=[u for u in data.units if u.state == "SUCCESS"])
    assert "## Failed units" not in render_markdown(ok, {})


def test_html_self_contained_and_escaped(data: ReportData, tmp_path: Path) -> None:
    files = write_report(data, tmp_path)
    html = files.html.path.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"""(?:src|href)\s*=\s*(?!["']?data:)""", html, flags=re.I)
    assert "url(" not in html and "@import" not in html
    assert "<script" not in html
    assert "&lt;script&gt;" in html
    assert "<style>" in html

    srcs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(srcs) == 3
    png = base64.b64decode(srcs[0])
    assert png.startswith(PNG_SIGNATURE)
    assert png == files.figures["cnn"].path.read_bytes()

    for heading in ("Model families", "Blending", "Confusion matrices", "Units", "Failed units"):
        assert f"<h2>{heading}</h2>" in html
    assert "84.125%" in html
    assert 'class="failed"' in html
    assert "Quick | test" in html


def test_html_without_figure_uses_placeholder(data: ReportData) -> None:
    html = render_html(data, {})
    assert "data:image/png" not in html
    assert html.count("Figure not rendered.") == 3


def test_confusion_png_deterministic_and_decodable(data: ReportData) -> None:
    conf = data.confusions["cnn"]
    a = confusion_png(conf, CLASSES)
    b = confusion_png(conf, CLASSES)
    assert a == b
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
    assert len(loaded["families"]) == 3
    assert [f["family"] for f in loaded["families"]] == ["cnn", "svm", "rf"]
    assert loaded["classes"] == list(CLASSES)
    assert loaded["confusions"]["cnn"]["matrix"][0] == [30, 2, 1]
    assert len(loaded["units"]) == 9
    assert loaded["units"][-1]["error"] == BAD_ERROR
    assert list(loaded) == sorted(loaded)


@pytest.mark.parametrize("slug", ["", "CNN", "../x", "a/b", "-cnn", "cnn.png", "c n"])
def test_invalid_slug_raises(data: ReportData, tmp_path: Path, slug: str) -> None:
    bad = dataclasses.replace(data, confusions={**data.confusions, slug: data.confusions["cnn"]})
    with pytest.raises(ValueError):
        write_report(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written before validation
