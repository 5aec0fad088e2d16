"""What a user following a campaign is told. Its progress bars time each stage (from its
first unit's start to its last unit's end). A campaign whose units wait with no worker
taking any from their queue says so: in
``orchard status ID`` (stderr, below the table) and once per new set of queues while
``run.wait`` follows it. The store's side is tested in tests/db/test_store.py
(``untaken_queues``); real workers on another database in
tests/integration/test_reliability.py."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

import scheduler.api as api
import scheduler.run as campaign_run
from db.store import Store
from scheduler import progress
from scheduler.api import CampaignRun
from scheduler.cli import main
from shared.errors import OrchardError
from shared.settings import Settings
from tests.db.test_store import seed_campaign

CID = "t-1"


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CampaignRun:
    url = f"sqlite:///{tmp_path / 'orchard.db'}"
    broker = f"filesystem://{tmp_path / 'broker'}"
    monkeypatch.setenv("ORCHARD_DATABASE_URL", url)
    monkeypatch.setenv("ORCHARD_BROKER_URL", broker)
    store = Store(url)
    store.upgrade()
    plans = seed_campaign(store, CID)
    store.claim_for_queue([p.key for p in plans if p.stage == 0])  # sent; no worker takes them
    settings = Settings(
        home=tmp_path, broker_url=broker, database_url=url, artifacts=tmp_path / "artifacts"
    )
    return CampaignRun(CID, store, settings)


def test_stalled_names_the_queue_and_both_urls(run: CampaignRun) -> None:
    assert run.stalled(after=3600) is None  # not waited that long
    line = run.stalled(after=0)
    assert line is not None
    assert "queue `preprocess` for 0 s" in line
    assert f"ORCHARD_DATABASE_URL={run.settings.database_url}" in line
    assert f"ORCHARD_BROKER_URL={run.settings.broker_url}? (" in line  # no Redis, no prefix
    # a broker that lost its messages (restarted without persistence) too: the mend
    assert "a broker restarted without persistence loses them" in line
    assert line.endswith(f"`orchard resume {run.id}` sends them now.)")


@pytest.mark.parametrize("prefix", [None, "lab-a:"])
def test_stalled_on_redis_names_the_key_prefix_too(
    run: CampaignRun, monkeypatch: pytest.MonkeyPatch, prefix: str | None
) -> None:
    """A worker with another ORCHARD_REDIS_PREFIX takes from other queues: as likely a
    cause as another URL, and not in either URL."""
    from dataclasses import replace

    if prefix is None:
        monkeypatch.delenv("ORCHARD_REDIS_PREFIX", raising=False)
    else:
        monkeypatch.setenv("ORCHARD_REDIS_PREFIX", prefix)
    run.settings = replace(run.settings, broker_url="redis://:secret@10.0.0.5:6379/0")
    line = run.stalled(after=0)
    said = "no ORCHARD_REDIS_PREFIX" if prefix is None else f"ORCHARD_REDIS_PREFIX={prefix}"
    assert f"ORCHARD_BROKER_URL=redis://:***@10.0.0.5:6379/0 and {said}? (A worker" in line


def test_wait_tells_once_for_the_same_queues(
    run: CampaignRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(campaign_run, "STALL_SECONDS", 0.0)
    monkeypatch.setattr(campaign_run, "STALL_CHECK_SECONDS", 0.0)
    told: list[str] = []
    with pytest.raises(OrchardError, match="not finished after"):
        run.wait(timeout=0.5, poll=0.05, on_stall=told.append)
    assert len(told) == 1 and "queue `preprocess`" in told[0]


def test_wait_s_timeout_counts_the_units_in_words(run: CampaignRun) -> None:
    """One line, also for `orchard demo --timeout`: no Python dict of states. A script
    catches it as WaitTimeout, with the last status read."""
    shard = next(u.key for u in run.status().units if u.state == "QUEUED")
    run.store.start_unit(shard, worker="w", task_id=None)
    with pytest.raises(api.WaitTimeout) as raised:
        run.wait(timeout=0, poll=0.001)
    assert (
        str(raised.value)
        == f"campaign {CID} not finished after 0 s: 1 running, 1 queued, 5 pending"
    )
    assert isinstance(raised.value, OrchardError)
    with pytest.raises(api.WaitTimeout, match=f"^campaign {CID} not finished after 0.01 s: "):
        run.wait(timeout=0.01, poll=0.001)  # not "after 0 s"
    assert raised.value.status.counts()["RUNNING"] == 1
    with pytest.raises(ValueError, match="at least 0"):
        run.wait(timeout=-1)
    for poll in (0, -1, float("nan"), "1"):  # 0 read the store as fast as it could
        with pytest.raises(ValueError, match="poll must be a number of seconds above 0"):
            run.wait(timeout=1, poll=poll)


def test_wait_with_progress_prints_the_stall_line_above_the_bars(
    run: CampaignRun, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As `--wait` does: a script's `run.wait(progress=True)` is not silent for ever
    when no worker takes the units."""
    monkeypatch.setattr(campaign_run, "STALL_SECONDS", 0.0)
    monkeypatch.setattr(campaign_run, "STALL_CHECK_SECONDS", 0.0)
    with pytest.raises(api.WaitTimeout):
        run.wait(timeout=0.3, poll=0.05, progress=True)
    err = capsys.readouterr().err
    assert err.count("orchard: warning: campaign t-1: no worker has taken a unit") == 1


def test_status_of_a_stalled_campaign_says_so_on_stderr(
    run: CampaignRun, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(campaign_run, "STALL_SECONDS", 0.0)
    assert main(["status", CID]) == 0
    out, err = capsys.readouterr()
    assert "preprocess/s00000" in out and "QUEUED" in out
    assert err.startswith(f"orchard: warning: campaign {CID}: no worker has taken a unit")


def test_status_says_nothing_once_a_worker_took_a_unit(
    run: CampaignRun, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(campaign_run, "STALL_SECONDS", 0.0)
    key = next(u.key for u in run.status().units if u.state == "QUEUED")
    run.store.start_unit(key, worker="w", task_id=None)
    assert main(["status", CID]) == 0
    assert capsys.readouterr().err == ""


def test_each_family_s_progress_clock_runs_only_while_its_stage_does(run: CampaignRun) -> None:
    """`--wait`'s bars time each stage, not the time since submit."""
    import time

    def task(display: progress.ProgressBars, family: str):  # noqa: ANN202
        return display._progress._tasks[display._tasks[family]]

    display = progress.ProgressBars()
    try:
        display.update(run.status().by_family(), {})
        assert task(display, "cnn").start_time is None  # PENDING: not started
        assert task(display, "preprocess").start_time is None  # QUEUED: not started either
        shards = [u.key for u in run.status().units if u.family == "preprocess"]
        run.store.start_unit(shards[0], worker="w", task_id=None)
        display.update(run.status().by_family(), {})
        assert task(display, "preprocess").start_time is not None
        for key in shards[1:]:
            run.store.start_unit(key, worker="w", task_id=None)
        for key in shards:
            run.store.fail_unit(key, "x")
        display.update(run.status().by_family(), {})
        stopped = task(display, "preprocess").elapsed
        time.sleep(0.05)
        display.update(run.status().by_family(), {})
        assert task(display, "preprocess").elapsed == stopped  # ended: the clock stopped
        assert task(display, "cnn").start_time is None
    finally:
        display.close()


def test_a_poll_reads_counts_not_every_unit(run: CampaignRun) -> None:
    """`wait` polls a campaign of thousands of units with one aggregate per poll; every
    unit is read once, for the status it returns."""
    polls = []
    real_counts = run.store.family_counts

    def family_counts(campaign_id: str) -> dict[str, dict[str, int]]:
        polls.append(campaign_id)
        if len(polls) == 3:
            run.store.cancel_campaign(CID)  # finished on the third poll
        return real_counts(campaign_id)

    run.store.family_counts = family_counts  # type: ignore[method-assign]
    real_units = run.store.units
    unit_reads = []
    run.store.units = lambda *a, **k: unit_reads.append(k) or real_units(*a, **k)  # type: ignore[method-assign]
    status = run.wait(poll=0.001, progress=True)
    assert status.campaign.state == "CANCELLED" and len(status.units) == 7
    assert len(polls) == 4 and unit_reads == [{}]  # the status returned, once


def test_the_epoch_of_each_running_fold_is_read_in_one_query(run: CampaignRun) -> None:
    from tests.db.test_store import deliver
    from tests.db.test_store_scale import count

    folds = [u for u in run.store.units(CID) if u.family == "cnn"]
    assert len(folds) == 2
    for unit in folds:
        deliver(run.store, unit.key, worker="w@h", task_id=unit.key)
    run.store.record_metrics(folds[0].key, 0, {"val_acc": 0.5})
    status = run.status()
    assert run.epochs(status) == {folds[0].key: "f0 epoch 1/1"}  # f1 reported none yet
    assert count(run.store, lambda: run.epochs(status)) == 1


class _Clock:
    """``time`` for scheduler.api: reads advance it, sleeps are recorded."""

    def __init__(self) -> None:
        self.now, self.sleeps = 0.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_wait_reads_less_often_after_a_slow_read_but_never_past_its_deadline(
    run: CampaignRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _Clock()
    monkeypatch.setattr(campaign_run, "time", clock)
    reads = iter([2.0, 0.1, 0.1, 30.0, 0.1])  # seconds each poll's read takes
    real_get = run.store.get_campaign

    polls: list[float] = []

    def get_campaign(campaign_id: str) -> api.Campaign:
        # then one more read: the status WaitTimeout holds, after the deadline
        polls.append(clock.now)
        clock.now += next(reads, 0.0)
        return real_get(campaign_id)

    monkeypatch.setattr(run.store, "get_campaign", get_campaign)
    with pytest.raises(OrchardError, match="not finished after"):
        run.wait(timeout=40, poll=0.5)
    # 2 x 2 s; then poll; then 2 x 30 s (a database outage's retries) capped at 5 s, and
    # cut to the 2.8 s left before the deadline
    assert clock.sleeps == pytest.approx([4.0, 0.5, 0.5, 2.8])
    assert len(polls) == 6 and polls[4] <= 40 < polls[5]  # the fifth poll's read ran past it


def test_the_bars_have_no_refresh_thread_to_leave_behind() -> None:
    """The bars are redrawn at each poll by the waiting thread. A refresh thread of
    their own, caught starting by the demo's SIGTERM (or not yet ended when rich's stop
    returned), outlived the interpreter's shutdown and died noisily."""
    import threading

    before = set(threading.enumerate())
    display = progress.ProgressBars()
    try:
        display.update({"svm": {"QUEUED": 2, "SUCCESS": 1}}, {})
        assert not set(threading.enumerate()) - before  # none of its own
    finally:
        display.close()


def test_the_bars_and_their_warnings_go_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    """`submit --wait` draws them when stderr is a terminal: on stdout they were mixed
    into what a script reads (`ID=$(orchard submit c.toml --wait)`), and a terminal
    whose stdout went to a file saw nothing for the whole wait."""

    display = progress.ProgressBars()
    try:
        display.update({"svm": {"QUEUED": 2, "SUCCESS": 1}}, {})
        display.warn("no worker has taken a unit")
    finally:
        display.close()
    out, err = capsys.readouterr()
    assert out == ""
    assert "svm" in err and "1/3" in err and "orchard: warning: no worker has taken a unit" in err


def test_a_terminal_that_cannot_redraw_gets_a_line_per_change(
    run: CampaignRun, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """TERM=dumb (an editor's shell, a job log through a pty), or a script's
    ``wait(progress=True)`` with stderr in a file: rich would draw the bars once, at the
    end, so `--wait` and `status --watch` said nothing for hours. They print the
    families' counts on stderr as a line whenever they change, and `--watch` its table
    once, at the end."""
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    # stderr a file or a pipe (captured, here): a script's log gets lines too, but at
    # most one per PIPED_LINE_SECONDS
    piped = progress.progress_display()
    assert isinstance(piped, progress.ProgressLines) and piped._every == progress.PIPED_LINE_SECONDS
    monkeypatch.setenv("FORCE_COLOR", "1")  # a terminal, for rich, though captured
    monkeypatch.setenv("TERM", "xterm")
    bars = progress.progress_display()
    bars.close()
    assert isinstance(bars, progress.ProgressBars)
    monkeypatch.setenv("TERM", "dumb")
    display = progress.progress_display()
    assert isinstance(display, progress.ProgressLines)
    capsys.readouterr()
    counts = {"preprocess": {"SUCCESS": 2}, "cnn": {"RUNNING": 1, "PENDING": 1}}
    display.update(counts, {f"{CID}/cnn/h/f0": "f0 epoch 3/60"})
    display.update(counts, {f"{CID}/cnn/h/f0": "f0 epoch 3/60"})  # no change: no line
    display.update(counts, {f"{CID}/cnn/h/f0": "f0 epoch 4/60"})
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "preprocess 2/2; cnn 0/2 (1 pending, 1 running, f0 epoch 3/60)",
        "preprocess 2/2; cnn 0/2 (1 pending, 1 running, f0 epoch 4/60)",
    ]
    assert not any("\x1b" in line or "━" in line for line in lines)
    # in UTC, as every time orchard prints (it was the local time, unmarked)
    assert all(re.fullmatch(r"\d\d:\d\d:\d\dZ", line.split(" ", 1)[0]) for line in lines)

    run.store.cancel_campaign(CID)  # its last poll, as a watch ends
    assert main(["status", CID, "--watch"]) == 0
    out, err = capsys.readouterr()
    assert "preprocess 2/2 (2 cancelled); cnn 2/2 (2 cancelled)" in err
    assert "CANCELLED" in out and "\x1b[?25l" not in out + err  # no live display


def test_a_run_s_results_are_its_succeeded_units(run: CampaignRun) -> None:
    from dataclasses import replace

    from tests.db.test_store import deliver, outcome

    assert run.results() == {}
    svm = next(u for u in run.status().units if u.family == "svm")
    deliver(run.store, svm.key, worker="w@h", task_id=None)
    run.store.finish_unit(svm.key, replace(outcome(0.75), artifacts=[]))
    [(key, result)] = run.results().items()
    assert key == svm.key and result.val_acc == 0.75 and result.train_acc == 0.9


@pytest.mark.parametrize("width", [40, 60])
def test_a_narrow_terminal_cuts_the_running_folds_note_not_the_bars(
    monkeypatch: pytest.MonkeyPatch, width: int
) -> None:
    """At 40 columns the note pushed the bar and the count off the line
    (`cnn          1 running, f1 epoch 16/60 …`); the count and the clock stay whole,
    three-digit totals too, and the note gets what is left (none at 40)."""
    from rich.console import Console

    monkeypatch.setenv("COLUMNS", str(width))
    display = progress.ProgressBars()
    try:
        display.update(
            {
                "preprocess": {"SUCCESS": 30},
                "svm": {"QUEUED": 120},
                "cnn": {"RUNNING": 1, "QUEUED": 3, "SUCCESS": 1},
            },
            {f"{CID}/cnn/h/f1": "f1 epoch 16/60"},
        )
        bars = display._progress
        console = Console(width=width, record=True, force_terminal=True, color_system=None)
        console.print(bars.make_tasks_table(bars.tasks))
    finally:
        display.close()
    lines = console.export_text().splitlines()
    assert lines[0].startswith("preprocess") and "30/30 " in lines[0] and "0:00:00" in lines[0]
    assert lines[1].startswith("svm ") and " 0/120 " in lines[1] and "-:--:--" in lines[1]
    assert lines[2].startswith("cnn ") and " 1/5 " in lines[2] and "━" in lines[2]
    assert all(len(line) <= width for line in lines)
    assert ("3 queued" in lines[2]) is (width > 50)


def _connections(database_url: str, *, allowed: bool) -> None:
    """Let the real PostgreSQL take connections to the database, or refuse them and end
    those it has: an outage of that database alone, as a restart or a failover is."""
    from sqlalchemy import create_engine, text

    from tests.conftest import POSTGRES_ADMIN

    name = database_url.rsplit("/", 1)[1]
    admin = create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}'))
            if not allowed:
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
                    ),
                    {"n": name},
                )
    finally:
        admin.dispose()


def test_a_wait_outlasts_a_database_outage_and_says_so(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`submit --wait`, `status --watch` and `run.wait()` ended with exit 2 five seconds
    into a database failover (the store's own retries), as if the campaign had failed,
    while it went on. Now the wait says so once, goes on, says when the database answers
    again, and ends with the campaign. A timeout during an outage says what it knows."""
    import threading

    from shared.settings import mask_url
    from tests.integration.workerpool import wait_for

    monkeypatch.setattr(campaign_run, "STALL_CHECK_SECONDS", 3600.0)
    store = Store(postgres_url, retry_seconds=0.3)
    store.upgrade()
    seed_campaign(store, CID)
    settings = Settings(
        home=tmp_path,
        broker_url=f"filesystem://{tmp_path / 'broker'}",
        database_url=postgres_url,
        artifacts=tmp_path / "artifacts",
    )
    run = CampaignRun(CID, store, settings)
    told: list[str] = []
    ended: dict[str, object] = {}

    def follow() -> None:
        try:
            ended["status"] = run.wait(timeout=120, poll=0.05, on_stall=told.append)
        except Exception as exc:  # noqa: BLE001 - the test says what it was
            ended["error"] = exc

    follower = threading.Thread(target=follow)
    follower.start()
    try:
        time.sleep(0.3)
        _connections(postgres_url, allowed=False)
        wait_for(lambda: told or ended, 30, "the outage told")
        time.sleep(1.0)  # several polls into it
        assert "error" not in ended and len(told) == 1, (told, ended)
        _connections(postgres_url, allowed=True)
        wait_for(lambda: len(told) > 1, 30, "the database answering told")
        Store(postgres_url).cancel_campaign(CID)
        follower.join(30)
    finally:
        _connections(postgres_url, allowed=True)
        follower.join(30)
    assert ended["status"].campaign.state == "CANCELLED", ended
    where = mask_url(postgres_url)
    assert told[0].startswith(f"database {where} unreachable: ")
    assert told[0].endswith(f"; campaign {CID} goes on, and this wait with it")
    assert told[1:] == [f"database {where} answers again"]

    _connections(postgres_url, allowed=False)
    try:
        with pytest.raises(api.WaitTimeout) as raised:
            CampaignRun(CID, store, settings).wait(timeout=0.5, poll=0.05)
    finally:
        _connections(postgres_url, allowed=True)
    assert raised.value.status is None
    assert str(raised.value).startswith(
        f"campaign {CID} not known to be finished after 0.5 s: database {where} unreachable"
    )


def test_piped_progress_lines_come_seldom_and_the_last_counts_always(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A grid of a thousand short units wrote a line per unit into a CI job's log; the
    counts the campaign ended with are written, however soon after the line before."""
    display = progress.ProgressLines(every=0.3)
    for done in range(1, 4):  # three changes at once: the first is printed
        display.update({"svm": {"SUCCESS": done, "QUEUED": 9 - done}}, {})
    display.refresh()
    time.sleep(0.35)
    display.refresh()  # the pending change, once the time has come
    display.update({"svm": {"SUCCESS": 3, "QUEUED": 6}}, {})  # no change: nothing
    display.update({"svm": {"SUCCESS": 9}}, {})
    display.close()
    lines = [line.split(" ", 1)[1] for line in capsys.readouterr().err.splitlines()]
    assert lines == [
        "svm 1/9 (8 queued)",
        "svm 3/9 (6 queued)",
        "svm 9/9",
    ]


def test_piped_progress_says_the_same_counts_again_after_a_long_silence(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A fold that reports no epoch for many minutes left a CI job's log silent, and
    CI services kill a job after some minutes without output."""
    display = progress.ProgressLines(every=0.05, again=1.0)
    display.update({"cnn": {"RUNNING": 1}}, {})
    display.refresh()
    time.sleep(0.1)
    display.update({"cnn": {"RUNNING": 1}}, {})  # unchanged, and not long: nothing
    time.sleep(1.0)
    display.update({"cnn": {"RUNNING": 1}}, {})  # unchanged for long: again
    display.close()
    lines = [line.split(" ", 1)[1] for line in capsys.readouterr().err.splitlines()]
    assert lines == ["cnn 0/1 (1 running)"] * 2
    piped = progress.progress_display()  # stderr captured: a pipe
    assert (piped._every, piped._again) == (
        progress.PIPED_LINE_SECONDS,
        progress.PIPED_KEEPALIVE_SECONDS,
    )
