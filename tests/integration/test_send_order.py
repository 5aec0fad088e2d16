"""Longest first, as the broker holds it: a stage's units reach their Redis queue in the
plan's order (costliest first), so that workers take a big forest before the short
units listed above it in the campaign file."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import redis
from sqlalchemy import update

from db.models import UnitRow
from db.store import Store
from scheduler import canvas
from shared.plan import TRAIN, estimated_cost
from tests.conftest import REDIS_URL, uneven_units
from tests.integration.test_campaign import settings_for
from workers.app import make_app

pytestmark = pytest.mark.integration


def test_a_stage_reaches_its_queue_longest_first(
    tmp_path: Path, sqlite_url: str, redis_prefix: str
) -> None:
    units = uneven_units(tmp_path)
    store = Store(sqlite_url)
    store.upgrade()
    store.create_campaign(
        "c-1", name="c", source="c.toml", digest="d", spec={}, classes=["A"], units=units
    )
    with store.engine.begin() as conn:  # the preprocessing stage done: the models' opens
        conn.execute(update(UnitRow).where(UnitRow.stage < TRAIN).values(state="SUCCESS"))
    model = [u for u in units if u.stage == TRAIN]
    costs = {u.key: estimated_cost(u.family, u.params, 64) for u in model}
    assert len(set(costs.values())) == len(model)  # an order to get right, not ties

    with make_app(settings_for(tmp_path, REDIS_URL, sqlite_url), with_tasks=False) as app:
        sent = canvas.advance(store, app, "c-1")
    longest_first = sorted(costs, key=costs.__getitem__, reverse=True)
    assert sent == longest_first

    # the queue as the workers take it: kombu pushes on the left, a worker pops the right
    client = redis.Redis.from_url(REDIS_URL)
    queued = client.lrange(f"{redis_prefix}cpu", 0, -1)[::-1]
    taken = [json.loads(base64.b64decode(json.loads(m)["body"]))[1]["unit_key"] for m in queued]
    assert taken == longest_first
    assert taken[0].startswith("c-1/rf/")  # the 500-tree forest, listed last in the file
    client.close()
    store.dispose()
