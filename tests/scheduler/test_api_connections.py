"""The Python API hands its broker connections back: a script or notebook that submits
campaigns and then waits for hours holds no socket to Redis per call it made."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from scheduler.api import cancel, submit
from tests.conftest import REDIS_URL
from tests.integration.test_campaign import drop_redis_keys

CAMPAIGN = """\
name = "k"
folds = 2
[dataset]
kind = "synthetic"
train_per_class = 4
test_per_class = 1
width = 64
height = 48
[preprocessing]
size = 32
[svm]
variant = "resize8"
n_components = [2]
"""


@pytest.fixture
def prefix(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    prefix = f"orchard-test-{secrets.token_hex(4)}:"
    monkeypatch.setenv("ORCHARD_REDIS_PREFIX", prefix)
    yield prefix
    drop_redis_keys(prefix)


def sockets() -> set[str]:
    """This process's open sockets (their inodes)."""
    held = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own descriptor)
            continue
        if target.startswith("socket:"):
            held.add(target)
    return held


def test_submit_and_cancel_hand_their_redis_connections_back(tmp_path: Path, prefix: str) -> None:
    """Celery pools an app's connections in kombu's pools, which outlive the app: each
    submit kept two sockets, each cancel two more."""
    campaign = tmp_path / "c.toml"
    campaign.write_text(CAMPAIGN)
    where = {
        "broker": REDIS_URL,
        "database": f"sqlite:///{tmp_path / 'orchard.db'}",
        "artifacts": tmp_path / "artifacts",
    }
    before = sockets()
    for _ in range(2):
        with submit(campaign, **where) as run:
            pass
        cancel(run.id, **where)
    assert sockets() - before == set()


def test_an_app_closed_leaves_another_s_connections_alone(tmp_path: Path, prefix: str) -> None:
    """Two calls at once in one process (threads of a notebook): the first to end
    closed the pool the other was sending on ("Acquire on closed pool"), when the
    apps' connections were pooled by URL, process-wide."""
    from kombu import pools

    from shared.settings import Settings
    from workers.app import make_app

    settings = Settings(
        home=tmp_path,
        broker_url=REDIS_URL,
        database_url=f"sqlite:///{tmp_path / 'orchard.db'}",
        artifacts=tmp_path / "artifacts",
    )
    before = sockets()
    # kombu's process-wide pools, as the suite's earlier tests in this process left them
    shared = (dict(pools.connections), dict(pools.producers))
    with make_app(settings, with_tasks=False) as other:
        other.send_task("orchard.none", queue="nobody")
        with make_app(settings, with_tasks=False) as app:
            app.send_task("orchard.none", queue="nobody")
        other.send_task("orchard.none", queue="nobody")  # its pool is its own
        assert (dict(pools.connections), dict(pools.producers)) == shared  # untouched
    assert sockets() - before == set()
