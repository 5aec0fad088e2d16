"""Flower against the real Redis broker: a real `celery flower` process with basic
auth watches a tiny campaign run by real workers, and its HTTP API shows every unit's
task by its readable name, with small arguments and its final state.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from db.store import Store
from scheduler.api import submit
from shared.settings import Settings
from tests.conftest import REDIS_URL, REPO
from tests.integration.test_campaign import running_workers, settings_for
from tests.integration.test_concurrent_campaigns import light_campaign

pytestmark = pytest.mark.integration

USER, PASSWORD = "orchard", secrets.token_hex(8)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, *, auth: tuple[str, str] | None = (USER, PASSWORD)) -> tuple[int, Any]:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None


@pytest.fixture
def flower(settings: Settings) -> Iterator[str]:
    """`celery -A workers.app flower` with the workers' environment; its base URL."""
    port = free_port()
    env = {
        **os.environ,
        "ORCHARD_HOME": str(settings.home),
        "ORCHARD_BROKER_URL": settings.broker_url,
        "ORCHARD_DATABASE_URL": settings.database_url,
        "ORCHARD_ARTIFACTS": str(settings.artifacts),
    }
    settings.home.mkdir(parents=True, exist_ok=True)
    log_path = settings.home / "flower.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.app",
                "flower",
                f"--port={port}",
                "--address=127.0.0.1",
                f"--basic-auth={USER}:{PASSWORD}",
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log_path.read_text(errors="replace")
            try:
                if get(f"{url}/api/workers")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "flower did not come up: " + log_path.read_text()
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def settings(tmp_path: Path, sqlite_url: str, redis_prefix: str) -> Settings:
    # the workers and Flower inherit the prefix
    return settings_for(tmp_path, REDIS_URL, sqlite_url)


def test_flower_shows_every_unit_task_and_the_workers(
    settings: Settings, flower: str, tmp_path: Path
) -> None:
    # no credentials, or wrong ones: 401, for the API and the UI alike
    assert get(f"{flower}/api/tasks", auth=None)[0] == 401
    assert get(f"{flower}/api/workers", auth=(USER, "wrong"))[0] == 401
    assert get(f"{flower}/", auth=None)[0] == 401
    # the compose file's healthcheck, run against this Flower: healthy; and against a
    # port nothing listens on: not
    from ruamel.yaml import YAML

    compose = YAML(typ="safe").load((REPO / "docker-compose.yml").read_text())
    kind, *check = compose["services"]["flower"]["healthcheck"]["test"]
    assert kind == "CMD" and check[0] == "python"
    port = flower.rsplit(":", 1)[1]
    for url_port, healthy in ((port, True), (str(free_port()), False)):
        script = check[-1].replace("127.0.0.1:5555", f"127.0.0.1:{url_port}")
        done = subprocess.run([sys.executable, *check[1:-1], script], capture_output=True)
        assert (done.returncode == 0) is healthy, done.stderr

    with running_workers(settings, "flower") as workers:
        campaign = light_campaign(tmp_path / "light.toml", "light", tmp_path / "data")
        run = submit(campaign, settings=settings)
        run.wait(timeout=300, check=workers.check)
        units = run.status().units
        assert {u.state for u in units} == {"SUCCESS"}

        # Flower learns task states from events; give the last ones a moment to arrive
        deadline = time.monotonic() + 60
        while True:
            status, tasks = get(f"{flower}/api/tasks")
            assert status == 200
            by_unit = {}
            for task in tasks.values():
                for unit in units:
                    if repr(unit.key) in (task.get("kwargs") or ""):
                        by_unit.setdefault(unit.key, []).append(task)
            done = {k for k, ts in by_unit.items() if any(t["state"] == "SUCCESS" for t in ts)}
            if done == {u.key for u in units} or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert done == {u.key for u in units}, sorted({u.key for u in units} - done)

        for unit in units:
            (task,) = by_unit[unit.key]  # one task per unit: nothing ran twice
            assert task["name"] == unit.task and task["name"].startswith("orchard.")
            assert task["state"] == "SUCCESS"
            assert task["worker"] == unit.worker  # Flower and the store agree on where
            # small arguments: two ids, never arrays
            assert task["args"] in ("()", "[]")
            assert task["kwargs"] == repr({"campaign_id": run.id, "unit_key": unit.key})
        names = {t["name"] for ts in by_unit.values() for t in ts}
        assert names == {
            "orchard.preprocess_shard",
            "orchard.train_cnn_fold",
            "orchard.fit_svm",
            "orchard.fit_rf",
            "orchard.report",
        }

        # the workers, asked over the same (prefixed) broker by Flower's inspect; a
        # worker that answers after Flower's inspect timeout (1 s, a loaded machine) is
        # asked again
        deadline = time.monotonic() + 30
        while True:
            status, listed = get(f"{flower}/api/workers?refresh=1")
            assert status == 200
            answered = {n.split("@")[0] for n, info in listed.items() if info.get("active_queues")}
            if {"gpu-flower-0", "cpu-flower-0"} <= answered or time.monotonic() > deadline:
                break
            time.sleep(1)
        online = {name.split("@")[0] for name in listed}
        assert {"gpu-flower-0", "cpu-flower-0"} <= online, listed.keys()
        cpu = next(info for name, info in listed.items() if name.startswith("cpu-flower-0@"))
        assert {q["name"] for q in cpu["active_queues"]} == {"cpu", "preprocess", "report"}
    Store(settings.database_url).dispose()
    # Flower's own log: no Alembic plugin lines from importing the store (db.migrate)
    assert "setup plugin" not in (settings.home / "flower.log").read_text(errors="replace")


def test_flower_sees_a_fold_while_it_trains(
    settings: Settings, flower: str, tmp_path: Path
) -> None:
    """A GPU worker's solo pool runs a fold in the thread of the event loop that sends
    Celery's buffered task events and the worker's heartbeats: held back, Flower showed
    a training fold PENDING and its worker offline until it ended. The task says
    STARTED, on its worker, and the worker is alive, while the fold trains."""
    from scheduler.api import cancel
    from tests.conftest import TINY_CAMPAIGN

    text = TINY_CAMPAIGN.format(name="long", root=tmp_path / "data")
    text = text.replace("[cnn]\nfolds = 5\nepochs = 2\n", "[cnn]\nfolds = 2\nepochs = 5000\n")
    campaign = tmp_path / "long.toml"
    campaign.write_text(text)
    store = Store(settings.database_url)
    with running_workers(settings, "train") as workers:
        run = submit(campaign, settings=settings)
        deadline = time.monotonic() + 240
        while True:  # a fold that has trained a few epochs
            workers.check()
            running = [u for u in run.status().units if u.family == "cnn" and u.state == "RUNNING"]
            if running and len(store.metrics(running[0].key).get("val_acc", [])) >= 3:
                break
            assert time.monotonic() < deadline, [(u.key, u.state) for u in run.status().units]
            time.sleep(0.5)
        fold = running[0]
        seen: dict[str, Any] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status, tasks = get(f"{flower}/api/tasks")
            assert status == 200
            seen = next(
                (t for t in tasks.values() if repr(fold.key) in (t.get("kwargs") or "")), {}
            )
            if seen.get("state") == "STARTED":
                break
            time.sleep(1)
        assert store.get_unit(fold.key).state == "RUNNING"  # still training
        assert seen.get("state") == "STARTED", seen
        assert seen["worker"] == fold.worker and seen["name"] == "orchard.train_cnn_fold"
        # and its worker alive: Flower counts one gone two heartbeats (4 s) after its last,
        # so past that it must be seen alive (a loaded machine may delay a heartbeat: asked
        # again for a while, the worker that stays offline while training still fails)
        time.sleep(6)
        for _ in range(15):
            status, alive = get(f"{flower}/api/workers?status=1")
            if status == 200 and alive.get(fold.worker) is True:
                break
            time.sleep(1)
        assert status == 200 and alive.get(fold.worker) is True, alive
        assert store.get_unit(fold.key).state == "RUNNING"  # the fold trained all along
        cancel(run.id, settings=settings)  # the fold stops at its next epoch
    store.dispose()
