"""orchard.preprocess_shard's own checks, on a real SQLite store: what a worker refuses
to read, whatever the submitter allowed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from shared.plan import PREPROCESS
from shared.preprocess import PreprocessError
from workers.tasks import preprocess as preprocess_task
from workers.tasks.base import UnitContext


def test_a_worker_reads_no_image_outside_its_dataset_roots(cached_campaign, tmp_path) -> None:  # noqa: ANN001
    store, settings, manifest = cached_campaign("p-1", {"rf": {"n_estimators": 5}})
    for shard in (settings.artifacts / "cache").rglob("*.npy"):
        shard.unlink()  # nothing cached: the shard must be decoded
    allowed = tmp_path / "datasets"
    allowed.mkdir()
    settings = dataclasses.replace(settings, dataset_roots=(allowed.resolve(),))
    unit = next(u for u in store.units("p-1") if u.stage == PREPROCESS)
    context = UnitContext(store.get_campaign("p-1"), unit, store, settings, _manifest=manifest)
    with pytest.raises(PreprocessError) as info:
        preprocess_task.preprocess_shard.run.__wrapped__(context)
    [first] = manifest.image_paths(manifest.entries[:1], settings.artifacts)
    assert str(info.value) == (
        f"{first}: outside this worker's ORCHARD_DATASET_ROOTS ({allowed.resolve()}); not read"
    )
    assert Path(first).is_absolute()


def test_a_worker_without_the_dataset_s_folder_says_it_is_not_on_its_host(
    cached_campaign,  # noqa: ANN001
    tmp_path,  # noqa: ANN001
) -> None:
    """A host that does not mount the data: the shard is not failed as if its images had
    been removed (every shard the worker took would be); the worker's own error, which
    run_unit turns into a hand-back and no more units from the queue."""
    from workers.data import DatasetElsewhereError, NotOnThisHostError

    store, settings, manifest = cached_campaign("p-1", {"rf": {"n_estimators": 5}})
    for shard in (settings.artifacts / "cache").rglob("*.npy"):
        shard.unlink()  # nothing cached: the shard must be decoded
    elsewhere = dataclasses.replace(manifest, root=str(tmp_path / "share" / "mango"))
    unit = next(u for u in store.units("p-1") if u.stage == PREPROCESS)
    context = UnitContext(store.get_campaign("p-1"), unit, store, settings, _manifest=elsewhere)
    with pytest.raises(DatasetElsewhereError) as info:
        preprocess_task.preprocess_shard.run.__wrapped__(context)
    assert isinstance(info.value, NotOnThisHostError)
    assert str(info.value) == (
        f"{tmp_path}/share/mango: the campaign's dataset is not on this worker's host (the "
        "share it is on not mounted here, or the data moved away since the submit)"
    )


def test_two_deliveries_of_a_shard_take_turns_and_the_record_matches_the_file(
    cached_campaign,
    monkeypatch,  # noqa: ANN001
) -> None:
    """Two campaigns over the same images (or two deliveries) decode the same cache
    shard at once; were their bytes to differ (another decoder, another CPU), one's
    rename could win and the other's record. Under the shard's lock the second finds
    the first's shard, recorded, and reuses it: one decode, the file's checksum on
    record."""
    import fcntl
    import threading

    import workers.data
    from workers.data import shard_intact, shard_rel

    store, settings, manifest = cached_campaign("p-2", {"rf": {"n_estimators": 5}})
    for shard in (settings.artifacts / "cache").rglob("*.npy"):
        shard.unlink()  # nothing cached: the shard must be decoded
    unit = next(u for u in store.units("p-2") if u.stage == PREPROCESS)
    decodes: list[int] = []
    lockers: list[int] = []
    second_at_the_lock = threading.Event()

    class Flock:  # fcntl, telling when the second delivery asks for the shard's lock
        LOCK_EX, LOCK_UN = fcntl.LOCK_EX, fcntl.LOCK_UN

        @staticmethod
        def flock(fh, operation):  # noqa: ANN001, ANN205
            if operation == fcntl.LOCK_EX:
                lockers.append(threading.get_ident())
                if len(lockers) == 2:
                    second_at_the_lock.set()
            return fcntl.flock(fh, operation)

    def slow_and_different(paths, size, *_):  # noqa: ANN001, ANN002, ANN202
        decodes.append(len(decodes))
        # the other delivery arrives meanwhile: it waits for this one's lock
        assert second_at_the_lock.wait(30), "the second delivery never asked for the lock"
        return np.full((len(paths), size, size, 3), len(decodes), np.uint8)  # its own bytes

    monkeypatch.setattr(workers.data, "fcntl", Flock)
    monkeypatch.setattr(preprocess_task, "preprocess_images", slow_and_different)
    outcomes = []

    def deliver() -> None:
        context = UnitContext(store.get_campaign("p-2"), unit, store, settings, _manifest=manifest)
        outcomes.append(preprocess_task.preprocess_shard.run.__wrapped__(context))

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert decodes == [0]
    assert len(set(lockers)) == 2  # both deliveries took the lock, one after the other
    assert sorted(o.extra["reused"] for o in outcomes) == [False, True]
    assert shard_intact(store, settings.artifacts, shard_rel(manifest, unit.params["shard"]))


def test_a_whole_shard_is_reused_without_its_lock(cached_campaign, monkeypatch) -> None:  # noqa: ANN001
    """Reusing needs only read access: a worker that cannot write the cache folder (a
    read-only mount, another uid's lock file) still takes the shard as it is."""
    store, settings, manifest = cached_campaign("p-3", {"rf": {"n_estimators": 5}})
    unit = next(u for u in store.units("p-3") if u.stage == PREPROCESS)

    def no_lock(*_):  # noqa: ANN002, ANN202
        raise AssertionError("took the lock to reuse a whole shard")

    monkeypatch.setattr(preprocess_task, "exclusive", no_lock)
    context = UnitContext(store.get_campaign("p-3"), unit, store, settings, _manifest=manifest)
    assert preprocess_task.preprocess_shard.run.__wrapped__(context).extra["reused"] is True


def test_a_lock_file_that_cannot_be_made_is_worked_without(tmp_path, caplog) -> None:  # noqa: ANN001
    from workers.data import exclusive

    blocker = tmp_path / "afile"
    blocker.write_text("")
    ran = []
    with exclusive(blocker / "cache" / "shard-00000.npy", "writing the shard"):
        ran.append(True)
    assert ran == [True]
    assert "writing the shard without the lock" in caplog.text
