"""Turning ready units into a Celery canvas and sending it.

Each stage of a campaign is a ``group`` of unit signatures (ids only, routed to the
family's queue). The next stage is opened by whichever task finishes the current
one: :func:`advance` asks the store whether a stage may open (one query that stops at
its first row, ``Store.stage_may_open``), and only when it may reads every unit's
state, asks ``shared.plan.next_actions`` what may run, claims those units (PENDING ->
QUEUED, a conditional update that only one caller wins), sends only what it claimed,
and marks it sent.
"""

from __future__ import annotations

from celery import Celery, group, uuid
from celery.canvas import Signature

from db.store import Store
from shared.plan import TERMINAL, UnitState, next_actions


def unit_signature(
    app: Celery, task: str, queue: str, campaign_id: str, key: str, task_id: str
) -> Signature:
    """The message of one unit: its two ids (``UnitMessage``), on its family's queue,
    under the task id the store recorded with its claim."""
    return app.signature(
        task,
        kwargs={"campaign_id": campaign_id, "unit_key": key},
        queue=queue,
        immutable=True,
    ).set(task_id=task_id)


#: messages published, then marked sent, at a time (each takes a millisecond or so)
SEND_CHUNK = 100


def advance(store: Store, app: Celery, campaign_id: str) -> list[str]:
    """Enqueue every unit of the campaign that is ready; returns the keys sent."""
    # after most units nothing can open yet: one query that stops at its first row
    # says so, where reading every unit's route would cost a row per unit, per unit
    if not store.stage_may_open(campaign_id):
        return []
    sent: list[str] = []
    while True:
        units = store.unit_routes(campaign_id)
        actions = next_actions(UnitState(u.key, u.stage, u.state) for u in units)
        if actions.fail:
            # failing units can open the next stage (the report): look again
            store.fail_units(actions.fail)
            continue
        # task ids chosen here and recorded with the claim: `orchard cancel` revokes them
        task_ids = {key: uuid() for key in actions.enqueue}
        claimed = store.claim_for_queue(actions.enqueue, task_ids)
        by_key = {u.key: u for u in units}
        signatures = [
            unit_signature(
                app, by_key[key].task, by_key[key].queue, campaign_id, key, task_ids[key]
            )
            for key in claimed
        ]
        # in chunks, each marked sent once published: a claim without the mark is a lease
        # period old when the workers send it again, taking this process for dead
        # (workers.reaper), and a stage of thousands of units on a busy host can take
        # longer than that to publish at once
        for start in range(0, len(signatures), SEND_CHUNK):
            chunk = claimed[start : start + SEND_CHUNK]
            try:
                group(signatures[start : start + SEND_CHUNK]).apply_async()
            except Exception:
                # the broker is away (after the publish retries): unclaim what is not
                # marked sent, so that the next advance (a redelivered task, `orchard
                # resume`) sends it again
                store.unclaim(claimed[start:])
                raise
            store.mark_sent([task_ids[key] for key in chunk])
        sent.extend(claimed)
        if all(u.state in TERMINAL for u in units):
            store.complete_campaign(campaign_id)
        return sent
