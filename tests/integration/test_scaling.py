"""Horizontal scaling on the real Redis: `orchard worker --gpus 0,1` (two "GPU" worker
processes, on the CPU here) and one CPU worker share a campaign stored in PostgreSQL.

Every CNN fold runs exactly once, both GPU workers get folds, and the report is
written once: several workers finishing at the same moment lose and duplicate nothing.
"""

from __future__ import annotations

import secrets
import socket
import time
from pathlib import Path

import pytest

from db.store import Store
from scheduler.api import submit
from scheduler.demo import Workers
from shared.settings import Settings
from tests.conftest import REDIS_URL
from tests.integration.test_campaign import settings_for

pytestmark = pytest.mark.integration

CAMPAIGN = """
name = "scale"
seed = 2
folds = 5

[dataset]
kind = "synthetic"
root = "{root}"
seed = 5
train_per_class = 10
test_per_class = 3
width = 64
height = 48

[preprocessing]
size = 48
shard_size = 12

[cnn]
folds = 5
epochs = 3
batch_size = 16
width = 0.125
image_size = 32

[rf]
variant = "resize16"
n_estimators = [10]

[blend]
families = ["cnn"]

[report]
lime = false
"""


def wait_for_nodes(settings: Settings, names: set[str], workers: Workers) -> None:
    """Until every named worker answers a ping: then none can miss the first stage."""
    from workers.app import make_app

    app = make_app(settings, with_tasks=False)
    deadline = time.monotonic() + 120
    seen: set[str] = set()
    while not names <= seen:
        workers.check()
        assert time.monotonic() < deadline, f"workers not up: {names - seen}"
        for reply in app.control.ping(timeout=1.0):
            seen.update(reply)
    app.close()


def test_two_gpu_workers_and_a_cpu_worker_share_a_campaign(
    tmp_path: Path,
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
    redis_prefix: str,
) -> None:
    monkeypatch.setenv("ORCHARD_DEVICE", "cpu")  # `--gpus 0,1` on a machine without GPUs
    monkeypatch.setenv("ORCHARD_TORCH_THREADS", "1")
    settings = settings_for(tmp_path, REDIS_URL, postgres_url)
    campaign = tmp_path / "scale.toml"
    campaign.write_text(CAMPAIGN.format(root=tmp_path / "data"))
    store = Store(postgres_url)
    store.upgrade()
    host = socket.gethostname()
    tag = secrets.token_hex(3)

    workers = Workers(
        settings,
        [
            ("gpus", ["--gpus", "0,1"]),
            ("cpu", ["--queues", "cpu,preprocess,report", "-c", "2", "--name", f"cpu{tag}@%h"]),
        ],
    )
    # each launcher names its workers gpu<i>-<its pid>: two launchers on a host differ
    launcher = workers.procs[0][1].pid
    gpus = [f"gpu{i}-{launcher}@{host}" for i in (0, 1)]
    try:
        wait_for_nodes(settings, {*gpus, f"cpu{tag}@{host}"}, workers)
        run = submit(campaign, settings=settings)
        status = run.wait(timeout=300, check=workers.check)
    finally:
        workers.stop()
    # the launcher passed the warm shutdown on: it and both children exited cleanly
    assert [proc.returncode for _, proc in workers.procs] == [0, 0]

    assert status.campaign.state == "DONE", [(u.key, u.state, u.error) for u in status.units]
    folds = [u for u in status.units if u.family == "cnn"]
    assert sorted(u.fold for u in folds) == [0, 1, 2, 3, 4]
    # each fold ran exactly once, on one of the two GPU workers, and both got work
    assert [u.attempts for u in folds] == [1] * 5
    assert {u.worker for u in folds} == set(gpus)
    results = store.results(run.id)
    assert all(results[u.key].extra["device"] == "cpu" for u in folds)
    # the rest ran on the CPU worker, each once
    others = [u for u in status.units if u.family != "cnn"]
    assert {u.worker for u in others} == {f"cpu{tag}@{host}"}
    assert all(u.attempts == 1 for u in others)
    # one result row per unit: concurrent finishes lost and duplicated nothing
    assert store.count_rows(run.id)["results"] == len(status.units) == len(results)
    (report,) = [u for u in status.units if u.family == "report"]
    assert report.attempts == 1
    reports = [a.path for a in store.artifacts(run.id, kind="report")]
    assert sum(p.endswith("report.html") for p in reports) == 1
    # each GPU worker's log lines are labelled by the launcher
    log = (workers.logs / "gpus.log").read_text(errors="replace")
    assert "gpu0| " in log and "gpu1| " in log
    assert "CUDA_VISIBLE_DEVICES=0" in log and "CUDA_VISIBLE_DEVICES=1" in log
    store.dispose()
