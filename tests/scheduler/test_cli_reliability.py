"""`orchard resume`, `orchard cancel` and `submit --reuse` at the command line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from db.store import Store
from scheduler.cli import _parser, main
from tests.db.test_store import seed_campaign


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    url = f"sqlite:///{tmp_path / 'orchard.db'}"
    monkeypatch.setenv("ORCHARD_DATABASE_URL", url)
    monkeypatch.setenv("ORCHARD_BROKER_URL", f"filesystem://{tmp_path / 'broker'}")
    store = Store(url)
    store.upgrade()
    return store


def test_parser_knows_the_reliability_commands() -> None:
    parser = _parser()
    assert parser.parse_args(["submit", "x.toml", "--reuse"]).reuse is True
    assert parser.parse_args(["submit", "x.toml"]).reuse is False
    assert parser.parse_args(["resume", "c-1", "--wait"]).campaign == "c-1"
    assert parser.parse_args(["cancel", "c-1"]).campaigns == ["c-1"]
    assert parser.parse_args(["cancel", "c-1", "c-2"]).campaigns == ["c-1", "c-2"]


def test_cancel_and_resume_of_an_unknown_campaign_is_one_line(
    home: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in ("cancel", "resume"):
        assert main([command, "nope"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("orchard: error: no campaign 'nope'") and err.count("\n") == 1


def test_cancel_marks_the_campaign(home: Store, capsys: pytest.CaptureFixture[str]) -> None:
    seed_campaign(home)  # nothing queued yet: nothing to revoke, no broker needed
    assert main(["cancel", "t-1"]) == 0
    assert "CANCELLED" in capsys.readouterr().out
    assert home.get_campaign("t-1").state == "CANCELLED"
    assert {u.state for u in home.units("t-1")} == {"CANCELLED"}
    # already cancelled: says so, and what a cancel asks holds (a script's retry)
    assert main(["cancel", "t-1"]) == 0
    assert capsys.readouterr().err == (
        "orchard: campaign t-1 is already CANCELLED: nothing to cancel\n"
    )


def test_cancel_of_several_campaigns_cancels_each_and_names_an_unknown_one(
    home: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    """`... | xargs orchard cancel`: each id on its own, one unknown stops no other."""
    seed_campaign(home, "t-1")
    seed_campaign(home, "t-2")
    assert main(["cancel", "t-1", "nope", "t-2", "t-1"]) == 2
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "campaign t-1: CANCELLED (7 unit(s) stopped, 0 task(s) revoked)",
        "campaign t-2: CANCELLED (7 unit(s) stopped, 0 task(s) revoked)",
    ]
    [line] = captured.err.splitlines()
    assert line.startswith("orchard: error: no campaign 'nope'")
    assert {home.get_campaign(c).state for c in ("t-1", "t-2")} == {"CANCELLED"}


def test_cancel_of_several_campaigns_with_the_broker_away_is_one_line(
    home: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What fails them all (the broker, the store) is said once, with its own code."""
    for cid in ("t-1", "t-2"):
        seed_campaign(home, cid)
    monkeypatch.setenv("ORCHARD_BROKER_URL", "redis://127.0.0.1:1/0")
    assert main(["cancel", "t-1", "t-2"]) == 75
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("orchard: error: broker redis://127.0.0.1:1/0 unreachable")
    assert {home.get_campaign(c).state for c in ("t-1", "t-2")} == {"RUNNING"}


def test_resume_of_a_campaign_whose_units_all_succeeded_says_there_is_nothing_to_do(
    home: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    from dataclasses import replace

    from tests.db.test_store import outcome

    for plan in seed_campaign(home):
        home.claim_for_queue([plan.key])
        home.start_unit(plan.key, worker="w", task_id=None)
        home.finish_unit(plan.key, replace(outcome(), artifacts=[]))
    home.complete_campaign("t-1")
    assert main(["resume", "t-1"]) == 0
    out = capsys.readouterr().out
    assert out == "campaign t-1 is DONE: every unit succeeded, nothing to re-enqueue\n"
    assert home.get_campaign("t-1").state == "DONE"


def test_resume_of_a_done_campaign_whose_report_files_changed_writes_the_report_again(
    home: Store,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An artifact folder restored from an older backup, a report edited by hand: the
    report's files no longer match their records. Resume writes them again."""
    from dataclasses import replace

    from db.store import Artifact
    from shared.artifacts import sha256_file
    from tests.db.test_store import outcome

    monkeypatch.setenv("ORCHARD_ARTIFACTS", str(tmp_path / "artifacts"))
    html = tmp_path / "artifacts" / "campaigns" / "t-1" / "report" / "report.html"
    html.parent.mkdir(parents=True)
    html.write_text("<html>the report</html>")
    for plan in seed_campaign(home):
        home.claim_for_queue([plan.key])
        home.start_unit(plan.key, worker="w", task_id=None)
        files = []
        if plan.family == "report":
            rel = html.relative_to(tmp_path / "artifacts").as_posix()
            size = html.stat().st_size
            files = [Artifact(rel, "report", sha256_file(html), size, "t-1", plan.key)]
        home.finish_unit(plan.key, replace(outcome(), artifacts=files))
    home.complete_campaign("t-1")
    assert main(["resume", "t-1"]) == 0  # its files as written: nothing to do
    assert capsys.readouterr().out.endswith("every unit succeeded, nothing to re-enqueue\n")

    html.write_text("<html>the report, edited</html>")
    assert main(["resume", "t-1"]) == 0
    assert capsys.readouterr().out == "campaign t-1: re-enqueued its report\n"
    assert home.get_campaign("t-1").state == "RUNNING"
    assert {u.key for u in home.units("t-1") if u.state != "SUCCESS"} == {"t-1/report"}


def test_cancel_with_an_unreachable_broker_changes_nothing(
    home: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The revokes could not be sent: the campaign stays as it was, one line says why."""
    plans = seed_campaign(home)
    home.claim_for_queue([plans[0].key], {plans[0].key: "task-0"})  # one task to revoke
    monkeypatch.setenv("ORCHARD_BROKER_URL", "redis://:hunter2@127.0.0.1:1/0")
    assert main(["cancel", "t-1"]) == 75  # sysexits' EX_TEMPFAIL: try again later
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("orchard: error: broker redis://:***@127.0.0.1:1/0 unreachable")
    assert home.get_campaign("t-1").state == "RUNNING"
    assert "CANCELLED" not in {u.state for u in home.units("t-1")}


def test_resume_while_a_unit_still_runs_says_so(
    home: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every unit succeeded but the report, which a live worker is writing."""
    from dataclasses import replace

    from tests.db.test_store import outcome

    *models, report = seed_campaign(home)
    for plan in models:
        home.claim_for_queue([plan.key])
        home.start_unit(plan.key, worker="w", task_id=None)
        home.finish_unit(plan.key, replace(outcome(), artifacts=[]))
    home.claim_for_queue([report.key])
    home.start_unit(report.key, worker="w", task_id=None, holder="d-1")  # a live lease
    assert main(["resume", "t-1"]) == 0
    out = capsys.readouterr().out
    assert out == "campaign t-1 is RUNNING: 1 unit(s) still running, nothing to re-enqueue\n"
    assert {u.key: u.state for u in home.units("t-1")}[report.key] == "RUNNING"


def test_report_of_a_campaign_whose_report_failed_says_so_and_what_to_do(
    home: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    plans = seed_campaign(home)
    assert main(["report", "t-1"]) == 2
    assert capsys.readouterr().err == "orchard: error: campaign t-1 has no report yet\n"
    [report] = [p for p in plans if p.family == "report"]
    home.fail_unit(report.key, "OSError: [Errno 30] Read-only file system: '/a/report'")
    assert main(["report", "t-1"]) == 2
    assert capsys.readouterr().err == (
        "orchard: error: campaign t-1 has no report: its report unit is FAILED: "
        "OSError: [Errno 30] Read-only file system: '/a/report'; "
        "`orchard resume t-1` runs it again\n"
    )
    plans = seed_campaign(home, "t-2")
    home.cancel_campaign("t-2")
    assert main(["report", "t-2"]) == 2
    assert capsys.readouterr().err == (
        "orchard: error: campaign t-2 has no report: its report unit is CANCELLED; "
        "`orchard resume t-2` runs it again\n"
    )


def test_resume_counts_the_units_it_sends_again_apart_from_the_report(
    home: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    from dataclasses import replace

    from tests.db.test_store import outcome

    plans = seed_campaign(home)
    failed = {plans[-2].key, plans[-3].key}
    for plan in plans:
        home.claim_for_queue([plan.key])
        home.start_unit(plan.key, worker="w", task_id=None)
        if plan.key in failed:
            home.fail_unit(plan.key, "boom")
        else:
            home.finish_unit(plan.key, replace(outcome(), artifacts=[]))
    home.complete_campaign("t-1")
    assert home.get_campaign("t-1").state == "PARTIAL"
    assert main(["resume", "t-1"]) == 0
    assert capsys.readouterr().out == "campaign t-1: re-enqueued 2 unit(s), and its report\n"


def test_submit_reuse_finds_the_same_images_under_another_root(
    home: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The dataset named once by its mount and once through a symlink to it (as another
    host's path would name it): other manifest files, the same data, so the second
    campaign copies what the first finished."""
    from dataclasses import replace

    from tests.aicup import make_aicup
    from tests.db.test_store import outcome

    monkeypatch.setenv("ORCHARD_ARTIFACTS", str(tmp_path / "artifacts"))
    real = make_aicup(tmp_path / "mnt-a" / "mango", per_class=4)
    (tmp_path / "data").symlink_to(tmp_path / "mnt-a")
    ids, said = [], []
    for root, extra in ((real, []), (tmp_path / "data" / "mango", ["--reuse"])):
        campaign = tmp_path / f"c{len(ids)}.toml"
        campaign.write_text(
            f'name = "c"\nfolds = 2\n[dataset]\nkind = "aicup"\nroot = "{root}"\n'
            '[preprocessing]\nsize = 32\n[svm]\nvariant = "resize8"\nn_components = [2]\n'
        )
        assert main(["submit", str(campaign), *extra]) == 0
        out, err = capsys.readouterr()
        ids.append(out.split()[-1])
        said.append(err)
        if len(ids) == 1:
            for unit in home.units(ids[0]):
                if unit.family == "svm":
                    home.claim_for_queue([unit.key])
                    home.start_unit(unit.key, worker="w", task_id=None)
                    home.finish_unit(unit.key, replace(outcome(), artifacts=[]))
    assert "reused 1 finished unit(s) from earlier campaigns" in said[1]
    [svm] = [u for u in home.units(ids[1]) if u.family == "svm"]
    assert svm.state == "SUCCESS" and svm.attempts == 0
    manifests = [home.artifacts(i, kind="manifest")[0].sha256 for i in ids]
    assert manifests[0] != manifests[1]


def test_a_wait_or_watch_stops_after_its_timeout_and_the_campaign_goes_on(
    home: Store, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CI job's `orchard status ID --watch` or `resume --wait` had no limit but the
    job's own (`timeout` gave 124 and no line): `--timeout S` stops following after S
    seconds with 124, timeout(1)'s code, and the line saying where the campaign is. A
    resume with nothing to send again while the campaign runs waited for nothing."""
    from dataclasses import replace

    from tests.db.test_store import deliver, outcome

    for variable in ("FORCE_COLOR", "TTY_COMPATIBLE"):  # set by some CI runners
        monkeypatch.delenv(variable, raising=False)
    plans = seed_campaign(home)
    for plan in plans[:-1]:
        deliver(home, plan.key, worker="w", task_id=None)
        home.finish_unit(plan.key, replace(outcome(), artifacts=[]))
    # the report runs, its worker alive: nothing for a resume to send
    deliver(home, plans[-1].key, worker="w", task_id=None, holder="d1", lease_seconds=300)

    assert main(["status", "t-1", "--watch", "--timeout", "0.3"]) == 124
    out, err = capsys.readouterr()
    assert err == "orchard: error: campaign t-1 not finished after 0.3 s: 6 succeeded, 1 running\n"
    assert main(["resume", "t-1", "--wait", "--timeout", "0.3"]) == 124
    out, err = capsys.readouterr()
    assert out.startswith("campaign t-1 is RUNNING: 1 unit(s) still running, nothing to re")
    assert err.endswith("not finished after 0.3 s: 6 succeeded, 1 running\n")
    # stderr a pipe (a CI job's log, which a job without output for long is killed
    # over): the counts as a line, where before it had none for the whole wait
    assert re.match(r"\d\d:\d\d:\d\dZ \w+ \d+/\d+.*\norchard: error: ", err), err
    assert main(["status", "t-1", "--json", "--watch", "--timeout", "0.3"]) == 124
    assert capsys.readouterr().out == ""  # no document of a campaign not yet finished

    for args in (["status", "t-1"], ["resume", "t-1"], ["submit", "c.toml"]):
        assert main([*args, "--timeout", "5"]) == 2
        flag = "watch" if args[0] == "status" else "wait"
        assert capsys.readouterr().err == (
            f"orchard: error: --timeout is how long --{flag} follows the campaign: give both\n"
        )
