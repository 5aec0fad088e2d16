"""What loading a variant's images costs in memory: the images once, not twice.

A worker holds every image of a variant (``workers.data.load_variant``); at 200,000
images of crop224 that is 30 GB, so a second copy as it loads (a list of shards, then
their concatenation) was the difference between fitting a host and not."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from db.store import Artifact, Store
from shared.manifest import Entry, Manifest
from shared.preprocess import shard_name, write_shard
from shared.settings import Settings
from shared.svm import fit_pca_basis
from tests.workers.conftest import local_settings
from workers import data

SIZE, SHARD, SHARDS = 128, 32, 8


@pytest.fixture
def cached(tmp_path: Path, sqlite_url: str) -> tuple[Store, Settings, Manifest, np.ndarray]:
    settings = local_settings(tmp_path, sqlite_url)
    store = Store(sqlite_url)
    store.upgrade()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (SHARD * SHARDS, SIZE, SIZE, 3), dtype=np.uint8)
    entries = tuple(
        Entry(f"{i}.jpg", "ABC"[i % 3], "train", f"/nowhere/{i}.jpg", i % 2)
        for i in range(len(images))
    )
    manifest = Manifest(("A", "B", "C"), entries, "f" * 64, "m" * 16, SIZE, SHARD)
    for index in range(SHARDS):
        rel = f"cache/{manifest.cache_key}/{shard_name(index)}"
        part = images[index * SHARD : (index + 1) * SHARD]
        written = write_shard(settings.artifacts / rel, part)
        store.record_artifact(Artifact(rel, "shard", written.sha256, written.size))
    return store, settings, manifest, images


def peak_of(call):  # noqa: ANN001, ANN201
    """``call()``'s result and the most memory it held at once, counting what it returned
    (numpy's allocations are traced), beyond what was held before it. A tracing already
    on (PYTHONTRACEMALLOC) is left on."""
    ours = not tracemalloc.is_tracing()
    if ours:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        result = call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        if ours:
            tracemalloc.stop()
    return result, peak - before


def test_the_variant_held_before_is_let_go_before_another_loads(cached, monkeypatch) -> None:  # noqa: ANN001
    """Held beside the next variant as it loads, it added a third copy to the peak."""
    import weakref

    store, settings, manifest, _ = cached
    monkeypatch.setattr(data, "_last", None)
    held = weakref.ref(data.load_variant(store, settings, manifest, "resize32"))
    alive_at_first_shard: list[bool] = []
    shard = data._shard

    def first_shard(*args):  # noqa: ANN002, ANN202
        if not alive_at_first_shard:
            alive_at_first_shard.append(held() is not None)
        return shard(*args)

    monkeypatch.setattr(data, "_shard", first_shard)
    data.load_variant(store, settings, manifest, "crop112")
    assert alive_at_first_shard == [False]


@pytest.mark.parametrize("variant", ["full", "resize32"])
def test_a_variant_loads_into_one_array_not_a_list_then_a_copy(cached, variant, monkeypatch):  # noqa: ANN001
    store, settings, manifest, images = cached
    data.load_variant(store, settings, manifest, variant)  # what a first call imports
    monkeypatch.setattr(data, "_last", None)
    loaded, peak = peak_of(lambda: data.load_variant(store, settings, manifest, variant))
    if variant == "full":  # the case the old way's second copy shows in (a derived
        # variant's is smaller than a shard's file, which then makes the peak)
        np.testing.assert_array_equal(loaded, images)
    assert len(loaded) == len(images)
    # the images and one shard's worth beside them (its file read, checked, derived);
    # the list of shards and their concatenation took twice the images
    shard = SHARD * SIZE * SIZE * 3
    assert peak < loaded.nbytes + 3 * shard, (peak, loaded.nbytes, shard)


def test_the_pca_fit_makes_one_float_copy_of_the_training_pixels(cached) -> None:  # noqa: ANN001
    *_, images = cached
    pixels = images[:192]
    fit_pca_basis(pixels[:16], 8, whiten=False, seed=0)  # what a first fit imports
    basis, peak = peak_of(lambda: fit_pca_basis(pixels, 8, whiten=False, seed=0))
    assert basis.components.shape == (8, SIZE * SIZE * 3)
    # float32 features (4 bytes a pixel) and the randomized SVD's working set (about
    # 5 in all here); the features scaled into a second array, and sklearn's copy of
    # them, took 9
    assert peak < 7 * pixels.nbytes, (peak, pixels.nbytes)


def test_projecting_holds_one_float_chunk_at_a_time(cached, monkeypatch) -> None:  # noqa: ANN001
    """Every image projected on the basis, a chunk of rows at a time: its float features
    centred in place and let go before the next chunk is made (it took three chunks)."""
    import shared.svm

    *_, images = cached
    basis = fit_pca_basis(images[:64], 8, whiten=False, seed=0)
    monkeypatch.setattr(shared.svm, "CHUNK_ROWS", 64)
    chunk = 64 * SIZE * SIZE * 3 * 4
    z, peak = peak_of(lambda: basis.project(images))
    features = images.reshape(len(images), -1).astype(np.float32) / np.float32(255)
    np.testing.assert_allclose(z, (features - basis.mean) @ basis.components.T, atol=1e-3)
    assert peak < 1.5 * chunk, (peak, chunk)
    floats = images[:100].astype(np.float32) / 255  # float input is left as it was
    kept = floats.copy()
    basis.project(floats)
    np.testing.assert_array_equal(floats, kept)


def test_rows_load_from_the_shards_that_hold_them_alone(cached, monkeypatch) -> None:  # noqa: ANN001
    """What a report needs of a variant (LIME's images): those images, read from their
    shards only, and the variant a worker holds left as it was."""
    store, settings, manifest, _ = cached
    monkeypatch.setattr(data, "_last", None)
    whole = data.load_variant(store, settings, manifest, "resize32")
    held = data._last
    rows = np.array([1, 2, 3 * SHARD + 5, 3 * SHARD + 6, SHARDS * SHARD - 1])
    read: list[int] = []
    shard = data._shard
    monkeypatch.setattr(data, "_shard", lambda *args: read.append(args[3]) or shard(*args))
    for variant in ("resize32", "crop112"):
        loaded = data.load_rows(store, settings, manifest, variant, rows)
        assert data._last is held
        if variant == "resize32":
            np.testing.assert_array_equal(loaded, whole[rows])
            assert read == []  # the variant held: nothing read
        else:
            assert read == [0, 3, SHARDS - 1]
            monkeypatch.setattr(data, "_last", None)
            np.testing.assert_array_equal(
                loaded, data.load_variant(store, settings, manifest, variant)[rows]
            )
    assert len(data.load_rows(store, settings, manifest, "crop112", rows[:0])) == 0
    for bad in ([3, 2], [-1, 2], [0, SHARDS * SHARD]):
        with pytest.raises(ValueError, match="ascending manifest indices"):
            data.load_rows(store, settings, manifest, "crop112", np.array(bad))


def test_a_unit_larger_than_the_memory_available_says_so_as_it_loads(
    cached_campaign, monkeypatch
) -> None:  # noqa: ANN001
    """Before the kernel kills it (which the store can tell only as a delivery that
    ended without a result), the worker's log says what the unit holds, what the process
    holds already (of it, perhaps: the variant kept from the last unit) and what the
    host has left."""
    import shared.memory
    from workers.tasks import base

    store, settings, manifest = cached_campaign("w-1", {"rf": {"variant": "resize16"}})
    unit = next(u for u in store.units("w-1") if u.family == "rf")
    ctx = base.UnitContext(store.get_campaign("w-1"), unit, store, settings, _manifest=manifest)
    said: list[tuple] = []
    monkeypatch.setattr(base.log, "warning", lambda *args: said.append(args))
    needs = shared.memory.unit_bytes(unit, shared.memory.Sizes.of(manifest, {}, [unit.fold]))
    for available, held, warned in (
        (10**12, 0, False),
        (1_000, 0, True),
        (needs - 1, 0, True),
        (needs // 2, needs // 2 + 1, False),  # what it holds already counts as its own
        (None, 0, False),  # not Linux
    ):
        said.clear()
        monkeypatch.setattr(shared.memory, "available_bytes", lambda a=available: a)
        monkeypatch.setattr(shared.memory, "process_bytes", lambda h=held: h)
        assert len(ctx.fold_data("resize16").images) == len(manifest.entries)
        assert bool(said) == warned, (available, held, said)
    monkeypatch.setattr(shared.memory, "available_bytes", lambda: 1_000)
    said.clear()
    ctx.fold_data("resize16")
    (args,) = said
    assert args[0].startswith("%s holds %s in this process by orchard's estimate, more than")
    assert args[1:] == (unit.key, shared.memory.about(needs), "0.0 GB", "0.0 GB")

    def broken(*_args):  # noqa: ANN202
        raise KeyError("variant")

    monkeypatch.setattr(shared.memory, "unit_bytes", broken)  # advisory: the unit goes on
    said.clear()
    assert len(ctx.fold_data("resize16").images) == len(manifest.entries) and not said


def test_a_cnn_fold_on_the_cpu_counts_its_images_on_the_device(monkeypatch) -> None:  # noqa: ANN001
    from workers.tasks import base

    monkeypatch.setenv("ORCHARD_DEVICE", "cpu")
    assert base._cnn_on_the_cpu()
    monkeypatch.setenv("ORCHARD_DEVICE", "cuda:1")
    assert not base._cnn_on_the_cpu()
