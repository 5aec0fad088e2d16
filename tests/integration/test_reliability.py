"""Failure semantics on real `celery worker` processes, the real Redis and a real store.

Each test breaks something on purpose (SIGKILL a worker mid-fold, deliver a task twice,
take a lease away, cancel, poison a unit) and then checks the store: every unit
recorded exactly once, nothing lost, the report written once.

The workers run with a short Redis visibility timeout (ORCHARD_VISIBILITY_TIMEOUT) so a
killed worker's unacknowledged task comes back within seconds, and a unit lease shorter
than that (ORCHARD_LEASE_SECONDS) so the redelivered task can take the unit over.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, select, update

from db.models import CampaignRow, ResultRow, UnitRow, utcnow
from db.store import DeleteRefusedError, Store
from scheduler.api import CampaignRun, cancel, prune_cache, resume, submit
from scheduler.api import delete as delete_campaign
from shared.artifacts import sha256_file
from shared.settings import Settings
from tests.conftest import REDIS_URL
from tests.integration.test_campaign import drop_redis_keys, settings_for
from tests.integration.workerpool import WorkerPool, wait_for

pytestmark = pytest.mark.integration

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
        with WorkerPool(other) as right:
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
