"""What the reliability tests share: a campaign file of theirs, a module's cluster of
real workers with fast recovery, a password-protected Redis of a test's own, and the
checks that every unit was recorded exactly once."""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from db.store import Store
from scheduler.api import CampaignRun, submit
from shared.settings import Settings
from tests.integration.workerpool import WorkerPool, wait_for

#: short enough that a test sees a killed worker's task again within seconds
FAST_RECOVERY = {
    "ORCHARD_VISIBILITY_TIMEOUT": "6",
    "ORCHARD_LEASE_SECONDS": "4",
    "ORCHARD_MAX_ATTEMPTS": "2",
}

CAMPAIGN = """
name = "{name}"
seed = 1
folds = 3

[dataset]
kind = "synthetic"
root = "{root}"
seed = 3
train_per_class = {per_class}
test_per_class = 4
width = 96
height = 72

[preprocessing]
size = 64
shard_size = 64

[cnn]
folds = {cnn_folds}
epochs = {epochs}
batch_size = 16
width = 0.25
image_size = 64
augment = false

[svm]
enabled = {classic}
variant = "polar32"
n_components = [4]
C = 1.0

[rf]
enabled = {classic}
variant = "resize16"
n_estimators = [10]

[blend]
families = {blend}

[report]
lime = false
"""


def write_campaign(
    tmp_path: Path,
    name: str = "rel",
    *,
    epochs: int = 8,
    cnn_folds: int = 1,
    classic: bool = False,
    per_class: int = 40,
    blend: str = '["cnn"]',
) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        CAMPAIGN.format(
            name=name,
            root=tmp_path / "data",
            epochs=epochs,
            cnn_folds=cnn_folds,
            classic=str(classic).lower(),
            per_class=per_class,
            blend=blend,
        )
    )
    return path


@dataclass
class Cluster:
    """One gpu and one cpu worker on the real Redis (own key prefix) and a SQLite store,
    shared by the tests of this module (starting workers is the slow part)."""

    settings: Settings
    store: Store
    pool: WorkerPool
    tmp: Path
    redis_prefix: str  # the Redis key prefix of this module's workers

    def submit(self, campaign: Path, **kwargs: object) -> CampaignRun:
        return submit(campaign, settings=self.settings, **kwargs)

    def wait(self, run: CampaignRun, timeout: float = 240):  # noqa: ANN201
        return run.wait(timeout=timeout, check=self.pool.check)

    def wait_for(self, condition, timeout: float, what: str):  # noqa: ANN001, ANN201
        return wait_for(condition, timeout, what, check=self.pool.check)


def cnn_unit(run: CampaignRun, fold: int = 0):  # noqa: ANN201
    return next(u for u in run.status().units if u.family == "cnn" and u.fold == fold)


def epochs_recorded(store: Store, key: str) -> int:
    return len(store.metrics(key).get("val_acc", []))


def assert_exactly_once(run: CampaignRun, store: Store) -> None:
    units = run.status().units
    results = store.results(run.id)
    assert set(results) == {u.key for u in units if u.state == "SUCCESS"}
    assert store.count_rows(run.id)["results"] == len(results)
    for unit in units:
        if unit.family in ("cnn", "svm", "rf") and unit.state == "SUCCESS":
            ids = [p.image_id for p in store.predictions(unit.key, "val")]
            assert ids and len(ids) == len(set(ids))  # one set of predictions


def restart_after_kill(cluster: Cluster, name: str) -> None:
    cluster.pool.kill(name)  # the whole worker: its task was never acknowledged
    cluster.pool.restart(name)


class PrivateRedis:
    def __init__(self, folder: Path, password: str) -> None:
        self.folder, self.password = folder, password
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it on its port, again after a kill: the port was free while it was down,
        and another process (a test run in parallel) may hold it for a moment; tried
        again while it does, for up to 30 s, then a failure saying so."""
        self.folder.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + 30
        while not self._started():
            if time.monotonic() > deadline:
                path = self.folder / "redis-server.log"
                log = path.read_text(errors="replace") if path.exists() else "(no log)"
                pytest.fail(
                    f"redis-server could not take port {self.port} again for 30 s "
                    f"(another process holds it?); its log ends:\n{log[-2000:]}"
                )
            time.sleep(0.5)

    def _started(self) -> bool:
        """True once it answers; False when it exited (its port taken)."""
        self.proc = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--requirepass",
                self.password,
                "--dir",
                str(self.folder),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--logfile",
                str(self.folder / "redis-server.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        proc = self.proc
        wait_for(
            lambda: self.ping() or proc.poll() is not None,
            20,
            f"redis-server on port {self.port}",
        )
        return proc.poll() is None

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=1).ping())
        except redis.exceptions.RedisError:  # away, or another process on its port
            return False

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no shutdown save, no goodbye to the clients
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


def wait_for_epochs(store: Store, pool: WorkerPool, key: str, count: int) -> None:
    """Until the fold ``key`` has recorded ``count`` epochs."""
    wait_for(
        lambda: epochs_recorded(store, key) >= count, 180, f"{key}: epoch {count}", check=pool.check
    )


def own_prefix_and_fast_recovery(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> str:
    """A Redis key prefix of the test's own, FAST_RECOVERY and ``env`` for every process
    the test starts; returns the prefix (for :func:`drop_redis_keys`)."""
    prefix = f"orchard-test-{secrets.token_hex(4)}:"
    for name, value in {"ORCHARD_REDIS_PREFIX": prefix, **FAST_RECOVERY, **env}.items():
        monkeypatch.setenv(name, value)
    return prefix
