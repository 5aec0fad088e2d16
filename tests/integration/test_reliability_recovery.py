"""Recovery on real `celery worker` processes, the real Redis and a real store: a unit
that fails for good, a claim never sent, cancel then resume then resubmit, artifacts
damaged or removed behind the campaign's back, workers of another version or database,
and a message in a format the workers refuse.

Each test then checks the store: every unit recorded exactly once, nothing lost, the
report written once. The workers run with fast recovery, as in test_reliability.py.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest
from sqlalchemy import delete, select, update

from db.models import CampaignRow, ResultRow, UnitRow, utcnow
from db.store import DeleteRefusedError
from scheduler.api import cancel, resume
from scheduler.cleanup import delete as delete_campaign
from scheduler.cleanup import prune_cache
from shared.artifacts import sha256_file
from tests.integration.reliability import (
    Cluster,
    assert_exactly_once,
    cnn_unit,
    epochs_recorded,
    restart_after_kill,
    write_campaign,
)

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------- 3. fails for good


def test_a_unit_that_fails_for_good_does_not_hang_the_campaign(cluster: Cluster) -> None:
    """A poison task (it kills its worker every time) is given up after
    ORCHARD_MAX_ATTEMPTS deliveries; the report still runs, once, and blends the rest."""
    store = cluster.store
    blend = '["cnn", "svm"]'
    campaign = write_campaign(cluster.tmp, "poison", epochs=12, classic=True, blend=blend)
    run = cluster.submit(campaign)
    fold = cnn_unit(run)

    def training(attempt: int) -> bool:
        unit = cnn_unit(run)
        return unit.attempts == attempt and epochs_recorded(store, fold.key) >= 1

    for attempt in (1, 2):
        cluster.wait_for(lambda a=attempt: training(a), 180, f"attempt {attempt} to train")
        restart_after_kill(cluster, "gpu")
    status = cluster.wait(run)
    assert status.campaign.state == "PARTIAL"
    states = {u.family: u.state for u in status.units}
    assert states == {
        "preprocess": "SUCCESS",
        "cnn": "FAILED",
        "svm": "SUCCESS",
        "rf": "SUCCESS",
        "report": "SUCCESS",
    }
    fold = cnn_unit(run)
    assert fold.error.startswith("gave up after 2 attempts")
    assert_exactly_once(run, store)
    report_key = f"{run.id}/report"
    assert report_key in store.results(run.id)  # written, once (exactly-once check above)
    markdown = run.report_path().with_suffix(".md").read_text()
    assert fold.key.removeprefix(run.id + "/") in markdown or fold.key in markdown
    assert "gave up after 2 attempts" in markdown
    # what succeeded is still in the Blending table (in bold when it is the best)
    assert re.search(r"^\| (\*\*)?SVM best point", markdown, re.MULTILINE), markdown


def test_a_claim_never_sent_and_a_stage_never_opened_are_repaired_by_the_workers(
    cluster: Cluster,
) -> None:
    """The process that claims units can die before it sends them, and the task that
    finished a stage's last unit can die (or give up on an unreachable store) before it
    opens the next: no message is left to bring the campaign back. The workers' reaper
    sends a claim that stayed unsent for a lease period, and advances a campaign that
    nothing moved for two."""
    store = cluster.store
    run = cluster.submit(write_campaign(cluster.tmp, "unsent", epochs=1))
    assert cluster.wait(run).campaign.state == "DONE"
    report = next(u for u in run.status().units if u.family == "report")

    def lose_the_report(**state: object) -> None:
        with store.engine.begin() as conn:
            conn.execute(delete(ResultRow).where(ResultRow.unit_id == report_id(conn)))
            conn.execute(
                update(UnitRow)
                .where(UnitRow.key == report.key)
                .values(finished_at=None, started_at=None, attempts=0, **state)
            )
            conn.execute(
                update(CampaignRow)
                .where(CampaignRow.id == run.id)
                .values(state="RUNNING", finished_at=None)
            )

    def report_id(conn) -> int:  # noqa: ANN001
        return conn.scalar(select(UnitRow.id).where(UnitRow.key == report.key))

    # 1. claimed (QUEUED, a task id recorded) by a process that died before sending
    lose_the_report(state="QUEUED", task_id="never-sent", queued_at=utcnow(), sent_at=None)
    status = cluster.wait(run, timeout=120)
    assert status.campaign.state == "DONE"
    assert f"{report.key}: claimed but never sent (its sender died); sent now" in (
        cluster.pool.all_logs()
    )
    assert store.get_unit(report.key).task_id != "never-sent"
    # 2. left PENDING: the stage was never opened
    lose_the_report(state="PENDING", task_id=None, queued_at=None, sent_at=None)
    status = cluster.wait(run, timeout=120)
    assert status.campaign.state == "DONE"
    assert f"{run.id}: nothing moved it for 8 s; advanced it (1 unit(s) sent)" in (
        cluster.pool.all_logs()
    )
    assert_exactly_once(run, store)
    assert run.report_path() is not None and run.report_path().exists()


# ---------------------------------------------------------------- 4. cancel, resume, reuse


def test_cancel_then_resume_then_resubmit_with_reuse(cluster: Cluster) -> None:
    store = cluster.store
    campaign = write_campaign(cluster.tmp, "cancelled", epochs=12, classic=True)
    run = cluster.submit(campaign)
    fold = cnn_unit(run)
    cluster.wait_for(lambda: epochs_recorded(store, fold.key) >= 2, 180, "the second epoch")
    outcome = cancel(run.id, settings=cluster.settings)
    assert outcome.state == "CANCELLED" and outcome.task_ids
    cluster.wait_for(
        lambda: f"{fold.key} stopped: its campaign was cancelled" in cluster.pool.log("gpu"),
        60,
        "the running fold to stop",
    )
    status = run.status()
    assert status.campaign.state == "CANCELLED"
    assert cnn_unit(run).state == "CANCELLED" and fold.key not in store.results(run.id)
    # Celery's "Failed to mark task … as revoked in backend: No result backend is
    # configured", once per unit and worker, is left out (workers.logs)
    assert "as revoked in backend" not in cluster.pool.all_logs()
    assert f"{fold.key} trains on " in cluster.pool.log("gpu")  # cpu (...) or cuda:0 (...)
    # the task's result, which Flower shows, says it stopped
    cluster.wait_for(
        lambda: "'why': 'campaign cancelled: stopped'" in cluster.pool.log("gpu"),
        30,
        "the stopped fold's task result",
    )
    assert {u.state for u in status.units if u.family == "report"} == {"CANCELLED"}

    resumed, reset = resume(run.id, settings=cluster.settings)
    assert fold.key in reset and f"{run.id}/report" in reset
    assert not any("/preprocess/" in key for key in reset)  # those had succeeded
    status = cluster.wait(resumed)
    assert status.campaign.state == "DONE", [(u.key, u.state, u.error) for u in status.units]
    assert store.results(run.id)[fold.key].extra["resumed_from_epoch"] >= 2
    assert cnn_unit(run).attempts == 1  # attempts start again after a resume
    assert_exactly_once(run, store)

    again = cluster.submit(campaign, reuse=True)
    model_units = [u for u in again.status().units if u.family in ("cnn", "svm", "rf")]
    assert set(again.reused) == {u.key for u in model_units}
    status = cluster.wait(again)
    assert status.campaign.state == "DONE"
    first, second = store.results(run.id), store.results(again.id)
    for unit in model_units:
        source = again.reused[unit.key]
        assert second[unit.key].val_acc == first[source].val_acc
        assert second[unit.key].extra["reused_from"] == source
        assert unit.attempts == 0  # not run again
    assert again.report_path() is not None and again.report_path().exists()

    # the copies keep reading the first campaign's model files: it is not deleted under them
    with pytest.raises(DeleteRefusedError, match=f"campaign\\(s\\) {again.id} reuse its results"):
        delete_campaign(run.id, settings=cluster.settings)
    artifacts = cluster.settings.artifacts
    key = _manifest(cluster, run.id).cache_key
    # beside each shard its lock file, `.shard-00000.npy.lock`, which holds nothing
    shards = sorted((artifacts / "cache" / key).glob("shard-*.npy"))
    assert shards and store.count_artifacts(f"cache/{key}/") == len(shards)
    for deleted in (again, run):
        gone = delete_campaign(deleted.id, settings=cluster.settings)
        assert gone.state == "DONE" and gone.files > 0
        assert not (artifacts / "campaigns" / deleted.id).exists()
        assert store.find_campaign(deleted.id) is None
    # a message of a deleted campaign still in a queue: done with, not an error
    from workers.app import make_app

    late = [u for u in model_units if u.family == "svm"][0]
    make_app(cluster.settings, with_tasks=False).send_task(
        late.task, kwargs={"campaign_id": again.id, "unit_key": late.key}, queue=late.queue
    )
    dropped = f"{late.key}: its campaign was deleted (`orchard delete`): dropped"
    cluster.wait_for(lambda: dropped in cluster.pool.log("cpu"), 60, "the late message")
    assert f"{late.key}: rejected" not in cluster.pool.all_logs()
    # the cache stays, whole and recorded, for the next campaign over these images
    for shard in shards:
        record = store.find_artifact(shard.relative_to(artifacts).as_posix())
        assert record is not None and sha256_file(shard) == record.sha256
    # until a prune, once no campaign left in the store uses it (this module's other
    # campaigns may read the same images)
    users = [
        c.id for c in store.list_campaigns(limit=None) if _manifest(cluster, c.id).cache_key == key
    ]
    pruned = prune_cache(settings=cluster.settings)
    assert (key in [folder.name for folder, _, _ in pruned.folders]) == (not users)
    assert all(shard.exists() for shard in shards) == bool(users)
    assert (store.count_artifacts(f"cache/{key}/") == len(shards)) == bool(users)


def _manifest(cluster: Cluster, campaign_id: str):  # noqa: ANN202 - a Manifest
    from shared.manifest import Manifest, manifest_path

    folder = cluster.settings.artifacts / "campaigns" / campaign_id
    return Manifest.from_json(manifest_path(folder).read_text())


def test_resume_rewrites_a_shard_that_was_altered_or_deleted(cluster: Cluster) -> None:
    """A shard damaged after its unit succeeded fails every unit that reads it; resume
    runs its preprocessing unit again (it would otherwise stay SUCCESS, and each resume
    fail the same way), and the campaign finishes."""
    from shared.manifest import Manifest, manifest_path
    from workers.data import shard_rel

    store, artifacts = cluster.store, cluster.settings.artifacts
    run = cluster.submit(write_campaign(cluster.tmp, "damaged", epochs=1))
    assert cluster.wait(run).campaign.state == "DONE"
    manifest = Manifest.from_json(manifest_path(artifacts / "campaigns" / run.id).read_text())
    first, second = (artifacts / shard_rel(manifest, index) for index in (0, 1))
    altered = bytearray(first.read_bytes())
    altered[-1] ^= 0xFF
    first.write_bytes(bytes(altered))
    second.unlink()

    resumed, reset = resume(run.id, settings=cluster.settings)
    assert reset == [
        f"{run.id}/preprocess/s00000",
        f"{run.id}/preprocess/s00001",
        f"{run.id}/report",
    ]
    assert cluster.wait(resumed).campaign.state == "DONE"
    for index, shard in enumerate((first, second)):
        record = store.find_artifact(shard_rel(manifest, index))
        assert record is not None and sha256_file(shard) == record.sha256

    _, reset = resume(run.id, settings=cluster.settings)  # whole again: nothing to do
    assert reset == []


def test_an_image_changed_after_submit_never_reaches_the_cache(cluster: Cluster) -> None:
    """The cache is keyed by the images' bytes as hashed at submit; a file edited (or a
    symlink swapped) before its shard is decoded fails that shard, naming the file,
    rather than putting other pixels under the key another campaign would reuse."""
    from shared.manifest import Manifest, manifest_path
    from workers.data import shard_rel

    path = write_campaign(cluster.tmp, "changed", epochs=1, per_class=12)
    path.write_text(path.read_text().replace(f'"{cluster.tmp / "data"}"', '"data-changed"'))
    cluster.pool.kill("cpu")  # the only consumer of `preprocess`: nothing decoded yet
    try:
        run = cluster.submit(path)
        folder = cluster.settings.artifacts / "campaigns" / run.id
        manifest = Manifest.from_json(manifest_path(folder).read_text())
        image = Path(manifest.image_paths(manifest.entries[:1], cluster.settings.artifacts)[0])
        assert image.is_relative_to(cluster.tmp / "data-changed")
        image.write_bytes(image.read_bytes() + b"\0")  # still a JPEG, other bytes
    finally:
        cluster.pool.restart("cpu")
    status = cluster.wait(run)
    shard = next(u for u in status.units if u.key == f"{run.id}/preprocess/s00000")
    assert shard.state == "FAILED"
    assert f"{image}: changed since the campaign was submitted" in shard.error
    assert cluster.store.find_artifact(shard_rel(manifest, 0)) is None
    assert status.campaign.state != "DONE"
    # the worker's log says it in orchard's line and Celery's, without a traceback
    log = cluster.pool.log("cpu")
    assert f"{shard.key} failed after " in log
    assert "raised expected: PreprocessError(" in log
    assert "raised unexpected: PreprocessError(" not in log


def test_a_worker_started_after_a_cancel_discards_the_cancelled_units(cluster: Cluster) -> None:
    """The revoke of `orchard cancel` reaches only the workers running at the time, and
    workers start without Celery's handshake (mingle) that would pass revoked ids on: a
    worker started later must learn it from the store and run nothing."""
    cluster.pool.kill("cpu")  # the only consumer of `preprocess`: the stage stays queued
    try:
        run = cluster.submit(write_campaign(cluster.tmp, "late", epochs=1))
        queued = [u.key for u in run.status().units if u.family == "preprocess"]
        assert queued and cancel(run.id, settings=cluster.settings).state == "CANCELLED"
    finally:
        cluster.pool.restart("cpu")
    cluster.wait_for(
        lambda: all(
            f"{key} already CANCELLED; nothing to do" in cluster.pool.log("cpu") for key in queued
        ),
        60,
        "the restarted worker to discard every queued unit",
    )
    units = run.status().units
    assert {u.state for u in units} == {"CANCELLED"}
    assert all(u.attempts == 0 for u in units)
    assert cluster.store.results(run.id) == {}


def test_a_campaign_whose_folder_was_removed_fails_and_the_workers_go_on(cluster: Cluster) -> None:
    """A queued campaign's folder removed by hand (or written by a submitter with
    another ORCHARD_ARTIFACTS): its manifest is missing on every host. The worker's
    folder holds the manifest of a campaign that ran, so the worker is not the one in
    the wrong: it hands the units back, counted, until they fail, writes the report of
    what failed, and keeps taking from its queues. It used to stop consuming
    `preprocess` at the first unit, and the next campaign waited for ever."""
    import shutil

    classic = {"classic": True, "blend": '["svm"]'}
    ran = cluster.submit(write_campaign(cluster.tmp, "ran", **classic))
    assert cluster.wait(ran).campaign.state == "DONE"  # its manifest: the witness
    cluster.pool.kill("cpu")  # the only consumer of `preprocess`: it stays queued
    try:
        gone = cluster.submit(write_campaign(cluster.tmp, "gone", **classic))
        folder = cluster.settings.artifacts / "campaigns" / gone.id
        shutil.rmtree(folder)
    finally:
        cluster.pool.restart("cpu")
    status = cluster.wait(gone)
    assert status.campaign.state == "PARTIAL"
    states = {u.family: u.state for u in status.units}
    # the report says what failed (it reads the store, not the manifest)
    assert states == {f: "FAILED" for f in ("preprocess", "cnn", "svm", "rf")} | {
        "report": "SUCCESS"
    }
    manifest = folder / "manifest.json"
    for unit in status.units:
        if unit.family == "preprocess":
            assert unit.attempts == 2, unit
            assert f"{manifest}: the campaign's manifest is not there, though this folder" in (
                unit.error
            ), unit.error
    report = gone.report_path().with_suffix(".md").read_text()
    assert "preprocessing failed" in report
    # and why: the shard's own error, under "Failed units"
    assert f"{manifest}: the campaign's manifest is not there" in report
    after = cluster.submit(write_campaign(cluster.tmp, "after", **classic))
    assert cluster.wait(after).campaign.state == "DONE"
    assert "takes no more units" not in cluster.pool.log("cpu")


def test_an_older_worker_runs_no_unit_of_a_newer_campaign_nor_of_a_newer_schema(
    cluster: Cluster,
) -> None:
    """Mixed versions, with real workers: a campaign of a newer format (a newer orchard
    submitted it), then the store migrated by a newer orchard while the worker runs on.
    The worker runs none of the campaign's units meanwhile, says why, and keeps each
    message: once both are this worker's again, the campaign finishes, each unit once."""
    from sqlalchemy import text

    from db import migrate
    from shared.spec import CAMPAIGN_FORMAT

    cluster.pool.kill("cpu")  # the only consumer of `preprocess`: it stays queued
    try:
        run = cluster.submit(write_campaign(cluster.tmp, "newer", classic=True, blend='["svm"]'))
        with cluster.store.engine.begin() as conn:
            conn.execute(
                update(CampaignRow)
                .where(CampaignRow.id == run.id)
                .values(format_version=CAMPAIGN_FORMAT + 1)
            )
    finally:
        cluster.pool.restart("cpu")

    def untouched() -> None:
        for unit in cluster.store.units(run.id):
            assert (unit.state, unit.attempts) in {("QUEUED", 0), ("PENDING", 0)}, unit

    said = f"campaign {run.id} was submitted by a newer orchard (campaign format "
    cluster.wait_for(lambda: said in cluster.pool.log("cpu"), 60, "the newer format's line")
    untouched()
    with cluster.store.engine.begin() as conn:  # a newer orchard's `orchard db upgrade`
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    try:
        cluster.wait_for(
            lambda: "is at schema 0099, newer than this orchard knows" in cluster.pool.log("cpu"),
            60,
            "the newer schema's line",
        )
        with cluster.store.engine.begin() as conn:
            conn.execute(
                update(CampaignRow)
                .where(CampaignRow.id == run.id)
                .values(format_version=CAMPAIGN_FORMAT)
            )
        untouched()
    finally:
        with cluster.store.engine.begin() as conn:
            conn.execute(
                text("UPDATE alembic_version SET version_num = :head"),
                {"head": migrate.head_revision()},
            )
    assert cluster.wait(run).campaign.state == "DONE"
    assert_exactly_once(run, cluster.store)
    assert cluster.pool.log("cpu").count(said) == 1  # said once, however many retries


# ---------------------------------------------------------------- security: JSON only


def test_a_pickled_message_is_refused(cluster: Cluster) -> None:
    """A worker never unpickles what someone put on the broker: a pickled orchard task
    is refused before it is decoded, so nothing runs and nothing is recorded."""
    from kombu import Exchange, Producer, Queue

    from workers.app import make_app

    marker = f"pickled-{secrets.token_hex(4)}"
    campaigns = [c.id for c in cluster.store.list_campaigns()]
    app = make_app(cluster.settings, with_tasks=False)
    queue = Queue("report", Exchange("report"), routing_key="report")
    with app.connection_for_write() as conn:
        Producer(conn).publish(
            {"campaign_id": "pickled", "unit_key": "pickled/report"},
            exchange=queue.exchange,
            routing_key="report",
            declare=[queue],
            serializer="pickle",
            headers={"task": "orchard.report", "id": marker, "lang": "py"},
        )
    cluster.wait_for(
        lambda: (
            "Refusing to deserialize untrusted content of type pickle" in cluster.pool.log("cpu")
        ),
        60,
        "the worker to refuse the pickled message",
    )
    log = cluster.pool.log("cpu")
    assert f"orchard.report[{marker}] received" not in log  # never became a task
    assert "The message has been ignored and discarded" in log
    assert "pickled/report: rejected" not in log  # the task body never looked it up
    assert [c.id for c in cluster.store.list_campaigns()] == campaigns
