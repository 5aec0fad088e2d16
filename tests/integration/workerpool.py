"""Real `orchard worker` processes that a test (or bench/chaos.py) can SIGKILL one by one.

Unlike ``scheduler.demo.Workers`` each worker gets its own process group, so killing it
takes its prefork children too, as a machine crash or the OOM killer would. The tests'
workers start warm, forked from ``tests.integration.forkserver`` (which says why and how);
``warm=False`` (bench/chaos.py, whose figures include the workers' starts) or
``ORCHARD_TEST_FORK_SERVER=0`` starts each with its own ``python -m scheduler.cli worker``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from shared.errors import OrchardError
from shared.settings import Settings
from tests.integration import forkserver
from tests.integration.forkserver import ForkedWorker

REPO = Path(__file__).resolve().parents[2]


class WorkerPool:
    def __init__(
        self, settings: Settings, env: Mapping[str, str] | None = None, *, warm: bool = True
    ) -> None:
        self.warm = warm  # forked from tests.integration.forkserver where it can be
        self.settings = settings
        self.logs = settings.home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "ORCHARD_HOME": str(settings.home),
            "ORCHARD_BROKER_URL": settings.broker_url,
            "ORCHARD_DATABASE_URL": settings.database_url,
            "ORCHARD_ARTIFACTS": str(settings.artifacts),
            "ORCHARD_TORCH_THREADS": "1",
            **(env or {}),
        }
        self.specs: dict[str, list[str]] = {}
        self.procs: dict[str, subprocess.Popen | ForkedWorker] = {}
        self.generation: dict[str, int] = {}
        self.terminated: set[str] = set()  # stopped on purpose: check() lets them be

    def start(
        self, name: str, queues: str, *, concurrency: int = 1
    ) -> subprocess.Popen | ForkedWorker:
        self.specs[name] = ["--queues", queues, "--concurrency", str(concurrency)]
        return self._spawn(name)

    def _spawn(self, name: str) -> subprocess.Popen | ForkedWorker:
        generation = self.generation[name] = self.generation.get(name, -1) + 1
        path = self.logs / f"{name}.log"
        args = [
            "worker",
            "--loglevel",
            "INFO",
            *self.specs[name],
            "--name",
            f"{name}-{generation}@%h",
        ]
        queues = self.specs[name][self.specs[name].index("--queues") + 1]
        proc = forkserver.start_worker(args, queues, self.env, REPO, path) if self.warm else None
        if proc is None:
            log = open(path, "ab")  # noqa: SIM115 - closed with the process
            proc = subprocess.Popen(
                [sys.executable, "-m", "scheduler.cli", *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,  # its own process group: kill() takes the children too
            )
            log.close()
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL the worker and its pool children: no warm shutdown, no acks."""
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def terminate(self, name: str, timeout: float = 60) -> int:
        """SIGTERM the worker, as `docker compose stop` or a cluster's scheduler would
        (Celery's warm shutdown), and wait for it to exit; returns its exit status."""
        proc = self.procs[name]
        self.terminated.add(name)
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {name} still running {timeout:.0f} s after SIGTERM"
            ) from None

    def restart(self, name: str) -> subprocess.Popen | ForkedWorker:
        self.terminated.discard(name)
        return self._spawn(name)

    def check(self) -> None:
        for name, proc in self.procs.items():
            if name in self.terminated:
                continue
            if proc.poll() is not None and proc.returncode != -signal.SIGKILL:
                raise OrchardError(f"worker {name} exited with {proc.returncode}: {self.log(name)}")

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def all_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))

    def kill_all(self) -> None:
        """SIGKILL every worker with its pool children: what a test does once it has
        asserted (a warm shutdown waits about 2 s on billiard's pool threads; the tests
        that mean to check one call :meth:`terminate`)."""
        kill_groups(self.procs.values())

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill_all()


def kill_groups(procs: Iterable[subprocess.Popen | ForkedWorker]) -> None:
    """SIGKILL each process's group (a worker started in a session of its own takes
    its prefork children with it) and reap the process."""
    procs = list(procs)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.wait()


def wait_for(
    condition: Callable[[], object],
    timeout: float,
    what: str,
    *,
    check: Callable[[], None] | None = None,
    poll: float = 0.2,
) -> object:
    """Poll until ``condition()`` is truthy; raise naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if check is not None:
            check()
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
