"""Fixtures of the integration tests (real Redis, real `orchard worker` processes)."""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from db.store import Store
from tests.conftest import REDIS_URL
from tests.integration.reliability import FAST_RECOVERY, Cluster, PrivateRedis
from tests.integration.test_campaign import drop_redis_keys, settings_for
from tests.integration.workerpool import WorkerPool


@pytest.fixture
def redis_prefix(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A Redis key prefix of this test's own, in ORCHARD_REDIS_PREFIX (the workers and
    services it starts inherit it): other users of this Redis never see its queues.
    Its keys are deleted afterwards."""
    prefix = f"orchard-test-{secrets.token_hex(4)}:"
    monkeypatch.setenv("ORCHARD_REDIS_PREFIX", prefix)
    yield prefix
    drop_redis_keys(prefix)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("reliability")
    prefix = f"orchard-test-{secrets.token_hex(4)}:"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ORCHARD_REDIS_PREFIX", prefix)
        for name, value in FAST_RECOVERY.items():
            env.setenv(name, value)  # the submitting app uses the same transport options
        url = f"sqlite:///{tmp / 'store.db'}"
        settings = settings_for(tmp, REDIS_URL, url)
        store = Store(url)
        store.upgrade()
        try:
            with WorkerPool(settings) as pool:
                pool.start("gpu", "gpu")
                pool.start("cpu", "cpu,preprocess,report", concurrency=1)
                yield Cluster(settings, store, pool, tmp, prefix)
        finally:
            drop_redis_keys(prefix)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (needed to restart a broker of our own)")
    server = PrivateRedis(tmp_path / "redis", f"pw-{secrets.token_hex(6)}")
    server.start()
    yield server
    server.stop()
