"""Turning ready units into a Celery canvas and sending it.

Each stage of a campaign is a ``group`` of unit signatures (ids only, routed to the
family's queue). The next stage is opened by whichever task finishes the current
one: :func:`advance` asks the store whether a stage may open (one query that stops at
its first row, ``Store.stage_may_open``), and only when it may has the store read every
unit's state, ask ``shared.plan.next_actions`` what may run and claim those units
(PENDING -> QUEUED, a conditional update that only one caller wins) in one transaction
under the campaign's lock (``Store.open_stage``); it sends only what it claimed, and
marks it sent.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from celery import Celery, group, uuid
from celery.canvas import Signature

from db.store import Store
from shared.plan import TERMINAL

log = logging.getLogger(__name__)

#: Units a log line of failures names at most (the rest are counted).
FAILED_NAMED = 3


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
    # one transaction decides and claims (failing what can no longer run), under the
    # campaign's lock: a resume cannot reopen a unit between the two. Task ids chosen
    # here and recorded with the claim: `orchard cancel` revokes them
    units, claimed, task_ids, failed = store.open_stage(campaign_id, uuid)
    _log_failed(failed)
    by_key = {u.key: u for u in units}
    # in chunks, each marked sent once published: a claim without the mark is a lease
    # period old when the workers send it again, taking this process for dead
    # (workers.reaper), and a stage of thousands of units on a busy host can take
    # longer than that to publish at once
    for start in range(0, len(claimed), SEND_CHUNK):
        chunk = claimed[start : start + SEND_CHUNK]
        try:
            signatures = [
                unit_signature(
                    app, by_key[key].task, by_key[key].queue, campaign_id, key, task_ids[key]
                )
                for key in chunk
            ]
            group(signatures).apply_async()
        except BaseException:
            # the broker is away (after the publish retries), or the sender was stopped
            # (Ctrl-C, SIGTERM): unclaim what is not marked sent, so that the next
            # advance (a redelivered task, `orchard resume`, a `submit --id` retried)
            # sends it again
            store.unclaim(claimed[start:])
            raise
        store.mark_sent([task_ids[key] for key in chunk])
    if all(u.state in TERMINAL for u in units):
        store.complete_campaign(campaign_id)
    return claimed


def _log_failed(failed: list[tuple[str, str]]) -> None:
    """One line per cause for the units ``open_stage`` failed, which never ran (a failed
    preprocessing shard fails every model unit that needs it): the worker's log, where
    every other failure is, names them."""
    by_error: dict[str, list[str]] = defaultdict(list)
    for key, error in failed:
        by_error[error].append(key)
    for error, keys in by_error.items():
        named = ", ".join(keys[:FAILED_NAMED])
        more = f" and {len(keys) - FAILED_NAMED} more" if len(keys) > FAILED_NAMED else ""
        log.warning("%s%s: failed without running (%s)", named, more, error)
