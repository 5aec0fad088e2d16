"""orchard.fit_rf_shard and the merge unit of orchard.fit_rf: each shard writes its trees
with their scores on the fold; the merge adds the scores and records what scoring the
merged forest would. The task bodies run against a real SQLite store and cache shards."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import shared.forest
from db.store import Store
from shared.forest import load_model, merge_rf_point
from shared.plan import MERGE
from tests.db.test_store import deliver
from tests.workers.conftest import N_TEST
from workers.tasks import rf as rf_task
from workers.tasks.base import UnitContext

CAMPAIGN_ID = "r-1"


@pytest.fixture
def env(cached_campaign):  # noqa: ANN001
    rf = {"variant": "resize16", "n_estimators": 6, "tree_shards": 2, "augment": "flip"}
    return cached_campaign(CAMPAIGN_ID, {"rf": {**rf, "folds": 1}})


def _context(env, unit) -> UnitContext:  # noqa: ANN001
    store, settings, manifest = env
    return UnitContext(store.get_campaign(CAMPAIGN_ID), unit, store, settings, _manifest=manifest)


def _run_and_record(env, unit):  # noqa: ANN001
    store: Store = env[0]
    deliver(store, unit.key, worker="test", task_id=None)
    body = rf_task.fit_rf_shard if unit.family == "rf_shard" else rf_task.fit_rf
    outcome = body.run.__wrapped__(_context(env, unit))
    store.finish_unit(unit.key, outcome)
    return outcome


def test_shards_carry_their_scores_and_the_merge_adds_them(env):
    store, settings, _ = env
    units = [u for u in store.units(CAMPAIGN_ID) if u.fold == 0]
    shards = sorted((u for u in units if u.family == "rf_shard"), key=lambda u: u.key)
    (merge,) = [u for u in units if u.family == "rf" and u.stage == MERGE]
    assert len(shards) == 2
    for shard in shards:
        outcome = _run_and_record(env, shard)
        assert outcome.extra["trees"] == 3 and outcome.extra["train_seconds"] > 0
    records = sorted(store.artifacts(CAMPAIGN_ID, kind="forest_shard"), key=lambda a: a.unit_key)
    models = [load_model(settings.artifacts / a.path, a.sha256) for a in records]
    assert all(m.scores is not None and m.scores.trees == 3 for m in models)
    # a shard's task run again writes the very same file
    again = rf_task.fit_rf_shard.run.__wrapped__(_context(env, shards[0]))
    assert again.artifacts[0].sha256 == records[0].sha256

    def no_scoring(*args, **kwargs):
        raise AssertionError("the merge scored the merged forest instead of adding scores")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shared.forest, "score_model", no_scoring)
        merged = _run_and_record(env, merge)
    # what scoring the merged forest (the shards without their scores) records
    fold = _context(env, merge).fold_data(merge.params["variant"])
    plain = [dataclasses.replace(m, scores=None) for m in models]
    want = merge_rf_point(plain, *fold.split(), merge.params)
    assert merged.train_acc == want.train_acc and merged.val_acc == want.val_acc
    for key in ("oob_score", "oob_grouped", "oob_grouped_coverage", "trees", "train_rows"):
        assert merged.extra[key] == pytest.approx(want.extra[key], abs=1e-12), key
    assert merged.extra["shards"] == 2
    test_rows = merged.predictions["test"]
    assert len(test_rows) == N_TEST
    assert merged.val_confusion is not None
    got_probs = np.array([row.probs for row in merged.predictions["val"]])
    np.testing.assert_allclose(got_probs, want.val_probs, atol=1e-9)
