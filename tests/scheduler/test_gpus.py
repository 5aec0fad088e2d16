"""`orchard worker --gpus`: which GPUs, and how the launcher supervises its children.

The children here are tiny Python scripts, so each behaviour (pinning, restart,
fail-fast, signal forwarding) is shown in a second; tests/integration/test_scaling.py
runs real Celery workers through the same launcher.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from scheduler.gpus import GpuError, GpuLauncher, child_command, detect_gpus, parse_gpus
from tests.conftest import REPO
from tests.scheduler.test_cli import assert_one_line_error, orchard


def test_all_means_every_gpu_found() -> None:
    assert parse_gpus("all", available=["0", "1", "2"], device=None) == ["0", "1", "2"]


def test_all_without_gpus_is_one_clear_error() -> None:
    with pytest.raises(GpuError, match=r"no GPU found \(nvidia-smi lists none\)"):
        parse_gpus("all", available=[], device=None)
    # nvidia-smi was not asked: CUDA_VISIBLE_DEVICES said which
    with pytest.raises(GpuError, match=r"no GPU found \(CUDA_VISIBLE_DEVICES='' names none\)"):
        parse_gpus("all", available=[], device=None, visible="")


def test_explicit_ids_must_exist_unless_on_the_cpu() -> None:
    assert parse_gpus("1", available=["0", "1"], device="cuda") == ["1"]
    with pytest.raises(GpuError, match="GPU 1 not found .*has: 0"):
        parse_gpus("0,1", available=["0"], device=None)
    # ORCHARD_DEVICE=cpu: the ids are slots, so tests run two "gpu" workers on a CPU
    assert parse_gpus("0,1", available=[], device="cpu") == ["0", "1"]


@pytest.mark.parametrize("spec", ["", "0,,1", "first", "0,0", "-1"])
def test_malformed_lists_are_refused(spec: str) -> None:
    with pytest.raises(GpuError, match="--gpus"):
        parse_gpus(spec, available=["0", "1"], device=None)


def test_a_pinned_cuda_device_would_break_the_children() -> None:
    with pytest.raises(GpuError, match="cuda:0"):
        parse_gpus("all", available=["0", "1"], device="cuda:1")


def test_detect_honours_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert detect_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_gpus() == []
    # CUDA hides every device after one that names none: so do we
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,-1,1")
    assert detect_gpus() == ["0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert detect_gpus() == []


def test_children_are_gpu_workers_with_their_own_node_names() -> None:
    command = child_command("1", ["gpu"], "INFO")
    assert command[1:4] == ["-m", "scheduler.cli", "worker"]
    assert command[command.index("--queues") + 1] == "gpu"
    # the launcher's pid too: two launchers on one host must not share a node name
    assert command[command.index("--name") + 1] == f"gpu1-{os.getpid()}@%h"
    command = child_command("1", ["gpu"], "INFO", launcher=4242)
    assert command[command.index("--name") + 1] == "gpu1-4242@%h"


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_each_child_sees_only_its_gpu() -> None:
    out = io.StringIO()
    launcher = GpuLauncher(
        ["0", "3"],
        lambda gpu: python("import os; print('sees', os.environ['CUDA_VISIBLE_DEVICES'])"),
        out=out,
        poll=0.05,
    )
    assert launcher.run() == 0
    lines = out.getvalue().splitlines()
    assert "gpu0| sees 0" in lines and "gpu3| sees 3" in lines


def test_a_child_that_dies_at_once_stops_the_launcher(tmp_path: Path) -> None:
    out = io.StringIO()
    stopped = tmp_path / "stopped"
    ready = tmp_path / "ready"
    code = {
        # gpu0 cannot start (once gpu1 listens for SIGTERM: a child still starting up
        # would die of the signal without a trace); gpu1 would run until told to stop
        "0": f"""
            import pathlib, sys, time
            while not pathlib.Path({str(ready)!r}).exists():
                time.sleep(0.01)
            sys.exit(3)
        """,
        "1": f"""
            import pathlib, signal, sys, time
            def bye(*_):
                pathlib.Path({str(stopped)!r}).write_text('TERM')
                sys.exit(0)
            signal.signal(signal.SIGTERM, bye)
            pathlib.Path({str(ready)!r}).touch()
            time.sleep(60)
        """,
    }
    launcher = GpuLauncher(["0", "1"], lambda gpu: python(code[gpu]), out=out, poll=0.05)
    with pytest.raises(GpuError, match=r"worker gpu0 exited with code 3 \d+ s after starting"):
        launcher.run()
    assert stopped.read_text() == "TERM"  # the healthy one was stopped, not orphaned


def test_a_child_that_crashes_later_is_restarted(tmp_path: Path) -> None:
    marker = tmp_path / "crashed-once"
    out = io.StringIO()
    crash_once = f"""
        import pathlib, sys
        marker = pathlib.Path({str(marker)!r})
        if not marker.exists():
            marker.write_text('x')
            sys.exit(1)
        print('second life')
    """
    launcher = GpuLauncher(["0"], lambda gpu: python(crash_once), out=out, min_uptime=0, poll=0.05)
    assert launcher.run() == 0
    assert launcher.children[0].restarts == 1
    assert "restarting (restart 1)" in out.getvalue()
    assert "gpu0| second life" in out.getvalue()


def test_a_stop_during_start_up_starts_no_more_workers() -> None:
    """SIGTERM between two starts: the one started is stopped, the next never starts."""
    out = io.StringIO()
    launcher = GpuLauncher(
        ["0", "1"], lambda gpu: python("import time; time.sleep(20)"), out=out, poll=0.05
    )
    start = launcher._start

    def start_then_stop(child) -> None:  # noqa: ANN001
        start(child)
        if child.gpu == "0":
            launcher.stop()  # what the launcher's SIGTERM handler does

    launcher._start = start_then_stop
    assert launcher.run() == 0
    assert launcher.children[0].proc.returncode == -signal.SIGTERM  # stopped, not waited for
    assert launcher.children[1].proc is None
    assert "gpu1:" not in out.getvalue()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_becomes_a_warm_shutdown_of_every_child(tmp_path: Path, sig: int) -> None:
    """The launcher as a process of its own, stopped as docker (SIGTERM) or Ctrl-C does."""
    child = f"""
        import os, pathlib, signal, sys, time
        def bye(*_):
            gpu = os.environ['CUDA_VISIBLE_DEVICES']
            pathlib.Path({str(tmp_path)!r}, 'term-' + gpu).write_text('warm shutdown')
            sys.exit(0)
        signal.signal(signal.SIGTERM, bye)
        print('ready', flush=True)
        time.sleep(60)
    """
    script = f"""
        import sys
        from scheduler.gpus import GpuLauncher
        child = {textwrap.dedent(child)!r}
        launcher = GpuLauncher(['0', '1'], lambda gpu: [sys.executable, '-c', child], poll=0.05)
        sys.exit(launcher.run())
    """
    proc = subprocess.Popen(
        python(script), cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ}
    )
    assert proc.stdout is not None
    ready = 0
    for line in proc.stdout:
        ready += line.endswith("| ready\n")
        if ready == 2:
            break
    proc.send_signal(sig)  # to the launcher alone: it must pass SIGTERM on
    assert proc.wait(timeout=30) == 0
    assert {p.name for p in tmp_path.glob("term-*")} == {"term-0", "term-1"}


def test_cli_gpus_all_on_a_machine_without_gpus(tmp_path: Path) -> None:
    # no GPU visible, whatever this machine has
    env = {"ORCHARD_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": "", "ORCHARD_DEVICE": ""}
    done = orchard("worker", "--gpus", "all", env=env)
    assert_one_line_error(done, "--gpus all: no GPU found (CUDA_VISIBLE_DEVICES='' names none)")


def test_gpu_workers_whose_torch_sees_no_gpu_refuse_to_start_rather_than_use_the_cpu(
    tmp_path: Path,
) -> None:
    """CUDA_VISIBLE_DEVICES names a GPU torch cannot use (no driver, no such card): each
    child refuses in one line, and the launcher stops, instead of training on the CPU
    under the name gpu<i>."""
    env = {"ORCHARD_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": "99", "ORCHARD_DEVICE": ""}
    assert orchard("db", "upgrade", env=env).returncode == 0
    done = orchard("worker", "--gpus", "all", env=env)
    assert done.returncode == 2, done.stderr
    assert "device cuda" in done.stderr.splitlines()[0]
    assert "gpu99| orchard: error: ORCHARD_DEVICE=cuda: this host has no CUDA device" in (
        done.stdout  # the children's output, each line named
    )
    assert done.stderr.count("could not start") == 1
    assert done.stderr.splitlines()[-1].startswith(
        "orchard: error: worker gpu99 exited with code 2 "
    )


def test_cli_gpu_ids_on_a_machine_without_gpus_need_the_cpu_device(tmp_path: Path) -> None:
    # no GPU visible, whatever this machine has
    env = {"ORCHARD_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": "", "ORCHARD_DEVICE": ""}
    assert_one_line_error(orchard("worker", "--gpus", "0,1", env=env), "ORCHARD_DEVICE=cpu")


def test_cli_gpus_refuses_a_name_or_a_queue_list_without_gpu(tmp_path: Path) -> None:
    env = {"ORCHARD_HOME": str(tmp_path), "ORCHARD_DEVICE": "cpu"}
    done = orchard("worker", "--gpus", "0", "--name", "x@%h", env=env)
    assert_one_line_error(done, "drop --name")
    done = orchard("worker", "--gpus", "0", "--queues", "cpu", env=env)
    assert_one_line_error(done, "gpu queue")


def test_children_get_resolved_urls_but_no_password_read_from_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--gpus`` hands its children the URLs it resolved (relative paths made
    absolute), except where a password comes from a file: the children read the file
    themselves, so the password stays out of their environment."""
    from shared.settings import child_env, load_settings

    monkeypatch.chdir(tmp_path)
    (tmp_path / "redis_password").write_text("s3cret/?#\n")
    environ = {
        "ORCHARD_HOME": "home",
        "ORCHARD_BROKER_URL": "redis://head:6379/0",
        "ORCHARD_BROKER_PASSWORD_FILE": "redis_password",
        "ORCHARD_DATABASE_URL": "sqlite:///rel/orchard.db",
    }
    settings = load_settings(environ)
    assert "s3cret" in settings.broker_url  # percent-encoded into the parent's URL
    env = child_env(settings, environ)
    assert not any("s3cret" in value for value in env.values())
    assert env["ORCHARD_BROKER_URL"] == "redis://head:6379/0"
    assert env["ORCHARD_BROKER_PASSWORD_FILE"] == str(tmp_path / "redis_password")
    assert env["ORCHARD_DATABASE_URL"] == f"sqlite:///{tmp_path / 'rel' / 'orchard.db'}"
    assert env["ORCHARD_HOME"] == str(tmp_path / "home")
    assert load_settings(env).broker_url == settings.broker_url  # what a child resolves
