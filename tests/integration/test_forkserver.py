"""The tests' fork server (tests/integration/forkserver.py) starts what the plain
command would: the same libraries, the test's environment, log, directory and exit
status, a session of its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration import forkserver
from workers.app import QUEUE_LIBRARIES


def test_the_server_imports_what_a_worker_preloads() -> None:
    """No module of orchard's (each worker imports those itself) and, for each of
    orchard's that a worker preloads, the libraries it loads."""
    modules = forkserver.libraries(list(QUEUE_LIBRARIES))
    ours = {"shared", "db", "workers", "scheduler"}
    assert not [m for m in modules if m.split(".")[0] in ours]
    assert forkserver.kinds_of("preprocess,report, gpu") == ("gpu", "report")
    heavy = {"torch", "torchvision", "sklearn", "matplotlib", "cv2", "skimage", "lime"}
    for module, library in forkserver.ORCHARD_MODULES.items():
        code = (
            f"import json, sys, {module}; heavy = {sorted(heavy)!r}; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(heavy))))"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        # cv2 comes with every worker (BASE)
        assert set(json.loads(out.stdout)) - {"cv2"} == {library}


def test_a_forked_command_gets_the_test_s_environment_log_and_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORCHARD_TEST_FORK_SERVER", "1")  # whatever the suite's setting
    log = tmp_path / "out.log"
    env = {
        **os.environ,
        "ORCHARD_HOME": str(tmp_path / "home"),
        "ORCHARD_DATABASE_URL": f"sqlite:///{tmp_path / 'store.db'}",
        "ORCHARD_BROKER_URL": f"filesystem://{tmp_path / 'broker'}",
    }
    subprocess.run([sys.executable, "-m", "scheduler.cli", "db", "upgrade"], env=env, check=True)
    # `orchard worker` with a queue it does not know: its one line in the log, its status
    args = ["worker", "--queues", "cpu,bogus"]
    plain = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", *args], env=env, capture_output=True, text=True
    )
    proc = forkserver.start_worker(args, "cpu", env, tmp_path, log)
    assert isinstance(proc, forkserver.ForkedWorker)
    assert proc.wait(60) == plain.returncode == 2
    assert log.read_text() == plain.stderr
    assert "unknown queue(s) ['bogus']" in plain.stderr
    assert proc.poll() == 2

    # a worker that starts: its own session, signals reach it, its status is the signal's
    proc = forkserver.start_worker(
        ["worker", "--queues", "cpu", "--pool", "solo"], "cpu", env, tmp_path, log
    )
    assert os.getsid(proc.pid) == proc.pid
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(0.5)
    assert proc.poll() is None
    proc.kill()
    assert proc.wait(60) == -signal.SIGKILL
    proc.kill()  # after it ended: nothing is signalled


def test_a_worker_asking_for_another_interpreter_starts_plainly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORCHARD_TEST_FORK_SERVER", "1")  # None for this reason alone
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    if os.environ.get("PYTHONHASHSEED") == "12345":
        env["PYTHONHASHSEED"] = "54321"
    proc = forkserver.start_worker(["--help"], "cpu", env, tmp_path, tmp_path / "log")
    assert proc is None
