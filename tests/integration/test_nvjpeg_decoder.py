"""``[preprocessing] decoder = "nvjpeg"`` through real `celery worker` processes, on the
real Redis and SQLite: the preprocessing shards go to queue ``gpu`` and the GPU worker
writes them, apart from OpenCV's in the cache; without a CUDA device (this machine) the
GPU worker decodes them with OpenCV and says so."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from db.store import Store
from scheduler.api import submit
from shared.preprocess import load_shard, preprocess_images, shard_ranges
from tests.conftest import REDIS_URL
from tests.integration.test_campaign import running_workers, settings_for
from workers.data import load_manifest, shard_rel

pytestmark = pytest.mark.integration

CAMPAIGN = """
name = "nvjpeg"
seed = 3
folds = 2

[dataset]
kind = "synthetic"
root = "{root}"
seed = 6
train_per_class = 6
test_per_class = 2
width = 160
height = 120

[preprocessing]
size = 32
shard_size = 12
decoder = "{decoder}"

[rf]
variant = "resize16"
n_estimators = 5
"""


def test_nvjpeg_shards_run_on_the_gpu_worker(tmp_path: Path, sqlite_url: str, redis_prefix: str):
    settings = settings_for(tmp_path, REDIS_URL, sqlite_url)
    store = Store(sqlite_url)
    runs = {}
    with running_workers(settings, "nvjpeg") as workers:
        for decoder in ("nvjpeg", "opencv"):
            path = tmp_path / f"{decoder}.toml"
            path.write_text(CAMPAIGN.format(root=tmp_path / "data", decoder=decoder))
            run = submit(path, settings=settings)
            run.wait(timeout=300, check=workers.check)
            runs[decoder] = run
    nvjpeg = runs["nvjpeg"].status()
    assert nvjpeg.campaign.state == "DONE", [(u.key, u.state, u.error) for u in nvjpeg.units]
    shards = [u for u in nvjpeg.units if u.family == "preprocess"]
    assert len(shards) == 2  # 24 images, 12 a shard
    assert {(u.queue, u.worker.split("@")[0], u.state) for u in shards} == {
        ("gpu", "gpu-nvjpeg-0", "SUCCESS")
    }
    results = store.results(runs["nvjpeg"].id)
    cuda = torch.cuda.is_available()
    for unit in shards:
        extra = results[unit.key].extra
        assert extra["decoded_on"].startswith("cuda" if cuda else "cpu"), extra
        assert (extra["by_nvjpeg"], extra["by_opencv"]) == ((12, 0) if cuda else (0, 12))
    markdown = runs["nvjpeg"].report_path().with_suffix(".md").read_text()
    where = "by nvJPEG on cuda" if cuda else "by OpenCV on the CPU"
    assert f"- Preprocessing: 24 images to 32×32 in 2 shards: 24 {where}" in markdown
    if not cuda:
        log = "".join(p.read_text() for p in workers.logs.glob("gpu-*.log"))
        assert "with OpenCV: nvJPEG needs a CUDA device" in log

    # the same images, cached apart by decoder; the pixels agree
    manifests = {d: load_manifest(store, settings, run.id) for d, run in runs.items()}
    assert manifests["nvjpeg"].fingerprint == manifests["opencv"].fingerprint
    assert manifests["nvjpeg"].cache_key != manifests["opencv"].cache_key
    opencv_shards = [u for u in runs["opencv"].status().units if u.family == "preprocess"]
    assert {u.queue for u in opencv_shards} == {"preprocess"}
    manifest = manifests["nvjpeg"]
    for index, (start, stop) in enumerate(shard_ranges(len(manifest.entries), 12)):
        rel = shard_rel(manifest, index)
        shard = load_shard(settings.artifacts / rel, store.find_artifact(rel).sha256)
        entries = manifest.entries[start:stop]
        expected = preprocess_images(manifest.image_paths(entries, settings.artifacts), 32)
        if cuda:
            assert cv2.PSNR(np.ascontiguousarray(expected), shard) >= 35
        else:
            np.testing.assert_array_equal(shard, expected)


def test_a_gpu_worker_without_the_dataset_pauses_its_queue_after_each_hand_back(
    tmp_path: Path, sqlite_url: str, redis_prefix: str
) -> None:
    """A GPU worker whose host lacks the dataset hands an nvJPEG shard back, then takes
    nothing from queue gpu for a lease period, so that the workers with the dataset
    decode the shards: it had taken each shard again at once, an attempt each time,
    until the shard FAILED. Missing on every host (here), each shard still ends."""
    import re
    from datetime import datetime

    from tests.integration.workerpool import WorkerPool, wait_for

    settings = settings_for(tmp_path, REDIS_URL, sqlite_url)
    store = Store(sqlite_url)
    store.upgrade()
    path = tmp_path / "nvjpeg.toml"
    path.write_text(CAMPAIGN.format(root=tmp_path / "data", decoder="nvjpeg"))
    run = submit(path, settings=settings)  # no worker yet: the shards wait in queue gpu
    (tmp_path / "data").rename(tmp_path / "moved")  # not on this worker's host
    lease = 3
    env = {"ORCHARD_LEASE_SECONDS": str(lease), "ORCHARD_MAX_ATTEMPTS": "2"}

    def ended() -> list:
        shards = [u for u in run.status().units if u.family == "preprocess"]
        return shards if all(u.state == "FAILED" for u in shards) else []

    with WorkerPool(settings, env) as pool:
        pool.start("gpu", "gpu")
        shards = wait_for(ended, 120, "both shards FAILED", check=pool.check)
        log = pool.log("gpu")
    assert [(u.attempts, "dataset is not on this worker's host" in u.error) for u in shards] == [
        (2, True),
        (2, True),
    ]
    stamp = r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) UTC: [^\]]*\] "

    def times(pattern: str) -> list[datetime]:
        return [
            datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f") for t in re.findall(stamp + pattern, log)
        ]

    paused = times(r".*this worker takes nothing from queue gpu for 3 s")
    received = times(r"Task orchard\.preprocess_shard\[.*\] received")
    assert len(paused) == 2, log  # the first delivery of each; the second fails the shard
    assert len(received) == 4 and "Started consuming from gpu" in log, log
    # the shards' second deliveries came after the pause, not at once (at most one
    # message fetched before the pause took effect)
    assert (received[-1] - paused[0]).total_seconds() >= lease - 0.5, log
