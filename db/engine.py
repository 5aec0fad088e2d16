"""Connecting to the store's database, and what its errors mean.

SQLite gets WAL, a busy timeout and BEGIN IMMEDIATE for writers (several worker
processes share one file); PostgreSQL gets a connect timeout, an application name and no
prepared statements (PgBouncer). Every error a transaction meets is sorted here:
transient (a connection lost or refused, a server restarting, a lock busy), which
:func:`retried` rides out, or the database's answer, which asking again cannot change.
"""

from __future__ import annotations

import functools
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import DBAPIError

from db.errors import StoreError, StoreUnreachableError
from shared.settings import mask_url

_T = TypeVar("_T")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Several worker processes share one SQLite file: WAL lets readers run beside the
    # writer, busy_timeout makes writers wait their turn instead of failing.
    dbapi_connection.isolation_level = None  # we issue BEGIN ourselves, below
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


#: Execution option of a transaction that only reads (``Store._transaction(read_only=True)``).
READ_ONLY = "orchard_read_only"


def _sqlite_begin(conn: Any) -> None:
    # IMMEDIATE takes the write lock up front: a deferred transaction that later
    # writes can fail with SQLITE_BUSY at once, with no wait, under contention.
    # A transaction that only reads begins deferred: in WAL mode it reads a snapshot
    # without the write lock, so it neither waits for another worker's write (SQLite's
    # busy handler sleeps 1 ms and more per try) nor makes a writer wait for it.
    conn.exec_driver_sql(
        "BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE"
    )


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        database = make_url(url).database
        # a ``file:`` URI is SQLite's to read (``?mode=ro``, ``uri=true``), not a folder
        # to make here: SQLite reports what it cannot open, as one line (check_schema)
        if database and database != ":memory:" and not database.startswith("file:"):
            folder = Path(database).expanduser().parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a plain file in the way, no permission
                reason = exc.strerror or type(exc).__name__
                # os.path: Path.exists raises for a folder we may not look into
                in_the_way = next(p for p in (folder, *folder.parents) if os.path.exists(p))
                if not os.path.isdir(in_the_way):
                    reason = f"{in_the_way} is not a directory"
                problem = f"database {mask_url(url)}: cannot create {folder}: {reason}"
                raise StoreError(problem) from None
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True, connect_args=_connect_args(url))


def _connect_args(url: str) -> dict[str, Any]:
    """psycopg's options beyond the URL's: a connect timeout and an application name
    where the URL gives none, and no prepared statements, always."""
    if not url.startswith("postgresql"):
        return {}
    given = make_url(url).query
    args: dict[str, Any] = {
        "connect_timeout": 5,  # fail within seconds when the server is away
        "application_name": "orchard",  # what a DBA's pg_stat_activity tells apart
    }
    args = {name: value for name, value in args.items() if name not in given}
    # psycopg prepares a statement it has run five times on a connection; behind
    # PgBouncer in transaction mode the next transaction may get another server
    # connection, which does not have it ("prepared statement _pg3_0 does not exist")
    args["prepare_threshold"] = None
    return args


#: Free space under which a SQLite store's disk error names how little is left.
LOW_DISK_BYTES = 64 * 1024 * 1024

#: Seconds a store call keeps retrying a lost connection before it gives up with a
#: StoreUnreachableError (ORCHARD_DB_RETRY_SECONDS): long enough to ride out a database
#: restart; a worker whose unit meets a longer outage hands the unit back.
DEFAULT_RETRY_SECONDS = 5.0
#: The most ORCHARD_DB_RETRY_SECONDS may be: a worker holding a unit that long for a
#: database that does not come back is already far past any sensible wait.
MAX_RETRY_SECONDS = 24 * 3600

_retrying_now = threading.local()


class TransientError(StoreUnreachableError):
    """A connection-level failure worth retrying; carries the one-line message."""


#: What libpq says when a connection is refused for what the URL asks, not for the
#: server being away: asking again cannot help (a login, a database or role that is not
#: there, an option it does not take, TLS the server does not offer).
_REFUSED_AT_CONNECT = re.compile(
    r"password authentication failed|authentication failed for user|no pg_hba\.conf entry"
    r"|(database|role) \"[^\"]*\" does not exist|invalid \w+ value|invalid connection option"
    r"|does not support SSL|certificate",
    re.IGNORECASE,
)


#: libpq's prefix naming the server it tried: ``connection to server at "db" (10.0.0.5),
#: port 5432 failed: `` or ``… on socket "/run/postgresql/.s.PGSQL.5432" failed: ``.
_CONNECTION_TO = re.compile(r'connection to server (?:at|on socket) "[^"]*".*? failed: ')


def is_transient(exc: DBAPIError) -> bool:
    """Connection lost or refused, server restarting, lock busy: a retry may succeed.

    Integrity errors, missing tables and bad SQL are not: retrying cannot help; nor is
    a connection refused for what the URL asks (a password, sslmode).
    """
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    if isinstance(orig, sqlite3.OperationalError):
        text = str(orig).lower()
        return "locked" in text or "busy" in text
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    # psycopg's OperationalError: refused/closed connections, admin shutdown, deadlocks,
    # serialization failures, statement and lock timeouts; never constraint violations
    # (IntegrityError). A refusal at connect time carries no SQLSTATE: its words tell
    if not isinstance(orig, psycopg.OperationalError):
        return False
    # the server's words, not the address they name (a host called "certificate-db")
    said = _CONNECTION_TO.sub("", str(orig))
    return bool(getattr(orig, "sqlstate", None)) or not _REFUSED_AT_CONNECT.search(said)


def retried(method: Callable[..., _T]) -> Callable[..., _T]:
    """Run a store method again, with exponential backoff, while the database is away
    (a :class:`TransientError` from its transaction), for its store's ``retry_seconds``.

    Every public method is one transaction, so running it again is safe; the writes
    are idempotent (upserts, conditional updates). Nested calls retry only once, at
    the outermost level.
    """

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> _T:
        if getattr(_retrying_now, "active", False):
            return method(self, *args, **kwargs)
        _retrying_now.active = True
        try:
            deadline = time.monotonic() + self.retry_seconds
            delay = 0.1
            while True:
                try:
                    return method(self, *args, **kwargs)
                except TransientError as exc:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise StoreUnreachableError(
                            f"{exc} (gave up after {self.retry_seconds:g} s of retries)"
                        ) from None
                    time.sleep(min(delay, remaining))
                    delay = min(delay * 2, 2.0)
        finally:
            _retrying_now.active = False

    return wrapper


def unreachable(url: str, exc: Exception) -> StoreUnreachableError:
    """One line for a database at ``url`` that did not answer, or answered "not now"."""
    orig = getattr(exc, "orig", exc)
    reason = str(orig).strip().splitlines()[0]
    # (a refusal at connect time carries no SQLSTATE: its words tell)
    if str(getattr(orig, "sqlstate", "") or "").startswith("53") or re.search(
        r"too many (connections|clients)", reason
    ):
        # PostgreSQL's "insufficient resources" (its disk full, out of memory, too
        # many connections): it answered; asking again may succeed once they are back
        what = "is out of resources"
    elif getattr(orig, "sqlstate", None) in ("57014", "55P03"):
        # its statement_timeout or lock_timeout: a lock held long, a busy server
        what = "timed out"
    else:
        what = "unreachable"
    return StoreUnreachableError(f"database {mask_url(url)} {what}: {reason}")


def refused(url: str, exc: DBAPIError) -> StoreError:
    """One line for a database at ``url`` that answered no (asking again cannot help)."""
    reason = str(exc.orig).strip().splitlines()[0] + _sqlite_disk_note(url, exc)
    return StoreError(f"database {mask_url(url)} refused: {reason}")


def _sqlite_disk_note(url: str, exc: DBAPIError) -> str:
    """Where SQLite says its disk is full or failed (``disk I/O error``: its -shm
    file could not grow), how much room the store's disk has left, if little."""
    errorname = getattr(exc.orig, "sqlite_errorname", "")
    if not errorname.startswith(("SQLITE_FULL", "SQLITE_IOERR")):
        return ""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return ""
    folder = Path(database).expanduser().absolute().parent
    try:
        stat = os.statvfs(folder)
    except OSError:
        return ""
    free = stat.f_bavail * stat.f_frsize
    if free >= LOW_DISK_BYTES:
        return ""
    return f" (the disk holding {folder} has {free:,} bytes free)"


def describe_error(url: str, exc: DBAPIError) -> StoreError:
    """One line for what opening the store met. "Unreachable" (a StoreUnreachableError:
    a worker keeps its unit for later) only where asking again may succeed: a server
    that refused or lost the connection, a lock held too long. Anything else is the
    database's answer, which asking again cannot change."""
    if is_transient(exc):
        return unreachable(url, exc)
    if url.startswith("sqlite") and (problem := _sqlite_file_problem(url, exc)):
        return StoreError(f"database {mask_url(url)}: {problem}")
    return refused(url, exc)


def _sqlite_file_problem(url: str, exc: DBAPIError) -> str | None:
    """What is wrong with a SQLite store's path, where SQLite's own line does not say
    (``unable to open database file``, ``file is not a database``); None: nothing
    the path shows."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None  # an SQLite URI: SQLite's line is all there is
    path = Path(database).expanduser().absolute()
    # os.path: Path.is_dir raises for a folder we may not look into
    if os.path.isdir(path):
        return f"{path} is a directory, not a SQLite file"
    header = b""
    if os.path.isfile(path):  # a regular file only: reading a FIFO would wait for a writer
        try:
            with path.open("rb") as file:
                header = file.read(16)
        except OSError:
            header = b""  # not ours to read: SQLite's line says so
    if header and header != b"SQLite format 3\x00":  # an empty file is a new database
        return f"{path} is not a SQLite database"
    errorname = getattr(exc.orig, "sqlite_errorname", "")
    cannot = errorname.startswith(("SQLITE_CANTOPEN", "SQLITE_READONLY"))
    if cannot and not os.access(path.parent, os.W_OK):
        folder = f"{path.parent} is not writable by this user (uid {os.geteuid()})"
        if not os.path.exists(path):
            return f"cannot create {path}: {folder}"
        return (
            f"{folder}: SQLite needs to create its -wal and -shm files beside the store, "
            "so the folder must be writable"
        )
    return None
