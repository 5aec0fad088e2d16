"""Sending again the units whose worker died, without waiting for the broker.

A worker killed mid-unit (SIGKILL, out of memory, a lost host) never acknowledges its
message, and Redis hands an unacknowledged message out again only after the visibility
timeout, which must exceed the longest unit (12 h by default). The store knows sooner:
the unit's lease stops being renewed. Every worker therefore looks, once per lease
period, for RUNNING units whose lease ran out more than a lease period ago, puts them
back to QUEUED under a new task id (only one worker wins each) and sends them. A fold
lost with its GPU worker starts again from its checkpoint about two lease periods
(2 min by default) after its last heartbeat, on any worker of its queue.

The same pass repairs three rarer losses. A unit claimed (QUEUED) whose message never
reached the broker, because the process that claimed it died before sending, is sent
once its claim is a lease period old. A unit sent more than ``DROPPED_AFTER_LEASES``
lease periods ago to a queue that this worker has consumed for all that time without
holding a single message is sent again, whatever other workers run: an idle consumer
would have taken its message, so the broker no longer has it (Redis restarted without
persistence, or evicting keys) or something else took it and dropped it (a worker on
another database, which finds no such unit). A running campaign that
nothing moves (no unit queued or running, none finished for two lease periods) is
advanced: the task that finished its last unit died, or gave up on an unreachable store
or broker, before it opened the next stage or closed the campaign.

It runs in a thread of the worker's main process, never on the worker's event loop: a
loop busy with the database would leave a message that Redis has already handed over
(BRPOP) unread in the socket, where a SIGKILL at that moment loses it, since it is
not yet among the unacknowledged messages Redis would hand out again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from celery import bootsteps, uuid
from celery.signals import task_received
from celery.worker import state as worker_state

from workers.config import reliability

# not under "orchard", whose records go through Celery's task formatter (tasks log with
# get_task_logger("orchard")): outside a task that prints "???[???]"
log = logging.getLogger(__name__)


#: Lease periods a sent unit waits, on a queue that a worker has consumed all that time
#: without holding a message, before that worker sends it again (its message is gone).
DROPPED_AFTER_LEASES = 5
#: How often the reaper's thread looks whether its worker holds a message.
IDLE_SAMPLE_SECONDS = 1.0


class StoreClock:
    """The store's clock between one worker's passes, against this host's monotonic
    clock: the lease times are the store's, so a step of its clock (an NTP step on the
    database's host, a resumed virtual machine) makes every live lease look run out,
    though its worker renewed it on time."""

    def __init__(self) -> None:
        self._last: tuple[datetime, float] | None = None
        #: the last pass could not reach the store
        self.away = False

    def ahead(self, store_now: datetime) -> float:
        """Seconds the store's clock ran ahead of this host's since the last call (0 at
        the first)."""
        here = time.monotonic()
        last, self._last = self._last, (store_now, here)
        if last is None:
            return 0.0
        return (store_now - last[0]).total_seconds() - (here - last[1])


def requeue_lost_units(
    app: Any, idle_consumer_of: Sequence[str] = (), clock: StoreClock | None = None
) -> list[str]:
    """One pass: requeue and send the units whose message is lost, then advance the
    campaigns that nothing moves; returns the keys sent. ``idle_consumer_of``: the
    queues of the calling worker when it has held no message for
    ``DROPPED_AFTER_LEASES`` lease periods (see :class:`Idleness`).
    With ``clock`` (the worker's passes so far), a pass that finds the store's clock
    half a lease period or more ahead of this host's since the last one takes no lease
    for run out: their workers renew them, by the new clock, before the next pass."""
    from db.store import StoreError
    from scheduler.canvas import advance, unit_signature
    from workers.tasks.base import worker_store

    lease = reliability().lease_seconds
    try:
        store = worker_store()
        if clock is not None and clock.away:
            # back from an outage, whose leases nobody could renew: their workers (a
            # heartbeat, a finished unit offering its result) renew them now, within a
            # lease period; taken over at once, a finished unit's result was lost
            clock.ahead(store.now())
            clock.away = False
            log.info(
                "the store answers again: leases that ran out while it was away are not "
                "taken for run out until the next look"
            )
            return []
        if clock is not None and (ahead := clock.ahead(store.now())) >= lease / 2:
            log.warning(
                "the store's clock ran %.0f s ahead of this host's since the last look for "
                "lost units (a clock step, or this host suspended): leases are not taken "
                "for run out until the next look",
                ahead,
            )
            return []
        lost = store.requeue_lost(
            lease,
            uuid,
            idle_consumer_of=idle_consumer_of,
            dropped_after=DROPPED_AFTER_LEASES * lease,
        )
    except StoreError as exc:
        if clock is not None:
            clock.away = True
        log.warning("could not look for units of lost workers: %s", exc)
        return []
    sent, sent_ids = [], []
    for unit in lost:
        try:
            unit_signature(
                app, unit.task, unit.queue, unit.campaign_id, unit.key, unit.task_id
            ).apply_async()
        except Exception as exc:  # the broker is away
            if unit.lost_in == "RUNNING":  # its delivery died with it: advance sends it
                log.error("%s: not sent again, left to the next stage opening: %s", unit.key, exc)
                try:
                    store.unclaim([unit.key])
                except StoreError as store_exc:  # the units sent so far are still marked
                    log.error("%s: left QUEUED: %s", unit.key, store_exc)
            else:
                # an earlier message may still be there (the broker was away, not the
                # message): left QUEUED and unsent, that message runs it, or a later
                # pass sends it once the broker is back (made PENDING, it would be dropped)
                log.error("%s: not sent again (%s); sent once the broker is back", unit.key, exc)
            continue
        if unit.lost_in == "QUEUED":
            log.warning("%s: claimed but never sent (its sender died); sent now", unit.key)
        elif unit.lost_in == "SENT":
            log.warning(
                "%s: sent over %.0f s ago to queue %s, which this worker consumed idle all "
                "that time: its message is gone (the broker restarted without persistence, "
                "or evicted it) or another consumer dropped it (a worker on another "
                "database?); sent again",
                unit.key,
                DROPPED_AFTER_LEASES * lease,
                unit.queue,
            )
        else:
            log.warning(
                "%s: its worker %s was lost (no heartbeat for %.0f s); sent again",
                unit.key,
                unit.worker or "(unnamed)",
                2 * lease,
            )
        sent.append(unit.key)
        sent_ids.append(unit.task_id)
    try:
        store.mark_sent(sent_ids)
        stalled = store.stalled_campaigns(2 * lease)
    except StoreError as exc:
        log.warning("could not look for stalled campaigns: %s", exc)
        return sent
    for campaign_id in stalled:
        try:
            opened = advance(store, app, campaign_id)
        except Exception as exc:  # the store or the broker is away: the next pass
            log.error("%s: stalled, and could not advance it: %s", campaign_id, exc)
            continue
        # what it finds (units sent, or the campaign closed) says the stage was left
        # unopened; a campaign advance cannot move stays as it is, and is looked at again
        log.log(
            logging.WARNING if opened else logging.INFO,
            "%s: nothing moved it for %.0f s; advanced it (%d unit(s) sent)",
            campaign_id,
            2 * lease,
            len(opened),
        )
        sent.extend(opened)
    return sent


class Idleness:
    """How long this worker has held no message at all, continuously, consuming the
    same queues. Sampled every second by the reaper's thread; a message received
    between two samples (a unit of a few milliseconds) is told by Celery's
    ``task_received`` signal, in the worker's main process, so that a worker busy with
    short units is never taken for idle. A change of the queues consumed (a pause, a
    queue stopped) starts it over."""

    def __init__(self) -> None:
        self._since: float | None = None
        self._queues: tuple[str, ...] = ()
        self._received = 0.0

    def received(self, **_: Any) -> None:
        self._received = time.monotonic()

    def sample(self, queues: Sequence[str]) -> float:
        """Seconds idle as of now, given :func:`idle_queues` now (0 while it holds a
        message)."""
        now = time.monotonic()
        if tuple(queues) != self._queues:
            self._queues, self._since = tuple(queues), None
        if not queues:
            return 0.0
        if self._since is None:
            self._since = now
        return now - max(self._since, self._received)


def consuming(worker: Any) -> bool:
    """Whether the worker's consumer runs, connected to its broker: a worker cut off from
    it (Redis restarting, away for minutes) or still connecting holds no message, but
    could take none either, so its time then is no idleness."""
    consumer = getattr(worker, "consumer", None)
    try:
        connection = consumer.connection
        return (
            consumer.blueprint.state == bootsteps.RUN
            and connection is not None
            and bool(connection.connected)
        )
    except Exception:  # noqa: BLE001 - not started yet, or torn down: not consuming
        return False


def idle_queues(app: Any) -> list[str]:
    """The queues this worker consumes, when it holds no message (none running, none
    waiting for a pool slot or an ETA); none while it holds one."""
    if (
        worker_state.active_requests
        or worker_state.reserved_requests
        or worker_state.scheduled_requests  # its own ETA / countdown retries
    ):
        return []
    return sorted(app.amqp.queues.consume_from)


class LostUnitReaper(bootsteps.StartStopStep):
    """Runs :func:`requeue_lost_units` every lease period in a daemon thread."""

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.idleness = Idleness()

    def start(self, worker: Any) -> None:
        task_received.connect(self.idleness.received, weak=False)
        self.thread = threading.Thread(
            target=self.run,
            args=(worker.app, worker),
            name="orchard lost-unit reaper",
            daemon=True,
        )
        self.thread.start()

    def run(self, app: Any, worker: Any = None) -> None:
        # the first pass reads the store's clock first: the worker's main process opens
        # its store no sooner than it did (not before its pool's children are forked)
        clock = StoreClock()
        lease = reliability().lease_seconds
        next_pass = time.monotonic() + lease
        while not self.stopping.wait(min(IDLE_SAMPLE_SECONDS, lease)):
            try:
                held = idle_queues(app) if consuming(worker) else []
                idle_for = self.idleness.sample(held)
                if time.monotonic() < next_pass:
                    continue
                next_pass = time.monotonic() + lease
                # its queues only once it has held nothing, connected, for as long as a
                # sent unit must wait before it counts as dropped
                queues = held if idle_for >= DROPPED_AFTER_LEASES * lease else []
                requeue_lost_units(app, queues, clock)
            except Exception:  # never let one bad pass end the thread
                log.exception("looking for units of lost workers failed")

    def stop(self, worker: Any) -> None:
        task_received.disconnect(self.idleness.received)
        self.stopping.set()
