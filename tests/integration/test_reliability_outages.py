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

import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from db.store import Store
from scheduler.api import submit
from tests.conftest import REDIS_URL
from tests.integration.test_campaign import drop_redis_keys, settings_for
from tests.integration.test_reliability import (
    FAST_RECOVERY,
    assert_exactly_once,
    cnn_unit,
    epochs_recorded,
    write_campaign,
)
from tests.integration.workerpool import WorkerPool, wait_for
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.integration


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


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (needed to restart a broker of our own)")
    server = PrivateRedis(tmp_path / "redis", f"pw-{secrets.token_hex(6)}")
    server.start()
    yield server
    server.stop()


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
                run = submit(write_campaign(tmp_path, name, epochs=12), settings=submitter)
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


def test_a_lost_gpu_workers_fold_is_sent_again_long_before_the_visibility_timeout(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU worker SIGKILLed mid-fold with an hour of visibility timeout: Redis would
    hand its message out again in an hour; the workers see the fold's lease run out and
    send it again, and it resumes from its checkpoint on another GPU worker."""
    prefix = own_prefix_and_fast_recovery(monkeypatch, {"ORCHARD_VISIBILITY_TIMEOUT": "3600"})
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
    lease = 2
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
