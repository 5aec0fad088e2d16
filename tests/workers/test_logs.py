"""workers.logs: which of Celery's records go quiet, and which stay."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from celery.exceptions import Reject

from workers import logs


def record(name: str, msg: str, args: tuple = (), exc_info=None) -> logging.LogRecord:  # noqa: ANN001
    return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, exc_info)


REVOKE = "Failed to mark task %s as revoked in backend: %s"


def test_the_no_backend_revoke_warning_is_dropped_and_no_other() -> None:
    keep = logs.NoBackendRevokeFilter().filter
    assert not keep(record(logs.CONTROL_LOGGER, REVOKE, ("id", NotImplementedError("none"))))
    # the same warning for another reason still shows, as does any other record
    assert keep(record(logs.CONTROL_LOGGER, REVOKE, ("id", ConnectionError("redis away"))))
    assert keep(record(logs.CONTROL_LOGGER, "Terminating %s (%s)", ("id", "SIGTERM")))


def raised(exc: BaseException):  # noqa: ANN201
    try:
        raise exc
    except BaseException:
        return sys.exc_info()


def test_a_reject_keeps_its_line_without_its_traceback() -> None:
    keep = logs.RejectTracebackFilter().filter
    rejected = record(logs.TRACE_LOGGER, "Task %s rejected", ("x",), raised(Reject("no unit")))
    assert keep(rejected) and rejected.exc_info is None
    failed = record(logs.TRACE_LOGGER, "Task %s raised", ("x",), raised(ValueError("bug")))
    assert keep(failed) and failed.exc_info is not None  # real failures keep theirs


def test_a_lost_child_s_line_is_a_warning_without_a_traceback() -> None:
    """orchard sends the unit again and names it in its own line; Celery's ERROR and
    traceback read as a failure."""
    from billiard.exceptions import WorkerLostError

    keep = logs.WorkerLostFilter().filter
    lost = WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL) Job: 3.")
    line = record(logs.REQUEST_LOGGER, "Task handler raised error: %r", (lost,), raised(lost))
    line.levelno, line.levelname = logging.ERROR, "ERROR"
    assert keep(line)
    assert (line.levelno, line.levelname, line.exc_info) == (logging.WARNING, "WARNING", None)
    assert "signal 9 (SIGKILL)" in line.getMessage()
    other = record(logs.REQUEST_LOGGER, "Task handler raised error: %r", (ValueError("x"),))
    other.levelno, other.exc_info = logging.ERROR, raised(ValueError("x"))
    assert keep(other) and other.levelno == logging.ERROR and other.exc_info is not None


def test_a_message_left_unacknowledged_by_a_broker_outage_is_a_warning_that_says_why() -> None:
    """kombu says CRITICAL, with a traceback, of what orchard's store makes harmless."""
    keep = logs.UnackedFilter().filter
    away = ConnectionError("Connection refused")
    line = record(logs.REQUEST_LOGGER, "Couldn't ack %r, reason:%r", (7, away), raised(away))
    line.levelno, line.levelname = logging.CRITICAL, "CRITICAL"
    assert keep(line) and (line.levelname, line.exc_info) == ("WARNING", None)
    assert line.getMessage() == (
        "Couldn't ack 7, reason:ConnectionError('Connection refused'); the broker was away: "
        "it hands the message out again after the visibility timeout, and the unit, "
        "recorded in the store, is not run twice"
    )
    assert keep(line) and line.getMessage().count("the broker was away") == 1  # once


def test_install_adds_each_filter_once(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (logs.CONTROL_LOGGER, logs.TRACE_LOGGER, logs.REQUEST_LOGGER):
        monkeypatch.setattr(logging.getLogger(name), "filters", [])
    logs.install()
    logs.install()
    assert [type(f) for f in logging.getLogger(logs.CONTROL_LOGGER).filters] == [
        logs.NoBackendRevokeFilter
    ]
    assert [type(f) for f in logging.getLogger(logs.TRACE_LOGGER).filters] == [
        logs.RejectTracebackFilter
    ]
    assert [type(f) for f in logging.getLogger(logs.REQUEST_LOGGER).filters] == [
        logs.WorkerLostFilter,
        logs.UnackedFilter,
    ]
    assert logging.getLogger(logs.ALEMBIC_LOGGER).level == logging.WARNING


def test_a_failed_units_error_line_shows_control_characters():
    from workers.tasks.base import _one_line

    line = _one_line(FileNotFoundError(2, "No such file", "/d/\x1b[2J.jpg"))
    assert "\x1b" not in line and "\\x1b[2J" in line


def test_a_worker_s_log_times_are_utc_and_say_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a host nine hours ahead of UTC, as on any: the line says 08:48 UTC."""
    import time

    from celery.app.log import TaskFormatter
    from celery.utils.log import ColorFormatter

    from shared.settings import load_settings
    from workers.config import celery_config

    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        config = celery_config(load_settings({"ORCHARD_HOME": str(tmp_path)}))
        # the handlers Celery gives the root and task loggers, as its signal hands them
        worker, task = logging.Logger("root-like"), logging.Logger("celery.task-like")
        for logger, fmt, kind in (
            (worker, config["worker_log_format"], ColorFormatter),
            (task, config["worker_task_log_format"], TaskFormatter),
        ):
            handler = logging.StreamHandler()
            handler.setFormatter(kind(fmt, use_color=False))
            logger.addHandler(handler)
            logs.utc_times(logger=logger)
        other = logging.Formatter("%(asctime)s")  # a handler of someone else's: local
        line = record("celery.worker", "ready")
        line.created, line.msecs, line.processName = 1796546897.718, 718.0, "MainProcess"
        line.levelname = "INFO"
        assert worker.handlers[0].format(line) == (
            "[2026-12-06 08:48:17,718 UTC: INFO/MainProcess] ready"
        )
        assert task.handlers[0].format(line) == (
            "[2026-12-06 08:48:17,718 UTC: INFO/MainProcess] ???[???]: ready"
        )
        assert other.format(line).startswith("2026-12-06 17:48:17")
    finally:
        monkeypatch.undo()
        time.tzset()
