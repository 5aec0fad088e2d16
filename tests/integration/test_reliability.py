"""Failure semantics on real `celery worker` processes, the real Redis and a real store.

Each test breaks something on purpose (SIGKILL a worker mid-fold, ask it to stop, alter
its checkpoints, deliver a task twice, take a lease away, send a campaign to workers of
another database) and then checks the store: every unit recorded exactly once, nothing
lost, the report written once. test_reliability_recovery.py has the rest.

The workers run with a short Redis visibility timeout (ORCHARD_VISIBILITY_TIMEOUT) so a
killed worker's unacknowledged task comes back within seconds, and a unit lease shorter
than that (ORCHARD_LEASE_SECONDS) so the redelivered task can take the unit over.
"""

from __future__ import annotations

import json
import os
import re
import signal
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from db.models import UnitRow, utcnow
from scheduler.api import CampaignRun, cancel, submit
from shared.artifacts import sha256_file
from tests.conftest import REDIS_URL
from tests.integration.reliability import (
    Cluster,
    assert_exactly_once,
    cnn_unit,
    epochs_recorded,
    restart_after_kill,
    write_campaign,
)
from tests.integration.workerpool import WorkerPool, wait_for

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------- 1. SIGKILL mid-fold


def test_a_sigkilled_prefork_child_s_unit_runs_again_at_once(cluster: Cluster) -> None:
    """Its parent sees it die and requeues the message (reject on worker lost): the
    dead child's lease is ended then, so the next delivery runs the unit instead of
    waiting out a lease that nobody renews."""
    store = cluster.store
    path = write_campaign(cluster.tmp, "child", epochs=1, classic=True, blend='["rf"]')
    path.write_text(path.read_text().replace("n_estimators = [10]", "n_estimators = [6000]"))
    run = cluster.submit(path)
    forest = cluster.wait_for(
        lambda: next(
            (u for u in run.status().units if u.family == "rf" and u.state == "RUNNING"), None
        ),
        120,
        "the forest to run",
    )
    pid = int(forest.lease_holder.split("/")[-2])  # the prefork child that runs it
    assert pid != cluster.pool.procs["cpu"].pid
    os.kill(pid, signal.SIGKILL)
    status = cluster.wait(run)
    assert status.campaign.state == "DONE", [(u.key, u.state, u.error) for u in status.units]
    log = cluster.pool.log("cpu")
    # the unit and how its process ended: a line to grep the campaign's history by
    assert (
        f"child {pid} was lost mid-unit ({forest.key}: Worker exited prematurely: signal 9 "
        "(SIGKILL)" in log
    )
    assert "its unit is sent again now" in log
    # Celery's own line of it, a warning without a traceback: the unit was not failed
    assert re.search(r"WARNING/MainProcess\] Task handler raised error: WorkerLostError", log)
    assert "Traceback" not in log
    assert re.search(
        r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} UTC: WARNING/MainProcess\] child ", log, re.M
    )
    # released before the message went back (the worker waits a second for the store:
    # a loaded machine's may take longer, and then it says so, and the next delivery
    # waits for the release instead)
    if "the store is slow to release its lease" not in log:
        assert f"{forest.key} is running elsewhere (live lease)" not in log
    assert store.get_unit(forest.key).attempts == 2
    assert_exactly_once(run, store)


def test_sigkilled_gpu_worker_resumes_the_fold_from_its_checkpoint(cluster: Cluster) -> None:
    store = cluster.store
    run = cluster.submit(write_campaign(cluster.tmp, "killed", epochs=10))
    fold = cnn_unit(run)
    cluster.wait_for(lambda: epochs_recorded(store, fold.key) >= 3, 180, "the third epoch")
    restart_after_kill(cluster, "gpu")
    killed_at = epochs_recorded(store, fold.key)
    status = cluster.wait(run)
    assert status.campaign.state == "DONE", [(u.key, u.state, u.error) for u in status.units]
    fold = cnn_unit(run)
    result = store.results(run.id)[fold.key]
    assert fold.attempts == 2  # the killed delivery and the redelivered one
    assert 2 <= result.extra["resumed_from_epoch"] <= killed_at  # not from epoch 0
    assert result.extra["epochs"] == 10
    assert_exactly_once(run, store)
    assert [step for step, _ in store.metrics(fold.key)["val_acc"]] == list(range(10))
    assert f"resuming {fold.key} from epoch" in cluster.pool.log("gpu")
    assert_checkpoints_removed(cluster, run)


def test_a_gpu_worker_asked_to_stop_hands_its_fold_back_at_the_next_checkpoint(
    cluster: Cluster,
) -> None:
    """SIGTERM (compose stop, a cluster draining a node): the worker does not wait for
    the fold to end; it hands the unit back after its next checkpoint, the message goes
    back to the queue, and the next GPU worker resumes from exactly there."""
    import redis

    store = cluster.store
    run = cluster.submit(write_campaign(cluster.tmp, "drained", epochs=40))
    fold = cnn_unit(run)
    cluster.wait_for(lambda: epochs_recorded(store, fold.key) >= 2, 180, "the second epoch")
    exit_status = cluster.pool.terminate("gpu")
    try:  # the module's later tests need their gpu worker back, whatever fails here
        assert exit_status == 0
        handed_back_at = epochs_recorded(store, fold.key)
        fold = cnn_unit(run)
        assert fold.state == "QUEUED" and handed_back_at < 40
        assert fold.attempts == 0  # stopping on request is not a failed attempt
        client = redis.Redis.from_url(REDIS_URL)
        try:  # the message is back on its queue, not waiting in the unacknowledged set
            assert client.llen(f"{cluster.redis_prefix}gpu") == 1
        finally:
            client.close()
        assert f"{fold.key} handed back at its checkpoint" in cluster.pool.log("gpu")
    finally:
        cluster.pool.restart("gpu")
    status = cluster.wait(run)
    assert status.campaign.state == "DONE", [(u.key, u.state, u.error) for u in status.units]
    fold = cnn_unit(run)
    assert fold.attempts == 1
    result = store.results(run.id)[fold.key]
    assert result.extra["resumed_from_epoch"] == handed_back_at  # nothing trained twice
    assert result.extra["epochs"] == 40
    assert [step for step, _ in store.metrics(fold.key)["val_acc"]] == list(range(40))
    assert_exactly_once(run, store)
    assert_checkpoints_removed(cluster, run)


def assert_checkpoints_removed(cluster: Cluster, run: CampaignRun) -> None:
    """A finished fold's checkpoints were scratch: no file and no record is left."""
    assert cluster.store.artifacts(run.id, kind="checkpoint") == []
    folder = cluster.settings.artifacts / "campaigns" / run.id / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == []


# ---------------------------------------------------------------- 6. altered artifacts


def test_altered_checkpoint_and_shard_are_detected_and_not_used(cluster: Cluster) -> None:
    store = cluster.store
    run = cluster.submit(write_campaign(cluster.tmp, "tamper", epochs=8))
    fold = cnn_unit(run)
    # the third epoch's metrics come after the second epoch's checkpoint is recorded
    cluster.wait_for(lambda: epochs_recorded(store, fold.key) >= 3, 180, "the third epoch")
    cluster.pool.kill("gpu")
    try:  # the module's later tests need their gpu worker back, whatever fails here
        checkpoints = store.artifacts(run.id, kind="checkpoint")
        assert len(checkpoints) == 2  # the two alternating files, both recorded by now
        for checkpoint in checkpoints:  # both truncated behind our back
            path = cluster.settings.artifacts / checkpoint.path
            path.write_bytes(path.read_bytes()[: checkpoint.size // 2])
    finally:
        cluster.pool.restart("gpu")
    status = cluster.wait(run)
    assert status.campaign.state == "DONE", [(u.key, u.state, u.error) for u in status.units]
    result = store.results(run.id)[fold.key]
    assert result.extra["resumed_from_epoch"] == 0  # neither bad checkpoint was loaded
    assert "does not match its recorded sha256" in cluster.pool.log("gpu")
    assert_exactly_once(run, store)

    # a cached shard altered on disk: the next campaign over the same images decodes it
    # again instead of training on it
    artifacts = cluster.settings.artifacts
    manifest = json.loads((artifacts / "campaigns" / run.id / "manifest.json").read_text())
    victim = sorted((artifacts / "cache" / manifest["cache_key"]).glob("*.npy"))[0]
    recorded = store.find_artifact(victim.relative_to(artifacts).as_posix())
    blob = bytearray(victim.read_bytes())
    blob[-1] ^= 0xFF  # one flipped bit in the pixels: same size, different bytes
    victim.write_bytes(bytes(blob))
    again = cluster.submit(write_campaign(cluster.tmp, "tamper2", epochs=1))
    assert cluster.wait(again).campaign.state == "DONE"
    reused = {
        key.rsplit("/", 1)[1]: result.extra["reused"]
        for key, result in store.results(again.id).items()
        if "/preprocess/" in key
    }
    assert list(reused.values()).count(False) == 1  # only the altered shard was redone
    assert sha256_of(victim) == recorded.sha256  # decoded again: the original bytes


def sha256_of(path: Path) -> str:

    return sha256_file(path)


# ---------------------------------------------------------------- 2. delivered twice


def test_a_task_delivered_twice_runs_once_and_a_stolen_lease_stops_the_run(
    cluster: Cluster,
) -> None:
    from workers.app import make_app

    store = cluster.store
    run = cluster.submit(write_campaign(cluster.tmp, "twice", epochs=12))
    fold = cnn_unit(run)
    cluster.wait_for(lambda: epochs_recorded(store, fold.key) >= 1, 180, "the first epoch")
    # the same task again, to another worker, while the first delivery runs it
    make_app(cluster.settings, with_tasks=False).send_task(
        fold.task, kwargs={"campaign_id": run.id, "unit_key": fold.key}, queue="cpu"
    )
    cluster.wait_for(
        lambda: f"{fold.key} is running elsewhere (live lease)" in cluster.pool.log("cpu"),
        60,
        "the duplicate delivery to step back",
    )
    assert cnn_unit(run).attempts == 1  # the duplicate did not start it
    # now someone else takes the unit over (as a delivery would once the lease expired)
    with store.engine.begin() as conn:
        conn.execute(
            update(UnitRow)
            .where(UnitRow.key == fold.key)
            .values(lease_holder="intruder", lease_expires_at=utcnow() + timedelta(seconds=3))
        )
    cluster.wait_for(
        lambda: f"{fold.key} stopped: another delivery took it over" in cluster.pool.all_logs(),
        60,
        "the first delivery to notice it lost its lease",
    )
    status = cluster.wait(run)
    assert status.campaign.state == "DONE", [(u.key, u.state, u.error) for u in status.units]
    fold = cnn_unit(run)
    assert fold.attempts == 2  # the first delivery, then one takeover after the intruder
    assert store.results(run.id)[fold.key].extra["resumed_from_epoch"] >= 1
    assert_exactly_once(run, store)


def test_a_campaign_sent_to_workers_of_another_database_is_named_on_both_sides(
    cluster: Cluster,
) -> None:
    """Submitted with another ORCHARD_DATABASE_URL than the workers', a campaign cannot
    run: each worker drops its units in one line that says so (no traceback), and the
    submitter's ``stalled`` names the queue no worker of its database takes from. Once
    a worker of its database consumes that queue, it finds it idle with the units sent
    long ago, and sends them again (``workers.reaper``): nothing waits for a resume."""
    other = replace(cluster.settings, database_url=f"sqlite:///{cluster.tmp / 'other.db'}")
    run = submit(write_campaign(cluster.tmp, "elsewhere", epochs=1), settings=other)
    queued = [u.key for u in run.status().units if u.family == "preprocess"]
    ours = cluster.settings.database_url
    said = f"rejected: campaign {run.id} is not in this worker's store ({ours})"
    cluster.wait_for(
        lambda: all(f"{key}: {said}" in cluster.pool.log("cpu") for key in queued),
        60,
        "the worker to drop every unit of the campaign it does not know",
    )
    lines = cluster.pool.log("cpu").splitlines()
    rejects = [i for i, line in enumerate(lines) if "reject requeue=False" in line]
    assert rejects and not any(
        lines[i + 1 : i + 2] == ["Traceback (most recent call last):"] for i in rejects
    )

    line = wait_for(lambda: run.stalled(after=1.0), 30, "the stall line")
    assert "queue `preprocess` for" in str(line) and str(other.database_url) in str(line)
    assert {u.state for u in run.status().units if u.family == "preprocess"} == {"QUEUED"}

    # the right worker comes (the wrong one leaves, or it could take a message again)
    cluster.pool.terminate("cpu")
    try:
        # a lease of 2 s (the module's workers: 4 s): it counts the units dropped after
        # five lease periods idle, 10 s instead of 20
        with WorkerPool(other, env={"ORCHARD_LEASE_SECONDS": "2"}) as right:
            right.start("right-cpu", "cpu,preprocess,report")
            wait_for(
                lambda: all(run.store.get_unit(k).state == "SUCCESS" for k in queued),
                120,
                "the worker of the campaign's database to send its dropped units again",
                check=right.check,
            )
            assert "another consumer dropped it (a worker on another database?); sent again" in (
                right.log("right-cpu")
            )
            cancel(run.id, settings=other)
    finally:
        cluster.pool.restart("cpu")
