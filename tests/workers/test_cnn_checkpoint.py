"""orchard.train_cnn_fold's per-epoch checkpoints: written, recorded, verified, resumed.

The task body runs against a real SQLite store and real cache shards on disk; a
"kill" is an exception raised right after a checkpoint was written and recorded, or
between its file and its record.
"""

from __future__ import annotations

import io
import logging
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from db.store import Outcome, Store
from shared.artifacts import atomic_write_bytes, sha256_file
from shared.manifest import Manifest
from shared.plan import TRAIN
from shared.settings import Settings
from tests.db.test_store import deliver
from workers.config import Reliability
from workers.lease import GuardedStore, Heartbeat, UnitAborted
from workers.tasks import base
from workers.tasks import cnn as cnn_task
from workers.tasks.base import LEASE_CANCELLED, WORKER_STOPPING, UnitContext

CAMPAIGN_ID = "k-1"
EPOCHS = 3


class Killed(Exception):
    """Stands in for SIGKILL between two epochs."""


@pytest.fixture
def env(cached_campaign) -> tuple[Store, Settings, Manifest]:  # noqa: ANN001
    return cached_campaign(
        CAMPAIGN_ID,
        {
            "cnn": {
                "folds": 1,
                "epochs": EPOCHS,
                "batch_size": 8,
                "width": 0.125,
                "image_size": 32,
                "dropout": 0.3,
            },
        },
    )


def _context(env) -> UnitContext:
    store, settings, manifest = env
    (unit,) = [u for u in store.units(CAMPAIGN_ID) if u.stage == TRAIN and u.family == "cnn"]
    return UnitContext(store.get_campaign(CAMPAIGN_ID), unit, store, settings, _manifest=manifest)


def _run(env) -> Outcome:
    return cnn_task.train_cnn_fold.run.__wrapped__(_context(env))


def _slot(env, epochs_done: int) -> tuple[Path, str]:
    """The file (and its relative path) of the checkpoint after ``epochs_done`` epochs."""
    ctx = _context(env)
    path = cnn_task.checkpoint_path(
        ctx.campaign_dir, ctx.unit.params_hash, ctx.unit.fold, epochs_done
    )
    return path, ctx.relative(path)


def _slots(env) -> list[tuple[Path, str]]:
    return [_slot(env, epochs_done) for epochs_done in range(cnn_task.CHECKPOINT_SLOTS)]


def _kill_after(monkeypatch: pytest.MonkeyPatch, epochs: int) -> None:
    """Let ``epochs`` checkpoints be written and recorded, then die."""
    real = cnn_task.write_checkpoint
    written: list[int] = []

    def write_then_maybe_die(*args, **kwargs):
        result = real(*args, **kwargs)
        written.append(1)
        if len(written) == epochs:
            raise Killed
        return result

    monkeypatch.setattr(cnn_task, "write_checkpoint", write_then_maybe_die)


def _kill_inside_write(monkeypatch: pytest.MonkeyPatch, epochs_done: int) -> None:
    """Die after the checkpoint of ``epochs_done`` epochs replaced its file and before
    its checksum was recorded."""
    real = cnn_task.write_checkpoint

    def write_but_die_before_recording(store, path, relative, checkpoint, **kwargs):
        if checkpoint["epochs_done"] == epochs_done:
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            atomic_write_bytes(path, buffer.getvalue())
            raise Killed
        return real(store, path, relative, checkpoint, **kwargs)

    monkeypatch.setattr(cnn_task, "write_checkpoint", write_but_die_before_recording)


def _probs(outcome: Outcome, split: str) -> list[list[float]]:
    return [p.probs for p in outcome.predictions[split]]


def test_every_epoch_leaves_a_recorded_checkpoint_in_alternating_files(env):
    store, settings, _ = env
    outcome = _run(env)
    assert outcome.extra["resumed_from_epoch"] == 0
    assert outcome.extra["epochs"] == EPOCHS
    import torch  # what a fold's numbers depend on besides the seed (README)

    assert outcome.extra["threads"]["torch"] == torch.get_num_threads()
    ctx = _context(env)
    for epochs_done in (EPOCHS, EPOCHS - 1):  # the last epoch's file and the one before
        path, rel = _slot(env, epochs_done)
        assert rel.startswith(f"campaigns/{CAMPAIGN_ID}/checkpoints/cnn-")
        assert rel.endswith(f"-f0-s{epochs_done % 2}.pt")
        record = store.find_artifact(rel)
        assert record is not None and record.kind == "checkpoint"
        assert record.sha256 == sha256_file(path) and record.size == path.stat().st_size
        assert record.unit_key == ctx.unit.key
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        assert checkpoint["epochs_done"] == epochs_done
        assert checkpoint["unit_key"] == ctx.unit.key
        assert checkpoint["params"] == ctx.unit.params
    assert len(store.artifacts(CAMPAIGN_ID, kind="checkpoint")) == 2  # two files, rewritten
    # both are scratch: the worker removes them once the fold's result is recorded
    assert sorted(outcome.scratch) == sorted(rel for _, rel in _slots(env))


def test_a_killed_fold_resumes_and_ends_as_an_uninterrupted_one(env, monkeypatch, caplog):
    import shared.cnn

    store, _, _ = env
    _kill_after(monkeypatch, 1)
    train_one_epoch = shared.cnn.train_one_epoch

    def a_slow_first_epoch(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        time.sleep(1.0)
        return train_one_epoch(*args, **kwargs)

    monkeypatch.setattr(shared.cnn, "train_one_epoch", a_slow_first_epoch)
    with pytest.raises(Killed):
        _run(env)
    monkeypatch.undo()
    key = _context(env).unit.key
    with caplog.at_level(logging.INFO):
        resumed = _run(env)
    assert resumed.extra["resumed_from_epoch"] == 1
    assert resumed.extra["epochs"] == EPOCHS
    assert f"resuming {key} from epoch 1" in caplog.text
    # its training time counts the killed delivery's epoch too, not only its own
    assert resumed.fit_seconds >= 1.0
    assert resumed.fit_seconds >= sum(v for _, v in store.metrics(key)["epoch_seconds"])

    # the same unit from scratch: spoil both checkpoints so that neither is used
    for path, _ in _slots(env):
        path.write_bytes(path.read_bytes()[:-10])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fresh = _run(env)
    assert fresh.extra["resumed_from_epoch"] == 0
    assert "does not match its recorded sha256" in caplog.text
    assert f"{key}: no checkpoint can be used; starting from epoch 0" in caplog.text
    assert _probs(resumed, "val") == _probs(fresh, "val")
    assert _probs(resumed, "test") == _probs(fresh, "test")
    assert resumed.train_acc == fresh.train_acc and resumed.val_acc == fresh.val_acc
    # per-epoch metrics: every epoch once, whichever delivery trained it
    assert [step for step, _ in store.metrics(key)["val_acc"]] == [0, 1, 2]


def test_a_kill_between_a_checkpoint_and_its_record_resumes_from_the_epoch_before(
    env, monkeypatch, caplog
):
    store, _, _ = env
    _kill_inside_write(monkeypatch, 3)
    with pytest.raises(Killed):
        _run(env)
    monkeypatch.undo()
    unrecorded, rel = _slot(env, 3)  # its record is still the first epoch's
    assert sha256_file(unrecorded) != store.find_artifact(rel).sha256
    key = _context(env).unit.key
    with caplog.at_level(logging.INFO):
        resumed = _run(env)
    assert resumed.extra["resumed_from_epoch"] == 2
    assert f"checkpoint {rel} does not match its recorded sha256" in caplog.text
    assert f"resuming {key} from epoch 2" in caplog.text
    assert "starting from epoch 0" not in caplog.text

    for path, _ in _slots(env):  # the same fold uninterrupted, for comparison
        path.unlink()
    fresh = _run(env)
    assert fresh.extra["resumed_from_epoch"] == 0
    assert _probs(resumed, "test") == _probs(fresh, "test")
    assert resumed.val_acc == fresh.val_acc


def test_a_checkpoint_write_cut_short_leaves_no_temporary_file_behind(env, caplog):
    """A SIGKILL inside ``atomic_write_bytes`` leaves its ``.<slot>.<random>.tmp``; the
    next delivery of the fold (it holds the lease) removes it, other files stay."""
    path, _ = _slot(env, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / f".{path.name}.k9x2_q.tmp"
    partial.write_bytes(b"half a checkpoint")
    other = path.parent / ".cnn-0123456789ab-f3-s1.pt.k9x2_q.tmp"  # another fold's write
    other.write_bytes(b"")
    with caplog.at_level(logging.INFO):
        _run(env)
    assert not partial.exists() and other.exists()
    assert f"removed {partial.name}, a checkpoint write cut short" in caplog.text


@pytest.mark.parametrize("damage", ["missing", "altered"])
def test_a_checkpoint_that_is_not_the_recorded_one_is_never_used(env, monkeypatch, caplog, damage):
    _kill_after(monkeypatch, 2)
    with pytest.raises(Killed):
        _run(env)
    monkeypatch.undo()

    def spoil(path: Path) -> None:
        if damage == "missing":
            path.unlink()
        else:  # same size, other bytes: only the checksum can tell
            blob = bytearray(path.read_bytes())
            blob[len(blob) // 2] ^= 0xFF
            path.write_bytes(bytes(blob))

    latest, rel = _slot(env, 2)
    spoil(latest)
    with caplog.at_level(logging.WARNING):
        outcome = _run(env)
    assert outcome.extra["resumed_from_epoch"] == 1  # the other file, one epoch older
    assert rel in caplog.text and "not used" in caplog.text

    for path, _ in _slots(env):  # now both, after the run above rewrote them
        spoil(path)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        outcome = _run(env)
    assert outcome.extra["resumed_from_epoch"] == 0
    assert "starting from epoch 0" in caplog.text


def test_a_recorded_checkpoint_of_other_params_is_not_used(env, caplog):
    store, _, _ = env
    _run(env)
    ctx = _context(env)
    for path, rel in _slots(env):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        checkpoint["params"] = {**checkpoint["params"], "lr": 0.5}
        cnn_task.write_checkpoint(
            store, path, rel, checkpoint, campaign_id=CAMPAIGN_ID, unit_key=ctx.unit.key
        )
    with caplog.at_level(logging.WARNING):
        outcome = _run(env)
    assert outcome.extra["resumed_from_epoch"] == 0
    assert "other params (lr)" in caplog.text


def test_a_checkpoint_written_as_the_campaign_is_cancelled_keeps_its_record(env, monkeypatch):
    """`orchard cancel` can land between the checkpoint's file and its record: the
    record still follows the file, so the resumed fold starts from it."""
    store, _, manifest = env
    _kill_after(monkeypatch, 1)
    with pytest.raises(Killed):
        _run(env)
    monkeypatch.undo()
    first, _ = _slot(env, 1)
    checkpoint = torch.load(first, map_location="cpu", weights_only=True)

    def cancelled() -> None:
        raise UnitAborted(LEASE_CANCELLED)

    guarded = GuardedStore(store, cancelled)
    path, rel = _slot(env, 2)
    ctx = _context(env)
    checkpoint["epochs_done"] = 2  # as if the second epoch were done
    cnn_task.write_checkpoint(
        guarded, path, rel, checkpoint, campaign_id=CAMPAIGN_ID, unit_key=ctx.unit.key
    )
    with pytest.raises(UnitAborted):  # the body stops at its next store call
        guarded.record_metrics(ctx.unit.key, 2, {"val_acc": 0.5})
    resume = cnn_task.read_checkpoint(
        store,
        _slots(env),
        unit_key=ctx.unit.key,
        params=ctx.unit.params,
        num_classes=len(manifest.classes),
    )
    assert resume is not None and resume["epochs_done"] == 2


@pytest.mark.parametrize("cancelled_after", [1, EPOCHS])
def test_a_cancel_stops_the_fold_at_its_next_epoch_not_the_heartbeats_next_turn(
    env, monkeypatch, cancelled_after
):
    """`orchard cancel` while a fold trains: the fold asks the store at each epoch's
    checkpoint, so it stops at the next one even when the heartbeat thread would not
    renew for minutes, and records nothing more. Cancelled after its last epoch, it
    writes no model file: the file is the unit's, and a resume may already run the
    unit again, whose file this one would replace with other weights."""
    store, settings, _ = env
    ctx = _context(env)
    key = ctx.unit.key
    assert deliver(store, key, worker="w", task_id="t", holder="d1", lease_seconds=600).run
    rules = Reliability(lease_seconds=600, max_attempts=3, visibility_timeout=3600)
    ctx.heartbeat = Heartbeat(store, key, "d1", rules).start()
    ctx.store = GuardedStore(store, ctx.heartbeat.check)
    real = cnn_task.write_checkpoint

    def write_then_cancel(store_, path, relative, checkpoint, **kwargs):
        written = real(store_, path, relative, checkpoint, **kwargs)
        if checkpoint["epochs_done"] == cancelled_after:
            store.cancel_campaign(CAMPAIGN_ID)
        return written

    monkeypatch.setattr(cnn_task, "write_checkpoint", write_then_cancel)
    try:
        with pytest.raises(UnitAborted) as stopped:
            cnn_task.train_cnn_fold.run.__wrapped__(ctx)
    finally:
        ctx.heartbeat.stop()
    assert stopped.value.reason == LEASE_CANCELLED
    recorded = [step for step, _ in store.metrics(key)["val_acc"]]
    assert recorded == list(range(min(cancelled_after + 1, EPOCHS)))  # no epoch after it ran
    assert store.get_unit(key).state == "CANCELLED" and key not in store.results(CAMPAIGN_ID)
    assert list((settings.artifacts / "campaigns" / CAMPAIGN_ID).glob("models/*")) == []


def _stop_requested_after(monkeypatch: pytest.MonkeyPatch, epochs_done: int) -> None:
    """The worker's SIGTERM arrives while the checkpoint of ``epochs_done`` is written."""
    stopping = threading.Event()
    monkeypatch.setattr(base, "_worker_stopping", stopping)
    real = cnn_task.write_checkpoint

    def write_then_signal(store, path, relative, checkpoint, **kwargs):
        written = real(store, path, relative, checkpoint, **kwargs)
        if checkpoint["epochs_done"] == epochs_done:
            stopping.set()
        return written

    monkeypatch.setattr(cnn_task, "write_checkpoint", write_then_signal)


def test_a_fold_whose_worker_stops_is_handed_back_right_after_a_recorded_checkpoint(
    env, monkeypatch
):
    store, _, _ = env
    _stop_requested_after(monkeypatch, 1)
    with pytest.raises(UnitAborted) as stopped:
        _run(env)
    assert stopped.value.reason == WORKER_STOPPING
    key = _context(env).unit.key
    assert [step for step, _ in store.metrics(key)["val_acc"]] == [0]  # no epoch begun
    path, rel = _slot(env, 1)
    assert store.find_artifact(rel).sha256 == sha256_file(path)
    monkeypatch.undo()
    assert _run(env).extra["resumed_from_epoch"] == 1


def test_a_stop_during_the_last_checkpoint_lets_the_fold_finish(env, monkeypatch):
    _stop_requested_after(monkeypatch, EPOCHS)
    outcome = _run(env)  # nothing left to hand back: evaluating is shorter than resuming
    assert outcome.extra["epochs"] == EPOCHS and outcome.extra["resumed_from_epoch"] == 0


def test_the_network_input_is_the_centre_crop_or_the_whole_image_resized() -> None:
    from shared.variants import derive

    assert cnn_task.cnn_variant(256) == cnn_task.cnn_variant(256, "crop") == "crop224"
    assert cnn_task.cnn_variant(256, "resize") == "resize224"
    assert cnn_task.cnn_variant(64, "resize") == "resize56"
    # the resize keeps the edges the crop cuts away: a border drawn on the cache survives
    cache = np.zeros((1, 256, 256, 3), np.uint8)
    cache[:, :8] = 255
    assert derive(cache, "crop224").max() == 0
    assert derive(cache, "resize224")[:, :6].min() == 255


def test_a_fold_out_of_gpu_memory_fails_saying_what_to_change(env, monkeypatch):
    """torch's OutOfMemoryError in the second epoch: the unit's error is one line with
    torch's words and the setting to lower; the cache is emptied for the next unit."""
    import shared.cnn

    real, epochs, emptied = shared.cnn.train_one_epoch, [], []

    def out_of_memory_in_the_second_epoch(*args, **kwargs):
        epochs.append(1)
        if len(epochs) == 2:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                "of 79.19 GiB of which 1.06 GiB is free.\nIf reserved but unallocated ..."
            )
        return real(*args, **kwargs)

    monkeypatch.setenv("ORCHARD_DEVICE", "cpu")  # on any machine
    monkeypatch.setattr(shared.cnn, "train_one_epoch", out_of_memory_in_the_second_epoch)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    with pytest.raises(torch.OutOfMemoryError) as raised:
        _run(env)
    message = base._one_line(raised.value)
    assert message.startswith(
        "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
        "capacity of 79.19 GiB of which 1.06 GiB is free. If reserved but unallocated ... — "
        "orchard: cpu"  # the device it trained on
    )
    assert ", [cnn] batch_size 8, image_size 32, " in message and "\n" not in message
    # what shared.memory says the fold holds on its device (the CPU here)
    estimate = r"held on the device \(by orchard's estimate, \S+ [\d.]+ GB in all\):"
    assert re.search(estimate, message), message
    assert "submit the campaign again with a smaller [cnn] batch_size" in message
    assert raised.value.__context__ is None and emptied == [1]
    assert len(_slots(env)) == 2 and _slot(env, 1)[0].exists()  # the first epoch's checkpoint
