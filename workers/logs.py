"""Worker log records that say nothing to an orchard user, made quiet.

- Each ``orchard cancel`` made every worker warn, once per revoked unit, ``Failed to
  mark task … as revoked in backend: No result backend is configured``: Celery tries to
  record the revocation in a result backend, and orchard has none on purpose (a
  cancelled unit is ``CANCELLED`` in the store). Only that warning, for that reason, is
  dropped.
- A task that rejects its message (a malformed message, a unit this store never had, a
  fold handed back by a stopping worker) has already said why in one line of orchard's
  own; Celery's ``Task … rejected`` line stays, without the traceback of the ``Reject``
  that Celery logs with it.
- A prefork child killed mid-unit (SIGKILL, the OOM killer): Celery's ``Task handler
  raised error: WorkerLostError(…)`` comes at WARNING and without a traceback, which
  says nothing of the unit: orchard requeues its message (reject on worker lost) and
  says so in a line of its own, naming the unit (``child … was lost mid-unit``).
- A message that cannot be acknowledged or rejected because the broker went away
  (kombu's CRITICAL ``Couldn't ack …`` with a traceback): a WARNING line that says what
  follows: the broker hands the message out again after the visibility timeout, and
  its unit, recorded in the store, is not run twice.
- Alembic's ``Context impl SQLiteImpl.`` / ``Will assume non-transactional DDL.``,
  logged at INFO by each worker process as it checks the store's schema, are left out
  (Alembic's WARNING and above still show; ``orchard db upgrade`` is unchanged).
- Times are UTC, whatever the host's zone (``[2026-12-07 08:48:17,718 UTC: INFO/…]``,
  the formats in ``workers.config``): the logs of workers in several zones line up with
  each other and with ``orchard status``.

Logger filters apply to records logged on that very logger, so the rest of Celery's
logging is untouched. The app of a worker installs them (``workers.app.make_app``).
"""

from __future__ import annotations

import logging
import time

from billiard.exceptions import WorkerLostError
from celery.exceptions import Reject

#: Celery's loggers (``celery.utils.log.get_logger(__name__)`` in each module).
CONTROL_LOGGER = "celery.worker.control"
TRACE_LOGGER = "celery.app.trace"
REQUEST_LOGGER = "celery.worker.request"


class NoBackendRevokeFilter(logging.Filter):
    """Drops ``Failed to mark task … as revoked in backend`` when the cause is that no
    result backend is configured (Celery's ``DisabledBackend`` raises
    NotImplementedError); any other failure to mark it still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Failed to mark task %s as revoked in backend"):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        return not any(isinstance(arg, NotImplementedError) for arg in args)


class RejectTracebackFilter(logging.Filter):
    """Keeps Celery's one-line ``Task …[id] Reject(…)`` record, without its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], Reject):
            record.exc_info = None
            record.exc_text = None
        return True


class WorkerLostFilter(logging.Filter):
    """Celery's ``Task handler raised error: WorkerLostError(…)`` as a WARNING line, with
    no traceback: the unit is sent again, not failed (its other records pass as they are)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if record.levelno >= logging.ERROR and any(
            isinstance(arg, WorkerLostError) for arg in args
        ):
            _as_warning(record)
        return True


class UnackedFilter(logging.Filter):
    """kombu's ``Couldn't ack`` / ``Couldn't reject`` of a message the broker's loss
    left unsettled: a WARNING line with what follows, no traceback."""

    FOLLOWS = (
        "; the broker was away: it hands the message out again after the visibility "
        "timeout, and the unit, recorded in the store, is not run twice"
    )

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(("Couldn't ack", "Couldn't reject")):
            if not str(record.msg).endswith(self.FOLLOWS):
                record.msg = f"{record.msg}{self.FOLLOWS}"
            _as_warning(record)
        return True


def _as_warning(record: logging.LogRecord) -> None:
    """A record of what orchard handles: a WARNING line, without its traceback."""
    record.levelno, record.levelname = logging.WARNING, "WARNING"
    record.exc_info = None
    record.exc_text = None


def utc_times(logger: logging.Logger | None = None, **_: object) -> None:
    """Celery's ``after_setup_logger`` / ``after_setup_task_logger``: the formatters of
    the handlers it gave ``logger`` (and the multiprocessing logger, set up with the
    root's) write their times in UTC; other handlers of the process are not touched."""
    from celery.utils.log import get_multiprocessing_logger

    for each in (logger, get_multiprocessing_logger() if logger is logging.root else None):
        for handler in each.handlers if each is not None else ():
            if handler.formatter is not None:
                handler.formatter.converter = time.gmtime


#: Alembic's logger of the migration context, which a worker's schema check opens.
ALEMBIC_LOGGER = "alembic.runtime.migration"


def install() -> None:
    """Add the filters to Celery's loggers, once per process; Alembic's migration
    context to WARNING (a worker migrates nothing); the times of the handlers Celery
    sets up, in UTC."""
    from celery import signals

    signals.after_setup_logger.connect(utc_times, weak=False, dispatch_uid="orchard-utc")
    signals.after_setup_task_logger.connect(utc_times, weak=False, dispatch_uid="orchard-utc-task")
    logging.getLogger(ALEMBIC_LOGGER).setLevel(logging.WARNING)
    for name, kind in (
        (CONTROL_LOGGER, NoBackendRevokeFilter),
        (TRACE_LOGGER, RejectTracebackFilter),
        (REQUEST_LOGGER, WorkerLostFilter),
        (REQUEST_LOGGER, UnackedFilter),
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())
