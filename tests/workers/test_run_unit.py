"""What the task wrapper (``run_unit``) asks of the store around a unit's body, run in
this process against a real SQLite store: a grid of thousands of tiny units pays it for
every unit, so it must stay a few transactions."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from db.store import Outcome, Prediction, Store
from shared.plan import UnitPlan
from shared.settings import Settings
from tests.conftest import record_begins
from workers.lease import Heartbeat, UnitAborted
from workers.tasks import base
from workers.tasks.base import UnitContext, UnitMessage, run_unit
from workers.tasks.base import worker_store as checked_worker_store

KEY = "g-1/svm/p0/f0"


class OneDelivery:
    """The little of a Celery task that ``run_unit`` reads: the request, and retry."""

    def __init__(self) -> None:
        self.request = SimpleNamespace(hostname="cpu@h", id="task-1", retries=0)
        self.app = None

    def retry(self, **kwargs: Any) -> Exception:
        raise AssertionError(f"retried: {kwargs}")


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    return _seeded(f"sqlite:///{tmp_path / 'store.db'}", tmp_path, monkeypatch)


def _seeded(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    """A store with campaign g-1 (two SVM points queued, a report), which ``run_unit``
    in this process uses as its worker's."""
    store = Store(url)
    store.upgrade()
    units = [
        UnitPlan(KEY, "svm", 1, 0, {"C": 2.0, "variant": "resize16"}, "p0"),
        UnitPlan("g-1/svm/p1/f0", "svm", 1, 0, {"C": 3.0, "variant": "resize16"}, "p1"),
        UnitPlan("g-1/report", "report", 3, None, {}, "r"),
    ]
    store.create_campaign(
        "g-1", name="g", source="g.toml", digest="d", spec={"seed": 7}, classes=["A"], units=units
    )
    store.claim_for_queue([u.key for u in units[:2]])
    settings = Settings(
        home=tmp_path / "home",
        broker_url="memory://",
        database_url=store.url,
        artifacts=tmp_path / "artifacts",
    )
    monkeypatch.setattr(base, "worker_store", lambda: store)
    monkeypatch.setattr(base, "worker_settings", lambda: settings)
    return store


def test_a_unit_costs_three_store_transactions_besides_its_body(store: Store) -> None:
    """Start (lease, unit, campaign), finish (result), and whether a stage may open.
    The unit and its campaign were read again after the start: five transactions."""
    seen: list[tuple[Any, ...]] = []

    def body(ctx: UnitContext) -> Outcome:
        seen.append((ctx.unit.key, ctx.unit.params, ctx.unit.fold, ctx.seed, ctx.campaign.id))
        return Outcome(0.01, val_acc=1.0, predictions={"val": [Prediction("a", 0, 0)]})

    begins = record_begins(store.engine)
    answer = run_unit(OneDelivery(), UnitMessage(campaign_id="g-1", unit_key=KEY), body)
    assert answer == {"unit": KEY, "state": "SUCCESS", "recorded": True}
    assert seen == [(KEY, {"C": 2.0, "variant": "resize16"}, 0, 7, "g-1")]
    assert len(begins) == 3, begins
    unit = store.get_unit(KEY)
    assert unit.state == "SUCCESS" and unit.attempts == 1 and unit.worker == "cpu@h"
    assert store.predictions(KEY, "val") == [Prediction("a", 0, 0)]
    # the other point still queued: nothing to open, nothing sent (advance had no app)
    assert store.get_unit("g-1/report").state == "PENDING"


def _delete_the_campaign(store: Store) -> None:
    store.cancel_campaign("g-1")
    store.delete_campaign("g-1", quiet_seconds=0)  # `orchard delete`, its quiet time past


@pytest.mark.parametrize("then", ["returns", "records a file"])
def test_a_unit_whose_campaign_is_deleted_while_it_runs_stops_quietly(
    store: Store, then: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Deleted under a body that runs on (a CPU fit on a solo worker, which a revoke does
    not stop): its result or its file's record has no unit or campaign to go to. The
    delivery stops with one warning: no traceback, no retry, no failure to record."""
    from db.store import Artifact

    def body(ctx: UnitContext) -> Outcome:
        _delete_the_campaign(store)
        model = ctx.settings.artifacts / "campaigns" / "g-1" / "models" / "m.pt"
        model.parent.mkdir(parents=True)
        model.write_bytes(b"weights")
        if then == "records a file":
            ctx.store.record_artifact(
                Artifact("campaigns/g-1/models/m.pt", "model", "0" * 64, 7, "g-1", KEY)
            )
        return Outcome(0.01, val_acc=1.0)

    answer = run_unit(OneDelivery(), UnitMessage(campaign_id="g-1", unit_key=KEY), body)
    assert answer == {"unit": KEY, "state": "DELETED", "why": "campaign deleted: stopped"}
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    folder = store.url.removeprefix("sqlite:///").removesuffix("store.db") + "artifacts"
    assert warning == (
        f"{KEY} stopped: its campaign was deleted while it ran; what it wrote is left in "
        f"{folder}/campaigns/g-1: `orchard delete g-1` removes it"
    )
    assert store.find_unit(KEY) is None and store.find_artifact("campaigns/g-1/models/m.pt") is None


@pytest.mark.parametrize("first", ["this delivery, its reply lost", "another delivery"])
def test_scratch_files_go_when_the_result_was_already_recorded(
    store: Store, first: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fold's checkpoints are scratch. When ``finish_unit`` answers "already recorded"
    (its retry after a commit whose reply the connection lost, or a second delivery),
    the commit that recorded the result took their records: the files go too, rather
    than wait for `orchard delete`. A file still on record is kept."""
    from db.store import Artifact

    caplog.set_level("INFO")
    scratch = ["campaigns/g-1/checkpoints/a.pt", "campaigns/g-1/checkpoints/b.pt"]
    kept = "campaigns/g-1/models/kept.pt"

    def body(ctx: UnitContext) -> Outcome:
        for relative in [*scratch, kept]:
            path = ctx.settings.artifacts / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"state")
            ctx.store.record_artifact(Artifact(relative, "checkpoint", "0" * 64, 5, "g-1", KEY))
        return Outcome(0.01, val_acc=1.0, scratch=[*scratch, kept])

    finish = store.finish_unit

    def recorded_before(key: str, outcome: Outcome, *, holder: str | None = None) -> bool:
        if first == "another delivery":
            assert finish(key, Outcome(0.02, val_acc=0.5, scratch=scratch)) is True
        else:
            assert finish(key, outcome, holder=holder) is True
        store.record_artifact(Artifact(kept, "model", "1" * 64, 5, "g-1", KEY))
        return finish(key, outcome, holder=holder)  # the retry, or this delivery's own

    monkeypatch.setattr(store, "finish_unit", recorded_before)
    answer = run_unit(OneDelivery(), UnitMessage(campaign_id="g-1", unit_key=KEY), body)
    assert answer == {"unit": KEY, "state": "SUCCESS", "recorded": False}
    artifacts = store.url.removeprefix("sqlite:///").removesuffix("store.db") + "artifacts"
    assert [(Path(artifacts) / p).exists() for p in [*scratch, kept]] == [False, False, True]
    assert f"{KEY} finished, but its result was already recorded" in caplog.text


def test_a_late_message_of_a_deleted_campaign_is_done_with_in_one_info_line(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """A message left in a queue when its campaign was deleted: nothing is wrong, so no
    error and no reject (which Flower shows as a failure); the store knows the id."""
    caplog.set_level("INFO")
    _delete_the_campaign(store)
    answer = run_unit(OneDelivery(), UnitMessage(campaign_id="g-1", unit_key=KEY), lambda ctx: None)
    assert answer == {"unit": KEY, "state": "DELETED", "why": "campaign deleted: not run"}
    assert [r.levelname for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert f"{KEY}: its campaign was deleted (`orchard delete`): dropped" in caplog.messages


def test_a_message_of_a_campaign_this_store_never_had_is_rejected_saying_why(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    from celery.exceptions import Reject

    message = UnitMessage(campaign_id="elsewhere-1", unit_key="elsewhere-1/svm/p0-f0")
    with pytest.raises(Reject):
        run_unit(OneDelivery(), message, lambda ctx: None)
    [error] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert error.endswith(
        "it was submitted to another database (the submitter's ORCHARD_DATABASE_URL must "
        "name the workers' database). Message dropped"
    )


def test_a_worker_with_a_long_node_name_runs_its_units_on_either_store(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--name` with a long fully qualified host name: PostgreSQL refuses a worker or a
    lease holder wider than its column, so the store keeps the name cut, with a hash of
    the whole, and a dead process's leases are still found by its prefix."""
    store = _seeded(store_url, tmp_path, monkeypatch)
    delivery = OneDelivery()
    delivery.request.hostname = "cpu@" + "node-" * 50 + "a.example.org"
    answer = run_unit(
        delivery,
        UnitMessage(campaign_id="g-1", unit_key=KEY),
        lambda ctx: Outcome(0.01, val_acc=1.0, predictions={"val": [Prediction("a", 0, 0)]}),
    )
    assert answer["recorded"]
    worker = store.get_unit(KEY).worker
    assert worker == base.node_label(delivery.request.hostname)
    assert len(worker) == base.MAX_NODE_NAME and worker.startswith("cpu@node-node-")
    other = delivery.request.hostname.replace("a.example", "b.example")
    assert base.node_label(other) != worker and len(base.node_label(other)) == len(worker)
    assert base.node_label("cpu@h") == "cpu@h"

    second = "g-1/svm/p1/f0"
    holder = base.holder_prefix(delivery.request.hostname, 4242) + "abcdef12"
    assert store.start_unit(second, worker=worker, task_id="t2", holder=holder).run
    # a namesake worker's child of the same pid (another host): not this one's lease
    namesake = base.holder_prefix(delivery.request.hostname, 4242).replace(
        base.WORKER_BOOT, "x" * 8
    )
    assert store.release_leases_of(namesake) == 0
    assert store.release_leases_of(base.holder_prefix(delivery.request.hostname, 4242)) == 1


@pytest.mark.parametrize("missing", ["manifest", "dataset"])
@pytest.mark.parametrize("queue", ["cpu", "gpu"])
def test_a_worker_without_the_campaign_s_files_hands_the_unit_back_and_stops_taking(
    store: Store, caplog: pytest.LogCaptureFixture, missing: str, queue: str
) -> None:
    """Its ORCHARD_ARTIFACTS is not the submitter's, or its host does not mount the
    dataset: not the unit's failure but the worker's. The unit goes back to the queue,
    the message is requeued for another worker, and this one stops consuming that
    queue (a GPU worker without the artifact folder too: it could run no fold). A
    dataset missing may be missing everywhere (moved away since the submit): that
    hand-back counts as an attempt, so the unit still ends."""
    from celery.exceptions import Reject

    from db.store import Artifact
    from workers.data import DatasetElsewhereError

    store.record_artifact(
        Artifact("campaigns/g-1/manifest.json", "manifest", "0" * 64, 2, "g-1")
    )  # written by the submitter, under another folder than this worker's
    cancelled: list[tuple[str, list[str]]] = []
    delivery = OneDelivery()
    delivery.request.delivery_info = {"routing_key": queue}
    delivery.app = SimpleNamespace(
        control=SimpleNamespace(
            broadcast=lambda command, arguments, destination: cancelled.append(
                (command, arguments, destination)
            )
        )
    )

    def body(ctx: UnitContext) -> Outcome:
        if missing == "dataset":
            raise DatasetElsewhereError("/mnt/share/mango: the campaign's dataset is not …")
        ctx.manifest()
        raise AssertionError("ran without its manifest")

    with pytest.raises(Reject) as rejected:
        run_unit(delivery, UnitMessage(campaign_id="g-1", unit_key=KEY), body)
    assert rejected.value.requeue is True
    unit = store.get_unit(KEY)
    counted = 1 if missing == "dataset" else 0
    assert unit.state == "QUEUED" and unit.attempts == counted and unit.error is None
    if queue == "gpu" and missing == "dataset":  # the next test
        paused = {"queue": "gpu", "boot": base.WORKER_BOOT, "seconds": 60.0}
        assert cancelled == [("orchard_stop_consuming", paused, ["cpu@h"])]
        return
    stop = {"queue": queue, "boot": base.WORKER_BOOT}  # this worker's, not a namesake's
    assert cancelled == [("orchard_stop_consuming", stop, ["cpu@h"])]
    [error] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    said, remedy = {
        "manifest": (
            "the campaign's manifest is not there; ORCHARD_ARTIFACTS on this worker",
            "with the right ORCHARD_ARTIFACTS",
        ),
        "dataset": (
            "/mnt/share/mango: the campaign's dataset is not …",
            "once the dataset is there",
        ),
    }[missing]
    assert said in error
    assert error.endswith(
        f"This worker takes no more units from queue {queue}: restart it {remedy}"
    )


def test_a_dataset_missing_at_every_attempt_fails_the_unit_and_a_gpu_worker_pauses_its_queue(
    store: Store, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nvJPEG shards run on queue gpu: a GPU worker without the dataset hands the shard
    back, takes nothing from the queue for a lease period (it had taken each shard
    again and again, an attempt each time, before the workers with the dataset could),
    then takes folds again. The last attempt allowed records the failure instead of
    handing back once more: a dataset moved away is missing on every host."""
    from celery.exceptions import Reject

    from workers.data import DatasetElsewhereError

    monkeypatch.setenv("ORCHARD_MAX_ATTEMPTS", "2")
    told: list[tuple] = []
    delivery = OneDelivery()
    delivery.request.delivery_info = {"routing_key": "gpu"}
    delivery.app = SimpleNamespace(
        control=SimpleNamespace(
            broadcast=lambda command, arguments, destination: told.append((command, arguments))
        )
    )
    missing = "/mnt/share/mango: the campaign's dataset is not on this worker's host"

    def body(ctx: UnitContext) -> Outcome:
        raise DatasetElsewhereError(missing)

    with pytest.raises(Reject):
        run_unit(delivery, UnitMessage(campaign_id="g-1", unit_key=KEY), body)
    paused = {"queue": "gpu", "boot": base.WORKER_BOOT, "seconds": 60.0}
    assert told == [("orchard_stop_consuming", paused)]
    assert store.get_unit(KEY).state == "QUEUED"
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"{KEY}: {missing}. Handed back to another worker; this worker takes nothing from "
        "queue gpu for 60 s"
    ]
    with pytest.raises(DatasetElsewhereError):
        run_unit(delivery, UnitMessage(campaign_id="g-1", unit_key=KEY), body)
    unit = store.get_unit(KEY)
    assert (unit.state, unit.attempts) == ("FAILED", 2) and missing in unit.error


def _another_campaign_with_its_manifest(
    store: Store, cid: str, artifacts: Path | None, *, ran: bool = True
) -> None:
    """Campaign ``cid`` recorded with a manifest, written in ``artifacts`` (None: not
    written anywhere this worker sees); ``ran``: a unit of it succeeded (a worker found
    its manifest)."""
    from db.store import Artifact
    from tests.db.test_store import deliver

    rel = f"campaigns/{cid}/manifest.json"
    store.create_campaign(
        cid, name="o", source="o.toml", digest=cid, spec={}, classes=["A"],
        units=[UnitPlan(f"{cid}/report", "report", 3, None, {}, "r")],
        artifacts=[Artifact(rel, "manifest", "0" * 64, 2, cid)],
    )  # fmt: skip
    if ran:
        deliver(store, f"{cid}/report", worker="w", task_id=f"t-{cid}", holder=f"h-{cid}")
        store.finish_unit(f"{cid}/report", Outcome(0.01), holder=f"h-{cid}")
    if artifacts is not None:
        (artifacts / rel).parent.mkdir(parents=True)
        (artifacts / rel).write_text("{}")


@pytest.mark.parametrize("queue", ["cpu", "gpu"])
def test_a_manifest_missing_from_the_folder_of_the_other_campaigns_fails_its_unit_alone(
    store: Store,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    queue: str,
) -> None:
    """The worker's folder holds the other campaigns' manifests but not this one's: the
    folder is the shared one, and this manifest is missing everywhere (its folder
    removed by hand, a submitter with another ORCHARD_ARTIFACTS). The worker keeps its
    queue, for the other campaigns (one such campaign used to stop every worker that
    took one of its units); the hand-backs count, so the unit ends FAILED."""
    from celery.exceptions import Reject

    from db.store import Artifact
    from workers.data import ManifestGoneError

    monkeypatch.setenv("ORCHARD_MAX_ATTEMPTS", "2")
    artifacts = tmp_path / "artifacts"
    _another_campaign_with_its_manifest(store, "o-1", artifacts)
    _another_campaign_with_its_manifest(store, "o-2", artifacts)
    _another_campaign_with_its_manifest(store, "o-3", None)  # a submitter's elsewhere
    store.record_artifact(Artifact("campaigns/g-1/manifest.json", "manifest", "0" * 64, 2, "g-1"))
    told: list[tuple] = []
    delivery = OneDelivery()
    delivery.request.delivery_info = {"routing_key": queue}
    delivery.app = SimpleNamespace(
        control=SimpleNamespace(broadcast=lambda *args, **kwargs: told.append(args))
    )

    def body(ctx: UnitContext) -> Outcome:
        ctx.manifest()
        raise AssertionError("ran without its manifest")

    with pytest.raises(Reject) as rejected:
        run_unit(delivery, UnitMessage(campaign_id="g-1", unit_key=KEY), body)
    assert rejected.value.requeue is True and told == []
    unit = store.get_unit(KEY)
    assert (unit.state, unit.attempts, unit.error) == ("QUEUED", 1, None)
    [error] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    missing = artifacts / "campaigns" / "g-1" / "manifest.json"
    said = (
        f"{missing}: the campaign's manifest is not there, though this folder "
        "(ORCHARD_ARTIFACTS) holds the other campaigns': its folder was removed, or it "
        "was submitted with another ORCHARD_ARTIFACTS"
    )
    assert error == f"{KEY}: {said}. Handed back to another worker"
    with pytest.raises(ManifestGoneError):
        run_unit(delivery, UnitMessage(campaign_id="g-1", unit_key=KEY), body)
    unit = store.get_unit(KEY)
    assert (unit.state, unit.attempts) == ("FAILED", 2) and said in unit.error
    assert told == []


@pytest.mark.parametrize("others", [0, 1])
def test_a_unit_whose_artifact_folder_vanished_as_it_ran_records_nothing(
    store: Store, caplog: pytest.LogCaptureFixture, tmp_path: Path, others: int
) -> None:
    """The share unmounted (or the folder removed) while a fold trained: its checkpoints
    and model went to folders made anew where the share was, a local disk no other
    host sees, and the unit was recorded SUCCESS. The manifest it read is gone when it
    ends: it is handed back, its result not recorded; the other campaigns' manifests
    tell whether the folder is this worker's fault (it stops taking from the queue)."""
    from celery.exceptions import Reject

    from db.store import Artifact
    from shared.artifacts import atomic_write_text
    from shared.manifest import Manifest

    artifacts = tmp_path / "artifacts"
    written = atomic_write_text(
        artifacts / "campaigns" / "g-1" / "manifest.json",
        Manifest(("A",), (), "f" * 64, "k" * 20, 32, 8).to_json(),
    )
    store.record_artifact(
        Artifact("campaigns/g-1/manifest.json", "manifest", written.sha256, written.size, "g-1")
    )
    for n in range(others):
        _another_campaign_with_its_manifest(store, f"o-{n}", artifacts)
    told: list[tuple] = []
    delivery = OneDelivery()
    delivery.request.delivery_info = {"routing_key": "gpu"}
    delivery.app = SimpleNamespace(
        control=SimpleNamespace(broadcast=lambda *args, **kwargs: told.append(args))
    )

    def body(ctx: UnitContext) -> Outcome:
        assert ctx.manifest().classes == ("A",)
        written.path.unlink()  # the folder goes, as the fold trains
        model = ctx.campaign_dir / "models" / "m.pt"  # made anew: on the wrong disk
        model.parent.mkdir(parents=True)
        model.write_bytes(b"weights")
        return Outcome(0.01, val_acc=1.0, predictions={"val": [Prediction("a", 0, 0)]})

    with pytest.raises(Reject):
        run_unit(delivery, UnitMessage(campaign_id="g-1", unit_key=KEY), body)
    unit = store.get_unit(KEY)
    assert unit.state == "QUEUED" and store.results("g-1") == {}
    [error] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert f"{written.path}: the campaign's manifest is not there" in error
    # no other campaign's manifest here either: the folder is taken for this worker's
    # fault, which stops taking folds; with one, the manifest alone is gone
    assert (told != []) == (others == 0)
    assert unit.attempts == others


def test_a_folder_holding_few_of_the_other_campaigns_manifests_is_not_the_shared_one(
    store: Store, tmp_path: Path
) -> None:
    """The newest other campaigns tell, by majority: a stale folder holding one old
    manifest is not taken for the shared folder; nor is one where none tells."""
    from workers.data import WITNESSES, holds_other_manifests

    artifacts = tmp_path / "artifacts"
    assert not holds_other_manifests(store, artifacts, {"g-1"})  # no other campaign
    _another_campaign_with_its_manifest(store, "o-0", artifacts)  # the oldest
    assert holds_other_manifests(store, artifacts, {"g-1"})
    assert not holds_other_manifests(store, artifacts, {"g-1", "o-0"})
    for n in range(1, WITNESSES + 1):
        _another_campaign_with_its_manifest(store, f"o-{n}", None)
    # o-0 is no longer among the newest WITNESSES: none of them is here
    assert not holds_other_manifests(store, artifacts, {"g-1"})
    (artifacts / "campaigns" / "o-5").mkdir(parents=True)
    (artifacts / "campaigns" / "o-5" / "manifest.json").write_text("{}")
    assert not holds_other_manifests(store, artifacts, {"g-1"})  # 1 of 5


def test_campaigns_no_worker_ran_do_not_witness_against_the_shared_folder(
    store: Store, tmp_path: Path
) -> None:
    """A user whose ORCHARD_ARTIFACTS is another folder submits again and again: none of
    those campaigns ever runs a unit. Counted, they outnumbered the campaigns the right
    folder holds, and every right worker that met one of their units stopped taking
    from its queue. Only campaigns some worker ran a unit of tell."""
    from workers.data import WITNESSES, holds_other_manifests

    artifacts = tmp_path / "artifacts"
    _another_campaign_with_its_manifest(store, "o-0", artifacts)
    for n in range(1, WITNESSES + 2):
        _another_campaign_with_its_manifest(store, f"bad-{n}", None, ran=False)
    assert holds_other_manifests(store, artifacts, {"bad-1"})
    assert not holds_other_manifests(store, tmp_path / "elsewhere", {"bad-1"})


def test_stop_consuming_reaches_the_worker_of_its_boot_alone() -> None:
    """Two workers of one node name (a host configured as another) both get a broadcast
    to that name: only the one whose unit asked stops consuming the queue."""
    calls: list[tuple] = []
    consumer = SimpleNamespace(
        call_soon=lambda *call: calls.append(call), cancel_task_queue="cancel_task_queue"
    )
    state = SimpleNamespace(consumer=consumer)
    reply = base.orchard_stop_consuming(state, queue="preprocess", boot="0" * 8)
    assert calls == [] and reply == {"ok": "not this worker: preprocess still consumed"}
    reply = base.orchard_stop_consuming(state, queue="preprocess", boot=base.WORKER_BOOT)
    assert calls == [("cancel_task_queue", "preprocess")]
    assert reply == {"ok": "no longer consuming from preprocess"}


def test_a_pause_consumes_from_the_queue_again_unless_stopped_for_good_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pause a GPU worker without a campaign's dataset takes: Celery's own timer
    and consumer calls, in the order a worker's loop makes them."""
    from kombu.asynchronous.timer import Timer

    monkeypatch.setattr(base, "_stopped_queues", set())
    consuming = {"gpu": object()}
    pending: list = []
    timer = Timer()

    class Consumer:
        app = SimpleNamespace(amqp=SimpleNamespace(queues=SimpleNamespace(consume_from=consuming)))

        def __init__(self) -> None:
            self.timer = timer

        def call_soon(self, fun, *args) -> None:  # noqa: ANN001 - Celery's signature
            pending.append((fun, args))

        def cancel_task_queue(self, queue: str) -> None:
            consuming.pop(queue, None)  # as Celery, a queue not consumed too

        def add_task_queue(self, queue: str) -> None:
            consuming[queue] = object()

    def run_pending() -> None:
        while pending:
            fun, args = pending.pop(0)
            fun(*args)

    def fire_timer() -> None:
        for due in list(timer.queue):
            due.entry()
        timer.clear()

    state = SimpleNamespace(consumer=Consumer())
    reply = base.orchard_stop_consuming(state, "gpu", base.WORKER_BOOT, seconds=60.0)
    assert reply == {"ok": "not consuming from gpu for 60 s"}
    run_pending()
    assert "gpu" not in consuming
    [due] = timer.queue  # in a minute
    assert 59 < due.eta - time.monotonic() <= 60
    fire_timer()
    run_pending()
    assert "gpu" in consuming  # taken up again

    base.orchard_stop_consuming(state, "gpu", base.WORKER_BOOT, seconds=60.0)
    run_pending()
    base.orchard_stop_consuming(state, "gpu", base.WORKER_BOOT)  # for good: another error
    run_pending()
    fire_timer()
    run_pending()
    assert "gpu" not in consuming


def test_a_database_away_mid_unit_hands_the_unit_back_counting_the_attempt(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """A store call of the body outlasted the store's retries (a failover): not the
    unit's failure. The database answers again by the hand-back: the unit is QUEUED for
    another delivery, the message requeued, and the attempt counted, so that a unit
    meeting such an error every time still ends after ORCHARD_MAX_ATTEMPTS."""
    from celery.exceptions import Reject

    from db.store import StoreUnreachableError

    def body(ctx: UnitContext) -> Outcome:
        raise StoreUnreachableError("database x unreachable: gone (gave up after 5 s)")

    with pytest.raises(Reject) as rejected:
        run_unit(OneDelivery(), UnitMessage(campaign_id="g-1", unit_key=KEY), body)
    assert rejected.value.requeue is True
    unit = store.get_unit(KEY)
    assert unit.state == "QUEUED" and unit.attempts == 1 and unit.error is None
    assert f"{KEY} handed back: the database was away; it runs again" in caplog.text
    assert "failed after" not in caplog.text


def test_a_result_the_database_could_not_take_is_offered_again_not_run_again(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The body's work is done; the database is away as its result is recorded. The
    result is offered again, for as long as it is away, rather than the body run again:
    offered for a lease period only (60 s), a longer failover threw it away. Said once
    a minute, not at every offer."""
    from db.store import StoreUnreachableError

    clock = [0.0]
    monkeypatch.setattr(base.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    monkeypatch.setattr(base.time, "monotonic", lambda: clock[0])
    runs: list[int] = []
    finish = store.finish_unit
    refusals = iter([True] * 30)  # 150 s of offers, each 5 s apart

    def away_twice(key: str, outcome: Outcome, *, holder: str | None = None) -> bool:
        if next(refusals, False):
            raise StoreUnreachableError("database x unreachable: gone (gave up after 5 s)")
        return finish(key, outcome, holder=holder)

    def body(ctx: UnitContext) -> Outcome:
        runs.append(1)
        return Outcome(0.01, val_acc=1.0)

    monkeypatch.setattr(store, "finish_unit", away_twice)
    answer = run_unit(OneDelivery(), UnitMessage(campaign_id="g-1", unit_key=KEY), body)
    assert answer == {"unit": KEY, "state": "SUCCESS", "recorded": True}
    assert runs == [1] and store.get_unit(KEY).state == "SUCCESS"
    assert caplog.text.count(f"{KEY} finished, but the database is away") == 3


def test_a_prefork_child_offers_its_result_for_five_lease_periods(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prefork child does not hear of its worker's warm shutdown (Celery tells the main
    process alone), which waits for it: its offer ends after CHILD_OFFER_LEASES lease
    periods, and the unit is handed back."""
    from db.store import StoreUnreachableError

    clock = [0.0]
    monkeypatch.setattr(base.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    monkeypatch.setattr(base.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(base, "_MAIN_PID", -1)  # this process is a child of the worker's
    offers: list[float] = []

    def away(key: str, outcome: Outcome, *, holder: str | None = None) -> bool:
        offers.append(clock[0])
        raise StoreUnreachableError("database x unreachable: gone (gave up after 5 s)")

    monkeypatch.setattr(store, "finish_unit", away)
    with pytest.raises(Exception) as raised:  # noqa: PT011 - Reject, Celery's
        run_unit(
            OneDelivery(),
            UnitMessage(campaign_id="g-1", unit_key=KEY),
            lambda ctx: Outcome(0.01, val_acc=1.0),
        )
    assert type(raised.value).__name__ == "Reject"
    lease = base.reliability().lease_seconds
    assert offers[-1] >= base.CHILD_OFFER_LEASES * lease > offers[-2]
    assert store.get_unit(KEY).state == "QUEUED"


def test_a_worker_stopping_gives_up_offering_its_result(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Its warm shutdown does not wait for a database that is away: the offer ends, and
    the unit is handed back for the next delivery."""
    from db.store import StoreUnreachableError

    monkeypatch.setattr(base.time, "sleep", lambda _s: base._worker_stopping.set())
    offers: list[int] = []

    def away(key: str, outcome: Outcome, *, holder: str | None = None) -> bool:
        offers.append(1)
        raise StoreUnreachableError("database x unreachable: gone (gave up after 5 s)")

    monkeypatch.setattr(store, "finish_unit", away)
    try:
        with pytest.raises(Exception) as raised:  # noqa: PT011 - Reject, Celery's
            run_unit(
                OneDelivery(),
                UnitMessage(campaign_id="g-1", unit_key=KEY),
                lambda ctx: Outcome(0.01, val_acc=1.0),
            )
    finally:
        base._worker_stopping.clear()
    assert type(raised.value).__name__ == "Reject" and len(offers) == 2
    assert store.get_unit(KEY).state == "QUEUED"


class Retried(Exception):
    """What ``OneDeliveryRetried.retry`` raises: the retry Celery would schedule."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        super().__init__(kwargs)
        self.kwargs = kwargs


class OneDeliveryRetried(OneDelivery):
    def retry(self, **kwargs: Any) -> Exception:
        raise Retried(kwargs)


def test_a_failure_the_database_cannot_record_leaves_the_unit_to_a_later_delivery(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The body failed, and the store cannot take even that: the unit is not left
    RUNNING for ever nor counted done. The message comes back once the lease has run
    out, with the body's error, and that delivery takes the unit over (its attempt
    counted), so a unit whose failure can never be written still ends."""
    from db.store import StoreError

    def cannot_record(key: str, error: str, *, holder: str | None = None) -> bool:
        raise StoreError("database x unreachable: gone (gave up after 5 s)")

    def body(ctx: UnitContext) -> Outcome:
        raise ValueError("the grid point is bad")

    monkeypatch.setattr(store, "fail_unit", cannot_record)
    monkeypatch.setenv("ORCHARD_LEASE_SECONDS", "0.5")
    with pytest.raises(Retried) as retried:
        run_unit(OneDeliveryRetried(), UnitMessage(campaign_id="g-1", unit_key=KEY), body)
    assert retried.value.kwargs["countdown"] == pytest.approx(1.5)
    assert isinstance(retried.value.kwargs["exc"], ValueError)
    assert f"{KEY}: failure not recorded, the store did not take it" in caplog.text
    unit = store.get_unit(KEY)
    assert unit.state == "RUNNING" and unit.attempts == 1  # its lease runs out by itself

    time.sleep(0.6)
    # the retried message, once the lease has run out: a takeover, the second attempt
    runs: list[int] = []

    def second(ctx: UnitContext) -> Outcome:
        runs.append(1)
        return Outcome(0.5, val_acc=0.5)

    answer = run_unit(OneDelivery(), UnitMessage(campaign_id="g-1", unit_key=KEY), second)
    assert answer["state"] == "SUCCESS" and runs == [1]
    assert store.get_unit(KEY).attempts == 2


def test_a_last_attempt_whose_lease_just_ran_out_is_waited_for_not_failed(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ORCHARD_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("ORCHARD_LEASE_SECONDS", "30")
    store.start_unit(KEY, worker="w1", task_id="t", holder="d1", lease_seconds=0.01)
    time.sleep(0.05)  # its lease ran out; the last attempt's grace (30 s) has not

    def body(ctx: UnitContext) -> Outcome:
        raise AssertionError("not to run: the unit is its last attempt's for 30 s more")

    with pytest.raises(Retried) as retried:
        run_unit(OneDeliveryRetried(), UnitMessage(campaign_id="g-1", unit_key=KEY), body)
    assert 25 < retried.value.kwargs["countdown"] <= 31
    assert store.get_unit(KEY).state == "RUNNING"
    assert f"{KEY}: the lease of its last attempt ran out; its worker has" in caplog.text


def test_what_a_unit_raises_as_its_worker_stops_hands_it_back_not_fails_it(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Ctrl-C twice: Celery's cold shutdown raises inside a solo pool's running unit
    (``NotImplementedError``: the solo pool has no kill_job). The fold was FAILED for
    good, its attempt counted; it is the worker that stopped, not the unit."""
    import threading

    from celery.exceptions import Reject

    stopping = threading.Event()
    monkeypatch.setattr(base, "_worker_stopping", stopping)

    def body(ctx: UnitContext) -> Outcome:
        stopping.set()  # the first Ctrl-C
        raise NotImplementedError(
            "<class 'celery.concurrency.solo.TaskPool'> does not implement kill_job"
        )

    with pytest.raises(Reject) as rejected:
        run_unit(OneDelivery(), UnitMessage(campaign_id="g-1", unit_key=KEY), body)
    assert rejected.value.requeue is True
    unit = store.get_unit(KEY)
    assert (unit.state, unit.attempts, unit.error) == ("QUEUED", 0, None)
    assert f"{KEY} stopped with its worker: NotImplementedError" in caplog.text
    assert "failed after" not in caplog.text


def test_confirming_the_lease_renews_it_and_stops_a_run_that_lost_it(store: Store) -> None:
    """What a run asks before a step it cannot undo (the report's files moved into
    place): held, the lease is renewed for a whole period; taken over, it stops."""
    from workers.config import Reliability

    store.start_unit(KEY, worker="w1", task_id="t", holder="d1", lease_seconds=0.05)
    rules = Reliability(lease_seconds=30, max_attempts=3, visibility_timeout=60)
    heartbeat = Heartbeat(store, KEY, "d1", rules)
    ctx = UnitContext(
        store.get_campaign("g-1"), store.get_unit(KEY), store, None, heartbeat=heartbeat
    )  # type: ignore[arg-type]
    ctx.confirm_lease()
    expires = store.get_unit(KEY).lease_expires_at
    assert (
        expires is not None and (expires - store.get_unit(KEY).heartbeat_at).total_seconds() == 30
    )
    store.hand_back(KEY, "d1")  # a `resume` reset it, or another delivery took it
    with pytest.raises(UnitAborted):
        ctx.confirm_lease()
    assert heartbeat.lost == "lost"


def test_a_store_at_an_older_schema_keeps_the_message_and_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker started without `orchard worker`'s check, on a store not yet upgraded:
    not "unreachable"; the message is kept (retried) until the schema matches, and the
    line that says why is an error once, not at every retry."""
    from db import migrate
    from shared.settings import mask_url

    old = Store(f"sqlite:///{tmp_path / 'old.db'}")
    migrate.upgrade(old.engine, "0003")

    def opened() -> Store:
        old.check_schema()
        return old

    class Retried(Exception):
        pass

    delivery = OneDelivery()
    delivery.retry = lambda **kwargs: Retried(kwargs)  # type: ignore[method-assign]
    monkeypatch.setattr(base, "worker_store", opened)
    monkeypatch.setattr(base, "worker_settings", lambda: None)
    monkeypatch.setattr(base, "_schema_told", set())
    caplog.set_level("DEBUG", logger=base.log.name)
    for _ in range(3):
        with pytest.raises(Retried):
            run_unit(delivery, UnitMessage(campaign_id="g-1", unit_key=KEY), lambda ctx: None)
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == base.log.name]
    line = (
        f"database {mask_url(old.url)} is at schema 0003, expected "
        f"{migrate.head_revision()}: run `orchard db upgrade`"
    )
    assert said[0] == ("ERROR", f"{KEY}: {line}; its units wait until then (said once)")
    assert [level for level, _ in said[1:]] == ["DEBUG", "DEBUG"]
    assert all("unreachable" not in text for _, text in said)
    old.dispose()


def test_a_store_migrated_under_a_running_worker_stops_its_units_within_the_recheck(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`orchard db upgrade` by a newer orchard while an older worker runs on (its host
    not yet updated): the store's schema is read again before a unit once
    SCHEMA_RECHECK_SECONDS have passed, so its units stop there, their messages kept,
    instead of running old code against the new schema for as long as it lives."""
    from sqlalchemy import text

    class Retried(Exception):
        pass

    monkeypatch.setattr(base, "worker_store", checked_worker_store)
    monkeypatch.setattr(base, "_store", lambda pid: store)
    monkeypatch.setattr(base, "_schema_told", set())
    monkeypatch.setattr(base, "_schema_checked_at", time.monotonic())  # opened just now
    delivery = OneDelivery()
    delivery.retry = lambda **kwargs: Retried(kwargs)  # type: ignore[method-assign]
    ran: list[str] = []

    def body(ctx: UnitContext) -> Outcome:
        ran.append(ctx.unit.key)
        return Outcome(0.01, val_acc=1.0)

    run_unit(delivery, UnitMessage(campaign_id="g-1", unit_key=KEY), body)
    with store.engine.begin() as conn:  # a newer orchard's migration
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    monkeypatch.setattr(base, "_schema_checked_at", time.monotonic() - base.SCHEMA_RECHECK_SECONDS)
    other = "g-1/svm/p1/f0"
    with pytest.raises(Retried):
        run_unit(delivery, UnitMessage(campaign_id="g-1", unit_key=other), body)
    assert ran == [KEY]
    unit = store.get_unit(other)
    assert (unit.state, unit.attempts) == ("QUEUED", 0)
    [said] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert said.startswith(f"{other}: database ") and "is at schema 0099, newer than this" in said


def test_a_campaign_of_a_newer_format_waits_for_an_updated_worker(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A campaign submitted by a newer orchard, met by this worker (its host not yet
    updated, on a store at the same schema): none of its units runs here, each message
    is kept (retried, backing off), and the worker says why once."""
    from sqlalchemy import text

    from shared.spec import CAMPAIGN_FORMAT

    class Retried(Exception):
        pass

    with store.engine.begin() as conn:
        conn.execute(text("UPDATE campaigns SET format_version = :v"), {"v": CAMPAIGN_FORMAT + 1})
    monkeypatch.setattr(base, "_schema_told", set())
    caplog.set_level("DEBUG", logger=base.log.name)
    delivery = OneDelivery()
    countdowns: list[float] = []

    def retry(**kwargs: Any) -> Exception:
        countdowns.append(kwargs["countdown"])
        return Retried()

    delivery.retry = retry  # type: ignore[method-assign]
    for retries in range(3):
        delivery.request.retries = retries
        with pytest.raises(Retried):
            run_unit(delivery, UnitMessage(campaign_id="g-1", unit_key=KEY), lambda ctx: None)
    assert countdowns == [2, 4, 8]
    unit = store.get_unit(KEY)
    assert (unit.state, unit.attempts, unit.lease_holder) == ("QUEUED", 0, None)
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == base.log.name]
    assert said[0] == (
        "ERROR",
        f"{KEY}: campaign g-1 was submitted by a newer orchard (campaign format "
        f"{CAMPAIGN_FORMAT + 1}; this worker runs format {CAMPAIGN_FORMAT} at most): its units "
        "wait for a worker updated to it; update orchard on this host (said once)",
    )
    assert [level for level, _ in said[1:]] == ["DEBUG", "DEBUG"]


def test_the_newest_schema_is_the_one_the_code_started_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's host updated under it (git pull, pip install): its migrations folder
    now holds a newer revision, but the code that runs is the old one, and must go on
    taking the old revision for the newest."""
    import shutil

    from db import migrate

    before = migrate.head_revision()
    newer = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS, newer)
    (newer / "versions" / "9999_newer.py").write_text(
        f'revision = "9999"\ndown_revision = "{before}"\nbranch_labels = None\n'
        "depends_on = None\n\n\ndef upgrade():\n    pass\n\n\ndef downgrade():\n    pass\n"
    )
    monkeypatch.setattr(migrate, "MIGRATIONS", newer)
    assert migrate.head_revision() == before and "9999" not in migrate.known_revisions()
    migrate.head_revision.cache_clear()
    migrate.known_revisions.cache_clear()
    try:  # read afresh (a new process): the folder's newest
        assert migrate.head_revision() == "9999" and "9999" in migrate.known_revisions()
    finally:
        migrate.head_revision.cache_clear()
        migrate.known_revisions.cache_clear()
        monkeypatch.undo()
        assert migrate.head_revision() == before


@pytest.mark.parametrize(
    ("exc", "recorded"),
    [
        # matplotlib's mathtext errors start with a newline: only "ValueError: " was kept
        (
            ValueError("\n\\frac{1}{\n     ^\nParseSyntaxException: Expected"),
            "ValueError: \\frac{1}{",
        ),
        (ValueError("  \n\t\n  bad value  \nmore"), "ValueError: bad value"),
        (RuntimeError("one line"), "RuntimeError: one line"),
        (KeyError("k"), "KeyError: 'k'"),
        (ValueError(""), "ValueError"),
        (ValueError("\n \n"), "ValueError"),
        (OSError("\n\x1b[2J cleared"), "OSError: \\x1b[2J cleared"),
    ],
)
def test_a_failure_records_the_first_line_that_says_something(
    exc: BaseException, recorded: str
) -> None:
    assert base._one_line(exc) == recorded


def test_a_unit_out_of_memory_fails_without_ending_its_worker(store: Store) -> None:
    """A MemoryError (an allocation refused: a memory limit, a file read whole) is the
    unit's failure, recorded; Celery would raise a task's MemoryError again and end the
    worker (a solo pool's whole GPU worker), so the task raises another error."""

    def body(ctx: UnitContext) -> Outcome:
        raise MemoryError()

    with pytest.raises(Exception) as raised:
        run_unit(OneDelivery(), UnitMessage(campaign_id="g-1", unit_key=KEY), body)
    assert not isinstance(raised.value, MemoryError)
    assert str(raised.value) == f"{KEY}: MemoryError"
    unit = store.get_unit(KEY)
    assert (unit.state, unit.error) == ("FAILED", "MemoryError")


def test_a_failure_s_recorded_error_stays_one_short_line() -> None:
    line = base._one_line(ValueError("\r\n" + "x" * 5000 + "\nsecond"))
    assert line.startswith("ValueError: xxx") and "\n" not in line and "\r" not in line
    assert len(line) == 2000


def test_a_dead_child_s_lease_release_does_not_hold_the_event_loop_for_a_slow_store(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """It runs on the worker's event loop, where a store that takes its time (retries
    for a minute) would stall every other message: the loop goes on after a short wait,
    and the release still happens when the store answers."""
    import threading

    answer, released = threading.Event(), threading.Event()

    class SlowStore:
        def release_leases_of(self, prefix: str) -> int:
            assert prefix == f"cpu@h/{base.WORKER_BOOT}/4242/"
            answer.wait(60)
            released.set()
            return 1

    monkeypatch.setattr(base, "worker_store", SlowStore)
    monkeypatch.setattr(base, "RELEASE_WAIT_SECONDS", 0.05)
    base._release_leases_of_dead_child("cpu@h", 4242, "c-1/rf/ab/f0: signal 9 (SIGKILL)")
    assert not released.is_set()  # returned while the store had not answered
    assert (
        "child 4242 was lost mid-unit (c-1/rf/ab/f0: signal 9 (SIGKILL)); the store is slow "
        "to release its lease" in caplog.text
    )
    answer.set()
    assert released.wait(60)


def test_a_next_stage_the_broker_cannot_take_is_retried_the_unit_kept_done(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The last unit of a stage finished and was recorded; opening the next stage fails
    (the broker away). The unit stays SUCCESS, the report unit goes back to PENDING,
    and the message is retried: its next delivery finds the unit done and opens the
    stage then."""

    class Retried(Exception):
        pass

    from scheduler import canvas
    from workers.app import make_app

    def broker_away(_signatures: Any) -> Any:
        raise ConnectionError("broker away")  # as a publish whose retries ran out

    monkeypatch.setattr(canvas, "group", broker_away)
    settings = Settings(
        home=tmp_path / "home",
        broker_url=f"filesystem://{tmp_path / 'broker'}",
        database_url=store.url,
        artifacts=tmp_path / "artifacts",
    )

    class BrokerAway(OneDelivery):
        def __init__(self) -> None:
            super().__init__()
            self.app = make_app(settings, with_tasks=False)
            self.retries: list[dict[str, Any]] = []

        def retry(self, **kwargs: Any) -> Exception:
            self.retries.append(kwargs)
            return Retried()

    def body(ctx: UnitContext) -> Outcome:
        return Outcome(0.01, val_acc=1.0)

    run_unit(OneDelivery(), UnitMessage(campaign_id="g-1", unit_key=KEY), body)  # stage open
    delivery = BrokerAway()
    with pytest.raises(Retried):
        run_unit(delivery, UnitMessage(campaign_id="g-1", unit_key="g-1/svm/p1/f0"), body)
    assert [(r["countdown"], type(r["exc"])) for r in delivery.retries] == [(5, ConnectionError)]
    assert store.get_unit("g-1/svm/p1/f0").state == "SUCCESS"
    assert store.get_unit("g-1/report").state == "PENDING"  # unclaimed: sent by the retry
    assert "g-1: could not open the next stage, will retry: broker away" in caplog.text


def test_a_retry_s_eta_from_a_clock_far_ahead_is_due_within_the_longest_countdown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Celery sends a countdown as a time of the sender's clock, kept by the receiver's:
    from a host ten minutes ahead, a 5 s retry (and the worker slot it keeps) waited ten
    minutes. Its due time is capped at the longest countdown orchard asks for, by this
    worker's clock; nearer ones, and none, are as sent."""
    from datetime import UTC, datetime, timedelta

    from celery.contrib.testing.mocks import TaskMessage

    import workers.tasks.preprocess  # noqa: F401 - registers the task
    from workers.app import app

    monkeypatch.setenv("ORCHARD_LEASE_SECONDS", "90")
    name = "orchard.preprocess_shard"

    def request(eta: datetime | None) -> base.UnitRequest:
        message = TaskMessage(
            name, id="t", kwargs={"campaign_id": "g-1", "unit_key": KEY},
            eta=eta.isoformat() if eta else None,
        )  # fmt: skip
        return base.UnitRequest(message, app=app, task=app.tasks[name])

    assert base.latest_eta_seconds() == 91 + base.ETA_SLACK_SECONDS
    now = datetime.now(UTC)
    far = request(now + timedelta(minutes=10)).eta
    assert far is not None
    assert timedelta(seconds=95) <= far - now <= timedelta(seconds=97)
    near = now + timedelta(seconds=5)
    assert request(near).eta == near
    assert request(None).eta is None


def test_a_kept_message_comes_back_within_half_the_visibility_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A message kept for later (the store unusable) came back after up to 60 s. Redis
    hands a message held longer than its visibility timeout out again while its holder
    still fires it: under a timeout of 30 s the kept messages multiplied, one more each
    round (3, 7, 9, … in a queue), for as long as the store stayed unusable."""
    from types import SimpleNamespace

    def countdowns() -> list[float]:
        return [
            base._backoff(SimpleNamespace(request=SimpleNamespace(retries=n))) for n in range(8)
        ]

    assert countdowns() == [2, 4, 8, 16, 32, 60, 60, 60]  # the default timeout: 12 h
    monkeypatch.setenv("ORCHARD_VISIBILITY_TIMEOUT", "30")
    monkeypatch.setenv("ORCHARD_LEASE_SECONDS", "10")
    assert countdowns() == [2, 4, 8, 15, 15, 15, 15, 15]
