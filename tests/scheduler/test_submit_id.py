"""`orchard submit --id`: a campaign id the caller chooses, so that a submit retried (by
a script, a CI job run again) records and runs nothing twice."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from db.store import Store
from scheduler.api import submit
from shared.manifest import manifest_path
from shared.plan import PENDING, QUEUED
from tests.scheduler.test_bad_input_cli import REPO, assert_one_line_error
from tests.scheduler.test_submit_checks import SYNTHETIC

CAMPAIGN = SYNTHETIC + "[rf]\nn_estimators = 5\n"


def _messages(home: Path) -> list[Path]:
    """The task messages waiting in the filesystem broker's queues."""
    return sorted((home / "broker" / "queue").glob("*.msg"))


def _store(home: Path, url: str | None = None) -> Store:
    return Store(url or f"sqlite:///{home / 'orchard.db'}")


@pytest.fixture
def orchard(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., subprocess.CompletedProcess]:
    """`orchard ...` with no ORCHARD_ variable but ORCHARD_HOME, in this process (a
    second each saved): its exit code and output as a finished process's."""
    from scheduler.cli import main

    def run(*args: str, home: Path) -> subprocess.CompletedProcess:
        with monkeypatch.context() as env:
            for name in [k for k in os.environ if k.startswith("ORCHARD_")]:
                env.delenv(name)
            env.setenv("ORCHARD_HOME", str(home))
            code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


@pytest.fixture
def campaign(tmp_path: Path) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(CAMPAIGN)
    return path


def test_a_retried_submit_under_the_same_id_submits_nothing_again(
    tmp_path: Path, campaign: Path, orchard: Callable[..., subprocess.CompletedProcess]
) -> None:
    home = tmp_path / "home"
    first = orchard("submit", str(campaign), "--id", "nightly-1", home=home)
    assert (first.returncode, first.stdout) == (0, "nightly-1\n"), first.stderr
    sent = _messages(home)
    assert sent
    # the same campaign from another checkout (a CI job run again): the same settings
    again = tmp_path / "elsewhere" / "c.toml"
    again.parent.mkdir()
    again.write_text(CAMPAIGN)
    second = orchard("submit", str(again), "--id", "nightly-1", home=home)
    assert (second.returncode, second.stdout) == (0, "nightly-1\n"), second.stderr
    assert "campaign nightly-1 was submitted already, at " in second.stderr
    assert "and is RUNNING: nothing submitted again" in second.stderr
    assert _messages(home) == sent  # nothing sent twice
    store = _store(home)
    try:
        [recorded] = store.list_campaigns()
        assert (recorded.id, recorded.source) == ("nightly-1", str(campaign))
        assert {u.state for u in store.units("nightly-1")} == {QUEUED, PENDING}
    finally:
        store.dispose()


def test_an_id_taken_by_other_settings_is_refused(
    tmp_path: Path, campaign: Path, orchard: Callable[..., subprocess.CompletedProcess]
) -> None:
    home = tmp_path / "home"
    assert orchard("submit", str(campaign), "--id", "nightly-1", home=home).returncode == 0
    manifest = manifest_path(home / "artifacts" / "campaigns" / "nightly-1").read_bytes()
    campaign.write_text(CAMPAIGN.replace("n_estimators = 5", "n_estimators = 6"))
    done = orchard("submit", str(campaign), "--id", "nightly-1", home=home)
    assert_one_line_error(
        done,
        f"campaign nightly-1 was submitted already, from {campaign}, with other settings: "
        "nothing submitted; choose another id",
    )
    assert done.stdout == ""
    assert manifest_path(home / "artifacts" / "campaigns" / "nightly-1").read_bytes() == manifest


def test_an_id_that_cannot_be_one_is_refused_before_anything_is_read(
    tmp_path: Path, campaign: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from scheduler.cli import main

    for name in [k for k in os.environ if k.startswith("ORCHARD_")]:
        monkeypatch.delenv(name)
    home = tmp_path / "home"
    monkeypatch.setenv("ORCHARD_HOME", str(home))
    for bad in ["Nightly", "-x", "a/b", "a.b", "x" * 81, ""]:
        for dry_run in ((), ("--dry-run",)):
            assert main(["submit", str(campaign), f"--id={bad}", *dry_run]) == 2
            assert capsys.readouterr().err == (
                f"orchard: error: campaign id {bad!r}: an id is 1 to 80 lowercase letters, "
                "digits, '-' and '_', the first a letter or a digit\n"
            )
    assert not home.exists()


def test_a_resubmit_sends_what_the_first_submit_recorded_but_could_not_send(
    tmp_path: Path, campaign: Path, orchard: Callable[..., subprocess.CompletedProcess]
) -> None:
    """The first submit recorded the campaign and its broker then refused the units
    (`advance` puts them back to PENDING): the retry sends them."""
    home = tmp_path / "home"
    assert orchard("submit", str(campaign), "--id", "nightly-1", home=home).returncode == 0
    store = _store(home)
    try:
        queued = [u.key for u in store.units("nightly-1") if u.state == QUEUED]
        store.unclaim(queued)
        for message in _messages(home):
            message.unlink()
        done = orchard("submit", str(campaign), "--id", "nightly-1", home=home)
        assert (done.returncode, done.stdout) == (0, "nightly-1\n"), done.stderr
        assert [u.key for u in store.units("nightly-1") if u.state == QUEUED] == queued
        assert len(_messages(home)) == len(queued)
    finally:
        store.dispose()


def test_what_a_killed_submit_left_is_taken_over_and_anything_more_is_refused(
    tmp_path: Path, campaign: Path, orchard: Callable[..., subprocess.CompletedProcess]
) -> None:
    home = tmp_path / "home"
    folder = home / "artifacts" / "campaigns" / "nightly-1"
    folder.mkdir(parents=True)
    # killed between writing the manifest and recording the campaign
    manifest_path(folder).write_text("{}")
    (folder / ".manifest.json.x1y2.tmp").write_text("{")
    (folder / ".submitting").touch()
    done = orchard("submit", str(campaign), "--id", "nightly-1", home=home)
    assert (done.returncode, done.stdout) == (0, "nightly-1\n"), done.stderr
    assert manifest_path(folder).read_text() != "{}"

    # a recorded campaign's, another store's sharing the folder: no mark of a submit
    recorded = home / "artifacts" / "campaigns" / "nightly-4"
    recorded.mkdir()
    manifest_path(recorded).write_text("{}")
    done = orchard("submit", str(campaign), "--id", "nightly-4", home=home)
    assert_one_line_error(done, "another store's campaign under ORCHARD_ARTIFACTS")
    assert manifest_path(recorded).read_text() == "{}"

    other = home / "artifacts" / "campaigns" / "nightly-2"
    (other / "models").mkdir(parents=True)  # more than a killed submit leaves
    done = orchard("submit", str(campaign), "--id", "nightly-2", home=home)
    assert_one_line_error(
        done,
        f"campaign nightly-2: its folder {other} is there, but the store (sqlite:///"
        f"{home / 'orchard.db'}) records no such campaign: another store's campaign under "
        "ORCHARD_ARTIFACTS, or not a campaign's; nothing submitted",
    )
    assert sorted(p.name for p in other.iterdir()) == ["models"]
    # not a campaign's: `orchard delete` leaves a folder with no .deleting mark alone
    assert_one_line_error(orchard("delete", "nightly-2", home=home), "no campaign 'nightly-2'")
    assert other.is_dir()


def test_what_a_delete_left_under_a_chosen_id_is_removed_by_deleting_it_again(
    tmp_path: Path, campaign: Path, orchard: Callable[..., subprocess.CompletedProcess]
) -> None:
    home = tmp_path / "home"
    assert orchard("db", "upgrade", home=home).returncode == 0
    folder = home / "artifacts" / "campaigns" / "nightly-3"
    (folder / "models").mkdir(parents=True)
    (folder / ".deleting").touch()  # its rows deleted, its folder not removed
    done = orchard("submit", str(campaign), "--id", "nightly-3", home=home)
    assert_one_line_error(
        done, "records no such campaign: what a delete left, which `orchard delete nightly-3`"
    )
    done = orchard("delete", "nightly-3", home=home)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("removed what was left of deleted campaign nightly-3: ")
    assert not folder.exists()
    assert orchard("submit", str(campaign), "--id", "nightly-3", home=home).returncode == 0


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_concurrent_submits_under_one_id_record_one_campaign(
    tmp_path: Path, campaign: Path, database: str, request: pytest.FixtureRequest
) -> None:
    home = tmp_path / "home"
    url = (
        f"sqlite:///{home / 'orchard.db'}"
        if database == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    env = {"ORCHARD_HOME": str(home), "ORCHARD_DATABASE_URL": url}
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ORCHARD_")}
    submits = [
        subprocess.Popen(
            [sys.executable, "-m", "scheduler.cli", "submit", str(campaign), "--id", "n-1"],
            cwd=REPO,
            env={**environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outcomes = [(p.wait(120), *p.communicate()) for p in submits]
    assert [(code, out) for code, out, _ in outcomes] == [(0, "n-1\n")] * 3, outcomes
    already = [err for _, _, err in outcomes if "was submitted already" in err]
    assert len(already) == 2, outcomes
    store = _store(home, url)
    try:
        assert [c.id for c in store.list_campaigns()] == ["n-1"]
        sent = sum(u.state == QUEUED for u in store.units("n-1"))
    finally:
        store.dispose()
    assert len(_messages(home)) == sent


def test_the_python_api_returns_the_campaign_recorded_before(
    tmp_path: Path, campaign: Path
) -> None:
    home = tmp_path / "home"
    options = {
        "broker": f"filesystem://{home / 'broker'}",
        "database": f"sqlite:///{home / 'orchard.db'}",
        "artifacts": home / "artifacts",
    }
    with submit(campaign, campaign_id="api-1", **options) as first:
        assert first.resubmitted is None
        with submit(campaign, campaign_id="api-1", **options) as second:
            assert second.id == "api-1"
            assert second.resubmitted is not None
            assert second.resubmitted.created_at == first.status().campaign.created_at


def test_a_retried_submit_with_reuse_reads_the_recorded_manifest(
    tmp_path: Path, campaign: Path, orchard: Callable[..., subprocess.CompletedProcess]
) -> None:
    home = tmp_path / "home"
    assert orchard("submit", str(campaign), "--id", "r-1", "--reuse", home=home).returncode == 0
    again = orchard("submit", str(campaign), "--id", "r-1", "--reuse", home=home)
    assert (again.returncode, again.stdout) == (0, "r-1\n"), again.stderr
    assert "reused 0 finished unit(s) from earlier campaigns" in again.stderr
    manifest_path(home / "artifacts" / "campaigns" / "r-1").unlink()  # its share gone
    gone = orchard("submit", str(campaign), "--id", "r-1", "--reuse", home=home)
    assert_one_line_error(gone, "manifest.json: the campaign's manifest is not there")
