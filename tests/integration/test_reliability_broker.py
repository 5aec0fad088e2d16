"""The broker failing a campaign, on real workers: a GPU worker lost with an hour of
visibility timeout, a password the broker refuses, a broker gone after the submit's
check, and messages the broker lost while a long fold runs.

The tests with a broker of their own run a password-protected redis-server (never the
shared one on 6379, which other tests use). Redis restarted and the database away are
in test_reliability_outages.py.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest

from db.store import Store
from scheduler.api import submit
from tests.conftest import REDIS_URL
from tests.integration.reliability import (
    PrivateRedis,
    assert_exactly_once,
    cnn_unit,
    epochs_recorded,
    own_prefix_and_fast_recovery,
    wait_for_epochs,
    write_campaign,
)
from tests.integration.test_campaign import drop_redis_keys, settings_for
from tests.integration.workerpool import WorkerPool, wait_for

pytestmark = pytest.mark.integration


def test_a_lost_gpu_workers_fold_is_sent_again_long_before_the_visibility_timeout(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU worker SIGKILLed mid-fold with an hour of visibility timeout: Redis would
    hand its message out again in an hour; the workers see the fold's lease run out and
    send it again, and it resumes from its checkpoint on another GPU worker."""
    # a lease of 3 s: the fold is sent again about two lease periods after its last
    # heartbeat (2 s let a heartbeat delayed 3.3 s on a loaded machine take a running fold)
    prefix = own_prefix_and_fast_recovery(
        monkeypatch, {"ORCHARD_VISIBILITY_TIMEOUT": "3600", "ORCHARD_LEASE_SECONDS": "3"}
    )
    settings = settings_for(tmp_path, REDIS_URL, postgres_url)
    store = Store(settings.database_url)
    store.upgrade()
    try:
        with WorkerPool(settings) as pool:
            pool.start("gpu", "gpu")
            pool.start("cpu", "cpu,preprocess,report", concurrency=1)
            run = submit(write_campaign(tmp_path, "lost", epochs=10), settings=settings)
            fold = cnn_unit(run)
            wait_for_epochs(store, pool, fold.key, 2)
            pool.kill("gpu")
            killed_at = epochs_recorded(store, fold.key)
            pool.start("gpu2", "gpu")
            status = run.wait(timeout=120, check=pool.check)
            logs = pool.all_logs()
    finally:
        drop_redis_keys(prefix)
    assert status.campaign.state == "DONE", [(u.key, u.state, u.error) for u in status.units]
    assert_exactly_once(run, store)
    fold = cnn_unit(run)
    assert fold.attempts == 2 and fold.worker.startswith("gpu2")
    # from its checkpoint: the first epoch's was recorded before the second epoch's
    # metrics, and a kill inside a later checkpoint's write leaves the one before it
    assert 1 <= store.results(run.id)[fold.key].extra["resumed_from_epoch"] <= killed_at
    # the worker lost is named: the first, not the one that ran the fold to the end
    [lost] = re.findall(rf"{re.escape(fold.key)}: its worker (\S+) was lost", logs)
    assert lost != fold.worker and "@" in lost, lost
    # and the store keeps that attempt, which the fold's row, now the second's, forgot
    [earlier] = store.earlier_attempts(run.id)[fold.key]
    assert (earlier.worker, earlier.state) == (lost, "QUEUED")
    assert "???[???]" not in logs  # the reaper's lines are the worker's, not a task's


def test_a_broker_that_refuses_the_password_says_so(private_redis: PrivateRedis) -> None:
    """A Redis reached that refuses the login (a wrong password, or none) is not called
    unreachable: the line says which, without the password."""
    from shared.errors import OrchardError
    from shared.settings import load_settings
    from workers.app import check_broker_reachable, make_app

    wrong = private_redis.url.replace(private_redis.password, "not-the-password")
    bare = private_redis.url.replace(f":{private_redis.password}@", "")
    for url in (wrong, bare):
        settings = load_settings({"ORCHARD_BROKER_URL": url, "ORCHARD_HOME": "/nonexistent"})
        with make_app(settings, with_tasks=False) as app, pytest.raises(OrchardError) as refused:
            check_broker_reachable(app)
        line = str(refused.value)
        assert " refused the login: " in line and "unreachable" not in line, line
        assert "not-the-password" not in line and private_redis.password not in line
    settings = load_settings({"ORCHARD_BROKER_URL": private_redis.url, "ORCHARD_HOME": "/x"})
    with make_app(settings, with_tasks=False) as app:
        check_broker_reachable(app)  # the right one
    private_redis.kill()
    with make_app(settings, with_tasks=False) as app, pytest.raises(OrchardError) as away:
        check_broker_reachable(app)
    assert " unreachable: " in str(away.value)


def test_a_broker_gone_after_its_check_leaves_the_campaign_to_resume_and_says_so(
    private_redis: PrivateRedis,
    tiny_campaign: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The broker answered the submit's check, then went away while the dataset was
    read (which can take minutes): the campaign is recorded with nothing sent. The
    submit says so in one line naming the campaign (password masked) and the command
    that sends its units; `orchard resume` does, once the broker is back."""
    import scheduler.api
    from scheduler.cli import main

    monkeypatch.setenv("ORCHARD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ORCHARD_BROKER_URL", private_redis.url)
    planned = scheduler.api._plan_checked

    def broker_dies_meanwhile(*args: object, **kwargs: object) -> object:
        plan = planned(*args, **kwargs)
        private_redis.kill()
        return plan

    monkeypatch.setattr(scheduler.api, "_plan_checked", broker_dies_meanwhile)
    assert main(["submit", str(tiny_campaign)]) == 2
    out, err = capsys.readouterr()
    [line] = err.strip().splitlines()
    assert ": not every unit it has ready was sent (broker redis://:***@127.0.0.1:" in line
    assert private_redis.password not in err
    campaign_id = line.split("campaign ")[1].split(":")[0]
    # recorded: its id on stdout, as a submit's, for a script to resume, not submit again
    assert out == f"{campaign_id}\n"
    assert line.endswith(
        f"the campaign is recorded, and `orchard resume {campaign_id}` sends the rest once "
        "that is mended"
    )
    store = Store(f"sqlite:///{tmp_path / 'home' / 'orchard.db'}")
    try:
        assert {u.state for u in store.units(campaign_id)} == {"PENDING"}
        monkeypatch.setattr(scheduler.api, "_plan_checked", planned)
        private_redis.start()
        assert main(["resume", campaign_id]) == 0, capsys.readouterr().err
        states = {u.key: u.state for u in store.units(campaign_id)}
        assert {s for k, s in states.items() if "/preprocess/" in k} == {"QUEUED"}, states
    finally:
        store.dispose()


def test_units_whose_messages_the_broker_lost_run_on_an_idle_worker_beside_a_long_fold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis restarted without persistence (or evicting keys) loses the queued messages.
    An idle worker of their queue sends the units again after five lease periods; but
    it waited until no unit of the queue ran anywhere, so the lost folds waited for a
    fold of hours on another GPU worker, the idle one doing nothing. Here the queue's
    Redis list is deleted under a long fold; a second GPU worker, started after, runs
    the lost folds while the long one still runs."""
    import redis

    from scheduler.api import cancel

    prefix = f"orchard-test-{secrets.token_hex(4)}:"
    lease = 3  # 2 s let a heartbeat delayed 3.3 s (a loaded machine) give up the long fold
    monkeypatch.setenv("ORCHARD_REDIS_PREFIX", prefix)
    monkeypatch.setenv("ORCHARD_LEASE_SECONDS", str(lease))
    monkeypatch.setenv("ORCHARD_VISIBILITY_TIMEOUT", "600")
    settings = settings_for(tmp_path, REDIS_URL, f"sqlite:///{tmp_path / 'store.db'}")
    store = Store(settings.database_url)
    store.upgrade()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        with WorkerPool(settings) as pool:
            pool.start("cpu", "cpu,preprocess,report")
            pool.start("gpu-busy", "gpu")
            long = submit(write_campaign(tmp_path, "long", epochs=5000), settings=settings)
            fold = wait_for(
                lambda: (u := cnn_unit(long)).state == "RUNNING" and u,
                120,
                "the long fold to run",
                check=pool.check,
            )
            short = submit(
                write_campaign(tmp_path, "short", epochs=1, cnn_folds=2), settings=settings
            )
            waiting = [u for u in short.status().units if u.family == "cnn"]
            wait_for(
                lambda: client.llen(f"{prefix}gpu") == len(waiting),
                120,
                "the short campaign's folds to wait in queue gpu",
                check=pool.check,
            )
            assert client.delete(f"{prefix}gpu") == 1  # their messages gone with the broker
            pool.start("gpu-idle", "gpu")
            wait_for(
                lambda: all(short.store.get_unit(u.key).state == "SUCCESS" for u in waiting),
                120,
                "the lost folds to run on the idle worker",
                check=pool.check,
            )
            assert store.get_unit(fold.key).state == "RUNNING"  # the long fold still runs
            ran = {short.store.get_unit(u.key).worker.split("@")[0] for u in waiting}
            assert ran == {"gpu-idle-0"}
            assert pool.log("gpu-idle").count("which this worker consumed idle all that time") == 2
            cancel(long.id, settings=settings)
            pool.kill("gpu-busy")
    finally:
        client.close()
        drop_redis_keys(prefix)
