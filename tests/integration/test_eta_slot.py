"""A countdown retry is not stuck behind a long task its worker fetched meanwhile.

Real `celery worker` processes of the workers' app (``workers.app.make_app``: orchard's
settings and bootsteps) on the real Redis, with two test tasks: one that retries itself
once with a countdown, as orchard's tasks do when the store is unreachable, and a long
one. A worker holding the retry used to fetch the long task into the room Celery makes
beside an ETA message, and the retry, due in seconds, then waited for it to end
(``workers.etaslot``).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REDIS_URL, REPO
from tests.integration.test_campaign import settings_for
from tests.integration.workerpool import kill_groups, wait_for

pytestmark = pytest.mark.integration

QUEUE = "etaslot"
COUNTDOWN = 6.0  # the retry's
LONG_TASK = 12.0  # seconds

APP_MODULE = '''
"""The workers' app, and two tasks that record what they do in a Redis list."""
import json
import os
import time

import redis
from celery import signals

from shared.settings import load_settings
from workers.app import make_app

app = make_app(load_settings())
_redis = redis.Redis.from_url(os.environ["ETASLOT_REDIS"])


def record(event, **fields):
    fields.update(event=event, worker=os.environ["ETASLOT_WORKER"], t=time.time())
    _redis.rpush(os.environ["ETASLOT_EVENTS"], json.dumps(fields))


@signals.task_received.connect
def _received(request=None, **_):
    record("received", task=request.name, eta=bool(request.eta))


@app.task(bind=True, name="etaslot.retrier", max_retries=1)
def retrier(self, countdown):
    if not self.request.retries:
        record("retry-sent", due=time.time() + countdown)
        raise self.retry(countdown=countdown)
    record("retry-ran")


@app.task(name="etaslot.long")
def long(seconds):
    record("long-start")
    time.sleep(seconds)
    record("long-end")
'''


class Workers:
    """Solo-pool `celery worker` processes of the test app, each in its own process group."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.folder = tmp_path
        (tmp_path / "etaslot_app.py").write_text(APP_MODULE)
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str) -> None:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed below
        self.procs[name] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "etaslot_app",
                "worker",
                "--queues",
                QUEUE,
                "--pool",
                "solo",
                "--concurrency",
                "1",  # as `orchard worker --pool solo` (Celery's default: one per core)
                "--hostname",
                f"{name}@etaslot",
                "--without-mingle",
                "--without-gossip",
                "--loglevel",
                "INFO",
            ],
            cwd=self.folder,
            env={**self.env, "ETASLOT_WORKER": name},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_for(lambda: " ready." in self.log(name), 60, f"{name} ready", check=self.check)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def check(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")


@contextlib.contextmanager
def etaslot_workers(tmp_path: Path, events_key: str) -> Iterator[Workers]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]),
        "ORCHARD_HOME": str(tmp_path / "home"),
        "ORCHARD_BROKER_URL": REDIS_URL,
        "ORCHARD_DATABASE_URL": f"sqlite:///{tmp_path / 'store.db'}",
        "ORCHARD_ARTIFACTS": str(tmp_path / "artifacts"),
        "ORCHARD_LEASE_SECONDS": "3600",  # the reaper's first pass: after the test
        "ETASLOT_REDIS": REDIS_URL,
        "ETASLOT_EVENTS": events_key,
    }
    workers = Workers(tmp_path, env)
    try:
        yield workers
    finally:
        kill_groups(workers.procs.values())


def test_a_countdown_retry_runs_when_due_though_its_worker_could_fetch_a_long_task(
    tmp_path: Path, redis_prefix: str
) -> None:
    import redis

    from workers.app import make_app

    events_key = f"{redis_prefix}etaslot-events"
    client = redis.Redis.from_url(REDIS_URL)

    def events(name: str | None = None) -> list[dict[str, Any]]:
        found = [json.loads(e) for e in client.lrange(events_key, 0, -1)]
        return [e for e in found if name is None or e["event"] == name]

    producer = make_app(
        settings_for(tmp_path, REDIS_URL, f"sqlite:///{tmp_path / 'store.db'}"), with_tasks=False
    )
    with etaslot_workers(tmp_path, events_key) as workers:
        # w1 alone: it runs the task, which retries, and holds the retry until due
        workers.start("w1")
        producer.send_task("etaslot.retrier", kwargs={"countdown": COUNTDOWN}, queue=QUEUE)
        wait_for(
            lambda: [e for e in events("received") if e["eta"]],
            30,
            "w1 to hold the retry",
            check=workers.check,
        )
        # a long task while w1 is the only worker of the queue: before the fix w1, with
        # room for one more message beside the retry, took it; then a second worker
        producer.send_task("etaslot.long", kwargs={"seconds": LONG_TASK}, queue=QUEUE)
        time.sleep(1)
        workers.start("w2")
        wait_for(
            lambda: events("retry-ran") and events("long-end"),
            COUNTDOWN + LONG_TASK + 60,
            "the retry and the long task to run",
            check=workers.check,
        )
    producer.close()
    client.close()

    (sent,) = events("retry-sent")
    (ran,) = events("retry-ran")
    (long_start,) = events("long-start")
    (long_end,) = events("long-end")
    said = json.dumps(events(), indent=1) + "\n" + workers.log("w1")[-3000:]
    # the retry ran when due, on the worker that held it, not after the long task ...
    assert ran["worker"] == "w1" and ran["t"] >= sent["due"] - 0.5, said
    assert ran["t"] < long_end["t"], said
    # ... which w1 did not take while it held the retry (it may run it afterwards, if
    # w2 was slow to start)
    if long_start["worker"] == "w1":
        assert long_start["t"] > ran["t"], said
