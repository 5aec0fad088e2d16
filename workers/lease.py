"""A delivery's hold on its unit: the lease renewed from a heartbeat thread, and the
store as a task body sees it, each call first checking that the lease is still held."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

from celery.utils.log import get_task_logger

from db.store import LEASE_HELD, Store, StoreError
from workers.config import Reliability

log = get_task_logger("orchard")
# the heartbeat's thread is outside the task, where the task logger's formatter prints
# "???[???]" for its name and id: its lines go through the worker's own format
lease_log = logging.getLogger(__name__)


class UnitAborted(Exception):
    """This delivery must stop without writing a result: ``reason`` is LEASE_LOST
    (another delivery took the unit over), LEASE_CANCELLED (`orchard cancel`), LEASE_GONE
    (`orchard delete`) or WORKER_STOPPING (the body saved its progress and its worker is
    shutting down)."""

    def __init__(self, reason: str = "lost") -> None:
        super().__init__(reason)
        self.reason = reason


class Heartbeat:
    """Renews a delivery's lease every third of its length, in a daemon thread.

    When the store answers that the lease is gone (taken over, unit cancelled) it
    remembers why; :meth:`check` then raises :class:`UnitAborted` in the task's own
    thread, at the body's next store call (every epoch for a CNN fold).
    """

    def __init__(self, store: Store, key: str, holder: str, rules: Reliability) -> None:
        self.store, self.key, self.holder, self.rules = store, key, holder, rules
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease {key}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.rules.heartbeat_seconds):
            try:
                state = self.store.renew_lease(self.key, self.holder, self.rules.lease_seconds)
            except StoreError as exc:
                # keep running: if the store stays away the lease expires, another
                # delivery takes over, and the next renewal finds that out
                lease_log.warning("%s: lease not renewed: %s", self.key, exc)
                continue
            if state != LEASE_HELD:
                if self._stop.is_set():
                    # the body finished while this renewal ran: the lease ended with
                    # the result it recorded, not with a takeover
                    return
                self.lost = state
                lease_log.warning("%s: lease %s; stopping at the next checkpoint", self.key, state)
                return

    def renew_now(self) -> None:
        """Renew the lease in the caller's thread, so that a cancel or a takeover is
        known now rather than at the thread's next turn (up to a third of the lease)."""
        if self.lost is not None:
            return
        try:
            self._renew()
        except StoreError as exc:  # the thread keeps trying; the body goes on meanwhile
            log.warning("%s: lease not renewed: %s", self.key, exc)

    def confirm(self) -> None:
        """Renew the lease now and raise unless this delivery holds it: a
        :class:`UnitAborted`, or the ``StoreError`` of a store that does not answer."""
        self.check()
        self._renew()
        self.check()

    def _renew(self) -> None:
        state = self.store.renew_lease(self.key, self.holder, self.rules.lease_seconds)
        if state != LEASE_HELD:
            self.lost = state

    def check(self) -> None:
        if self.lost is not None:
            raise UnitAborted(self.lost)

    def stop(self) -> None:
        self._stop.set()


class GuardedStore:
    """The store as a task body sees it: every call first checks the heartbeat, so a
    run that lost its unit stops at its next store call (a CNN fold: every epoch).

    ``record_artifact`` is the exception: it describes a file the body has already
    written, and refusing it would leave that file without its checksum, so that the
    next delivery distrusts it and starts over (a fold cancelled while it wrote its
    checkpoint would resume from epoch 0). The body stops at its next guarded call.
    """

    UNGUARDED = frozenset({"record_artifact"})

    def __init__(self, store: Store, check: Callable[[], None]) -> None:
        self._store, self._check = store, check

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr) or name in self.UNGUARDED:
            return attr

        @functools.wraps(attr)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            self._check()
            return attr(*args, **kwargs)

        return guarded
