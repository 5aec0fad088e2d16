"""`orchard demo` when it cannot finish: a campaign file it cannot run stops it before it
creates anything or starts a worker, a dataset it cannot use before a worker starts; a
campaign that is not finished in time, or Ctrl-C, cancels the demo's campaign (left
RUNNING, the next demo's workers would finish it first) and stops its workers, in one
line. A demo run to its report is in tests/integration/test_campaign.py."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import scheduler.demo as demo
from db.store import Store
from scheduler.cli import main
from shared.plan import TERMINAL
from shared.settings import load_settings
from tests.conftest import REPO


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """ORCHARD_HOME of its own and no other ORCHARD_ variable: the demo's defaults."""
    for name in [k for k in os.environ if k.startswith("ORCHARD_")]:
        monkeypatch.delenv(name)
    home = tmp_path / "home"
    monkeypatch.setenv("ORCHARD_HOME", str(home))
    return home


def demo_workers_alive(pid: int) -> bool:
    """Whether a worker the demo of process ``pid`` started still runs (its node name)."""
    found = subprocess.run(["pgrep", "-f", f"demo-(gpu|cpu)-{pid}@"], capture_output=True)
    return found.returncode == 0


def assert_cancelled(home: Path, campaign_id: str) -> None:
    store = Store(load_settings({"ORCHARD_HOME": str(home)}).database_url)
    assert store.get_campaign(campaign_id).state == "CANCELLED"
    assert {u.state for u in store.units(campaign_id)} <= TERMINAL


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "no such campaign file"),
        ('name = "x"\n[dataset]\nkind = "synthetic"\n[cnn]\nlr = "fast"\n', "[cnn] lr"),
    ],
)
def test_a_campaign_file_it_cannot_run_stops_it_before_anything_starts(
    home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    content: str | None,
    needle: str,
) -> None:
    campaign = tmp_path / "c.toml"
    if content is not None:
        campaign.write_text(content)

    def no_workers(*_args: object) -> None:
        raise AssertionError("the demo started its workers")

    monkeypatch.setattr(demo, "Workers", no_workers)
    assert main(["demo", "--campaign", str(campaign)]) == 2
    out, err = capsys.readouterr()
    assert not out  # not even the demo's header
    [line] = err.splitlines()
    assert line.startswith(f"orchard: error: {campaign}: ") and needle in line
    assert not home.exists()  # no store, no broker folder, no log folder


def test_a_dataset_it_cannot_use_stops_it_before_a_worker_starts(
    home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    campaign = tmp_path / "c.toml"
    campaign.write_text('name = "x"\n[dataset]\nkind = "aicup"\nroot = "nowhere"\n[svm]\n')

    def no_workers(*_args: object) -> None:
        raise AssertionError("the demo started its workers")

    monkeypatch.setattr(demo, "Workers", no_workers)
    assert main(["demo", "--campaign", str(campaign)]) == 2
    _, err = capsys.readouterr()
    [line] = err.splitlines()
    assert line.startswith("orchard: error: ") and str(tmp_path / "nowhere") in line, line
    assert not (home / "logs").exists()


def test_it_migrates_its_own_store_and_no_other(
    home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Its own store (under ORCHARD_HOME) it brings to this orchard's schema; a store
    ORCHARD_DATABASE_URL names (a cluster's, whose workers run the old schema's code)
    only a submit's check meets: one line, nothing migrated, no worker started."""
    from db import migrate

    def no_workers(*_args: object) -> None:
        raise AssertionError("the demo started its workers")

    monkeypatch.setattr(demo, "Workers", no_workers)
    other = Store(f"sqlite:///{tmp_path / 'cluster.db'}")
    migrate.upgrade(other.engine, "0006")
    monkeypatch.setenv("ORCHARD_DATABASE_URL", other.url)
    assert main(["demo"]) == 2
    _, err = capsys.readouterr()
    assert err.splitlines()[-1] == (
        f"orchard: error: database {other.url} is at schema 0006, expected "
        f"{migrate.head_revision()}: run `orchard db upgrade`"
    )
    assert other.revision() == "0006"
    other.dispose()

    monkeypatch.delenv("ORCHARD_DATABASE_URL")
    home.mkdir(exist_ok=True)
    own = Store(load_settings().database_url)
    migrate.upgrade(own.engine, "0006")
    own.dispose()
    with pytest.raises(AssertionError, match="started its workers"):  # past the submit
        main(["demo"])
    assert Store(own.url).revision() == migrate.head_revision()


def test_a_log_folder_it_cannot_make_stops_it_before_anything_starts(
    home: Path, tiny_campaign: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home.mkdir()
    (home / "logs").write_text("a file where the demo writes its workers' logs\n")
    assert main(["demo", "--campaign", str(tiny_campaign)]) == 2
    out, err = capsys.readouterr()
    assert not out
    assert err.splitlines() == [
        f"orchard: error: log folder {home / 'logs'}: {home / 'logs'} is not a directory"
    ]
    assert not (home / "artifacts" / "campaigns").exists()


def test_workers_that_cannot_all_start_cancel_the_demo_s_campaign(
    home: Path,
    tiny_campaign: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def cannot_start(*_args: object) -> None:
        raise demo.OrchardError("cannot write /x/cpu-worker.log: Disk quota exceeded")

    monkeypatch.setattr(demo, "Workers", cannot_start)
    assert main(["demo", "--campaign", str(tiny_campaign)]) == 1
    _, err = capsys.readouterr()
    campaign_id = err.split("; cancelled campaign ")[-1].split(".")[0]
    assert err.splitlines() == [
        "orchard demo: cannot write /x/cpu-worker.log: Disk quota exceeded; "
        f"cancelled campaign {campaign_id}. Logs in {home / 'logs'}"
    ]
    assert_cancelled(home, campaign_id)


@pytest.mark.parametrize("failure", ["log", "fork"])
def test_a_worker_that_cannot_start_stops_the_workers_already_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    signals: list[int] = []

    class Started:
        def __init__(self, cmd: list[str], **kwargs: object) -> None:
            if failure == "fork" and "cpu" in cmd:
                raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
            self.returncode: int | None = None

        def poll(self) -> int | None:
            return self.returncode

        def send_signal(self, number: int) -> None:
            signals.append(number)
            self.returncode = -number

        def wait(self, timeout: float | None = None) -> int | None:
            return self.returncode

    monkeypatch.setattr(subprocess, "Popen", Started)
    monkeypatch.setenv("ORCHARD_HOME", str(tmp_path / "home"))
    log = tmp_path / "home" / "logs" / "cpu-worker.log"
    if failure == "log":
        log.mkdir(parents=True)  # cannot be opened
        message = f"cannot write {log}: Is a directory"
    else:
        message = f"cannot start cpu-worker: {os.strerror(errno.EAGAIN)}"
    specs = [("gpu-worker", ["--queues", "gpu"]), ("cpu-worker", ["--queues", "cpu"])]
    with pytest.raises(demo.OrchardError) as raised:
        demo.Workers(load_settings(), specs)
    assert str(raised.value) == message
    assert signals == [signal.SIGTERM]  # the gpu worker, started first


@pytest.mark.integration
def test_a_demo_not_finished_in_time_cancels_its_campaign(
    home: Path, tiny_campaign: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--campaign", str(tiny_campaign), "--timeout", "1"]) == 1
    out, err = capsys.readouterr()
    campaign_id = next(line.split()[1] for line in out.splitlines() if line.startswith("campaign "))
    [line] = err.splitlines()
    assert line.startswith(f"orchard demo: campaign {campaign_id} not finished after 1 s: ")
    assert line.endswith(f"; cancelled campaign {campaign_id}. Logs in {home / 'logs'}")
    assert "{" not in line and "queued" in line  # the units counted in words
    assert_cancelled(home, campaign_id)
    assert not demo_workers_alive(os.getpid())


@pytest.mark.integration
@pytest.mark.parametrize(
    ("when", "stop"),
    [
        ("submitted", signal.SIGINT),
        ("a forest fits", signal.SIGINT),
        ("submitted", signal.SIGTERM),  # `timeout`, `kill`, a CI job's end
    ],
)
def test_ctrl_c_cancels_the_demo_s_campaign(
    home: Path, tiny_campaign: Path, when: str, stop: signal.Signals
) -> None:
    """Ctrl-C as soon as the campaign is submitted, or while a forest of many trees fits
    (a body that makes no store call, which a warm shutdown would wait for): the
    workers stop cold, what they ran is the cancelled campaign's. SIGTERM does the
    same (it ended the demo alone, and its workers ran on)."""
    if when == "a forest fits":
        text = tiny_campaign.read_text().replace("n_estimators = [10]", "n_estimators = [50000]")
        tiny_campaign.write_text(text)
    demo_process = subprocess.Popen(
        [sys.executable, "-m", "scheduler.cli", "demo", "--campaign", str(tiny_campaign)],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its workers too: killed together should the test fail
        # as from a shell: the signal neither ignored nor blocked, whatever this test
        # process inherited (under the full suite the demo once ran on, deaf to SIGINT)
        preexec_fn=_signals_as_from_a_shell,
    )
    try:
        # "campaign ID submitted (FILE); logs in ...": the demo is waiting for it
        submitted = next(line for line in demo_process.stdout if " submitted (" in line)
        if when == "a forest fits":
            wait_for_a_running_forest(home, submitted.split()[1])
        signal_masks = "".join(
            line
            for line in Path(f"/proc/{demo_process.pid}/status").read_text().splitlines(True)
            if line.startswith(("SigBlk", "SigIgn", "SigCgt"))
        )
        demo_process.send_signal(stop)
        out, err = demo_process.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(demo_process.pid, signal.SIGKILL)
    campaign_id = submitted.split()[1]
    # 128 + the signal; not -2, as a Ctrl-C that came inside a string's exec (a module
    # loading) once made CPython end `python -m` by SIGINT (exit_as_main)
    assert demo_process.returncode == 128 + stop, out + err + signal_masks
    why = "interrupted" if stop == signal.SIGINT else f"stopped by {stop.name}"
    assert err.splitlines() == [
        f"orchard demo: {why}; cancelled campaign {campaign_id}. Logs in {home / 'logs'}"
    ], err  # the whole of it, should something else be there
    assert_cancelled(home, campaign_id)
    assert not demo_workers_alive(demo_process.pid)


def _signals_as_from_a_shell() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


def test_a_cold_stop_kills_a_worker_that_a_warm_one_does_not_end_with_its_children(
    tmp_path: Path,
) -> None:
    """What a cancelled campaign's demo does to a worker still busy after SIGTERM (a
    Celery worker waits for its unit): its whole process group goes, pool children too."""
    pids = tmp_path / "pids"
    busy = (
        "import os, signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "time.sleep(300)\n"
    )
    workers = demo.Workers.__new__(demo.Workers)
    proc = subprocess.Popen([sys.executable, "-c", busy], start_new_session=True)
    workers.procs = [("busy", proc)]
    try:
        while not pids.exists() or len(pids.read_text().split()) < 2:
            time.sleep(0.05)
        child = int(pids.read_text().split()[1])
        workers.stop(timeout=300, cold=True)
        assert proc.returncode == -signal.SIGKILL
        for _ in range(100):  # reaped by init, at once or nearly
            if (
                not os.path.exists(f"/proc/{child}")
                or " Z " in Path(f"/proc/{child}/stat").read_text()
            ):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the worker's child survived it")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for_a_running_forest(home: Path, campaign_id: str) -> None:
    store = Store(load_settings({"ORCHARD_HOME": str(home)}).database_url)
    for _ in range(600):
        units = store.units(campaign_id)
        if any(u.family == "rf" and u.state == "RUNNING" for u in units):
            return
        time.sleep(0.1)
    raise AssertionError(f"no forest running after 60 s: {[(u.key, u.state) for u in units]}")


def test_the_demo_s_workers_read_a_password_file_themselves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As with --gpus: the password stays in its file, out of the workers' environment."""
    from shared.settings import load_settings

    (tmp_path / "pw").write_text("s3cret-XYZ\n")
    monkeypatch.setenv("ORCHARD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ORCHARD_BROKER_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("ORCHARD_BROKER_PASSWORD_FILE", str(tmp_path / "pw"))
    envs: list[dict[str, str]] = []

    class Started:
        def __init__(self, cmd: list[str], *, env: dict[str, str], **kwargs: object) -> None:
            envs.append(env)

    monkeypatch.setattr(subprocess, "Popen", Started)
    settings = load_settings()
    assert "s3cret-XYZ" in settings.broker_url
    demo.Workers(settings, [("gpu-worker", ["--queues", "gpu"])])
    [env] = envs
    assert not any("s3cret" in value for value in env.values())
    assert env["ORCHARD_BROKER_URL"] == "redis://127.0.0.1:6379/0"
