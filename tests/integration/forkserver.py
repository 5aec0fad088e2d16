"""Start the tests' `orchard worker` processes warm: forked from a process that has
already imported the libraries such a worker loads.

A worker spends about 2.5 s of CPU starting, most of it importing torch (a ``gpu``
worker) or scikit-learn and matplotlib (``cpu`` and ``report``), which ``orchard worker``
imports before its pool starts (``workers.app.preload``). The integration tests start
and restart about a hundred workers on two cores: their starts were about a third of
the suite's CPU time (sampled on 2026-12-08). A fork server imports them once per test
process and kind of worker; each worker is then a child forked from it that takes the
test's environment, working directory, log, arguments and a session of its own, and
runs ``python -m scheduler.cli`` from there, as the command would: a real Celery
worker process on the real broker and store, which Celery's pool children, SIGKILL and
warm shutdowns treat as any other.

What it cannot inherit it does not import: orchard's own modules (they read the
environment, which is the test's, as they load) are imported by each worker itself. A
worker whose environment differs from the server's in what an interpreter or a library
reads as it starts (``PYTHON*``, thread counts, ``OMP_*``, ...) is started the plain
way, as is every worker where ``ORCHARD_TEST_FORK_SERVER=0``.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: What every worker imports as it starts, whatever its queues (the largest of it).
BASE = (
    "numpy",
    "cv2",
    "sqlalchemy.orm",
    "alembic.runtime.migration",
    "alembic.script",
    "redis",
    "kombu.transport.redis",
    "celery.bin.celery",
    "celery.apps.worker",
    "celery.worker.consumer",
    "celery.concurrency.prefork",
)

#: What orchard's own modules among ``workers.app.QUEUE_LIBRARIES`` load, which the
#: server imports in their stead (it imports no module of orchard's: they read the
#: environment as they load, and a worker's is the test's, not the server's).
ORCHARD_MODULES = {"shared.cnn": "torch"}


def libraries(kinds: Sequence[str]) -> list[str]:
    """What the server imports for workers of queues ``kinds``: what ``orchard worker``
    preloads for them (``workers.app.preload``), or the libraries behind it."""
    from workers.app import QUEUE_LIBRARIES

    return [ORCHARD_MODULES.get(m, m) for kind in kinds for m in QUEUE_LIBRARIES[kind]]


#: Environment variables read as an interpreter or a library loads: a worker that asks
#: for other values than its server started with is started the plain way.
STARTUP_ENV = re.compile(r"^(PYTHON|OMP_|KMP_|MKL_|OPENBLAS_|GOTO|NUMEXPR_|MPL|TORCH|CUDA|NVIDIA)")

# as workers.app sets it before any OpenMP runtime loads; the server loads torch's
STARTUP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def enabled() -> bool:
    return os.environ.get("ORCHARD_TEST_FORK_SERVER", "1") != "0"


# --- the server -------------------------------------------------------------------


def serve(path: str, modules: Sequence[str]) -> None:
    """Import ``modules`` (see :func:`libraries`), then fork a worker for each request
    on the Unix socket at ``path`` until stdin closes (the test process is gone)."""
    for module in (*BASE, *modules):
        importlib.import_module(module)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the select below
    children: dict[int, socket.socket] = {}
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([listener, wake_r, sys.stdin], [], [])
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1024):
            return  # the workers it forked live on: their tests stop them
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 1024)
            _reap(children)
        if listener in ready:
            conn, _ = listener.accept()
            request = json.loads(conn.makefile("r").readline())
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the worker
                for sock in (listener, *children.values()):
                    sock.close()
                os.close(wake_r)
                os.close(wake_w)
                _run_worker(request, conn)
            children[pid] = conn  # the child says its pid once it leads its session
            _reap(children)  # a SIGCHLD may have come while the wakeup fd was full


def _reap(children: dict[int, socket.socket]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            _send(conn, {"pid": pid, "returncode": os.waitstatus_to_exitcode(status)})
            conn.close()


def _send(conn: socket.socket, message: dict) -> None:
    with contextlib.suppress(OSError):  # the test that asked is gone
        conn.sendall((json.dumps(message) + "\n").encode())


def _run_worker(request: dict, conn: socket.socket) -> None:  # pragma: no cover - a child
    code: object = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        # only now: a test that kills the group as soon as it has the pid kills this
        _send(conn, {"pid": os.getpid()})
        conn.close()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        sys.argv = ["-m", *request["args"]]
        sys.path[0] = os.getcwd()  # as `python -m` has it
        import runpy

        try:
            runpy.run_module("scheduler.cli", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code
    except BaseException:  # noqa: BLE001 - said in the worker's log, as Python would
        traceback.print_exc()
        code = 1
    finally:
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


# --- the client -------------------------------------------------------------------


class ForkedWorker:
    """What a test uses of a :class:`subprocess.Popen`, for a worker the server forked:
    ``pid``, ``returncode``, ``poll``, ``wait``, ``send_signal``, ``kill``.
    Its exit status comes from the server, which reaps it."""

    def __init__(self, conn: socket.socket, args: Sequence[str]) -> None:
        self._conn = conn
        self._buffer = b""
        self.args = list(args)
        first = self._read(None)  # the child's pid, or its end if it failed before
        self.pid: int = first["pid"]
        self.returncode: int | None = first.get("returncode")
        if self.returncode is not None:
            self._conn.close()

    def _read(self, timeout: float | None) -> dict:
        """The server's next message; raises TimeoutExpired after ``timeout`` s. (Both
        messages may come in one read: a worker that fails as it starts.)"""
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self._conn], [], [], timeout)
            if not ready:
                raise subprocess.TimeoutExpired(self.args, timeout)
            data = self._conn.recv(4096)
            if not data:
                raise RuntimeError("the tests' fork server went away before its worker ended")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._read(timeout)["returncode"]
            self._conn.close()
        return self.returncode

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.wait(0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # as Popen: never a pid the system may have reused
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _Server:
    def __init__(self, kinds: tuple[str, ...]) -> None:
        self.dir = tempfile.mkdtemp(prefix="orchard-forkserver-")
        self.path = os.path.join(self.dir, "socket")
        self.env = {**STARTUP_DEFAULTS, **os.environ}
        self.startup = self.startup_env(self.env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.forkserver", self.path, *libraries(kinds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
            env=self.env,
            start_new_session=True,  # a Ctrl-C at the terminal is the tests', not its
        )
        if self.proc.stdout.readline() != b"ready\n":
            raise RuntimeError(f"the tests' fork server for {kinds} did not start")

    @staticmethod
    def startup_env(env: Mapping[str, str]) -> dict[str, str]:
        """What of ``env`` a new interpreter and its libraries read as they load (a
        worker's ``workers.app`` sets the defaults the server started with)."""
        return {k: v for k, v in {**STARTUP_DEFAULTS, **env}.items() if STARTUP_ENV.match(k)}

    def fork(
        self, args: Sequence[str], env: Mapping[str, str], cwd: Path, log: Path
    ) -> ForkedWorker:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        request = {"args": list(args), "env": dict(env), "cwd": str(cwd), "log": str(log)}
        conn.sendall((json.dumps(request) + "\n").encode())
        return ForkedWorker(conn, args)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        self.proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(self.dir)


_servers: dict[tuple[str, ...], _Server] = {}
_lock = threading.Lock()


def kinds_of(queues: str) -> tuple[str, ...]:
    """The queues among ``queues`` whose workers load libraries, in a fixed order."""
    from workers.app import QUEUE_LIBRARIES

    names = {q.strip() for q in queues.split(",")}
    return tuple(kind for kind in QUEUE_LIBRARIES if kind in names)


def start_worker(
    args: Sequence[str], queues: str, env: Mapping[str, str], cwd: Path, log: Path
) -> ForkedWorker | None:
    """``python -m scheduler.cli *args`` forked warm, or None where it must start plainly
    (the fork server is off, or ``env`` asks for another interpreter than the server's)."""
    if not enabled():
        return None
    kinds = kinds_of(queues)
    with _lock:
        server = _servers.get(kinds)
        if server is None:
            server = _servers[kinds] = _Server(kinds)
    if server.startup_env(env) != server.startup:
        return None
    return server.fork(args, env, cwd, log)


@atexit.register
def _close_all() -> None:
    for server in _servers.values():
        server.close()
    _servers.clear()


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2:])
