"""How a report run puts its files in place: all of them written into a folder of its
own first, then moved into ``report/`` only while the run still holds its unit, so the
report a reader finds is always one run's, whole, and the one its records describe."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from db.store import StoreUnreachableError
from shared.artifacts import ArtifactWriteError, atomic_write_text, sha256_file
from shared.report import ReportFiles
from workers.lease import UnitAborted
from workers.tasks import report as report_task

PAGES = ("report.md", "report.html", "report.json")


def fake_writer(run: str, *, fail_at: str | None = None):
    """``write_report`` as far as publishing needs it: a figure and the three pages,
    each saying which run wrote it; ``fail_at`` raises as that file is written (a disk
    filling up halfway)."""

    def write(data: object, out_dir: Path) -> ReportFiles:
        written = {}
        for name in ("timeline.png", *PAGES):
            if name == fail_at:
                raise ArtifactWriteError(f"cannot write {out_dir / name}: No space left")
            written[name] = atomic_write_text(out_dir / name, f"{name} of {run}")
        return ReportFiles(
            markdown=written["report.md"],
            html=written["report.html"],
            json=written["report.json"],
            figures={"timeline.png": written["timeline.png"]},
        )

    return write


def context(tmp_path: Path, *, lost: bool = False, away: bool = False) -> SimpleNamespace:
    """The unit's context as far as publishing asks it: the folder, and whether the
    delivery still holds its lease (renewed just before the moves)."""

    def confirm_lease() -> None:
        if away:
            raise StoreUnreachableError("database x unreachable: gone (gave up after 5 s)")
        if lost:
            raise UnitAborted("lost")

    return SimpleNamespace(campaign_dir=tmp_path / "c-1", confirm_lease=confirm_lease)


def contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


@pytest.fixture
def earlier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The report folder as an earlier run left it."""
    monkeypatch.setattr(report_task, "write_report", fake_writer("the first run"))
    report_task.write_then_publish(context(tmp_path), data=None)
    return tmp_path / "c-1" / "report"


def test_the_files_are_moved_into_place_with_their_checksums(earlier: Path) -> None:
    assert contents(earlier) == {n: f"{n} of the first run" for n in ("timeline.png", *PAGES)}


def test_a_run_that_publishes_replaces_every_file_and_leaves_no_folder_of_its_own(
    earlier: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead, writing = earlier / ".run-deadbeef", earlier / ".run-0a0a0a0a"
    for folder in (dead, writing):
        folder.mkdir()
        (folder / "report.md").write_text("half")
    # a run killed while writing, a lease period ago (60 s); and one writing now (a
    # run cut off from the database, its lease run out): it is left to finish or fail
    hour_ago = time.time() - 3600
    os.utime(dead, (hour_ago, hour_ago))
    monkeypatch.setattr(report_task, "write_report", fake_writer("the second run"))
    files = report_task.write_then_publish(context(tmp_path), data=None)
    assert not dead.exists() and (writing / "report.md").read_text() == "half"
    shutil.rmtree(writing)
    assert contents(earlier) == {n: f"{n} of the second run" for n in ("timeline.png", *PAGES)}
    for f in (files.markdown, files.html, files.json, *files.figures.values()):
        assert f.path.parent == earlier and sha256_file(f.path) == f.sha256


@pytest.mark.parametrize("fail_at", ["timeline.png", "report.md", "report.html"])
def test_a_run_that_cannot_write_every_file_leaves_the_earlier_report_whole(
    earlier: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str
) -> None:
    before = contents(earlier)
    monkeypatch.setattr(report_task, "write_report", fake_writer("the second run", fail_at=fail_at))
    with pytest.raises(ArtifactWriteError):
        report_task.write_then_publish(context(tmp_path), data=None)
    assert contents(earlier) == before


@pytest.mark.parametrize("how", ["lost", "away"])
def test_a_run_that_lost_its_unit_or_cannot_tell_writes_nothing_over_the_report(
    earlier: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """``orchard resume`` reset the report, or another delivery took it over, while this
    run was writing: the report is the one the unit's holder writes, not this run's.
    A run cut off from the database cannot tell, and its lease may have run out and the
    unit been taken over: it moves nothing either."""
    before = contents(earlier)
    monkeypatch.setattr(report_task, "write_report", fake_writer("a stale run"))
    with pytest.raises(UnitAborted if how == "lost" else StoreUnreachableError):
        report_task.write_then_publish(context(tmp_path, **{how: True}), data=None)
    assert contents(earlier) == before
