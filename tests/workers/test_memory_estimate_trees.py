"""``shared.memory``'s estimates of forests whose fitted trees are most of what they hold:
a tree shard and the merge of its forest's shards, measured as in
``test_memory_estimate.py`` (a file of its own, so that the two run side by side)."""

from __future__ import annotations

from shared.memory import Sizes, unit_bytes
from shared.plan import MERGE
from tests.db.test_store import deliver
from tests.workers.conftest import local_settings
from tests.workers.test_memory_estimate import _campaign, _check, _first, _measured, _near
from workers.tasks import rf as rf_task
from workers.tasks.base import UnitContext

#: small images, many rows (eight copies of each): the trees are most of it
FOREST = {"variant": "resize8", "n_estimators": 80, "tree_shards": 2, "augment": "rotate_flip"}


def test_a_tree_shard_of_deep_trees(tmp_path, sqlite_url):
    """Fitted, scored, then pickled into its file."""
    rf = {"rf": {**FOREST, "folds": 1}}
    _check(tmp_path, sqlite_url, rf, _first("rf_shard"), images=2500, cache=32)


def test_a_merge_of_tree_shards(tmp_path, sqlite_url):
    """The shards' trees, loaded from their files one after another, with the scores
    they bring (four shards: the last one's file is a quarter of the trees)."""
    rf = {**FOREST, "tree_shards": 4, "folds": 1}
    store, manifest, units, path = _campaign(
        tmp_path, sqlite_url, {"rf": rf}, images=2500, cache=32
    )
    settings = local_settings(tmp_path, sqlite_url)
    campaign = store.get_campaign("m-1")
    for shard in (u for u in units if u.family == "rf_shard" and u.fold == 0):
        deliver(store, shard.key, worker="test", task_id=None)
        ctx = UnitContext(campaign, shard, store, settings, _manifest=manifest)
        store.finish_unit(shard.key, rf_task.fit_rf_shard.run.__wrapped__(ctx))
    merge = _first("rf", MERGE)(units)
    estimate = unit_bytes(merge, Sizes.of(manifest, campaign.spec, [0]))
    peak = _measured(tmp_path, sqlite_url, merge.key, path)
    _near(merge.key, peak, estimate)
