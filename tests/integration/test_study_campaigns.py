"""Every experiment of the study, as shipped in ``campaigns/study/``, runs to a report.

Each file is read as a user would write it (the competition's ``aicup`` dataset, the
study's sizes), then only its dataset section is swapped for a small synthetic one and
its sizes shrunk (fewer epochs, narrower CNN, fewer trees and components, at most two
values per numeric sweep) so that all of them run here, together, through real
`celery worker` processes on the real Redis into one SQLite store.
"""

from __future__ import annotations

import copy
import json
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from db.store import Store
from scheduler.api import CampaignRun, submit
from shared.settings import Settings
from shared.spec import load_campaign
from tests.conftest import REDIS_URL, REPO
from tests.integration.test_campaign import running_workers, settings_for
from workers.data import load_manifest
from workers.reporting.data import build_report_data

pytestmark = pytest.mark.integration

STUDY = REPO / "campaigns" / "study"
STUDY_FILES = sorted(STUDY.glob("*.toml"))

#: numbers capped in the tiny runs: (section, field) -> largest value kept
CAPS = {
    ("svm", "n_components"): 12,
    ("rf", "n_estimators"): 6,
    ("rf", "pca_components"): 10,
    ("rf", "max_depth"): 8,
    ("rf", "tree_shards"): 2,
}


def tiny_sweep(section: str, field: str, value: Any) -> Any:
    """A numeric sweep keeps its first and last values; categorical sweeps stay whole."""
    values = value if isinstance(value, list) else [value]
    cap = CAPS.get((section, field))
    if cap is not None:
        values = [min(v, cap) if isinstance(v, int | float) else v for v in values]
    values = list(dict.fromkeys(values))
    if len(values) > 2 and all(isinstance(v, int | float) for v in values):
        values = [values[0], values[-1]]
    return values if isinstance(value, list) or len(values) > 1 else values[0]


def tiny(raw: dict[str, Any], data_root: Path, *, test_labels: bool = True) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    raw["dataset"] = {
        "kind": "synthetic",
        "root": str(data_root),
        "seed": 0,
        "train_per_class": 8,
        "test_per_class": 3,
        "width": 96,
        "height": 72,
        # like the competition's test CSV: images without labels -> submission.csv
        "test_labels": test_labels,
    }
    if raw.get("validation") == "dev":  # the study's train/dev split, as in its tables
        raw["dataset"]["dev_per_class"] = 3
    raw["preprocessing"] = {"size": 64, "shard_size": 32}
    for section in ("cnn", "svm", "rf"):
        if section not in raw:
            continue
        body = raw[section]
        for field, value in list(body.items()):
            if field == "search":  # [svm.search]: its lists shrink as sweeps do
                body[field] = {
                    name: 2 if name == "folds" else tiny_sweep(section, name, values)
                    for name, values in value.items()
                }
            elif field not in ("enabled", "folds"):
                body[field] = tiny_sweep(section, field, value)
        body["folds"] = min(body.get("folds", 1), 2 if section != "cnn" else 5)
    if "cnn" in raw:
        raw["cnn"].update(epochs=1, width=0.125, image_size=32, batch_size=16)
    if "rf" in raw and "select_scaling" in raw["rf"]:
        raw["rf"]["select_estimators"] = 5
    raw.setdefault("report", {}).update(lime_samples=20)
    # the study's published figures of the points the tiny sweeps still have
    raw["report"]["published"] = [
        entry for entry in raw["report"].get("published", []) if still_swept(raw, entry)
    ]
    return raw


def still_swept(raw: dict[str, Any], entry: dict[str, Any]) -> bool:
    """Whether the point a ``[[report.published]]`` entry names is in the tiny sweeps."""
    family = entry.get("family") or next(f for f in ("cnn", "svm", "rf") if f in raw)
    body = raw[family]
    for name, value in entry.get("params", {}).items():
        kept = body.get(name, value)
        if value not in (kept if isinstance(kept, list) else [kept]):
            return False
    return True


def to_toml(raw: dict[str, Any]) -> str:
    """Enough TOML for campaign files: scalars, flat lists, one level of tables and
    inline tables in them ([svm.search])."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        return json.dumps(v)

    top = [f"{k} = {value(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    tables = [
        f"[{name}]\n" + "\n".join(f"{k} = {value(v)}" for k, v in body.items())
        for name, body in raw.items()
        if isinstance(body, dict)
    ]
    return "\n".join(top) + "\n\n" + "\n\n".join(tables) + "\n"


def test_study_files_are_valid_as_shipped() -> None:
    """The shipped files name the competition data and validate with the study's sizes."""
    assert len(STUDY_FILES) >= 18
    for path in STUDY_FILES:
        campaign = load_campaign(path)
        assert campaign.dataset.kind == "aicup", path
        assert campaign.name.startswith("study-"), path


def test_every_study_campaign_runs_to_a_report(
    tmp_path: Path, sqlite_url: str, redis_prefix: str
) -> None:
    settings = settings_for(tmp_path, REDIS_URL, sqlite_url)
    store = Store(sqlite_url)
    runs: dict[str, CampaignRun] = {}
    with running_workers(settings, "study") as workers:
        for path in STUDY_FILES:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
            small = tmp_path / "campaigns" / path.name
            small.parent.mkdir(exist_ok=True)
            final = path.stem == "final-comparison"
            dev = raw.get("validation") == "dev"  # these datasets get a dev split
            data = tmp_path / ("data-unlabelled" if final else "data-dev" if dev else "data")
            small.write_text(to_toml(tiny(raw, data, test_labels=not final)), encoding="utf-8")
            runs[path.stem] = submit(small, settings=settings)
        for run in runs.values():
            run.wait(timeout=900, check=workers.check)

    for stem, run in runs.items():
        status = run.status()
        failed = [(u.key, u.error) for u in status.units if u.state != "SUCCESS"]
        assert status.campaign.state == "DONE", (stem, failed)
        assert store.count_rows(run.id)["results"] == len(status.units), stem
        report = run.report_path()
        assert report is not None and report.exists(), stem
        html = report.read_text(encoding="utf-8")
        assert "data:image/png;base64," in html, stem
        assert report.with_suffix(".md").exists() and report.with_suffix(".json").exists()
        stored = run.store.get_campaign(run.id)
        # the format of the fields each uses: 2 where it quotes the study's figures
        quotes = {"published", "published_in"} & set(stored.spec["report"])
        assert stored.format_version == (2 if quotes else 1), stem
        validation = stored.spec["validation"]
        expected = {
            "dev": "Validation: the dev split (9 images); every model trains on the train "
            "split (24 images)",
            "oob": "Validation: out of bag; every forest trains on all 24 labelled train and "
            "dev images",
            "folds": "Validation: 5-fold stratified cross-validation (seed 0) over the 24",
        }[validation]
        assert expected in report.with_suffix(".md").read_text(encoding="utf-8"), stem
        svm = run.store.get_campaign(run.id).spec.get("svm")
        if svm is not None:  # the study's SVM campaigns standardize the pixels first
            assert svm["standardize"] == [True], stem
            pcas = run.store.artifacts(run.id, kind="pca")
            assert pcas and all("-s1-k" in a.path for a in pcas), (stem, pcas)
    schemes = Counter(run.store.get_campaign(run.id).spec["validation"] for run in runs.values())
    # dev: the nine CNN ablations (order ... stride, input size, crop), four SVM tables,
    # the linear kernel and the t-SNE map of the SVM's features;
    # oob: the forests of 3.3, 3.4 and 3.6, judged by oob_score_ as the study did
    assert (schemes["dev"], schemes["oob"]) == (15, 7)
    # 2.4.1: each point chose its C and gamma (and, whitening, its width) on the training
    # images; the report gives the choice beside the accuracy on the dev split
    for stem in ("svm-pca-components", "svm-whiten"):
        report = runs[stem].report_path()
        assert report is not None
        experiments = sections(report.with_suffix(".md").read_text(encoding="utf-8"))
        table = experiments["Experiments"]
        assert "Best C" in table and "Best γ" in table and "Search CV acc" in table, stem
    assert (
        "Best n_component"
        in sections(
            runs["svm-whiten"].report_path().with_suffix(".md").read_text(encoding="utf-8")
        )["Experiments"]
    )
    # 2.5: the linear kernel's point says whether its solver stopped at max_iter
    linear = sections(runs["svm-linear"].report_path().with_suffix(".md").read_text("utf-8"))
    assert "Solver iterations" in linear["Experiments"]
    assert_final_comparison_report(runs["final-comparison"])
    # the study's own figures beside the run's, where the tiny sweeps kept the point
    for stem, column, figures in (
        ("cnn-order", "Published valid acc", ("83.125%", "84.125%")),
        ("rf-preprocessing", "Published oob_score_", ("0.6279", "0.6252", "0.8065")),
        ("rf-best", "Published train acc", ("100.000%", "0.8235", "61.000%")),
    ):
        markdown = runs[stem].report_path().with_suffix(".md").read_text(encoding="utf-8")
        table = sections(markdown)["Experiments"]
        assert column in table, stem
        cells = {cell.strip(" *") for line in table.splitlines() for cell in line.split("|")}
        assert set(figures) <= cells, (stem, table)
        assert "Published: figures for these points from the study, " in table, stem
    # 1.4: the five folds' vote on the test set, beside the run's vote
    markdown = runs["cnn-final"].report_path().with_suffix(".md").read_text(encoding="utf-8")
    vote = next(
        line for line in sections(markdown)["Blending"].splitlines() if "CNN 5-fold vote" in line
    )
    assert "Published test acc" in sections(markdown)["Blending"]
    assert f"{0.800625 * 100:.3f}%" in vote, vote
    # 2.4.2: only the campaign that asks for it maps the SVM's features by t-SNE
    for stem, run in runs.items():
        markdown = run.report_path().with_suffix(".md").read_text(encoding="utf-8")
        assert ("\n## t-SNE\n" in markdown) == (stem == "svm-tsne"), stem
    assert_tsne_report(runs["svm-tsne"], settings)


def sections(markdown: str) -> dict[str, str]:
    """The report's ``## `` sections by heading."""
    out = {}
    for chunk in markdown.split("\n## ")[1:]:
        heading, _, body = chunk.partition("\n")
        out[heading.strip()] = body
    return out


def assert_tsne_report(run: CampaignRun, settings: Settings) -> None:
    """The t-SNE map of the best SVM point's PCA features, and, with its projection
    file altered or gone, the one line that says why there is none."""
    report = run.report_path()
    assert report is not None
    tsne = sections(report.with_suffix(".md").read_text(encoding="utf-8"))["t-SNE"]
    # fold 0's 24 training images, on the 12 components the tiny run keeps
    assert "](tsne-svm.png)" in tsne and "All 24 of fold 0's training images" in tsne, tsne
    assert "the first 12 components of the PCA projection" in tsne
    assert (report.parent / "tsne-svm.png").read_bytes().startswith(b"\x89PNG")
    assert '<figure id="tsne-svm"><img' in report.read_text(encoding="utf-8")

    (pca,) = run.store.artifacts(run.id, kind="pca")
    projection = settings.artifacts / pca.path
    manifest = load_manifest(run.store, settings, run.id)
    data = projection.read_bytes()
    projection.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    altered = build_report_data(run.store, run.id, manifest=manifest, settings=settings).tsne
    assert altered is not None and not altered.drawn
    assert (
        altered.note == f"Not drawn: {projection}, the PCA projection, differs from its "
        "record (checksum)."
    )
    projection.unlink()
    gone = build_report_data(run.store, run.id, manifest=manifest, settings=settings).tsne
    assert gone is not None and not gone.drawn
    assert gone.note == f"Not drawn: {projection}, the PCA projection, is missing."


def assert_final_comparison_report(run: CampaignRun) -> None:
    """The final comparison's report holds every section of the study's shapes, filled."""
    report = run.report_path()
    assert report is not None
    found = sections(report.with_suffix(".md").read_text(encoding="utf-8"))
    assert {
        "Experiments",
        "Learning curves",
        "Sweep plots",
        "Blending",
        "Confusion matrices",
        "Explanations (LIME)",
        "Efficiency",
        "Submission",
    } <= set(found), list(found)
    for family in ("CNN", "SVM", "RF"):
        assert f"### {family} " in found["Experiments"]
    assert "Grouped OOB" in found["Experiments"]  # both OOB scores of the forest
    assert "γ scale ≈" in found["Experiments"]  # the value the SVM's gamma = "scale" took
    assert "![" in found["Learning curves"]
    # one point per family, the study's three models: nothing is swept
    assert "No swept parameters." in found["Sweep plots"]
    assert "CNN + SVM + RF vote" in found["Blending"]
    assert "5-fold vote" in found["Blending"] and "5-fold mean" in found["Blending"]
    for family in ("cnn", "svm", "rf"):
        assert f"confusion-{family}.png" in found["Confusion matrices"]
    assert "lime-cnn.png" in found["Explanations (LIME)"]
    assert "### Timeline" in found["Efficiency"] and "timeline.png" in found["Efficiency"]
    assert "submission.csv" in found["Submission"]
    rows = (report.parent / "submission.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "image_id,label"
    assert len(rows) == 1 + 3 * 3  # every unlabelled test image, once
    assert {row.split(",")[1] for row in rows[1:]} <= {"A", "B", "C"}
