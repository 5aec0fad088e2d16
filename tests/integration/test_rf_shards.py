"""A tree-sharded random forest through real `celery worker` processes, on the real
Redis and SQLite: shard units train their trees, the merge unit joins them into one
forest and records it as the campaign's RF result."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from db.store import Store
from scheduler.api import submit
from shared.forest import load_model, merge_models
from tests.conftest import REDIS_URL
from tests.integration.test_campaign import running_workers, settings_for

pytestmark = pytest.mark.integration

CAMPAIGN = """
name = "rfshards"
seed = 2
folds = 3

[dataset]
kind = "synthetic"
root = "{root}"
seed = 5
train_per_class = 8
test_per_class = 3
width = 64
height = 48

[preprocessing]
size = 32
shard_size = 16

[rf]
variant = "resize16"
n_estimators = 7
tree_shards = 2
augment = "flip"
folds = 2
"""


def test_tree_sharded_forest(tmp_path: Path, sqlite_url: str, redis_prefix: str) -> None:
    path = tmp_path / "rf.toml"
    path.write_text(CAMPAIGN.format(root=tmp_path / "data"))
    settings = settings_for(tmp_path, REDIS_URL, sqlite_url)
    store = Store(sqlite_url)
    with running_workers(settings, "rf") as workers:
        run = submit(path, settings=settings)
        run.wait(timeout=300, check=workers.check)
        status = run.status()
        units = status.units
        assert status.campaign.state == "DONE", [(u.key, u.state, u.error) for u in units]
        shards = [u for u in units if u.family == "rf_shard"]
        merges = [u for u in units if u.family == "rf"]
        assert len(shards) == 4 and len(merges) == 2
        # each shard and merge unit ran once, and wrote one result
        assert {(u.state, u.attempts) for u in shards + merges} == {("SUCCESS", 1)}
        assert store.count_rows(run.id)["results"] == len(units)
        results = store.results(run.id)
        for merge in merges:
            extra = results[merge.key].extra
            assert extra["trees"] == 7 and extra["shards"] == 2
            assert 0.0 <= extra["oob_score"] <= 1.0
            assert "oob_grouped" in extra and extra["train_rows"] % 2 == 0
            assert results[merge.key].val_acc is not None
            assert store.predictions(merge.key, "test")
        for shard in shards:
            assert results[shard.key].val_acc is None  # a part of a model, not a model
        # the shard files on the artifact store merge into one 7-tree forest per fold
        recorded = store.artifacts(run.id, kind="forest_shard")
        assert sorted(a.unit_key for a in recorded) == sorted(u.key for u in shards)
        for merge in merges:
            mine = sorted(
                (a for a in recorded if a.unit_key.startswith(merge.key + "/")),
                key=lambda a: a.unit_key,
            )
            forest = merge_models([load_model(settings.artifacts / a.path, a.sha256) for a in mine])
            assert forest.trees == forest.forest.n_estimators == 7
        # the report's best RF is a merged forest, never one of its shards
        markdown = run.report_path().with_suffix(".md").read_text()
        assert f"\n| rf | `{run.id}/rf/" in markdown
        assert f"\n| rf_shard | `{run.id}/rf/" not in markdown
        resend_finished_shard(run, settings, workers, shards[0])
    assert {u.attempts for u in run.status().units if u.family in ("rf", "rf_shard")} == {1}


def resend_finished_shard(run, settings, workers, shard) -> None:
    """A broker may deliver a finished shard's task again: it must not run."""
    from workers.app import make_app

    app = make_app(settings, with_tasks=False)
    app.send_task(shard.task, kwargs={"campaign_id": run.id, "unit_key": shard.key}, queue="cpu")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = "".join(p.read_text(errors="replace") for p in workers.logs.glob("*.log"))
        if f"{shard.key} already SUCCESS" in text:
            return
        time.sleep(0.5)
    raise AssertionError(f"the re-sent shard task was not seen ({workers.logs})")
