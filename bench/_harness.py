"""What bench/scaling.py, bench/scheduling.py and bench/chaos.py share (not a benchmark).

A throwaway orchard per run: the real Redis under a key prefix of its own (deleted
afterwards), or kombu's filesystem broker when Redis is not reachable; a SQLite store
and an artifact folder in a temporary directory; real `orchard worker` processes,
waited for until each answers, so start-up never counts as campaign time. Times come
from the store (each unit's queued/started/finished timestamps).
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/x.py` from anywhere
    sys.path.insert(0, str(REPO))

from bench._report import machine_info, write_results  # noqa: E402, F401  (re-exported)
from scheduler.demo import Workers  # noqa: E402
from shared.settings import Settings  # noqa: E402

if TYPE_CHECKING:
    from scheduler.api import CampaignRun

REDIS_URL = os.environ.get("ORCHARD_BENCH_REDIS", "redis://127.0.0.1:6379/0")


def redis_reachable(url: str = REDIS_URL) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2)
        client.ping()
        client.close()
        return True
    except redis.RedisError:
        return False


@dataclass(frozen=True)
class Cluster:
    settings: Settings
    broker: str  # "redis" or "filesystem"


@contextmanager
def cluster(root: Path, broker: str = "auto") -> Iterator[Cluster]:
    """Fresh broker namespace, store and artifacts under ``root``."""
    if broker == "auto":
        broker = "redis" if redis_reachable() else "filesystem"
    root.mkdir(parents=True, exist_ok=True)
    prefix = f"orchard-bench-{secrets.token_hex(4)}:"
    url = REDIS_URL if broker == "redis" else f"filesystem://{root / 'broker'}"
    previous = os.environ.get("ORCHARD_REDIS_PREFIX")
    os.environ["ORCHARD_REDIS_PREFIX"] = prefix  # the workers inherit it
    settings = Settings(
        home=root / "home",
        broker_url=url,
        database_url=f"sqlite:///{root / 'store.db'}",
        artifacts=root / "artifacts",
    )
    try:
        yield Cluster(settings, broker)
    finally:
        if previous is None:
            os.environ.pop("ORCHARD_REDIS_PREFIX", None)
        else:
            os.environ["ORCHARD_REDIS_PREFIX"] = previous
        if broker == "redis":
            drop_redis_keys(prefix)


def drop_redis_keys(prefix: str, url: str = REDIS_URL) -> None:
    import redis

    client = redis.Redis.from_url(url)
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    client.close()


@contextmanager
def workers(
    c: Cluster, count: int, queues: str = "cpu,preprocess,report", extra: Sequence[str] = ()
) -> Iterator[Workers]:
    """``count`` worker processes, one task at a time each, ready before this yields;
    ``extra``: more `orchard worker` arguments (``--pool solo``)."""
    from db.store import Store

    Store(c.settings.database_url).upgrade()
    tag = secrets.token_hex(3)
    names = [f"bench{i}-{tag}" for i in range(count)]
    running = Workers(
        c.settings,
        [
            (name, ["--queues", queues, "--concurrency", "1", "--name", f"{name}@%h", *extra])
            for name in names
        ],
    )
    try:
        _wait_ready(c, running, names)
        yield running
    finally:
        running.stop()


def _wait_ready(c: Cluster, running: Workers, names: list[str], timeout: float = 180) -> None:
    if c.broker == "redis":
        prefixes = [n + "@" for n in names]
        wait_for_pings(c.settings, prefixes, running.check, running.logs, timeout)
        return
    deadline = time.monotonic() + timeout
    # the filesystem broker has no broadcast: read the workers' logs instead
    while True:
        running.check()
        logs = [running.logs / f"{n}.log" for n in names]
        if all(p.exists() and " ready." in p.read_text(errors="replace") for p in logs):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers not up after {timeout:.0f} s; see {running.logs}")
        time.sleep(0.5)


def wait_for_pings(
    settings: Settings,
    prefixes: Iterable[str],
    check: Callable[[], None],
    logs: Path,
    timeout: float = 180,
) -> None:
    """Until, for each prefix, a worker whose node name starts with it answers a ping.

    ``check`` raises when a worker process died (its log is under ``logs``).
    """
    from workers.app import make_app

    app = make_app(settings, with_tasks=False)
    deadline = time.monotonic() + timeout
    wanted, seen = list(prefixes), set[str]()
    while not all(any(s.startswith(p) for s in seen) for p in wanted):
        check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers not up after {timeout:.0f} s; see {logs}")
        for reply in app.control.ping(timeout=1.0):
            seen.update(reply)
    app.close()


def run_campaign(
    root: Path,
    broker: str,
    count: int,
    submit: Callable[[Settings], CampaignRun],
    worker_args: Sequence[str] = (),
) -> tuple[list[dict[str, Any]], str]:
    """``submit`` one campaign to ``count`` fresh workers on a fresh cluster under ``root``;
    its units' times (see :func:`unit_times`) and the broker it ran on."""
    with cluster(root, broker) as c, workers(c, count, extra=worker_args) as running:
        run = submit(c.settings)
        status = run.wait(timeout=1800, check=running.check)
        if status.campaign.state != "DONE":
            raise SystemExit(f"campaign {run.id} ended {status.campaign.state}")
        return unit_times(c.settings.database_url, run.id), c.broker


def unit_times(database_url: str, campaign_id: str) -> list[dict[str, Any]]:
    """Each unit's family, worker and queued/started/finished times (epoch seconds)."""
    from sqlalchemy import select

    from db.models import UnitRow
    from db.store import Store

    store = Store(database_url)
    try:
        with store.engine.connect() as conn:
            rows = conn.execute(
                select(
                    UnitRow.key,
                    UnitRow.family,
                    UnitRow.stage,
                    UnitRow.state,
                    UnitRow.worker,
                    UnitRow.attempts,
                    UnitRow.queued_at,
                    UnitRow.started_at,
                    UnitRow.finished_at,
                )
                .where(UnitRow.campaign_id == campaign_id)
                .order_by(UnitRow.position)
            ).all()
    finally:
        store.dispose()

    def seconds(value: datetime | None) -> float | None:
        if value is None:
            return None
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()

    return [
        {
            "key": r.key,
            "family": r.family,
            "stage": r.stage,
            "state": r.state,
            "worker": r.worker,
            "attempts": r.attempts,
            "queued": seconds(r.queued_at),
            "started": seconds(r.started_at),
            "finished": seconds(r.finished_at),
        }
        for r in rows
    ]


def makespan(units: list[dict[str, Any]]) -> float:
    """From the first unit queued to the last unit finished."""
    return max(u["finished"] for u in units) - min(u["queued"] for u in units)
