"""``orchard worker --gpus all|0,1``: one Celery worker process per GPU, supervised.

Each child is an ordinary ``orchard worker --queues gpu`` (solo pool, one task at a
time) started with ``CUDA_VISIBLE_DEVICES=<i>`` and the node name ``gpu<i>@%h``, so
it sees exactly one card (as ``cuda:0``) and Flower and ``orchard status`` name it.
A second host joins by running the same command against the same broker, store and
artifact mount.

The launcher never imports torch or touches CUDA: it asks ``nvidia-smi`` which GPUs
there are. On SIGTERM or SIGINT it sends every child SIGTERM (Celery's warm shutdown:
each hands its fold back after the fold's next checkpoint, then exits) and waits for
them. A child that dies on its own is restarted (its unacknowledged task goes back to
the queue and is delivered again), unless it died within ``min_uptime`` seconds of
starting: a worker that cannot even start will not start next time either, so the
launcher stops the others and exits non-zero instead of looping.
"""

from __future__ import annotations

import itertools
import os
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

#: a child that exits sooner than this after starting is a configuration problem
MIN_UPTIME_S = 30.0


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
) -> list[str]:
    """The GPU ids ``--gpus`` asks for, checked against ``available``.

    ``all`` is every available GPU. An explicit list (``0,1``) must name available
    GPUs, except with ``ORCHARD_DEVICE=cpu``: then the ids are only slots, so a
    machine without GPUs can run several "gpu" workers (how the tests run them).
    """
    spec = spec.strip()
    if device and device.startswith("cuda:"):
        raise GpuError(
            f"--gpus with ORCHARD_DEVICE={device}: each child sees one GPU as cuda:0; "
            "set ORCHARD_DEVICE=cuda or leave it unset"
        )
    on_cpu = device == "cpu"
    if spec == "all":
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
            raise GpuError(
                f"--gpus {spec}: GPU {missing[0]} not found (this host has: {have}); "
                "set ORCHARD_DEVICE=cpu to run these workers on the CPU"
            )
    return ids


def node_name(gpu: str) -> str:
    return f"gpu{gpu}@%h"


def child_command(gpu: str, queues: Sequence[str], loglevel: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "scheduler.cli",
        "worker",
        "--queues",
        ",".join(queues),
        "--name",
        node_name(gpu),
        "--loglevel",
        loglevel,
    ]


@dataclass
class _Child:
    gpu: str
    command: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
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
    ) -> None:
        base = dict(os.environ if env is None else env)
        self.children = [
            _Child(gpu, command_for(gpu), {**base, "CUDA_VISIBLE_DEVICES": gpu}) for gpu in gpus
        ]
        self.min_uptime = min_uptime
        self.out = out or sys.stdout
        self.poll = poll
        self._stopping = False
        self._lock = threading.Lock()

    # -- lifecycle

    def _start(self, child: _Child) -> None:
        child.proc = subprocess.Popen(
            child.command,
            env=child.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
        )
        child.started = time.monotonic()
        if self._stopping:  # a signal that came while it started: stop() did not see it
            child.proc.send_signal(signal.SIGTERM)
        child.pump = threading.Thread(target=self._pump, args=(child, child.proc), daemon=True)
        child.pump.start()
        self._say(f"gpu{child.gpu}: pid {child.proc.pid}, CUDA_VISIBLE_DEVICES={child.gpu}")

    def _pump(self, child: _Child, proc: subprocess.Popen) -> None:
        # every line says which GPU's worker wrote it: Celery's own format does not
        assert proc.stdout is not None
        for line in proc.stdout:
            self._say(f"gpu{child.gpu}| {line.rstrip()}")

    def _say(self, text: str) -> None:
        with self._lock:
            print(text, file=self.out, flush=True)

    def stop(self) -> None:
        """Ask every running child for Celery's warm shutdown: hand the fold back at its
        next checkpoint (another worker resumes it from there), then exit.

        Always SIGTERM, whatever the launcher got: a Ctrl-C at a terminal already
        reaches the children (same process group), and a second SIGINT would make
        Celery abandon the running fold.
        """
        self._stopping = True
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)

    def run(self) -> int:
        """Start the children and supervise them until all have exited; the exit code."""
        previous = {
            sig: signal.signal(sig, lambda _signum, _frame: self.stop())
            for sig in (signal.SIGTERM, signal.SIGINT)
        }
        failure: str | None = None
        try:
            for child in self.children:
                if self._stopping:  # a signal during start-up: start no more
                    break
                self._start(child)
            while True:
                running = 0
                for child in self.children:
                    if child.proc is None:
                        continue  # never started: the launcher was stopped first
                    code = child.proc.poll()
                    if code is None:
                        running += 1
                        continue
                    if self._stopping or code == 0:
                        continue  # asked to stop, or shut down remotely: not a crash
                    if child.pump is not None:
                        child.pump.join(timeout=5)
                    uptime = time.monotonic() - child.started
                    if uptime < self.min_uptime:
                        # said now (the others may take a while to hand their folds
                        # back), and why in the command's last line, once they stopped
                        self._say(
                            f"orchard worker: gpu{child.gpu} did not start; stopping the others"
                        )
                        failure = (
                            f"worker gpu{child.gpu} exited with code {code} {uptime:.0f} s "
                            "after starting: it could not start (its output is above)"
                        )
                        self.stop()
                        continue
                    if self._stopping:  # asked to stop while it waited for the output
                        continue
                    child.restarts += 1
                    self._say(
                        f"gpu{child.gpu}: exited with code {code} after {uptime:.0f} s; "
                        f"restarting (restart {child.restarts})"
                    )
                    self._start(child)
                    running += 1
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
        # every child either shut down when asked or was restarted after a crash
        return 0
