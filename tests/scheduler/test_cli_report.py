"""`orchard report ID` names a report only while its report unit's run is the one that
wrote it and its files are what that run recorded; `orchard status` reads a campaign's
units once and prints its times in UTC."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from db.store import Artifact, Outcome, Store
from scheduler.cli import main
from shared.times import as_utc
from tests.db.test_store import seed_campaign

HTML = b"<html><body>report</body></html>"
MARKDOWN = "# report of t-1\n\naccuracy 61.667% ± 13.6 pp\n".encode()  # UTF-8, not ASCII
DISK_FULL = "ArtifactWriteError: cannot write /a/report.md: No space left on device"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    url = f"sqlite:///{tmp_path / 'orchard.db'}"
    monkeypatch.setenv("ORCHARD_HOME", str(tmp_path))
    monkeypatch.setenv("ORCHARD_DATABASE_URL", url)
    monkeypatch.setenv("ORCHARD_BROKER_URL", f"filesystem://{tmp_path / 'broker'}")
    monkeypatch.setenv("ORCHARD_ARTIFACTS", str(tmp_path / "artifacts"))
    store = Store(url)
    store.upgrade()
    return store


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    return tmp_path / "artifacts"


def write_report(store: Store, artifacts: Path, campaign_id: str = "t-1") -> Path:
    """Campaign ``campaign_id`` with its report unit SUCCESS, as a worker leaves it:
    report.html and report.md in the campaign's folder, recorded with their sha256.
    Returns the report's folder."""
    key = f"{campaign_id}/report"
    folder = artifacts / "campaigns" / campaign_id / "report"
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for name, data in (("report.html", HTML), ("report.md", MARKDOWN)):
        (folder / name).write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        path = f"campaigns/{campaign_id}/report/{name}"
        records.append(Artifact(path, "report", digest, len(data), campaign_id, key))
    store.claim_for_queue([key])
    store.start_unit(key, worker="w", task_id=None)
    store.finish_unit(key, Outcome(fit_seconds=1.0, artifacts=records))
    return folder


def report(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["report", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_report_written_and_intact_is_named_and_printed(
    home: Store, artifacts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_campaign(home)
    folder = write_report(home, artifacts)
    html, markdown = folder / "report.html", folder / "report.md"
    assert report(capsys, "t-1") == (0, f"{html}\n{markdown}\n", "")
    assert report(capsys, "t-1", "--print") == (0, MARKDOWN.decode() + "\n", "")


def test_a_report_unit_run_again_is_not_taken_for_its_earlier_run(
    home: Store, artifacts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`orchard resume` reset the report unit (a model unit failed): the files recorded
    are the earlier run's while the new run waits, runs, or fails (a full disk)."""
    from scheduler.api import CampaignRun
    from shared.settings import load_settings

    seed_campaign(home)
    html = write_report(home, artifacts) / "report.html"
    run = CampaignRun("t-1", home, load_settings())
    assert run.report_path() == html
    assert "t-1/report" in home.resume_campaign("t-1")
    for state in ("PENDING", "QUEUED", "RUNNING"):
        if state == "QUEUED":
            home.claim_for_queue(["t-1/report"])
        elif state == "RUNNING":
            home.start_unit("t-1/report", worker="w", task_id=None)
        # nor by `status --json`, `submit/resume --wait` and scripts
        assert run.report_path() is None
        for args in (["t-1"], ["t-1", "--print"]):
            assert report(capsys, *args) == (
                2,
                "",
                f"orchard: error: campaign t-1: its report is being written again (its report "
                f"unit is {state}); the report at {html} is an earlier run's\n",
            )
    home.fail_unit("t-1/report", DISK_FULL)
    assert run.report_path() is None
    assert report(capsys, "t-1", "--print") == (
        2,
        "",
        f"orchard: error: campaign t-1 has no report: its report unit is FAILED: {DISK_FULL}; "
        f"the report at {html} is an earlier run's; `orchard resume t-1` runs it again\n",
    )


def test_a_report_unit_that_never_wrote_one_says_so_as_before(
    home: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_campaign(home)
    assert report(capsys, "t-1") == (2, "", "orchard: error: campaign t-1 has no report yet\n")
    home.fail_unit("t-1/report", DISK_FULL)
    assert report(capsys, "t-1") == (
        2,
        "",
        f"orchard: error: campaign t-1 has no report: its report unit is FAILED: {DISK_FULL}; "
        "`orchard resume t-1` runs it again\n",
    )


@pytest.mark.parametrize("name", ["report.md", "report.html"])
def test_a_report_file_changed_since_it_was_written_is_not_named(
    home: Store, artifacts: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    seed_campaign(home)
    changed = write_report(home, artifacts) / name
    changed.write_text("garbage")
    line = (
        f"orchard: error: campaign t-1: {changed} differs from its record (checksum): "
        "changed since its report unit wrote it; `orchard resume t-1` writes the report again\n"
    )
    assert report(capsys, "t-1") == (2, "", line)
    if name == "report.md":  # --print checks the file it prints
        assert report(capsys, "t-1", "--print") == (2, "", line)


@pytest.mark.parametrize("name", ["report.md", "report.html"])
def test_a_report_file_deleted_is_missing_not_another_artifact_folder(
    home: Store, artifacts: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """The campaign's folder is here: ORCHARD_ARTIFACTS is right, the file is gone."""
    seed_campaign(home)
    gone = write_report(home, artifacts) / name
    gone.unlink()
    line = (
        f"orchard: error: campaign t-1: {gone} is missing; `orchard resume t-1` writes the "
        "report again\n"
    )
    assert report(capsys, "t-1") == (2, "", line)
    if name == "report.md":
        assert report(capsys, "t-1", "--print") == (2, "", line)


def test_a_campaign_folder_not_on_this_host_blames_the_artifact_folder(
    home: Store,
    tmp_path: Path,
    artifacts: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed_campaign(home)
    write_report(home, artifacts)
    elsewhere = tmp_path / "not-the-share"
    monkeypatch.setenv("ORCHARD_ARTIFACTS", str(elsewhere))
    assert report(capsys, "t-1") == (
        2,
        "",
        "orchard: error: campaign t-1: campaigns/t-1/report/report.html is not under the "
        f"artifact folder {elsewhere} (ORCHARD_ARTIFACTS must be the folder, or shared mount, "
        "that the workers write to)\n",
    )
    markdown = elsewhere / "campaigns" / "t-1" / "report" / "report.md"
    assert report(capsys, "t-1", "--print") == (
        2,
        "",
        f"orchard: error: campaign t-1: cannot read {markdown}: No such file or directory "
        "(ORCHARD_ARTIFACTS must be the folder, or shared mount, that the workers write to)\n",
    )


def test_print_prints_the_bytes_it_checked(
    home: Store,
    artifacts: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Read once: a file replaced on the share right after its check is not read again."""
    import shared.artifacts

    seed_campaign(home)
    markdown = write_report(home, artifacts) / "report.md"
    checked = shared.artifacts.read_if_intact

    def then_replaced(path: Path, sha256: str) -> bytes | None:
        data = checked(path, sha256)
        Path(path).write_text("garbage")
        return data

    monkeypatch.setattr(shared.artifacts, "read_if_intact", then_replaced)
    assert report(capsys, "t-1", "--print") == (0, MARKDOWN.decode() + "\n", "")
    assert markdown.read_text() == "garbage"


def test_status_of_a_campaign_reads_its_units_once(
    home: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_campaign(home)
    reads = []
    units = Store.units

    def counted(self: Store, *args: object, **kwargs: object) -> list:
        reads.append((args, kwargs))
        return units(self, *args, **kwargs)

    monkeypatch.setattr(Store, "units", counted)
    assert main(["status", "t-1"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "t-1: RUNNING"
    assert len(reads) == 1


def test_utc_converts_an_aware_time_and_takes_a_naive_one_as_utc() -> None:
    berlin = timezone(timedelta(hours=1))
    assert as_utc(datetime(2026, 12, 6, 11, 13, 14, tzinfo=berlin)) == datetime(
        2026, 12, 6, 10, 13, 14, tzinfo=UTC
    )
    assert as_utc(datetime(2026, 12, 6, 11, 13, 14, tzinfo=berlin)).tzinfo is UTC
    assert as_utc(datetime(2026, 12, 6, 10, 13, 14)) == datetime(
        2026, 12, 6, 10, 13, 14, tzinfo=UTC
    )
    assert as_utc(None) is None


def test_status_prints_utc_times_from_a_store_in_another_zone(
    home: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """psycopg hands back times in the server session's zone (TimeZone = Europe/Berlin)."""
    seed_campaign(home)
    [campaign] = home.list_campaigns()
    created = as_utc(campaign.created_at)
    berlin = timezone(timedelta(hours=1))
    listed = Store.list_campaigns

    def in_berlin(self: Store, *args: object, **kwargs: object) -> list:
        return [
            replace(c, created_at=as_utc(c.created_at).astimezone(berlin))
            for c in listed(self, *args, **kwargs)
        ]

    monkeypatch.setattr(Store, "list_campaigns", in_berlin)
    assert main(["status"]) == 0
    [row] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("t-1 ")]
    assert row.endswith(f"{created:%Y-%m-%d %H:%M:%S}")
    assert main(["status", "--json"]) == 0
    [listed_json] = json.loads(capsys.readouterr().out)["campaigns"]
    assert listed_json["created_at"] == created.isoformat()
    assert listed_json["created_at"].endswith("+00:00")


def finish_campaign(store: Store, campaign_id: str = "t-1") -> None:
    """Every unit of ``campaign_id`` not SUCCESS run to SUCCESS, and the campaign DONE."""
    for unit in store.units(campaign_id):
        if unit.state != "SUCCESS":
            store.claim_for_queue([unit.key])
            store.start_unit(unit.key, worker="w", task_id=None)
            store.finish_unit(unit.key, Outcome(fit_seconds=1.0))
    assert store.complete_campaign(campaign_id) == "DONE"


@pytest.mark.parametrize("damage", ["removed", "changed"])
def test_status_of_a_done_campaign_says_when_its_report_is_damaged(
    home: Store, artifacts: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    """A report file removed or changed since its unit wrote it (an artifact folder
    restored from an older backup): `status` still says DONE, and says too that `resume`
    writes the report again."""
    seed_campaign(home)
    folder = write_report(home, artifacts)
    finish_campaign(home)
    assert main(["status", "t-1"]) == 0
    assert capsys.readouterr().err == ""  # intact: nothing said
    assert json.loads(_status_json(capsys))["campaign"]["report_damaged"] == []

    markdown = folder / "report.md"
    markdown.unlink() if damage == "removed" else markdown.write_text("garbage")
    assert main(["status", "t-1"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "t-1: DONE"
    assert err == (
        f"orchard: warning: campaign t-1: its report's {markdown} is missing or changed since "
        "its report unit wrote it: `orchard resume t-1` writes the report again\n"
    )
    assert json.loads(_status_json(capsys))["campaign"]["report_damaged"] == [str(markdown)]
    (folder / "report.html").unlink()
    assert main(["status", "t-1"]) == 0
    err = capsys.readouterr().err
    assert f"its report's {folder / 'report.html'}, {markdown} are missing or changed" in err


def test_status_says_nothing_of_a_report_whose_campaign_folder_is_not_on_this_host(
    home: Store,
    tmp_path: Path,
    artifacts: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A host that watches the store without the share cannot judge the files."""
    seed_campaign(home)
    write_report(home, artifacts)
    finish_campaign(home)
    monkeypatch.setenv("ORCHARD_ARTIFACTS", str(tmp_path / "not-the-share"))
    assert main(["status", "t-1"]) == 0
    assert capsys.readouterr().err == ""
    assert json.loads(_status_json(capsys))["campaign"]["report_damaged"] == []


def _status_json(capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["status", "t-1", "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def test_status_names_resume_for_a_damaged_report_of_a_done_campaign_alone(
    home: Store, artifacts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A resume of a CANCELLED (or PARTIAL) campaign runs its other units again too:
    not what a missing report file calls for."""
    seed_campaign(home)
    (write_report(home, artifacts) / "report.md").unlink()
    home.cancel_campaign("t-1")
    assert main(["status", "t-1"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "t-1: CANCELLED" and err == ""
    assert json.loads(_status_json(capsys))["campaign"]["report_damaged"] == []
