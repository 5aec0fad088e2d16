"""What bench/scaling.py and bench/scheduling.py share (not a benchmark itself).

A throwaway orchard per run: the real Redis under a key prefix of its own (deleted
afterwards), or kombu's filesystem broker when Redis is not reachable; a SQLite store
and an artifact folder in a temporary directory; real `orchard worker` processes,
waited for until each answers, so start-up never counts as campaign time. Times come
from the store (each unit's queued/started/finished timestamps).
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/x.py` from anywhere
    sys.path.insert(0, str(REPO))

from scheduler.demo import Workers  # noqa: E402
from shared.settings import Settings  # noqa: E402

REDIS_URL = os.environ.get("ORCHARD_BENCH_REDIS", "redis://127.0.0.1:6379/0")
RESULTS = REPO / "bench" / "results"


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    if smi := shutil.which("nvidia-smi"):
        done = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        )
        gpu = done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg_1_5_15_min": os.getloadavg(),  # others sharing the cores skew timings
    }


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
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            for key in client.scan_iter(match=f"{prefix}*"):
                client.delete(key)
            client.close()


@contextmanager
def workers(c: Cluster, count: int, queues: str = "cpu,preprocess,report") -> Iterator[Workers]:
    """``count`` worker processes, one task at a time each, ready before this yields."""
    from db.store import Store

    Store(c.settings.database_url).upgrade()
    tag = secrets.token_hex(3)
    names = [f"bench{i}-{tag}" for i in range(count)]
    running = Workers(
        c.settings,
        [
            (name, ["--queues", queues, "--concurrency", "1", "--name", f"{name}@%h"])
            for name in names
        ],
    )
    try:
        _wait_ready(c, running, names)
        yield running
    finally:
        running.stop()


def _wait_ready(c: Cluster, running: Workers, names: list[str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    if c.broker == "redis":
        from workers.app import make_app

        app = make_app(c.settings, with_tasks=False)
        seen: set[str] = set()
        while not all(any(s.startswith(n + "@") for s in seen) for n in names):
            running.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not up after {timeout:.0f} s; see {running.logs}")
            for reply in app.control.ping(timeout=1.0):
                seen.update(reply)
        app.close()
        return
    # the filesystem broker has no broadcast: read the workers' logs instead
    while True:
        running.check()
        logs = [running.logs / f"{n}.log" for n in names]
        if all(p.exists() and " ready." in p.read_text(errors="replace") for p in logs):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers not up after {timeout:.0f} s; see {running.logs}")
        time.sleep(0.5)


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


def write_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
