"""`orchard status` lists campaigns whose ids can be copied into the next command: never
cut, at any terminal width, and plain columns (no box characters) when piped."""

from __future__ import annotations

import contextlib
import os
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from db.store import Store
from scheduler.cli import main
from tests.db.test_store import seed_campaign

IDS = ("quick-20261127-130325-1ee0", "study-rf-feature-selection-20261127-130325-1ee0")
BOX = set("━┃┏┓┗┛┡┩│─└┘┌┐┳┻╇╈┼")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    url = f"sqlite:///{tmp_path / 'orchard.db'}"
    monkeypatch.setenv("ORCHARD_DATABASE_URL", url)
    monkeypatch.setenv("ORCHARD_BROKER_URL", f"filesystem://{tmp_path / 'broker'}")
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS"):
        monkeypatch.delenv(name, raising=False)
    store = Store(url)
    store.upgrade()
    return store


def status(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["status", *args]) == 0
    out, err = capsys.readouterr()
    assert not err
    return ANSI.sub("", out)


def on_a_terminal(monkeypatch: pytest.MonkeyPatch, width: int) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich: a terminal, though pytest captures it
    monkeypatch.setenv("COLUMNS", str(width))


def test_an_80_column_terminal_shows_the_whole_id_in_a_table(
    store: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_campaign(store, IDS[0])
    on_a_terminal(monkeypatch, 80)
    out = status(capsys)
    assert BOX & set(out)  # still a table
    assert max(len(line) for line in out.splitlines()) <= 80
    [row] = [line for line in out.splitlines() if IDS[0] in line]
    assert "RUNNING" in row and "0/7" in row


@pytest.mark.parametrize("width", [40, 60, 80, 100, 120, 200])
def test_no_terminal_width_cuts_an_id(
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    width: int,
) -> None:
    for campaign_id in IDS:
        seed_campaign(store, campaign_id)
    on_a_terminal(monkeypatch, width)
    out = status(capsys)
    for campaign_id in IDS:
        assert re.search(rf"(^|\s){campaign_id}(\s|$)", out, re.MULTILINE), out
    assert "…" not in out


@pytest.mark.parametrize("width", [52, 60, 80, 120])
def test_a_campaign_s_unit_keys_stay_whole_and_its_messages_fold(
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    width: int,
) -> None:
    """At 80 columns every column used to fold: keys cut in two (`cnn/aeb895e` /
    `1d414/f0`). The keys stay whole, the columns a narrow terminal can do without go
    first, and long messages fold."""
    plans = seed_campaign(store, IDS[0])
    failed = plans[-2].key
    store.claim_for_queue([failed])
    store.start_unit(failed, worker="cpu-1234@orchard-head.example.org", task_id=None)
    error = "/data/mango/train/000.jpg: changed since the campaign was submitted " * 2
    store.fail_unit(failed, error.strip())
    on_a_terminal(monkeypatch, width)
    out = status(capsys, IDS[0])
    assert BOX & set(out) and max(len(line) for line in out.splitlines()) <= width
    for plan in plans:
        key = plan.key.removeprefix(IDS[0] + "/")
        assert re.search(rf"(^|\s){re.escape(key)}(\s|$)", out, re.MULTILINE), (key, out)
    if width >= 120:
        assert "cpu-1234@orchard-head.example.org" in out and "not shown" not in out
    else:
        [caption] = [line for line in out.splitlines() if "not shown at this width:" in line]
        assert "worker" in caption and "progress" in out
    assert "FAILED" in out and "campaign" in out and "submitted" in out


def test_piped_output_is_plain_columns(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    for campaign_id in IDS:
        seed_campaign(store, campaign_id)
    out = status(capsys)  # captured: not a terminal, as `orchard status | grep quick`
    assert not BOX & set(out)
    lines = out.splitlines()
    assert lines[1].split() == ["id", "name", "state", "units", "done/total", "failed",
                                "cancelled", "running", "created"]  # fmt: skip
    for campaign_id in IDS:
        [row] = [line for line in lines if line.startswith(campaign_id + " ")]
        assert row.split()[1:5] == ["t", "RUNNING", "0/7", "0"]
    units = status(capsys, IDS[0])
    assert not BOX & set(units)
    assert units.splitlines()[0] == f"{IDS[0]}: RUNNING"
    assert any(line.split()[:4] == ["report", "PENDING", "0", "-"] for line in units.splitlines())


@pytest.mark.parametrize("width", [40, 60, 80, 92])
def test_a_terminal_too_narrow_for_a_table_gets_plain_columns_without_the_drops(
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    width: int,
) -> None:
    """README: a narrow terminal leaves out `created`, then `name`, then `cancelled`; the
    plain columns it falls back to when even that table is too wide leave them out too."""
    for campaign_id in IDS:
        seed_campaign(store, campaign_id)
    on_a_terminal(monkeypatch, width)
    lines = status(capsys).splitlines()
    assert not BOX & set("".join(lines))
    assert lines[1].split() == ["id", "state", "units", "done/total", "failed", "running"]
    for campaign_id in IDS:
        [row] = [line for line in lines if line.startswith(campaign_id + " ")]
        assert row.split()[1:] == ["RUNNING", "0/7", "0", "0"]
    assert lines[-1] == "not shown at this width: name, cancelled, created"


def test_piped_output_keeps_every_column_whatever_the_width(
    store: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pipe has no width: scripts reading `orchard status | ...` get the same columns
    whatever COLUMNS says."""
    seed_campaign(store, IDS[1])
    monkeypatch.setenv("COLUMNS", "40")
    lines = status(capsys).splitlines()
    assert len(lines[1].split()) == 9 and lines[1].split()[-1] == "created"
    assert len(lines) == 3  # the title, the header, the campaign: nothing said below


def test_watch_needs_a_campaign(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    seed_campaign(store, IDS[0])
    assert main(["status", "--watch"]) == 2
    out, err = capsys.readouterr()
    assert not out
    assert err == (
        "orchard: error: --watch follows one campaign: give its id, `orchard status ID --watch`\n"
    )


def test_done_counts_succeeded_units_not_cancelled_ones(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    from dataclasses import replace

    from tests.db.test_store import outcome

    plans = seed_campaign(store, IDS[0])
    first = plans[0].key
    store.claim_for_queue([first])
    store.start_unit(first, worker="w", task_id=None)
    store.finish_unit(first, replace(outcome(), artifacts=[]))
    store.cancel_campaign(IDS[0])
    [row] = [line.split() for line in status(capsys).splitlines() if IDS[0] in line]
    # id name state done/total failed cancelled running created(2 words)
    assert row[2:7] == ["CANCELLED", f"1/{len(plans)}", "0", str(len(plans) - 1), "0"]


def test_a_reused_unit_says_where_it_came_from(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    from dataclasses import replace

    from tests.db.test_store import outcome

    plans = seed_campaign(store, IDS[0])
    key = plans[-2].key  # a model unit
    store.claim_for_queue([key])
    store.start_unit(key, worker="w", task_id=None)
    source = "quick-20261127-000000-0000/" + key.removeprefix(IDS[0] + "/")
    store.finish_unit(key, replace(outcome(), artifacts=[], extra={"reused_from": source}))
    [row] = [line for line in status(capsys, IDS[0]).splitlines() if "SUCCESS" in line]
    assert row.rstrip().endswith(f"reused from {source}")


def test_a_unit_handed_back_says_it_is_queued_again(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    fold = next(p for p in seed_campaign(store, IDS[0]) if p.family == "cnn")
    store.claim_for_queue([fold.key])
    store.start_unit(fold.key, worker="gpu0@a", task_id=None, holder="d1", lease_seconds=30)
    store.record_metrics(fold.key, 1, {"val_acc": 0.5})  # two epochs done
    assert store.hand_back(fold.key, "d1")
    [row] = [
        line for line in status(capsys, IDS[0]).splitlines() if "/f0" in line and "cnn" in line
    ]
    assert "QUEUED" in row and row.rstrip().endswith("queued again after epoch 2: was on gpu0@a")


def test_campaigns_beyond_the_newest_50_are_counted_and_listed_with_all(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = [f"c-{i:03d}" for i in range(52)]
    for campaign_id in ids:
        seed_campaign(store, campaign_id)
    assert main(["status"]) == 0
    out, err = capsys.readouterr()
    assert sum(line.startswith("c-") for line in out.splitlines()) == 50
    assert err == "... 2 older campaign(s) not shown; --all lists every one\n"
    assert main(["status", "--all"]) == 0
    out, err = capsys.readouterr()
    assert {line.split()[0] for line in out.splitlines() if line.startswith("c-")} == set(ids)
    assert not err


def _statements_of_status(capsys: pytest.CaptureFixture[str], *args: str) -> int:
    from sqlalchemy import Engine, event

    sent: list[str] = []

    def count(conn, cursor, statement, *_rest) -> None:  # noqa: ANN001
        if not statement.lstrip().upper().startswith(("BEGIN", "COMMIT", "ROLLBACK", "PRAGMA")):
            sent.append(statement)

    event.listen(Engine, "before_cursor_execute", count)
    try:
        status(capsys, *args)
    finally:
        event.remove(Engine, "before_cursor_execute", count)
    return len(sent)


def test_the_list_costs_the_same_queries_for_two_campaigns_or_six(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(2):
        seed_campaign(store, f"t-{i}")
    two = _statements_of_status(capsys)
    for i in range(2, 6):
        seed_campaign(store, f"t-{i}")
    assert _statements_of_status(capsys) == two
    out = status(capsys)
    assert all(f"t-{i}" in out for i in range(6))
    assert out.count("0/7") == 6  # done/total per campaign, from the one count query


def test_a_campaign_costs_the_same_queries_with_one_running_fold_or_two(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.db.test_store import deliver, outcome

    seed_campaign(store, "t-1")
    folds = [u for u in store.units("t-1") if u.family == "cnn"]
    for unit in folds:
        deliver(store, unit.key, worker="w@h", task_id=unit.key)
        store.record_metrics(unit.key, 0, {"val_acc": 0.5})
    both = _statements_of_status(capsys, "t-1")
    assert status(capsys, "t-1").count("epoch 1/1 val_acc=0.500") == 2
    store.finish_unit(folds[1].key, outcome())
    assert _statements_of_status(capsys, "t-1") == both


def test_an_error_recorded_with_control_characters_is_shown_not_sent(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    """Recorded by a worker of an earlier orchard, which wrote errors as they came."""
    from sqlalchemy import update

    from db.models import UnitRow
    from tests.db.test_store import deliver

    (unit, *_) = seed_campaign(store, "t-1")
    deliver(store, unit.key, worker="w@h", task_id=unit.key)
    store.fail_unit(unit.key, "x")
    with store.engine.begin() as conn:
        conn.execute(
            update(UnitRow)
            .where(UnitRow.key == unit.key)
            .values(error="ValueError: bad \x1b]0;pwned\x07\x1b[2J")
        )
    out = status(capsys, "t-1")
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b]0;pwned\\x07\\x1b[2J" in out


def test_json_lists_campaigns_with_their_unit_counts(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    from datetime import datetime

    plans = seed_campaign(store, IDS[0])
    seed_campaign(store, IDS[1])
    store.cancel_campaign(IDS[1])
    document = json.loads(status(capsys, "--json"))
    assert document["store"] == store.url and document["not_shown"] == 0
    by_id = {c["id"]: c for c in document["campaigns"]}
    assert by_id[IDS[0]]["state"] == "RUNNING" and by_id[IDS[1]]["state"] == "CANCELLED"
    none = dict.fromkeys(("PENDING", "QUEUED", "RUNNING", "SUCCESS", "FAILED", "CANCELLED"), 0)
    # every state, 0 too: a script's `.units.FAILED` was null, not 0
    assert by_id[IDS[0]]["units"] == {"total": len(plans), **none, "PENDING": len(plans)}
    assert by_id[IDS[1]]["units"] == {"total": len(plans), **none, "CANCELLED": len(plans)}
    assert by_id[IDS[0]]["finished_at"] is None
    for moment in (by_id[IDS[1]]["created_at"], by_id[IDS[1]]["finished_at"]):
        assert datetime.fromisoformat(moment).utcoffset().total_seconds() == 0  # UTC, said so


def test_json_of_a_campaign_has_every_unit_and_a_running_folds_epoch(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    from dataclasses import replace

    from tests.db.test_store import deliver, outcome

    plans = seed_campaign(store, IDS[0])
    fold = next(p for p in plans if p.family == "cnn")
    deliver(store, fold.key, worker="gpu0@a", task_id=fold.key, holder="d1", lease_seconds=300)
    store.record_metrics(fold.key, 0, {"val_acc": 0.25})
    point = plans[-2].key
    deliver(store, point, worker="cpu@b", task_id=point)
    threads = {"blas": 2, "torch": 1}
    extra = {"reused_from": "x/y", "threads": threads}
    store.finish_unit(point, replace(outcome(0.75), artifacts=[], extra=extra))
    document = json.loads(status(capsys, IDS[0], "--json"))
    campaign = document["campaign"]
    assert (campaign["id"], campaign["state"], campaign["report"]) == (IDS[0], "RUNNING", None)
    assert campaign["units"] == {
        "total": len(plans),
        "PENDING": len(plans) - 2,
        "QUEUED": 0,
        "RUNNING": 1,
        "SUCCESS": 1,
        "FAILED": 0,
        "CANCELLED": 0,
    }
    units = {u["key"]: u for u in document["units"]}
    assert list(units) == [p.key for p in plans]  # in plan order, every one
    running = units[fold.key]
    assert running["epoch"] == {"done": 1, "of": 1, "val_acc": 0.25}
    assert (running["state"], running["worker"], running["val_acc"]) == ("RUNNING", "gpu0@a", None)
    # to match Flower and the workers' logs, and to tell a lease running out
    assert running["task_id"] == fold.key
    lease = store.get_unit(fold.key)
    assert running["heartbeat_at"] == lease.heartbeat_at.replace(tzinfo=UTC).isoformat()
    assert running["lease_expires_at"] > running["heartbeat_at"]
    done = units[point]
    assert done["lease_expires_at"] is None  # no lease once it ended
    assert (done["state"], done["val_acc"], done["reused_from"]) == ("SUCCESS", 0.75, "x/y")
    assert (done["threads"], running["threads"]) == (threads, None)
    assert done["params"] == plans[-2].params and done["family"] == plans[-2].family


def test_json_names_an_unknown_campaign_in_one_line(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "nope-1", "--json"]) == 2
    out, err = capsys.readouterr()
    assert not out and err == f"orchard: error: no campaign 'nope-1' in {store.url}\n"


def test_json_with_watch_prints_once_at_the_end(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    seed_campaign(store, IDS[0])
    store.cancel_campaign(IDS[0])
    out = status(capsys, IDS[0], "--watch", "--json")
    assert json.loads(out)["campaign"]["state"] == "CANCELLED"  # one document, nothing more


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_json_is_valid_with_accuracies_that_are_not_finite(
    store_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    value: float,
) -> None:
    """JSON has no NaN or Infinity (which Python's json writes, and jq refuses): such an
    accuracy or time is null. (SQLite keeps an infinity and stores a NaN as NULL;
    PostgreSQL keeps both. The store now writes neither, but an older one may hold them.)"""
    import json
    import math
    from dataclasses import replace

    from sqlalchemy import update

    from db.models import MetricRow, ResultRow
    from tests.db.test_store import deliver, outcome

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    monkeypatch.setenv("ORCHARD_DATABASE_URL", store_url)
    store = Store(store_url)
    store.upgrade()
    sqlite_nan = store_url.startswith("sqlite") and math.isnan(value)  # NULL: NOT NULL columns
    plans = seed_campaign(store, IDS[0])
    fold = next(p for p in plans if p.family == "cnn")
    deliver(store, fold.key, worker="gpu0@a", task_id=fold.key)
    store.record_metrics(fold.key, 0, {"val_acc": 0.5})
    point = plans[-2].key
    deliver(store, point, worker="cpu@b", task_id=point)
    store.finish_unit(point, replace(outcome(0.5), artifacts=[]))
    # the store writes such numbers no more (None, or left out), but a store written
    # before it did may hold them
    with store.engine.begin() as conn:
        if not sqlite_nan:
            conn.execute(update(MetricRow).values(value=value))
        seconds = {} if sqlite_nan else {"fit_seconds": value}
        conn.execute(update(ResultRow).values(val_acc=value, **seconds))
    document = json.loads(status(capsys, IDS[0], "--json"), parse_constant=refuse)
    units = {u["key"]: u for u in document["units"]}
    assert units[point]["val_acc"] is None
    if not sqlite_nan:
        assert units[point]["fit_seconds"] is None
        assert units[fold.key]["epoch"] == {"done": 1, "of": 1, "val_acc": None}


def test_json_is_ascii_whatever_stdout_encodes(
    store: Store, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker name or an error beyond ASCII on a stdout that is not UTF-8
    (PYTHONIOENCODING=latin-1) is escaped, not a UnicodeEncodeError's traceback."""
    import io
    import json
    import sys

    from sqlalchemy import update

    from db.models import UnitRow

    plans = seed_campaign(store, IDS[0])
    with store.engine.begin() as conn:
        conn.execute(
            update(UnitRow)
            .where(UnitRow.key == plans[-2].key)
            .values(worker="wörker@höst", error="échec ✗ 失败\x1b[2J")
        )
    out = io.TextIOWrapper(io.BytesIO(), encoding="latin-1")
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["status", IDS[0], "--json"]) == 0
    out.flush()
    text = out.buffer.getvalue().decode("ascii")
    unit = next(u for u in json.loads(text)["units"] if u["key"] == plans[-2].key)
    assert (unit["worker"], unit["error"]) == ("wörker@höst", "échec ✗ 失败\x1b[2J")


def test_a_running_unit_whose_lease_ran_out_says_its_worker_is_gone(
    store: Store, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILLed, its host down: the unit stays RUNNING until the workers send it again
    (two lease periods); status says why instead of showing it as alive."""
    from tests.db.test_store import deliver

    plans = seed_campaign(store, IDS[0])
    alive, dead = plans[0].key, plans[1].key
    deliver(store, alive, worker="w@h", task_id="a", holder="a", lease_seconds=600)
    deliver(store, dead, worker="gone@h", task_id="b", holder="b", lease_seconds=0.01)
    import time

    import scheduler.views

    monkeypatch.setattr(scheduler.views, "LEASE_SLACK", 0.0)  # no clocks apart here
    time.sleep(0.1)
    rows = {line.split()[0]: line for line in status(capsys, IDS[0]).splitlines()[2:]}
    short = {key: key.removeprefix(IDS[0] + "/") for key in (alive, dead)}
    assert "lease ran out" not in rows[short[alive]]
    assert re.search(
        r"RUNNING .* gone@h .* lease ran out \d+ s ago: its worker is gone, stuck or cut off "
        "from the database; sent again within two lease periods$",
        rows[short[dead]],
    ), rows[short[dead]]


def test_a_live_lease_is_judged_by_the_store_s_clock_not_this_host_s(
    store: Store, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host whose clock runs two minutes ahead of the store's (the PostgreSQL server
    writes the leases by its own) saw every healthy worker's lease as run out."""
    from datetime import timedelta

    from tests.db.test_store import deliver

    plans = seed_campaign(store, IDS[0])
    deliver(store, plans[0].key, worker="w@h", task_id="a", holder="a", lease_seconds=60)
    import scheduler.views

    class Ahead(datetime):
        @classmethod
        def now(cls, tz=None):  # noqa: ANN001, ANN206
            return datetime.now(tz) + timedelta(minutes=2)

    monkeypatch.setattr(scheduler.views, "datetime", Ahead)
    rows = status(capsys, IDS[0]).splitlines()[2:]
    line = next(r for r in rows if r.split()[0] == plans[0].key.removeprefix(IDS[0] + "/"))
    assert "RUNNING" in line and "lease ran out" not in line, line


def test_a_terminal_shows_a_big_campaign_s_units_not_succeeded_first() -> None:
    """Rich took seconds to lay out a grid of thousands of rows: a terminal gets at most
    MAX_TERMINAL_UNITS, the failed, running and queued ones first, in plan order; the
    title says where every unit is."""
    from scheduler.views import MAX_TERMINAL_UNITS, terminal_rows

    states = ["SUCCESS"] * 500
    states[3] = "FAILED"
    states[450] = "RUNNING"
    cells = [[f"svm/p{i}/f0", state] for i, state in enumerate(states)]
    title, columns, shown = terminal_rows(("c-1: RUNNING", ("unit", "state"), cells))
    assert len(shown) == MAX_TERMINAL_UNITS and columns == ("unit", "state")
    assert shown[:5] == [cells[0], cells[1], cells[2], cells[3], cells[4]]
    assert cells[450] in shown and shown[-1] == cells[450]  # kept, in plan order
    assert title == (
        f"c-1: RUNNING ({MAX_TERMINAL_UNITS} of 500 units shown, those not succeeded first; "
        "piped or with --json, every unit)"
    )
    small = ("c-2: DONE", ("unit", "state"), cells[:10])
    assert terminal_rows(small) == small


def test_a_watch_fits_the_terminal_with_the_units_not_succeeded_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """rich cuts a live display at the bottom of the screen: on an 80 x 24 terminal a
    running fold after thirty finished shards was never seen."""
    from rich.console import Console

    import scheduler.views

    cells = [[f"c-1/preprocess/s{i:05d}", "SUCCESS", "1", "w@h", "0.1", ""] for i in range(30)]
    cells.append(["c-1/cnn/f0", "RUNNING", "1", "gpu0@h", "", "epoch 2/100 val_acc=0.400"])
    cells += [[f"c-1/cnn/f{i}", "QUEUED", "0", "", "", ""] for i in range(1, 5)]
    columns = ["unit", "state", "tries", "worker", "seconds", "note"]
    monkeypatch.setattr(scheduler.views, "unit_rows", lambda store, cid: ("c-1", columns, cells))
    for width, height in ((80, 24), (60, 24), (120, 12)):
        console = Console(width=width, height=height, record=True, force_terminal=True)
        console.print(scheduler.views.units_table(None, "c-1", console))
        text = console.export_text()
        assert len(text.splitlines()) <= height - 2, (width, height)
        assert "RUNNING" in text and "QUEUED" in text, (width, height)
        assert "units shown, those not succeeded first" in text.replace("\n", " ")


def test_sigterm_or_ctrl_c_stop_the_watching_alone_saying_the_campaign_goes_on(
    tmp_path: Path,
) -> None:
    """As Ctrl-C does: rich's display is restored (its cursor shown again) and the
    line says what goes on and how to follow or stop it."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    url = f"sqlite:///{tmp_path / 'orchard.db'}"
    store = Store(url)
    store.upgrade()
    seed_campaign(store, IDS[0])
    env = {
        **__import__("os").environ,
        "ORCHARD_HOME": str(tmp_path),
        "ORCHARD_DATABASE_URL": url,
        "ORCHARD_BROKER_URL": f"filesystem://{tmp_path / 'broker'}",
    }
    # and `--watch --json`, whose document comes at the end (it said nothing, or
    # "interrupted")
    runs = [
        (extra, sig, code)
        for extra in ([], ["--json"])
        for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129))
    ]
    for extra, sig, code in runs:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler.cli", "status", IDS[0], "--watch", *extra],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until it watches: its store is open
            with contextlib.suppress(FileNotFoundError):
                fds = Path(f"/proc/{proc.pid}/fd").iterdir()
                if any(os.readlink(fd).endswith("orchard.db") for fd in fds):
                    break
            time.sleep(0.05)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        # 128 + the signal's number, not -2: a Ctrl-C that came inside a string's exec
        # (a module loading) once made CPython end `python -m` by SIGINT (exit_as_main)
        assert proc.returncode == code, (proc.returncode, err)
        assert err == (
            f"orchard: stopped watching; campaign {IDS[0]} goes on (`orchard status {IDS[0]} "
            f"--watch` follows it, `orchard cancel {IDS[0]}` stops it)\n"
        )
    assert store.get_campaign(IDS[0]).state == "RUNNING"


def test_a_watch_under_nohup_keeps_sighup_ignored() -> None:
    """`nohup orchard submit --wait`: the terminal's hangup must not stop the watching."""
    import signal

    from scheduler.cli import _watching

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with _watching("c-1"):
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_watch_on_a_terminal_too_short_for_a_table_shows_the_counts_and_the_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At 80 x 5 the watch showed its title alone: no row fitted under the header."""
    from rich.console import Console

    import scheduler.views

    cells = [[f"preprocess/s{i:05d}", "SUCCESS", "1", "w@h", "0.1", "", ""] for i in range(3)]
    cells.append(["cnn/h/f0", "RUNNING", "1", "gpu0@h", "", "", "epoch 2/100 val_acc=0.400"])
    cells.append(["cnn/h/f1", "QUEUED", "0", "", "", "", ""])
    columns = ["unit", "state", "tries", "worker", "seconds", "val acc", "progress / error"]
    monkeypatch.setattr(
        scheduler.views, "unit_rows", lambda store, cid: ("c-1: RUNNING", columns, cells)
    )
    console = Console(width=80, height=5, record=True, force_terminal=True)
    console.print(scheduler.views.units_table(None, "c-1", console))
    assert console.export_text().splitlines() == [
        "c-1: RUNNING: 3 SUCCESS, 1 RUNNING, 1 QUEUED",
        "cnn/h/f0 RUNNING epoch 2/100 val_acc=0.400",
        "cnn/h/f1 QUEUED",
    ]


@pytest.mark.parametrize("terminal", [True, False])
def test_file_names_and_worker_names_are_shown_as_they_are_never_obeyed(
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    terminal: bool,
) -> None:
    """A unit's error repeats a dataset's file name, which may hold rich's markup
    ("[/red]" stopped `status` with a MarkupError on a terminal; "[link=…]" made a
    hyperlink), and a worker started by `celery worker -n` may be named with ESC
    sequences (they retitled the window, cleared the screen). Both are shown as text."""
    units = seed_campaign(store, IDS[0])
    key = units[0].key
    worker = "w\x1b]0;PWNED\x07\x1b[2J@h"
    store.claim_for_queue([key])
    store.start_unit(key, worker=worker, task_id="t", holder="d1")
    error = "PreprocessError: /d/x[/red]/[link=https://evil.example]a[conceal]b.png: changed"
    store.fail_unit(key, error, holder="d1")
    if terminal:
        on_a_terminal(monkeypatch, 200)
    assert main(["status", IDS[0]]) == 0
    out, err = capsys.readouterr()
    assert not err
    assert "\x1b]" not in out and "\x1b[2J" not in out and "\x07" not in out
    text = ANSI.sub("", out)
    assert "x[/red]/[link=https://evil.example]a[conceal]b.png" in text
    assert "w\\x1b]0;PWNED\\x07\\x1b[2J@h" in text


def test_a_unit_s_earlier_attempts_are_shown(
    store: Store, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fold whose first worker was killed, run to the end by the second: `tries 2`
    and the second worker were all status said of it."""
    import json
    import time
    from dataclasses import replace

    from tests.db.test_store import deliver, outcome

    monkeypatch.setenv("COLUMNS", "250")
    plans = seed_campaign(store, IDS[0])
    fold = next(p for p in plans if p.family == "cnn").key
    deliver(store, fold, worker="gpu-7413@vm", task_id="t1", holder="d1", lease_seconds=0.2)
    time.sleep(0.4)
    store.requeue_lost(0.0, lambda: "t2")
    store.start_unit(fold, worker="gpu-8630@vm", task_id="t2", holder="d2")
    store.finish_unit(fold, replace(outcome(), artifacts=[]), holder="d2")
    table = status(capsys, IDS[0])
    [row] = [line for line in table.splitlines() if fold.removeprefix(IDS[0] + "/") in line]
    assert "gpu-8630@vm" in row
    assert "after an earlier run on gpu-7413@vm: sent again (its worker lost" in row
    units = {u["key"]: u for u in json.loads(status(capsys, IDS[0], "--json"))["units"]}
    [earlier] = units[fold]["earlier_attempts"]
    assert (earlier["worker"], earlier["state"], earlier["error"]) == (
        "gpu-7413@vm",
        "QUEUED",
        None,
    )
    heard, started = (datetime.fromisoformat(earlier[k]) for k in ("last_heard_at", "started_at"))
    assert heard >= started
    assert all(u["earlier_attempts"] == [] for key, u in units.items() if key != fold)


def _killed(store: Store, key: str) -> None:
    """Every delivery of ``key`` dies without a result, until the store gives up on it."""
    from tests.db.test_store import deliver

    for attempt in range(1, 5):
        deliver(
            store, key, worker="w", task_id="t", holder=f"d{attempt}", lease_seconds=0,
            max_attempts=3,
        )  # fmt: skip
    assert store.get_unit(key).error.startswith("gave up after 3 attempts")


def test_units_whose_workers_were_killed_are_told_with_the_memory_they_hold(
    store: Store, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch
) -> None:
    """An OOM kill leaves no error of its own: status says what the unit holds, by the
    estimate a dry run shows, where the campaign's manifest is on this host."""
    from scheduler.api import CampaignRun
    from shared.manifest import Entry, Manifest, manifest_path
    from shared.settings import load_settings

    monkeypatch.setenv("ORCHARD_ARTIFACTS", str(tmp_path / "artifacts"))
    plans = seed_campaign(store, IDS[0])
    svm = [p.key for p in plans if p.family == "svm"]
    for key in svm:
        _killed(store, key)
    assert main(["status", IDS[0]]) == 0
    line = 'orchard: warning: campaign {}: 2 units failed with no delivery ending in a result (a worker killed, by the OOM killer most often, or the database away){}: see the README, "How much memory a worker needs"\n'  # noqa: E501
    assert capsys.readouterr().err == line.format(IDS[0], "")  # no manifest here: no sizes
    entries = tuple(
        Entry(f"{i}.jpg", "ABC"[i % 3], "train", f"/d/{i}.jpg", i % 2) for i in range(600)
    )
    manifest = Manifest(("A", "B", "C"), entries, "f" * 64, "k" * 16, 256, 256)
    path = manifest_path(tmp_path / "artifacts" / "campaigns" / IDS[0])
    path.parent.mkdir(parents=True)
    path.write_text(manifest.to_json())
    memory = CampaignRun(IDS[0], store, load_settings()).unit_memory()
    assert set(memory) == {p.key for p in plans}
    largest = max(svm, key=lambda key: memory[key])
    assert memory[largest] > 600 * 256 * 256 * 3  # the variant's images, at least
    assert main(["status", IDS[0]]) == 0
    held = f"; the largest of them, {largest}, holds about {memory[largest] / 1e9:.1f} GB in its worker process by orchard's estimate"  # noqa: E501
    assert capsys.readouterr().err == line.format(IDS[0], held)
