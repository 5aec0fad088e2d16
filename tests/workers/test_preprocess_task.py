"""orchard.preprocess_shard's own checks, on a real SQLite store: what a worker refuses
to read, whatever the submitter allowed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

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
    assert str(info.value) == (
        f"{manifest.entries[0].path}: outside this worker's ORCHARD_DATASET_ROOTS "
        f"({allowed.resolve()}); not read"
    )
    assert Path(manifest.entries[0].path).is_absolute()
