"""``shared.memory``'s estimates against what real units hold: each unit's task body runs
in a fresh process (``tests/workers/memory_probe.py``) on cached images of a size where
the arrays it allocates dwarf the interpreter's own, and the most resident memory it
held beyond what the process held before must be within the estimate's band."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from db.store import Artifact, Store
from shared.manifest import Entry, Manifest
from shared.memory import Sizes, cnn_on_the_cpu, unit_bytes
from shared.plan import plan_units
from shared.preprocess import shard_name, write_shard
from shared.spec import parse_campaign
from tests.workers.conftest import local_settings

REPO = Path(__file__).resolve().parents[2]

#: how far a unit's measured peak may lie from its estimate: the estimate is "about"
LOW, HIGH = 0.8, 1.25


def _campaign(
    tmp_path: Path, url: str, families: dict[str, Any], *, images: int, cache: int
) -> tuple[Store, Manifest, list[Any], Path]:
    """Campaign ``m-1``: ``images`` noisy images at ``cache`` px (a fifth of them test,
    the rest in folds 0 and 1), cached in shards of 256, planned and recorded."""
    settings = local_settings(tmp_path, url)
    store = Store(url)
    store.upgrade()
    shard = 256
    campaign = parse_campaign(
        {
            "name": "m",
            "folds": 2,
            "dataset": {"kind": "synthetic"},
            "preprocessing": {"size": cache, "shard_size": shard},
            **families,
        },
        source="m.toml",
    )
    rng = np.random.default_rng(0)
    n_test = images // 5
    entries = tuple(
        Entry(
            f"{i}.jpg",
            "ABC"[i % 3],
            "test" if i < n_test else "train",
            f"/nowhere/{i}.jpg",
            -1 if i < n_test else i % 2,
        )
        for i in range(images)
    )
    manifest = Manifest(("A", "B", "C"), entries, "f" * 64, "k" * 16, cache, shard)
    ranges = [(start, min(start + shard, images)) for start in range(0, images, shard)]
    for index, (start, stop) in enumerate(ranges):
        rel = f"cache/{manifest.cache_key}/{shard_name(index)}"
        pixels = rng.integers(0, 256, (stop - start, cache, cache, 3), dtype=np.uint8)
        written = write_shard(settings.artifacts / rel, pixels)
        store.record_artifact(Artifact(rel, "shard", written.sha256, written.size))
    units = plan_units("m-1", campaign, ranges)
    spec = campaign.model_dump(mode="json")
    store.create_campaign(
        "m-1", name="m", source="m.toml", digest=campaign.digest(), spec=spec,
        classes=["A", "B", "C"], units=units,
    )  # fmt: skip
    path = tmp_path / "manifest.json"
    path.write_text(manifest.to_json())
    return store, manifest, units, path


def _measured(tmp_path: Path, url: str, unit_key: str, manifest: Path) -> int:
    """The unit's peak, in a fresh process whose large arrays come and go as mappings of
    their own (a fixed mmap threshold), so none reuses memory freed before it began."""
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": str(128 << 10),
        # one thread: each BLAS or OpenMP thread's buffers (about 30 MB, once per
        # process) are the libraries' share, which the estimate leaves out
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "ORCHARD_TORCH_THREADS": "1",
        "ORCHARD_DEVICE": "cpu",
    }
    done = subprocess.run(
        [sys.executable, "-m", "tests.workers.memory_probe", url, str(tmp_path), "m-1",
         unit_key, str(manifest)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["peak"]


def _near(key: str, peak: int, estimate: int) -> None:
    assert LOW * estimate <= peak <= HIGH * estimate, (
        f"{key}: measured {peak / 1e6:.1f} MB, estimated {estimate / 1e6:.1f} MB"
    )


def _check(tmp_path: Path, url: str, families: dict[str, Any], pick, **sizes: int) -> None:  # noqa: ANN001
    store, manifest, units, path = _campaign(tmp_path, url, families, **sizes)
    unit = pick(units)
    spec = store.get_campaign("m-1").spec
    estimate = unit_bytes(unit, Sizes.of(manifest, spec, [unit.fold]))
    peak = _measured(tmp_path, url, unit.key, path)
    _near(unit.key, peak, estimate)


def _first(family: str, stage: int | None = None):  # noqa: ANN202
    def pick(units):  # noqa: ANN001, ANN202
        return next(
            u for u in units if u.family == family and u.fold == 0 and stage in (None, u.stage)
        )

    return pick


@pytest.mark.parametrize(("k", "cache"), [(40, 128), (300, 96)])
def test_an_svm_point_fitting_its_folds_pca(tmp_path, sqlite_url, k, cache):
    """K = 300 of 400 training images: the randomized SVD's working set is most of it."""
    svm = {"variant": "full", "n_components": k, "C": 1.0, "gamma": "scale", "folds": 1}
    _check(tmp_path, sqlite_url, {"svm": svm}, _first("svm"), images=1000, cache=cache)


def test_a_forest_over_augmented_rows_with_a_pca(tmp_path, sqlite_url):
    rf = {"variant": "resize64", "n_estimators": 4, "augment": "rotate", "pca_components": 30}
    _check(tmp_path, sqlite_url, {"rf": {**rf, "folds": 1}}, _first("rf"), images=1500, cache=64)


@pytest.mark.parametrize(
    ("cnn", "images"),
    [
        # a small network over many images: its images on the device and the host's
        ({"batch_size": 16, "image_size": 32, "width": 0.5}, 1500),
        # a wider one in batches of 96: what autograd keeps for the backward pass
        ({"batch_size": 96, "image_size": 64, "width": 0.5, "activation": "relu"}, 400),
    ],
)
def test_a_cnn_fold(tmp_path, sqlite_url, cnn, images):
    """On the CPU, where what it holds on the device is host memory too."""
    cnn = {"epochs": 1, "folds": 1, **cnn}
    store, manifest, units, path = _campaign(
        tmp_path, sqlite_url, {"cnn": cnn}, images=images, cache=128
    )
    unit = _first("cnn")(units)
    sizes = Sizes.of(manifest, store.get_campaign("m-1").spec, [0])
    estimate = cnn_on_the_cpu(unit.params, sizes, 0)
    peak = _measured(tmp_path, sqlite_url, unit.key, path)
    _near(unit.key, peak, estimate)
