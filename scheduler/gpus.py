"""``orchard worker --gpus all|0,1``: one Celery worker process per GPU, supervised.

Each child is an ordinary ``orchard worker --queues gpu`` (solo pool, one task at a
time) started with ``CUDA_VISIBLE_DEVICES=<i>`` and the node name
``gpu<i>-<launcher pid>@%h``, so it sees exactly one card (as ``cuda:0``) and Flower and
``orchard status`` name it. A second host joins by running the same command against
the same broker, store and artifact mount.

The launcher never imports torch or touches CUDA: it asks ``nvidia-smi`` which GPUs
there are. The children run in sessions of their own, so a terminal's signals reach
the launcher alone: on SIGTERM, SIGINT, SIGHUP or SIGQUIT it sends every child one
SIGTERM (Celery's warm shutdown: each hands its fold back after the fold's next
checkpoint, then exits) and waits for them. On Linux a child gets SIGTERM too should
the launcher die without a word (SIGKILL). A child that dies on its own is restarted
(the workers' reaper sends its fold again once its lease has run out: see
``workers.reaper``; Redis would only after the visibility timeout), unless it died
before it was ready, within ``min_uptime`` seconds of starting: a worker that cannot
even start will not start next time either, so the launcher stops the others and exits
non-zero instead of looping. It reads its children's output to the end, whatever
becomes of its own (a reader that left): a child whose pipe fills would stall its fold.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO

from shared.errors import OrchardError

#: a child that exits sooner than this after starting, before it was ready, is a
#: configuration problem
MIN_UPTIME_S = 30.0
#: the longest a restart waits after deaths in a row, each soon after its start
MAX_BACKOFF_S = 60.0


class GpuError(OrchardError):
    """``--gpus`` names GPUs this host does not have, or there are none."""


def detect_gpus() -> list[str]:
    """Indices of the GPUs this process may use, as nvidia-smi lists them.

    ``CUDA_VISIBLE_DEVICES``, when set, already narrows them: its entries are what
    the children get. Returns [] when there is no NVIDIA driver.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        # CUDA stops at the first entry that names no device ("-1", empty): those
        # after it are hidden too
        entries = [d.strip() for d in visible.split(",")]
        return list(itertools.takewhile(lambda d: d != "" and not d.startswith("-"), entries))
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        done = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if done.returncode != 0:
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def parse_gpus(
    spec: str,
    *,
    available: Sequence[str],
    device: str | None,
    visible: str | None = None,
) -> list[str]:
    """The GPU ids ``--gpus`` asks for, checked against ``available``.

    ``all`` is every available GPU. An explicit list (``0,1``) must name available
    GPUs, except with ``ORCHARD_DEVICE=cpu``: then the ids are only slots, so a
    machine without GPUs can run several "gpu" workers (how the tests run them).
    ``visible`` is ``CUDA_VISIBLE_DEVICES``, where set: what ``available`` came from.
    """
    spec = spec.strip()
    if device and device.startswith("cuda:"):
        raise GpuError(
            f"--gpus with ORCHARD_DEVICE={device}: each child sees one GPU as cuda:0; "
            "set ORCHARD_DEVICE=cuda or leave it unset"
        )
    on_cpu = device == "cpu"
    if spec == "all":
        if not available and visible is not None:
            raise GpuError(
                f"--gpus all: no GPU found (CUDA_VISIBLE_DEVICES={visible!r} names none); "
                "unset it to use every GPU nvidia-smi lists, or use "
                "`orchard worker --queues gpu` to train on the CPU"
            )
        if not available:
            raise GpuError(
                "--gpus all: no GPU found (nvidia-smi lists none); "
                "use `orchard worker --queues gpu` to train on the CPU"
            )
        return list(available)
    ids = [part.strip() for part in spec.split(",")]
    if not spec or any(not part.isdigit() for part in ids):
        raise GpuError(f"--gpus {spec!r}: expected `all` or GPU indices like 0,1")
    if len(set(ids)) != len(ids):
        raise GpuError(f"--gpus {spec!r}: a GPU is named twice")
    if not on_cpu:
        missing = [i for i in ids if i not in available]
        if missing:
            have = ",".join(available) if available else "none"
            where = (
                "this host has" if visible is None else f"CUDA_VISIBLE_DEVICES={visible!r} leaves"
            )
            raise GpuError(
                f"--gpus {spec}: GPU {missing[0]} not found ({where}: {have}); "
                "set ORCHARD_DEVICE=cpu to run these workers on the CPU"
            )
    return ids


def node_name(gpu: str, launcher: int | None = None) -> str:
    """``gpu<i>-<launcher pid>@%h``: unique per launcher, as ``cpu-<pid>@%h`` is per
    plain worker, so that two launchers on one host never share a name (a broadcast to
    a name, Celery's or Flower's, reaches every worker of it; `orchard worker` refuses a
    name a running worker answers to, and orchard's own orders name a worker's boot)."""
    return f"gpu{gpu}-{os.getpid() if launcher is None else launcher}@%h"


def child_command(
    gpu: str, queues: Sequence[str], loglevel: str, *, launcher: int | None = None
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "scheduler.cli",
        "worker",
        "--queues",
        ",".join(queues),
        "--name",
        node_name(gpu, launcher),
        "--loglevel",
        loglevel,
    ]


#: Celery's ``<node> ready.``, logged (at INFO) once the worker consumes; or, at a log
#: level above INFO, orchard's ``orchard: <node> ready.``, which a child whose
#: environment holds ``SAY_READY=1`` prints (workers.tasks.base)
READY_LINE = re.compile(r"@\S+ ready\.\s*$")
SAY_READY = "ORCHARD_SAY_READY"

#: what stops the launcher: each becomes one SIGTERM to every child (a warm shutdown)
STOP_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
    if hasattr(signal, name)
)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with(launcher: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that gives the child SIGTERM when the launcher dies (Linux's
    parent-death signal), so that a SIGKILLed launcher leaves no worker behind; None
    where there is no ``prctl``. Looked up here, in the parent: the forked child only
    calls it (other threads of the launcher may hold locks the child must not need).

    The kernel sends it when the *thread* that started the child ends (run() starts
    every child from the main thread), and again for each other thread of the dying
    launcher the child is handed to: a SIGKILLed launcher's child may get SIGTERM more
    than once, which Celery's warm shutdown takes as the same request."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    term = int(signal.SIGTERM)

    def set_parent_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, term, 0, 0, 0)
        # the launcher may have died before prctl: no signal will come, so go now
        if os.getppid() != launcher:
            os._exit(1)

    return set_parent_death_signal


def describe_exit(code: int) -> str:
    """``exited with code 3`` or ``killed by SIGKILL``, from a Popen return code."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


@dataclass
class _Child:
    gpu: str
    command: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    ready: bool = False  # this process logged Celery's ready line
    stop_sent: bool = False  # the launcher sent this process its one SIGTERM
    quick_deaths: int = 0  # deaths in a row, each within min_uptime of its start
    restart_at: float | None = None  # a restart held back (monotonic clock)
    pump: threading.Thread | None = field(default=None, repr=False)


class GpuLauncher:
    """Start, watch and stop one worker process per GPU."""

    def __init__(
        self,
        gpus: Sequence[str],
        command_for: Callable[[str], list[str]],
        *,
        env: Mapping[str, str] | None = None,
        min_uptime: float = MIN_UPTIME_S,
        out: IO[str] | None = None,
        poll: float = 0.5,
        backoff: float = 2.0,
    ) -> None:
        base = dict(os.environ if env is None else env)
        self.children = [
            _Child(gpu, command_for(gpu), {**base, "CUDA_VISIBLE_DEVICES": gpu, SAY_READY: "1"})
            for gpu in gpus
        ]
        self.min_uptime = min_uptime
        self.backoff = backoff
        # where the children's lines go: the first stream that still takes them
        out = out or sys.stdout
        self._outputs: list[IO[str]] = [out] if out is sys.stderr else [out, sys.stderr]
        self.poll = poll
        self._stopping = False
        self._stopped_by: str | None = None  # the signal's name, said once by run()
        self._lock = threading.Lock()
        self._preexec = _die_with(os.getpid())

    # -- lifecycle

    def _start(self, child: _Child) -> None:
        child.ready = False
        child.stop_sent = False
        child.proc = subprocess.Popen(
            child.command,
            env=child.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            # a session of its own: a terminal's Ctrl-C or hangup reaches the launcher
            # alone, which sends each child one SIGTERM (a second signal from the
            # terminal would make Celery abandon the running fold)
            start_new_session=True,
            preexec_fn=self._preexec,
        )
        child.started = time.monotonic()
        if self._stopping:  # stopped while it started: stop() did not see it
            self._terminate(child)
        child.pump = threading.Thread(target=self._pump, args=(child, child.proc), daemon=True)
        child.pump.start()
        self._say(f"gpu{child.gpu}: pid {child.proc.pid}, CUDA_VISIBLE_DEVICES={child.gpu}")

    def _pump(self, child: _Child, proc: subprocess.Popen) -> None:
        # every line says which GPU's worker wrote it: Celery's own format does not.
        # It reads to the end whatever becomes of the output: a child whose pipe is
        # full blocks in its next write, its fold stalled while its lease is renewed.
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                if not child.ready and proc is child.proc and READY_LINE.search(line):
                    child.ready = True
                self._say(f"gpu{child.gpu}| {line.rstrip()}")
        except (OSError, ValueError):  # the pipe closed under it: the child is gone
            pass

    def _say(self, text: str) -> None:
        """One line to the output; never raises. A reader that left (``| head``), a
        full disk: the lines go to standard error from then on, or nowhere."""
        with self._lock:
            while self._outputs:
                try:
                    print(text, file=self._outputs[0], flush=True)
                    return
                except UnicodeError:  # an encoding without the character: escape it
                    text = text.encode("ascii", "backslashreplace").decode("ascii")
                except (OSError, ValueError) as exc:
                    _discard(self._outputs.pop(0))
                    reason = getattr(exc, "strerror", None) or str(exc)
                    text = (
                        f"orchard worker: cannot write the workers' output ({reason}); "
                        f"it goes to standard error now\n{text}"
                    )

    def _terminate(self, child: _Child) -> None:
        """Send the child its one SIGTERM, unless it has it or has exited."""
        proc = child.proc
        if proc is None or child.stop_sent or proc.poll() is not None:
            return
        child.stop_sent = True
        with contextlib.suppress(ProcessLookupError):  # it exited since poll()
            proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """Ask every running child for Celery's warm shutdown: hand the fold back at its
        next checkpoint (another worker resumes it from there), then exit.

        Always one SIGTERM per child, whatever the launcher got and however often: the
        children run in sessions of their own, so a terminal's signals reach the
        launcher alone, and a second signal would make Celery abandon the running fold.
        Called from the main thread only (a signal handler just asks run() to).
        """
        self._stopping = True
        for child in self.children:
            self._terminate(child)

    def _on_signal(self, signum: int, _frame: object) -> None:
        # only flags: run() sends the SIGTERMs (each child exactly one, whatever this
        # interrupted) and says why; the interrupted code may hold the output's lock
        if self._stopped_by is None:
            self._stopped_by = signal.Signals(signum).name
        self._stopping = True

    def run(self) -> int:
        """Start the children and supervise them until all have exited; the exit code:
        1 when a child ended otherwise than by the stop it was asked for."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        failure: str | None = None
        told = False
        try:
            for child in self.children:
                if self._stopping:  # a signal during start-up: start no more
                    break
                self._start(child)
            while True:
                if self._stopping:
                    self.stop()  # those not yet sent their SIGTERM
                if self._stopped_by is not None and not told:
                    told = True
                    self._say(
                        f"orchard worker: {self._stopped_by}: stopping the workers (each "
                        "hands its fold back after the fold's next checkpoint)"
                    )
                running = 0
                for child in self.children:
                    if child.proc is None:
                        continue  # never started: the launcher was stopped first
                    if child.restart_at is not None:  # a restart held back
                        if self._stopping:
                            child.restart_at = None
                        elif time.monotonic() >= child.restart_at:
                            child.restart_at = None
                            self._start(child)
                            running += 1
                        else:
                            running += 1
                        continue
                    code = child.proc.poll()
                    if code is None:
                        running += 1
                        continue
                    if self._stopping or code == 0:
                        continue  # asked to stop, or shut down remotely: not a crash
                    if child.pump is not None:
                        child.pump.join(timeout=5)  # its last lines, and its ready line
                    uptime = time.monotonic() - child.started
                    how = describe_exit(code)
                    if not child.ready and uptime < self.min_uptime:
                        # said now (the others may take a while to hand their folds
                        # back), and why in the command's last line, once they stopped
                        self._say(
                            f"orchard worker: gpu{child.gpu} did not start; stopping the others"
                        )
                        failure = (
                            f"worker gpu{child.gpu} {how} {uptime:.0f} s after starting, "
                            "before it was ready: it could not start (its output is above)"
                        )
                        self.stop()
                        continue
                    if self._stopping:  # asked to stop while it waited for the output
                        continue
                    child.restarts += 1
                    # one that keeps dying soon after it was ready (a card that fails at
                    # its first fold) is restarted ever later, not in a tight loop
                    child.quick_deaths = child.quick_deaths + 1 if uptime < self.min_uptime else 0
                    delay = 0.0
                    if child.quick_deaths > 1:
                        delay = min(MAX_BACKOFF_S, self.backoff * 2 ** (child.quick_deaths - 2))
                    self._say(
                        f"gpu{child.gpu}: {how} after {uptime:.0f} s; restarting (restart "
                        f"{child.restarts}"
                        + (
                            f", in {delay:g} s: {child.quick_deaths} deaths in a row, each "
                            f"within {self.min_uptime:.0f} s of its start)"
                            if delay
                            else ")"
                        )
                    )
                    running += 1
                    if delay:
                        child.restart_at = time.monotonic() + delay
                        continue
                    self._start(child)
                if running == 0:
                    break
                time.sleep(self.poll)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for child in self.children:
                if child.pump is not None:
                    child.pump.join(timeout=5)
        if failure is not None:
            raise GpuError(failure)
        # each child shut down when asked (exit 0, or the SIGTERM it was sent killed it
        # while it started), or was restarted after a crash; otherwise say which did not
        unclean = [
            f"gpu{child.gpu} {describe_exit(child.proc.returncode)}"
            for child in self.children
            if child.proc is not None
            and child.proc.returncode != 0
            and not (child.stop_sent and child.proc.returncode == -signal.SIGTERM)
        ]
        if unclean:
            with contextlib.suppress(OSError, ValueError):
                print(
                    f"orchard worker: stopped, but {', '.join(unclean)} (its output is above)",
                    file=sys.stderr,
                    flush=True,
                )
            return 1
        return 0


def _discard(stream: IO[str]) -> None:
    """Point a stream that failed at /dev/null, so that the interpreter's final flush of
    what it still buffers does not fail again (a BrokenPipeError at exit)."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, stream.fileno())
        finally:
            os.close(null)
