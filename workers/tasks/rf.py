"""orchard.fit_rf and orchard.fit_rf_shard: random forests on one fold (queue ``cpu``).

An unsharded forest is one ``orchard.fit_rf`` unit. A forest with ``tree_shards = k``
is k ``orchard.fit_rf_shard`` units, each writing its share of the trees, with their
scores on the fold (``shared.forest.ShardScores``), to
``<campaign>/forests/<params hash>/f<fold>/t<i>.joblib``, then the ``orchard.fit_rf``
unit of the merge stage, which checks each file against the store, merges the trees,
adds the shards' scores (or, for a file without them, scores the merged forest) and
records the result as an unsharded forest would.

Under ``validation = "oob"`` the fold's validation images are its training images and
each forest predicts them out of bag (``shared.forest.image_oob_probs``), sharded or not.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

from db.store import Artifact, Outcome
from shared.forest import (
    ForestError,
    fit_rf_point,
    fit_scored_shard,
    load_model,
    merge_rf_point,
    save_model,
)
from shared.plan import tree_shard_keys
from workers.tasks.base import UnitContext, unit_task
from workers.tasks.classic import fit_classic

SHARD_KIND = "forest_shard"


def shard_path(ctx: UnitContext, shard_key: str) -> Path:
    """Where a tree shard's forest lives: a function of its unit key alone."""
    *_, phash, fold, shard = shard_key.split("/")
    return ctx.campaign_dir / "forests" / phash / fold / f"{shard}.joblib"


def _out_of_bag(ctx: UnitContext) -> bool:
    """``validation = "oob"``: the fold's validation images are its training images, each
    judged by the trees that did not draw it."""
    return ctx.campaign.spec.get("validation") == "oob"


@unit_task("orchard.fit_rf")
def fit_rf(ctx: UnitContext) -> Outcome:
    if ctx.unit.params.get("tree_shards", 1) > 1:
        return _merge_shards(ctx)
    return fit_classic(ctx, functools.partial(fit_rf_point, out_of_bag=_out_of_bag(ctx)))


@unit_task("orchard.fit_rf_shard")
def fit_rf_shard(ctx: UnitContext) -> Outcome:
    """Train one shard's trees, score them on the fold, and write both atomically.

    Safe to run twice: the file's path and bytes depend only on the unit (the fit is
    seeded and the model holds no timestamps), so a second run rewrites the same file.
    """
    params = ctx.unit.params
    train_x, train_y, val_x, _, test_x = ctx.fold_data(params["variant"]).split()
    started = time.perf_counter()
    model, train_seconds = fit_scored_shard(
        train_x,
        train_y,
        val_x,
        test_x,
        params,
        seed=ctx.seed + ctx.unit.fold,
        shard=params["shard"],
    )
    seconds = time.perf_counter() - started
    written = save_model(model, shard_path(ctx, ctx.unit.key))
    artifact = Artifact(
        ctx.relative(written.path),
        SHARD_KIND,
        written.sha256,
        written.size,
        ctx.campaign.id,
        ctx.unit.key,
    )
    # recorded with the result, in one transaction: a merge never sees a shard unit
    # SUCCESS without its file's checksum
    return Outcome(
        fit_seconds=seconds,
        extra={"trees": model.trees, "train_seconds": train_seconds, "forest": artifact.path},
        artifacts=[artifact],
    )


def _merge_shards(ctx: UnitContext) -> Outcome:
    params = ctx.unit.params
    shard_keys = tree_shard_keys(ctx.unit.key, params["tree_shards"])
    results = ctx.store.results(ctx.campaign.id)
    models, seconds = [], []
    for key in shard_keys:
        # the shard's result names its file: a shard reused from an identical earlier
        # campaign points at that campaign's file
        result = results.get(key)
        rel = result.extra.get("forest") if result else None
        record = ctx.store.find_artifact(rel) if rel else None
        if record is None:
            raise ForestError(f"{shard_path(ctx, key)}: tree shard {key} has no recorded forest")
        models.append(load_model(ctx.settings.artifacts / rel, record.sha256))
        seconds.append(float(result.extra.get("train_seconds", 0.0)))

    def merge(*split: Any, seed: int) -> Any:
        *data, unit_params = split
        return merge_rf_point(
            models, *data, unit_params, shard_seconds=seconds, out_of_bag=_out_of_bag(ctx)
        )

    return fit_classic(ctx, merge)
