"""`orchard worker --gpus`: the launcher as a process of its own, in the ways it ends.

A reader that leaves, a terminal's hangup or Ctrl-C, a SIGKILL, a child that dies
soon after it was ready, a child that stops badly: the launcher must neither stall its
workers nor leave them behind, and its exit code must say what they did. The children
are tiny Python scripts (each records its pid and the signals it got), so each case
takes a second or two; the last tests start real workers through the command.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scheduler.gpus import READY_LINE, GpuError, GpuLauncher
from tests.conftest import REPO
from tests.scheduler.test_cli import assert_one_line_error, orchard
from tests.scheduler.test_gpus import python

# A child that records its pid, and each signal it gets in signals-<gpu>; it says
# `ready` once its handlers are in place, and exits ON_TERM (a code, or a signal it
# kills itself with) a moment after SIGTERM, so that a second signal would be seen.
CHILD = """
    import os, pathlib, signal, sys, time
    gpu = os.environ['CUDA_VISIBLE_DEVICES']
    here = pathlib.Path({folder!r})
    log = here / ('signals-' + gpu)
    def record(signum, _frame):
        with log.open('a') as f:
            f.write(signal.Signals(signum).name + '\\n')
        if signum == signal.SIGTERM:
            time.sleep(0.5)
            on_term = {on_term!r}
            if on_term.startswith('SIG'):
                os.kill(os.getpid(), getattr(signal, on_term))
            sys.exit(int(on_term))
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, record)
    (here / ('pid-' + gpu)).write_text(str(os.getpid()))
    print('ready', flush=True)
    {then}
    while True:
        time.sleep(0.1)
"""

LAUNCHER = """
    import sys
    from scheduler.gpus import GpuLauncher
    code = {code!r}
    launcher = GpuLauncher(list(code), lambda gpu: [sys.executable, '-c', code[gpu]], poll=0.05)
    sys.exit(launcher.run())
"""


def child_code(folder: Path, *, on_term: str = "0", then: str = "") -> str:
    return textwrap.dedent(CHILD).format(folder=str(folder), on_term=on_term, then=then)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # an orphan that exited, not yet reaped
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return True


def wait_until(condition, timeout: float = 10) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def pids(folder: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(folder.glob("pid-*")) if p.read_text()]


@contextlib.contextmanager
def launcher(
    folder: Path, code: str | dict[str, str], **popen: object
) -> Iterator[subprocess.Popen]:
    """The launcher of gpu0 and gpu1 (``code``: both children's, or each one's) in a
    process group of its own, as a terminal's foreground job; whatever the test leaves
    running is killed after it."""
    code = code if isinstance(code, dict) else {"0": code, "1": code}
    script = textwrap.dedent(LAUNCHER).format(code=code)
    popen = {"stdout": subprocess.PIPE, "text": True, **popen}
    proc = subprocess.Popen(python(script), cwd=REPO, start_new_session=True, **popen)
    try:
        yield proc
    finally:
        for pid in [proc.pid, *pids(folder)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def wait_ready(proc: subprocess.Popen, count: int = 2) -> None:
    assert proc.stdout is not None
    ready = 0
    for line in proc.stdout:
        ready += line.endswith("| ready\n")
        if ready == count:
            return
    raise AssertionError("the launcher ended before its children were ready")


def test_a_reader_that_left_stalls_no_worker(tmp_path: Path) -> None:
    """`orchard worker --gpus 0,1 | head -1`: the launcher goes on reading its children's
    output (a child whose pipe fills blocks, its fold stalled), quietly, and still
    stops them on SIGTERM."""
    err = tmp_path / "stderr"
    # 2 MB each, far more than a pipe holds, then `talked`
    talk = "print(('x' * 99 + chr(10)) * 20000, flush=True); (here / ('talked-' + gpu)).touch()"
    with (
        err.open("w") as stderr,
        launcher(tmp_path, child_code(tmp_path, then=talk), stderr=stderr) as proc,
    ):
        assert proc.stdout is not None
        proc.stdout.readline()
        proc.stdout.close()  # the reader leaves
        assert wait_until(lambda: len(list(tmp_path.glob("talked-*"))) == 2, 60), "a child stalled"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not any(alive(pid) for pid in pids(tmp_path))
    text = err.read_text()
    assert "Traceback" not in text and "Exception in thread" not in text, text[:2000]
    assert "cannot write the workers' output (Broken pipe); it goes to standard error" in text


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT])
def test_a_hangup_stops_every_child_and_leaves_none_behind(tmp_path: Path, sig: int) -> None:
    with launcher(tmp_path, child_code(tmp_path)) as proc:
        wait_ready(proc)
        children = pids(tmp_path)
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
        assert not any(alive(pid) for pid in children)
        for gpu in ("0", "1"):  # a warm shutdown each, nothing else
            assert (tmp_path / f"signals-{gpu}").read_text() == "SIGTERM\n"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_a_terminals_signal_reaches_each_child_as_one_sigterm(tmp_path: Path, sig: int) -> None:
    """Ctrl-C or a hangup goes to the terminal's whole process group, and a second
    Ctrl-C to the launcher follows: each child still gets one SIGTERM and nothing else
    (a second signal would make Celery abandon the fold)."""
    with launcher(tmp_path, child_code(tmp_path)) as proc:
        wait_ready(proc)
        os.killpg(proc.pid, sig)  # the whole foreground job, as the terminal does
        assert wait_until(lambda: len(list(tmp_path.glob("signals-*"))) == 2)
        proc.send_signal(signal.SIGINT)  # the impatient second Ctrl-C
        assert proc.wait(timeout=20) == 0
        for gpu in ("0", "1"):
            assert (tmp_path / f"signals-{gpu}").read_text() == "SIGTERM\n"


def test_a_killed_launcher_takes_its_children_with_it(tmp_path: Path) -> None:
    with launcher(tmp_path, child_code(tmp_path)) as proc:
        wait_ready(proc)
        children = pids(tmp_path)
        proc.kill()
        proc.wait()
        assert wait_until(lambda: not any(alive(pid) for pid in children), timeout=5)
        # a warm shutdown (Linux's parent-death signal), not a kill; once per thread
        # of the launcher's that dies (the kernel sends it on each reparenting)
        assert set((tmp_path / "signals-0").read_text().split()) == {"SIGTERM"}


@pytest.mark.parametrize(
    ("on_term", "said"), [("3", "gpu1 exited with code 3"), ("SIGKILL", "gpu1 killed by SIGKILL")]
)
def test_a_child_that_stops_badly_makes_the_launcher_fail(
    tmp_path: Path, on_term: str, said: str
) -> None:
    code = {"0": child_code(tmp_path), "1": child_code(tmp_path, on_term=on_term)}
    with launcher(tmp_path, code, stderr=subprocess.PIPE) as proc:
        wait_ready(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 1
        assert proc.stderr is not None
        assert f"orchard worker: stopped, but {said}" in proc.stderr.read()
        proc.stderr.close()


READY = "print('[2026-01-01 00:00:00,000: INFO/MainProcess] gpu0-1@host ready.', flush=True)"


def test_a_child_killed_soon_after_it_was_ready_is_restarted(tmp_path: Path) -> None:
    marker = tmp_path / "killed-once"
    code = f"""
        import os, pathlib, signal
        {READY}
        marker = pathlib.Path({str(marker)!r})
        if not marker.exists():
            marker.write_text('x')
            os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer, a second after start
        print('second life')
    """
    out = io.StringIO()
    launcher = GpuLauncher(["0"], lambda gpu: python(code), out=out, poll=0.05)
    assert launcher.run() == 0
    assert launcher.children[0].restarts == 1
    assert re.search(
        r"gpu0: killed by SIGKILL after \d+ s; restarting \(restart 1\)", out.getvalue()
    )
    assert "gpu0| second life" in out.getvalue()


def test_a_child_that_keeps_dying_soon_after_it_is_ready_is_restarted_ever_later() -> None:
    """A card that fails at its first fold: the worker is ready, then dies, again and
    again. The first death restarts it at once; each one after waits twice as long."""
    out = io.StringIO()
    launcher = GpuLauncher(
        ["0"], lambda gpu: python(f"{READY}\nraise SystemExit(1)"), out=out, poll=0.01,
        backoff=0.2,
    )  # fmt: skip
    starts: list[float] = []
    start = launcher._start

    def counted(child) -> None:  # noqa: ANN001
        starts.append(time.monotonic())
        if len(starts) == 5:
            launcher._on_signal(signal.SIGTERM, None)
        start(child)

    launcher._start = counted  # type: ignore[method-assign]
    assert launcher.run() == 0  # its last start was stopped by the SIGTERM it was sent
    said = out.getvalue()
    assert "restarting (restart 1)\n" in said
    assert "restarting (restart 2, in 0.2 s: 2 deaths in a row, each within 30 s" in said
    assert "restarting (restart 4, in 0.8 s: 4 deaths in a row" in said
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[2] >= 0.4 and gaps[3] >= 0.8 and gaps[3] > gaps[1]


def test_a_child_killed_before_it_was_ready_could_not_start() -> None:
    out = io.StringIO()
    code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    launcher = GpuLauncher(["0"], lambda gpu: python(code), out=out, poll=0.05)
    with pytest.raises(GpuError, match=r"worker gpu0 killed by SIGKILL \d+ s after starting"):
        launcher.run()
    assert "gpu0 did not start" in out.getvalue()


@pytest.mark.parametrize(
    "args", [["--gpus", "0", "--concurrency", "4"], ["--queues", "gpu,cpu", "-c", "4"]]
)
def test_concurrency_that_a_gpu_worker_would_ignore_is_refused(
    tmp_path: Path, args: list[str]
) -> None:
    env = {"ORCHARD_HOME": str(tmp_path), "ORCHARD_DEVICE": "cpu"}
    assert_one_line_error(orchard("worker", *args, env=env), "drop --concurrency 4")


def test_two_launchers_on_one_host_name_their_workers_apart(tmp_path: Path) -> None:
    """A broadcast to a name (Celery's, Flower's) reaches every worker of it: each
    launcher's workers carry its pid. Each says it is ready, at a log level that hides
    Celery's INFO line too (the launcher tells a worker that started by that line)."""
    env = {
        **os.environ,
        "ORCHARD_HOME": str(tmp_path / "home"),
        "ORCHARD_DEVICE": "cpu",
        "ORCHARD_TORCH_THREADS": "1",
    }
    assert orchard("db", "upgrade", env=env).returncode == 0
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "scheduler.cli", "worker", "--gpus", "0", "-l", level],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        for level in ("INFO", "WARNING")
    ]
    names, said = [], []
    # a worker that never says it is ready fails the test rather than hanging it
    stuck = threading.Timer(90, lambda: [os.killpg(p.pid, signal.SIGKILL) for p in procs])
    stuck.start()
    try:
        for proc in procs:
            assert proc.stdout is not None
            for line in proc.stdout:
                found = re.search(r" (\S+)@\S+ ready\.$", line)
                if found:
                    assert READY_LINE.search(line)
                    names.append(found.group(1))
                    said.append(line.split("| ", 1)[1].split(" ", 1)[0])
                    break
    finally:
        stuck.cancel()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                assert proc.wait(timeout=30) == 0
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    assert names == [f"gpu0-{proc.pid}" for proc in procs]
    assert said[0].startswith("[") and said[1] == "orchard:"  # Celery's log line, orchard's


def test_no_gpu_left_by_cuda_visible_devices_names_it(tmp_path: Path) -> None:
    env = {"ORCHARD_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": "-1", "ORCHARD_DEVICE": ""}
    done = orchard("worker", "--gpus", "all", env=env)
    assert_one_line_error(done, "--gpus all: no GPU found (CUDA_VISIBLE_DEVICES='-1' names none)")
