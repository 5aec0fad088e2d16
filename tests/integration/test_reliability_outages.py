"""The services going away in the middle of a campaign, on real workers.

Redis restarted: the test runs its own password-protected redis-server (never the
shared one on 6379, which other tests use), with the append-only file on and fsynced at
every write, as a production broker is configured: messages queued or unacknowledged
when Redis dies come back with it. kill -9, then a restart on the same port and data
directory; the workers reconnect and the campaign finishes.

The database briefly unreachable: the workers reach PostgreSQL through a TCP proxy the
test takes down. A short outage is ridden out by the store's retries; a longer one
fails the unit that hit it with one clear line naming the (masked) URL, and the
campaign still ends with its report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from db.store import Store
from scheduler.api import submit
from tests.conftest import REDIS_URL
from tests.integration.reliability import (
    FAST_RECOVERY,
    PrivateRedis,
    assert_exactly_once,
    cnn_unit,
    own_prefix_and_fast_recovery,
    wait_for_epochs,
    write_campaign,
)
from tests.integration.test_campaign import drop_redis_keys, settings_for
from tests.integration.workerpool import WorkerPool, wait_for
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.integration


def test_campaign_finishes_across_a_redis_restart(
    tmp_path: Path, sqlite_url: str, private_redis: PrivateRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in FAST_RECOVERY.items():
        monkeypatch.setenv(name, value)
    settings = settings_for(tmp_path, private_redis.url, sqlite_url)
    store = Store(sqlite_url)
    store.upgrade()
    campaign = write_campaign(tmp_path, "restart", epochs=10, classic=True)
    with WorkerPool(settings) as pool:
        pool.start("gpu", "gpu")
        pool.start("cpu", "cpu,preprocess,report", concurrency=1)
        run = submit(campaign, settings=settings)
        fold = cnn_unit(run)
        wait_for_epochs(store, pool, fold.key, 2)
        finished_before = sum(u.state == "SUCCESS" for u in run.status().units)
        private_redis.kill()
        time.sleep(2)  # the workers see the connection drop and start reconnecting
        private_redis.start()
        status = run.wait(timeout=240, check=pool.check)
        logs = pool.all_logs()
    assert finished_before >= 1  # it really was mid-campaign
    assert status.campaign.state == "DONE", [(u.key, u.state, u.error) for u in status.units]
    assert_exactly_once(run, store)
    assert "Connection to broker lost" in logs or "Trying to re-establish" in logs
    assert private_redis.password not in logs  # workers print the broker URL masked


def test_a_database_outage_never_fails_a_running_unit(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database away mid-fold (a restart, a failover) is the cluster's trouble, not the
    unit's. Shorter than the store's retries (5 s), it is ridden out; longer, the fold is
    handed back when the database answers again and resumes from its checkpoint; still
    away then, the fold comes back once its lease has run out."""
    prefix = own_prefix_and_fast_recovery(monkeypatch, {"ORCHARD_DB_RETRY_SECONDS": "5"})
    Store(postgres_url).upgrade()
    proxy = TcpProxy()
    proxy.up()
    # the workers reach the store through the proxy, with a password that must not leak
    through_proxy = postgres_url.replace(
        "postgres@127.0.0.1:5432", f"postgres:s3cret@127.0.0.1:{proxy.port}"
    )
    submitter = settings_for(tmp_path, REDIS_URL, postgres_url)
    store = Store(postgres_url)
    try:
        with WorkerPool(settings_for(tmp_path, REDIS_URL, through_proxy)) as pool:
            pool.start("gpu", "gpu")
            pool.start("cpu", "cpu,preprocess,report", concurrency=1)

            def outage(name: str, until: Callable[[str], object]):  # noqa: ANN202
                # 8 epochs: 5 still to run once the third is recorded, room for the
                # test's polling before the outage, which must meet the fold mid-run
                run = submit(write_campaign(tmp_path, name, epochs=8), settings=submitter)
                fold = cnn_unit(run)
                # an epoch's metrics are recorded before its checkpoint: the third
                # epoch's mean the checkpoint after the second is recorded
                wait_for_epochs(store, pool, fold.key, 3)
                proxy.down()
                wait_for(lambda: until(fold.key), 60, f"{name}: the outage", check=pool.check)
                proxy.up()
                return run, run.wait(timeout=240, check=pool.check)

            # shorter than the retry budget (5 s), and met by a store call (the fold is
            # mid-run: its epochs and lease renewals): back a second after it went away,
            # or as soon as a connection was refused if none had been by then, so that
            # the call that met it is still within its own retries
            refused_before, slept = proxy.refused, []

            def blip_met(_key: str) -> bool:
                if not slept:  # the first look, right after it went down
                    slept.append(time.sleep(1.0))
                return proxy.refused > refused_before

            blip, status = outage("blip", blip_met)
            assert status.campaign.state == "DONE", [(u.key, u.error) for u in status.units]
            assert_exactly_once(blip, store)
            # ridden out by the store's retries: the fold neither failed nor ran again
            fold = cnn_unit(blip)
            assert fold.attempts == 1 and f"{fold.key}: the database is away" not in pool.log("gpu")
            # longer: back as soon as the fold's store call gave up, while the hand-back
            # retries
            back, back_status = outage(
                "back", lambda key: f"{key}: the database is away" in pool.log("gpu")
            )
            # longer still: back only once the hand-back too gave up
            away, away_status = outage(
                "away", lambda key: f"{key}: not handed back" in pool.log("gpu")
            )
            logs = pool.all_logs()
    finally:
        proxy.close()
        drop_redis_keys(prefix)
    for run, status in ((back, back_status), (away, away_status)):
        assert status.campaign.state == "DONE", [(u.key, u.error) for u in status.units]
        assert_exactly_once(run, store)
        fold = cnn_unit(run)
        assert fold.state == "SUCCESS" and fold.error is None
        # the delivery the outage ended counts, as a lost worker's would
        assert fold.attempts == 2, fold
        assert f"{fold.key} failed after" not in logs
        # it went on from its checkpoint, not from epoch 0
        assert store.results(run.id)[fold.key].extra["resumed_from_epoch"] >= 2
    handed = cnn_unit(back).key
    assert f"{handed} handed back: the database was away" in logs
    assert f"postgres:***@127.0.0.1:{proxy.port}" in logs and "s3cret" not in logs


def test_a_worker_whose_first_unit_finds_the_database_away_keeps_the_message(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker process opens its store at its first unit. When the database is away
    right then (restarting, out of connections), the message is kept and comes back,
    and the unit runs once the database is back, instead of being dropped as a failed
    task and leaving its unit QUEUED for ever."""
    prefix = own_prefix_and_fast_recovery(monkeypatch, {"ORCHARD_DB_RETRY_SECONDS": "1"})
    Store(postgres_url).upgrade()
    proxy = TcpProxy()
    proxy.up()
    through_proxy = postgres_url.replace("@127.0.0.1:5432", f"@127.0.0.1:{proxy.port}")
    store = Store(postgres_url)
    try:
        with WorkerPool(settings_for(tmp_path, REDIS_URL, through_proxy)) as pool:
            pool.start("gpu", "gpu")  # solo pool: the worker process runs the units
            pool.start("cpu", "cpu,preprocess,report", concurrency=1)  # a prefork child
            for worker in ("gpu", "cpu"):
                wait_for(
                    lambda w=worker: " ready." in pool.log(w),
                    60,
                    f"{worker} ready",
                    check=pool.check,
                )
            proxy.down()  # neither has opened its store for units yet
            submitter = settings_for(tmp_path, REDIS_URL, postgres_url)
            run = submit(write_campaign(tmp_path, "away", epochs=2), settings=submitter)
            # the shard's delivery ends one way or the other: kept (retried) or failed
            # (Celery's "Task ... raised unexpected: StoreError(...)", the message dropped)
            wait_for(
                lambda: any(
                    text in pool.log("cpu")
                    for text in ("message kept for later", "raised unexpected")
                ),
                60,
                "the preprocessing shard to find the database away",
                check=pool.check,
            )
            cpu_log = pool.log("cpu")
            assert "raised unexpected" not in cpu_log, cpu_log  # dropped as a failed task
            assert "store unreachable, message kept for later" in cpu_log
            proxy.up()
            status = run.wait(timeout=120, check=pool.check)
            logs = pool.all_logs()
    finally:
        proxy.close()
        drop_redis_keys(prefix)
    assert status.campaign.state == "DONE", [(u.key, u.state, u.error) for u in status.units]
    assert_exactly_once(run, store)
    # its own message ran it: no delivery dropped, and none sent again by the reaper
    # (which would also finish the campaign, late: "another consumer dropped it")
    assert "raised unexpected" not in logs
    assert "another consumer dropped it" not in logs
    assert "; sent again" not in logs and "; sent now" not in logs
