"""A command stopped by Ctrl-C, SIGTERM or SIGHUP: one line, the clean-ups done, and a
submit stopped once its campaign was recorded says so, with the id."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from db.store import Store
from scheduler import api
from scheduler.cli import main
from tests.scheduler.test_bad_input_cli import REPO
from tests.scheduler.test_submit_checks import SYNTHETIC

CAMPAIGN = SYNTHETIC + "[rf]\nn_estimators = 5\n"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in [k for k in os.environ if k.startswith("ORCHARD_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("ORCHARD_HOME", str(tmp_path / "home"))
    (tmp_path / "c.toml").write_text(CAMPAIGN)
    return tmp_path / "home"


def _stop_while_sending(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """The submit's send is stopped once the campaign is recorded: Ctrl-C, or a real
    SIGTERM to this process, which the command's handler raises where it is."""
    real = api._send

    def stopped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        monkeypatch.setattr(api, "_send", real)  # the retry sends
        if how == "SIGINT":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not stop the submit")

    monkeypatch.setattr(api, "_send", stopped)


@pytest.mark.parametrize(("how", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_submit_stopped_once_recorded_prints_its_id_and_the_retry_sends_it(
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    how: str,
    code: int,
) -> None:
    """It said `orchard: interrupted` (or nothing, on SIGTERM) and no id, and the same
    submit again made a second campaign."""
    _stop_while_sending(monkeypatch, how)
    campaign = str(home.parent / "c.toml")
    assert main(["submit", campaign, "--id", "n-1"]) == code
    out, err = capsys.readouterr()
    assert out == "n-1\n"
    assert err == (
        "orchard: stopped; campaign n-1 IS recorded, but what it has ready may not all be "
        "sent: `orchard resume n-1` sends the rest (do not submit it again)\n"
    )
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back
    store = Store(f"sqlite:///{home / 'orchard.db'}")
    try:
        assert {u.state for u in store.units("n-1")} == {"PENDING"}  # nothing sent
        # the same submit under its id sends what the stopped one left
        assert main(["submit", campaign, "--id", "n-1"]) == 0
        assert "QUEUED" in {u.state for u in store.units("n-1")}
        assert [c.id for c in store.list_campaigns()] == ["n-1"]
    finally:
        store.dispose()
    assert len(list((home / "broker" / "queue").glob("*.msg"))) == 1  # the shard


def test_sigterm_stops_any_command_in_one_line(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`timeout 60 orchard prune` and the like died silently on SIGTERM, their clean-ups
    not run."""
    import scheduler.cli

    def pruning(args):  # noqa: ANN001, ANN202
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(scheduler.cli, "cmd_prune", pruning)
    assert main(["prune"]) == 143
    assert capsys.readouterr().err == "orchard: stopped by SIGTERM\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_retried_delete_of_what_it_deleted_is_no_failure(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A delete of several ids stopped midway, run again: those it had deleted are
    gone, as asked; it exited 2 for them."""
    assert main(["submit", str(home.parent / "c.toml"), "--id", "d-1"]) == 0
    assert main(["cancel", "d-1"]) == 0
    assert main(["delete", "d-1"]) == 0
    capsys.readouterr()
    assert main(["delete", "d-1"]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("orchard: campaign d-1 was deleted (`orchard delete`) at ")
    assert err.endswith(" UTC: nothing to delete\n")
    assert main(["delete", "d-1", "never-was"]) == 2  # an unknown id is still an error


def _launch(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ORCHARD_")}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**environ, "ORCHARD_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=90,
    )


def test_ctrl_c_while_the_command_loads_is_one_line(tmp_path: Path) -> None:
    """`orchard` imported SQLAlchemy and Celery before its handlers: a Ctrl-C in that
    second printed a 25-line traceback."""
    done = _launch(
        "import sys\n"
        "class Stop:\n"
        "    def find_spec(self, name, *args):\n"
        "        if name == 'scheduler.cli':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Stop())\n"
        "from scheduler.launch import main\n"
        "sys.exit(main())\n",
        tmp_path,
    )
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "orchard: interrupted\n")


def test_a_signal_after_the_command_ended_leaves_its_exit_code(tmp_path: Path) -> None:
    """A SIGTERM as the interpreter shut down, once the submit had printed its id, made
    its exit 143: a job retrying on it submitted again."""
    done = _launch(
        "import os, signal, sys\n"
        "import scheduler.cli\n"
        "scheduler.cli.main = lambda: print('c-1') or 0\n"
        "from scheduler.launch import main\n"
        "code = main()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.exit(code)\n",
        tmp_path,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "c-1\n", "")


def test_the_orchard_command_loads_neither_sqlalchemy_nor_celery_before_its_handlers() -> None:
    """And the package still offers the API and its modules, loaded when asked for."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, scheduler.cli; print(sorted({'sqlalchemy', 'celery', "
            "'scheduler.api'} & set(sys.modules)))\n"
            "import scheduler; assert scheduler.api.submit is scheduler.submit\n"
            "from scheduler import CampaignRun, WaitTimeout, attach, cancel, delete\n"
            "assert not hasattr(scheduler, 'nothing_of_that_name')",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.stdout == "[]\n", done.stderr


def test_a_cancel_stopped_before_its_revokes_sends_them_when_retried(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its commit done, the revokes not sent: the retry said `already CANCELLED:
    nothing to cancel` and sent none, so the running units on prefork workers ran on."""
    from celery.app.control import Control

    assert main(["submit", str(home.parent / "c.toml"), "--id", "c-1"]) == 0
    revoked: list[list[str]] = []

    def revoke(self, task_ids, **kwargs):  # noqa: ANN001, ANN003, ANN202
        if not revoked:
            revoked.append([])
            raise KeyboardInterrupt  # Ctrl-C just after the commit
        revoked.append(sorted(task_ids))

    monkeypatch.setattr(Control, "revoke", revoke)
    assert main(["cancel", "c-1"]) == 130
    capsys.readouterr()
    assert main(["cancel", "c-1"]) == 0
    assert "c-1 is already CANCELLED: nothing to cancel" in capsys.readouterr().err
    store = Store(f"sqlite:///{home / 'orchard.db'}")
    try:
        sent = sorted(u.task_id for u in store.units("c-1") if u.task_id)
    finally:
        store.dispose()
    assert sent and revoked == [[], sent]


@pytest.mark.parametrize("after", ["KeyboardInterrupt", "StoreError"])
def test_a_submit_ended_just_after_its_commit_keeps_what_the_campaign_reads(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], after: str
) -> None:
    """Stopped (or its commit's answer lost) as the campaign was recorded: its folder
    and the synthetic dataset it generated were removed under it, and every shard then
    failed with `image file is missing`."""
    from db.store import StoreError

    real = Store.create_campaign

    def committed_then_ended(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        real(self, *args, **kwargs)
        raise KeyboardInterrupt if after == "KeyboardInterrupt" else StoreError("answer lost")

    monkeypatch.setattr(Store, "create_campaign", committed_then_ended)
    code = main(["submit", str(home.parent / "c.toml"), "--id", "k-1"])
    out, err = capsys.readouterr()
    assert out == "k-1\n"
    if after == "KeyboardInterrupt":
        assert code == 130 and "campaign k-1 IS recorded" in err
    else:
        assert code == 2
        assert err == (
            "orchard: error: campaign k-1: not every unit it has ready was sent (recording "
            "it ended in: answer lost); the campaign is recorded, and `orchard resume k-1` "
            "sends the rest once that is mended\n"
        )
    folder = home / "artifacts" / "campaigns" / "k-1"
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"]  # and no mark
    [dataset] = (home / "artifacts" / "datasets").glob("synthetic-*")
    assert any(dataset.rglob("*.png")) or any(dataset.rglob("*.jpg"))
    monkeypatch.setattr(Store, "create_campaign", real)
    assert main(["resume", "k-1"]) == 0
    assert len(list((home / "broker" / "queue").glob("*.msg"))) == 1


def test_a_second_sigterm_does_not_cut_the_clean_ups_short() -> None:
    """`timeout` or a CI runner sends TERM again: the first one's unwinding (a claim put
    back, a folder removed) must finish. And the stop is a SystemExit of 128 + the
    signal's number, which psycopg answers by cancelling the query on the server."""
    from scheduler.stopsignals import Stopped, StopSignals

    StopSignals.stopping = False
    signals = StopSignals()
    cleaned = False
    try:
        with pytest.raises(Stopped) as stopped:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # the second, during the clean-up
                time.sleep(0.1)
                cleaned = True
    finally:
        signals.restore()
        StopSignals.stopping = False
    assert cleaned
    assert isinstance(stopped.value, SystemExit) and stopped.value.code == 143
    assert str(stopped.value) == "SIGTERM"


def test_a_signal_after_the_command_ended_ends_a_hung_shutdown_with_its_code(
    tmp_path: Path,
) -> None:
    """A shutdown that hangs (a thread that never ends) is still ended by a signal, with
    the command's exit code, not ignored."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, threading, time\n"
            "import scheduler.cli\n"
            "scheduler.cli.main = lambda: print('c-1', flush=True) or 0\n"
            "from scheduler.launch import main\n"
            "threading.Thread(target=time.sleep, args=(600,)).start()  # not a daemon\n"
            "sys.exit(main())\n",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "c-1\n"
    time.sleep(0.5)  # in its shutdown, waiting for the thread
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


CTRL_C_IN_EXEC = """\
import sys

from scheduler.stopsignals import exit_as_main, said_stop


def main() -> int:
    try:
        # code evaluated from a string, as a dataclass or a named tuple is made while a
        # module loads, where the Ctrl-C comes
        exec("import os, signal, time\\nos.kill(os.getpid(), signal.SIGINT)\\ntime.sleep(30)")
    except KeyboardInterrupt as exc:
        return said_stop(exc)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["plain"]:
        sys.exit(main())
    exit_as_main(main())
"""


def _run_as_main(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "ctrl_c_in_exec.py").write_text(CTRL_C_IN_EXEC)
    return subprocess.run(
        [sys.executable, "-m", "ctrl_c_in_exec", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_handled_ctrl_c_exits_130_under_python_m(tmp_path: Path) -> None:
    """`python -m scheduler.cli status --watch`, Ctrl-C'd on a loaded machine, once ended
    by SIGINT (-2) after saying its line: the Ctrl-C had come inside a string's exec."""
    done = _run_as_main(tmp_path)
    assert (done.returncode, done.stderr) == (130, "orchard: interrupted\n")


def test_cpython_ends_python_m_by_sigint_after_such_a_ctrl_c_without_exit_as_main(
    tmp_path: Path,
) -> None:
    """Why ``exit_as_main`` is there: should a CPython stop doing this, it can go."""
    done = _run_as_main(tmp_path, "plain")
    assert (done.returncode, done.stderr) == (-signal.SIGINT, "orchard: interrupted\n")
