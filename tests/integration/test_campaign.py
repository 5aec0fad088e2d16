"""A tiny campaign through real `celery worker` processes, on the real Redis and on
kombu's filesystem broker, into real SQLite and PostgreSQL stores.

No eager mode and no mocks: the workers are `orchard worker` processes, started warm by
tests/integration/forkserver.py (``ORCHARD_TEST_FORK_SERVER=0``: each by its own
``python -m scheduler.cli worker``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from db.store import Store
from scheduler.api import CampaignRun, submit
from shared.settings import Settings, load_settings
from tests.conftest import REDIS_URL, REPO
from tests.integration.workerpool import WorkerPool

pytestmark = pytest.mark.integration


@contextmanager
def running_workers(settings: Settings, tag: str) -> Iterator[WorkerPool]:
    """A GPU worker and a CPU worker (two prefork children) for ``settings``, SIGKILLed
    on exit (no warm shutdown: see kill_groups)."""
    # workers refuse to start on a store without the schema, as `orchard worker` does
    Store(settings.database_url).upgrade()
    with WorkerPool(settings) as pool:
        pool.start(f"gpu-{tag}", "gpu")
        pool.start(f"cpu-{tag}", "cpu,preprocess,report", concurrency=2)
        yield pool


def assert_campaign_complete(run: CampaignRun, store: Store) -> None:
    status = run.status()
    assert status.campaign.state == "DONE", [(u.key, u.state, u.error) for u in status.units]
    units = status.units
    assert {u.state for u in units} == {"SUCCESS"}
    # exactly once: one result row per unit, no more
    assert store.count_rows(run.id)["results"] == len(units)
    families = {u.family for u in units}
    assert families == {"preprocess", "cnn", "svm", "rf", "report"}
    # the CNN folds ran on the gpu worker, everything else on the cpu worker
    assert {u.worker.split("@")[0].split("-")[0] for u in units if u.family == "cnn"} == {"gpu"}
    assert {u.worker.split("@")[0].split("-")[0] for u in units if u.family != "cnn"} == {"cpu"}
    report = run.report_path()
    assert report is not None and report.exists()
    markdown = report.with_suffix(".md").read_text()
    for family in ("cnn", "svm", "rf"):
        assert f"\n| {family} | `{run.id}/{family}/" in markdown
    # the best blend's row is bold
    assert re.search(
        r"\| (\*\*)?CNN 5-fold vote(\*\*)? \| (\*\*)?vote(\*\*)? \| (\*\*)?5", markdown
    )
    for heading in ("Experiments", "Learning curves", "Explanations (LIME)", "Efficiency"):
        assert f"\n## {heading}\n" in markdown
    assert "(lime-cnn.png)" in markdown and "(timeline.png)" in markdown
    assert store.count_rows(run.id)["metrics"] >= 5 * 2  # per-epoch metrics of every fold


def settings_for(tmp_path: Path, broker: str, database: str) -> Settings:
    return Settings(
        home=tmp_path / "home",
        broker_url=broker,
        database_url=database,
        artifacts=tmp_path / "artifacts",
    )


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_campaign_on_redis(
    database: str,
    tmp_path: Path,
    tiny_campaign: Path,
    redis_prefix: str,
    request: pytest.FixtureRequest,
) -> None:
    url = request.getfixturevalue("sqlite_url" if database == "sqlite" else "postgres_url")
    settings = settings_for(tmp_path, REDIS_URL, url)
    store = Store(url)
    with running_workers(settings, "redis") as workers:
        run = submit(tiny_campaign, settings=settings)
        run.wait(timeout=300, check=workers.check)
        assert_campaign_complete(run, store)
        redeliver_finished_units(run, settings, workers)
    assert_campaign_complete(run, store)  # still exactly one result per unit


def drop_redis_keys(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    client.close()


def redeliver_finished_units(run: CampaignRun, settings: Settings, workers: WorkerPool) -> None:
    """Send finished units' tasks again, as a broker may: nothing runs, nothing is added."""
    from workers.app import make_app

    before = {u.key: u.attempts for u in run.status().units}
    again = [u for u in run.status().units if u.family in ("cnn", "svm", "report")][-3:]
    app = make_app(settings, with_tasks=False)
    for unit in again:
        app.send_task(
            unit.task, kwargs={"campaign_id": run.id, "unit_key": unit.key}, queue=unit.queue
        )
    logs = " ".join(str(p) for p in workers.logs.glob("*.log"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = "".join(p.read_text(errors="replace") for p in workers.logs.glob("*.log"))
        if all(f"{u.key} already SUCCESS" in text for u in again):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the re-sent tasks were not seen by the workers ({logs})")
    assert {u.key: u.attempts for u in run.status().units} == before


def test_campaign_on_filesystem_broker_reuses_the_cache(
    tmp_path: Path, tiny_campaign: Path, sqlite_url: str
) -> None:
    settings = settings_for(tmp_path, f"filesystem://{tmp_path / 'broker'}", sqlite_url)
    store = Store(sqlite_url)
    with running_workers(settings, "fs") as workers:
        first = submit(tiny_campaign, settings=settings)
        first.wait(timeout=300, check=workers.check)
        second = submit(tiny_campaign, settings=settings)
        second.wait(timeout=300, check=workers.check)
    assert_campaign_complete(first, store)
    assert_campaign_complete(second, store)
    # the second campaign found every shard the first one decoded
    shard_results = {
        key: result
        for run in (first, second)
        for key, result in store.results(run.id).items()
        if "/preprocess/" in key
    }
    assert all(not r.extra["reused"] for k, r in shard_results.items() if k.startswith(first.id))
    assert all(r.extra["reused"] for k, r in shard_results.items() if k.startswith(second.id))


def test_orchard_demo_runs_with_no_servers(tmp_path: Path, tiny_campaign: Path) -> None:
    """`orchard demo` with nothing configured: filesystem broker, SQLite, own workers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHARD_")}
    env["ORCHARD_HOME"] = str(tmp_path / "demo-home")
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scheduler.cli",
            "demo",
            "--campaign",
            str(tiny_campaign),
            "--timeout",
            "300",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = demo.communicate(timeout=400)
    finally:
        demo.kill()
    assert demo.returncode == 0, stdout + stderr
    assert "filesystem://" in stdout
    report_line = next(line for line in stdout.splitlines() if line.startswith("report:"))
    report = Path(report_line.split(":", 1)[1].strip())
    assert report.exists() and report.is_relative_to(tmp_path / "demo-home")
    demo_settings = load_settings({"ORCHARD_HOME": env["ORCHARD_HOME"]})
    store = Store(demo_settings.database_url)
    (campaign,) = store.list_campaigns()
    assert campaign.state == "DONE"
    # the demo stopped its workers: nothing of ours is left running
    # (its workers are named demo-gpu-<its pid>@host and demo-cpu-<its pid>@host)
    leftover = subprocess.run(
        ["pgrep", "-f", f"demo-(gpu|cpu)-{demo.pid}@"], capture_output=True, text=True
    )
    assert leftover.returncode == 1, leftover.stdout  # 1: no process matched
