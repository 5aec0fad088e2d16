"""``orchard demo``: the whole system on one machine with no servers.

Uses whatever ``shared.settings`` resolves (by default kombu's filesystem broker and
a SQLite file under ./.orchard), starts one worker consuming ``gpu`` (it trains on
the CPU when there is no CUDA) and one consuming ``cpu,preprocess,report``, submits
the quick campaign, shows progress, prints where the report is, and stops its
workers again. A campaign file it cannot run stops it before anything is created, and a
dataset it cannot use before a worker starts; a campaign that does not finish in time,
or Ctrl-C, cancels the campaign before the workers stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from db.store import Store
from scheduler.api import (
    CampaignRun,
    cancel,
    check_campaign_path,
    check_creatable,
    check_sqlite_store,
    submit,
)
from scheduler.stopsignals import Stopped, StopSignals
from shared.errors import OrchardError, visible_controls
from shared.settings import Settings, child_env, default_store_url, load_settings, mask_url
from shared.spec import load_campaign

REPO = Path(__file__).resolve().parent.parent
#: campaigns/quick.toml: in a checkout through the link scheduler/quick.toml, which an
#: install from a wheel (`pip install .`, the Docker image) carries as the file itself
QUICK = Path(__file__).with_name("quick.toml").resolve()
#: Seconds a worker gets to end on SIGTERM (idle, it ends at once) before a cancelled
#: campaign's demo stops it cold.
COLD_AFTER = 1.0


class Workers:
    """Worker subprocesses that are stopped (warm shutdown, or cold, then kill) on exit."""

    def __init__(self, settings: Settings, specs: list[tuple[str, list[str]]]) -> None:
        self.logs = settings.home / "logs"
        try:
            self.logs.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OrchardError(f"cannot create {self.logs}: {exc.strerror or exc}") from None
        # the same as --gpus gives its children: a password file stays a file
        env = child_env(settings, os.environ)
        self.procs: list[tuple[str, subprocess.Popen]] = []
        try:
            for name, extra in specs:
                path = self.logs / f"{name}.log"
                try:
                    log = open(path, "ab")  # noqa: SIM115 - closed once the child has it
                except OSError as exc:
                    raise OrchardError(f"cannot write {path}: {exc.strerror or exc}") from None
                cmd = [sys.executable, "-m", "scheduler.cli", "worker", "--loglevel", "INFO"]
                with log:
                    try:
                        proc = subprocess.Popen(
                            [*cmd, *extra],
                            env=env,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            cwd=REPO,
                            # a process group of its own, which stop() can kill whole; a
                            # Ctrl-C reaches the demo alone, which stops them
                            start_new_session=True,
                        )
                    except OSError as exc:  # no more processes, no memory
                        raise OrchardError(f"cannot start {name}: {exc.strerror or exc}") from None
                self.procs.append((name, proc))
        except BaseException:  # Ctrl-C, a log or a process that cannot be had: none left behind
            self.stop()
            raise

    def check(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise OrchardError(
                    f"worker {name} exited with code {proc.returncode}; see {self.logs / name}.log"
                )

    def stop(self, timeout: float = 30, *, cold: bool = False) -> None:
        """Stop the workers: a warm shutdown (the units they run finish first), or with
        ``cold`` a cold one (what they run stops now: their campaign is cancelled).

        Cold is SIGKILL to the worker's process group (its pool's children too) when
        SIGTERM did not end it at once: Celery's own cold shutdown (SIGQUIT) can fail
        with a unit running (a solo pool cannot kill its job; a prefork one can hang in
        its signal handler), and a cancelled campaign's unit needs no clean end (its
        message, if it comes again, is rejected; `orchard resume` sends it anew)."""
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # Celery's warm shutdown
        if cold:
            deadline = time.monotonic() + COLD_AFTER
            for _, proc in self.procs:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
        for _, proc in self.procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_demo(campaign: Path | None = None, *, timeout: float = 600) -> int:
    settings = load_settings()
    campaign = campaign or QUICK
    _check_before_starting(campaign, settings)
    print(f"orchard demo: home {settings.home}")
    print(f"  broker    {mask_url(settings.broker_url)}")
    print(f"  store     {mask_url(settings.database_url)}")
    print(f"  artifacts {settings.artifacts}")
    if settings.database_url == default_store_url(settings.home):
        # its own store, under ORCHARD_HOME: brought to this orchard's schema. Another
        # (ORCHARD_DATABASE_URL: a cluster's, perhaps, whose workers run on) is never
        # migrated here: the submit checks it, as any submit does
        store = Store(settings.database_url)
        try:
            store.upgrade()
        finally:
            store.dispose()
    run = workers = None
    cancelled = False
    stop_signals = StopSignals()
    try:
        # submitted before the workers start: a dataset it cannot use stops the demo with
        # nothing started; the first stage waits in the broker for them
        run = submit(campaign, settings=settings)
        workers = Workers(settings, _worker_specs())
        print(f"campaign {run.id} submitted ({campaign}); logs in {workers.logs}")
        # the bars on stderr, as `submit --wait` draws them: where it is a terminal
        status = run.wait(timeout=timeout, progress=sys.stderr.isatty(), check=workers.check)
    except (OrchardError, KeyboardInterrupt, Stopped) as exc:
        stop_signals.ignore()  # a second TERM must not cut the cleanup short
        if run is None:  # nothing of ours to clean up
            if isinstance(exc, Stopped):
                return 128 + exc.signum
            raise
        # the demo's campaign is cancelled before its workers stop: left RUNNING, the
        # next demo's workers would finish it before starting their own
        why = "interrupted"
        if isinstance(exc, OrchardError):
            why = str(exc)
        elif isinstance(exc, Stopped):
            why = f"stopped by {exc}"
        logs = settings.home / "logs"
        outcome = _cancel(run)
        # what the workers run is of a cancelled campaign now: a cold shutdown, else the
        # warm one waits for it (the filesystem broker carries no revoke to the workers)
        cancelled = outcome.startswith("cancelled ")
        print(f"orchard demo: {why}; {outcome}. Logs in {logs}", file=sys.stderr)
        if isinstance(exc, Stopped):
            return 128 + exc.signum  # as a shell reports a process the signal ended
        return 1 if isinstance(exc, OrchardError) else 130
    finally:
        stop_signals.ignore()
        if workers is not None:
            workers.stop(cold=cancelled)
        stop_signals.restore()
    print(f"campaign {run.id}: {status.campaign.state}")
    failed = [u for u in status.units if u.state != "SUCCESS"]
    for unit in failed:
        error = visible_controls(unit.error or "")
        print(f"  {unit.state.lower()} {unit.key}: {error}", file=sys.stderr)
    report = run.report_path()
    if report is not None:
        print(f"report: {report}")
        print(f"        {report.with_suffix('.md')}")
    return 0 if status.campaign.state == "DONE" and report is not None else 1


def _worker_specs() -> list[tuple[str, list[str]]]:
    pid = os.getpid()
    return [
        ("gpu-worker", ["--queues", "gpu", "--name", f"demo-gpu-{pid}@%h"]),
        (
            "cpu-worker",
            ["--queues", "cpu,preprocess,report", "--concurrency", "1"]
            + ["--name", f"demo-cpu-{pid}@%h"],
        ),
    ]


def _check_before_starting(campaign: Path, settings: Settings) -> None:
    """What ``submit`` can refuse without reading the dataset, checked before the demo
    creates a store or starts a worker: the campaign file, the artifact folder, the
    reliability variables, the workers' log folder, an existing SQLite store and the
    broker."""
    check_campaign_path(campaign)
    load_campaign(campaign)
    check_creatable(settings.artifacts)
    check_creatable(settings.home / "logs", "log folder")
    if settings.broker_is_filesystem:
        check_creatable(settings.broker_folder, "ORCHARD_BROKER_URL: broker folder")
    check_sqlite_store(settings.database_url)
    from workers.app import check_broker_reachable, make_app

    check_broker_reachable(make_app(settings, with_tasks=False, broker_folders=False))


def _cancel(run: CampaignRun) -> str:
    """Cancel the demo's unfinished campaign; what happened, for the demo's last line."""
    try:
        outcome = cancel(run.id, settings=run.settings)
    except OrchardError as exc:
        return f"could not cancel campaign {run.id}: {exc}"
    if outcome.already_finished:
        return f"campaign {run.id} ended {outcome.state} meanwhile"
    return f"cancelled campaign {run.id}"
