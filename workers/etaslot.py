"""A message with an ETA keeps the prefetch slot it was fetched into until it runs.

orchard's tasks put a unit off with ``task.retry(countdown=...)`` (the store unreachable,
the unit's lease still held by another delivery, ...: from 1 s to a lease period and a
second), which sends the task again as a message with an ETA. A Celery worker fetches
such a message at once and holds it in memory until it is due, and raises its prefetch
count by one for each one it holds (``consumer.qos.increment_eventually`` in
``celery.worker.strategy``), so that it goes on fetching other work meanwhile. With
orchard's long units that other work is a fold of minutes or hours: a solo-pool GPU
worker (or a prefork worker whose children are all busy) runs it, and the retry, due in
seconds, waits for it to end while other workers of its queue idle. During a database
outage one worker's "store unreachable, message kept for later" retries drained the
whole queue into it, and once the database was back it ran them one after another
beside an idle worker.

:class:`EtaKeepsItsSlot` keeps the prefetch count at the worker's own (concurrency ×
``worker_prefetch_multiplier``, which orchard sets to 1): a worker that holds a retry
fetches nothing more into that slot, so the retry finds it free when due, and the other
messages stay on the broker for the workers that are free. The price is that slot
idling until the retry is due.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps

__all__ = ["EtaKeepsItsSlot"]


def keep_prefetch_count(c: Any) -> None:
    """Make ``c.qos`` (the consumer's kombu ``QoS``) keep the consumer's prefetch count
    when an ETA message is fetched or runs.

    ``increment_eventually`` and ``decrement_eventually`` are what the ETA path calls
    (the strategy when it holds one, ``Consumer.apply_eta_task`` when it is due); their
    only other caller is ``Consumer._update_prefetch_count``, after a pool grows or
    shrinks (``pool_grow`` / ``pool_shrink`` remote control), which sets
    ``c.initial_prefetch_count`` to the new count first. Both therefore set the count
    to ``c.initial_prefetch_count``, which is also what a reconnection's reduced count
    and its gradual restoration (``_restore_prefetch_count_after_connection_restart``)
    keep it equal to. A count of 0 (prefetch off) stays 0, as in kombu.
    """
    qos = c.qos

    def keep(n: int = 1) -> int:
        with qos._mutex:
            if qos.value:
                qos.value = c.initial_prefetch_count or qos.value
            return qos.value

    qos.increment_eventually = keep
    qos.decrement_eventually = keep


class EtaKeepsItsSlot(bootsteps.StartStopStep):
    """Consumer bootstep applying :func:`keep_prefetch_count` to the task consumer's QoS.

    ``Tasks.start`` makes ``c.qos`` anew on every connection, a reconnection included
    (the consumer's blueprint starts every step again, in order, after a connection
    loss); this step requires it, so its ``start`` runs after it each time.

    Left off under ``--autoscale``: the autoscaler changes the pool and the prefetch
    count by itself, and orchard does not offer it.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        controller = c.controller  # the WorkController
        autoscaling = getattr(controller, "autoscaler", None) or getattr(
            controller, "autoscale", None
        )
        if autoscaling or c.qos is None:
            return
        keep_prefetch_count(c)
