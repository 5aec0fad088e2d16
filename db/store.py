"""The store: every public method is one transaction and returns frozen values.

SQLite (the default, one file) and PostgreSQL share the code. Writes that a
re-delivered task may repeat are idempotent by construction: results, predictions
and metrics are unique per unit, and state changes are conditional updates that
report whether they won.

A unit is leased to the delivery running it (holder + expiry, taken under a row lock
in ``start_unit``, renewed by ``renew_lease``), so two deliveries of one task never run
it at once, and a dead holder's unit is taken over once its lease runs out.
Connection-level errors (server restarting, connection cut, SQLite busy) are retried
with exponential backoff for ``retry_seconds`` (ORCHARD_DB_RETRY_SECONDS) before a
StoreError naming the masked URL; integrity and SQL errors are never retried.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import (
    Engine,
    Select,
    Text,
    and_,
    bindparam,
    case,
    cast,
    create_engine,
    delete,
    event,
    false,
    func,
    make_url,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from db import migrate
from db.models import (
    ArtifactRow,
    AttemptRow,
    CampaignRow,
    DeletedCampaignRow,
    MetricRow,
    PredictionRow,
    ResultRow,
    UnitParamRow,
    UnitRow,
    utcnow,
)
from shared.errors import OrchardError, UnreachableError
from shared.metrics import finite_or_none
from shared.plan import (
    CANCELLED,
    FAILED,
    PENDING,
    PREPROCESS,
    QUEUED,
    REPORT,
    RUNNING,
    SUCCESS,
    TERMINAL,
    UnitPlan,
    UnitState,
    largest_n_components,
    next_actions,
)
from shared.settings import env_number, mask_url
from shared.spec import CAMPAIGN_FORMAT, formats_alike
from shared.times import as_utc

_T = TypeVar("_T")


class StoreError(OrchardError):
    """The store is unreachable, not initialised, or asked for something absent."""


class StoreUnreachableError(StoreError, UnreachableError):
    """The database did not answer for the whole retry budget (connection refused or
    lost, a server restarting or failing over, a lock held too long): nothing was wrong
    with what was asked, and asking again later may succeed."""


class SchemaError(StoreError):
    """The store's schema is not this orchard's: older (``orchard db upgrade`` mends it),
    newer (the orchard that upgraded it must run), or not there yet."""


class NotFoundError(StoreError):
    """No such campaign or unit: asking again cannot help."""


class CampaignDeletedError(NotFoundError):
    """The campaign was in this store, and ``orchard delete`` removed it."""

    def __init__(self, campaign_id: str, deleted_at: datetime) -> None:
        super().__init__(
            f"campaign {campaign_id} was deleted (`orchard delete`) at "
            f"{deleted_at:%Y-%m-%d %H:%M:%S} UTC"
        )
        self.deleted_at = deleted_at


class UnitCancelledError(OrchardError):
    """``finish_unit`` on a unit that ``orchard cancel`` stopped: nothing is written."""


class LeaseLostError(OrchardError):
    """``finish_unit`` by a delivery that no longer holds its unit (another delivery
    took it over, or ``orchard resume`` reset it): nothing is written."""


class DeleteRefusedError(OrchardError):
    """``delete_campaign`` of a campaign that something still uses: it runs, a worker
    may still be stopping one of its units, or another campaign reuses its results."""


class BeingDeletedError(OrchardError):
    """``resume_campaign`` of a campaign whose delete began and did not finish."""

    def __init__(self, campaign_id: str) -> None:
        super().__init__(
            f"campaign {campaign_id} is being deleted: `orchard delete {campaign_id}` "
            "finishes a delete that stopped midway"
        )


#: A campaign's state from the moment ``delete_campaign`` decides to delete it until
#: its last row goes: nothing resumes it, reuses its results or runs its units.
DELETING = "DELETING"

#: Rows ``delete_campaign`` removes per transaction. On SQLite each transaction holds
#: the store's write lock, so workers' calls wait for one batch (about 0.1 s), not for
#: the whole campaign (5 million prediction rows: 7 s in one transaction).
DELETE_BATCH_ROWS = 50_000

#: Seconds a delete on SQLite waits between its batches. SQLite has no queue for its
#: lock: a writer that waits polls it, at most 0.1 s apart, and a delete that took the
#: lock again at once would keep it from a worker for many batches (seen: 3.9 s).
SQLITE_BATCH_PAUSE = 0.1


#: Unit keys (or task ids) per statement where a call names many units: a stage of
#: thousands of units stays far below the parameter limits (PostgreSQL 65,535, SQLite
#: 32,766), and the claim's CASE over the task ids, which the database evaluates for
#: each row it updates, stays short.
KEYS_PER_STATEMENT = 500

#: How the campaign row is held while units are reopened, claimed or closed under it:
#: FOR NO KEY UPDATE on PostgreSQL (SQLite's BEGIN IMMEDIATE already serialises
#: writers), which these writers take in turn, but which does not stop a worker
#: recording a file or result of the campaign meanwhile (that insert takes the row's
#: KEY SHARE lock for its foreign key): with FOR UPDATE, a worker's finish (unit row
#: locked, then the campaign's) and a cancel (the campaign's, then the unit rows)
#: deadlocked, one of them waiting out PostgreSQL's deadlock_timeout before its retry
_CAMPAIGN_LOCK = {"key_share": True}


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ---------------------------------------------------------------- values handed to callers


@dataclass(frozen=True, slots=True)
class Campaign:
    id: str
    name: str
    source: str
    digest: str
    spec: dict[str, Any]
    classes: tuple[str, ...]
    state: str
    created_at: datetime
    finished_at: datetime | None
    #: shared.spec.CAMPAIGN_FORMAT of the orchard that submitted it
    format_version: int = 1


@dataclass(frozen=True, slots=True)
class Unit:
    key: str
    campaign_id: str
    family: str
    stage: int
    fold: int | None
    params: dict[str, Any]
    params_hash: str
    task: str
    queue: str
    state: str
    attempts: int
    worker: str | None
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    task_id: str | None = None
    lease_holder: str | None = None
    lease_expires_at: datetime | None = None
    heartbeat_at: datetime | None = None


#: Why a unit the store gave up on failed, where no delivery recorded an error
NO_RESULT = (
    "each delivery ended without a result (its worker killed or out of memory, or the "
    "database away as it ended)"
)

#: :class:`EarlierAttempt`'s state for an attempt whose process died under a live
#: worker (a prefork child killed), which ended its lease at once.
LOST = "LOST"


@dataclass(frozen=True, slots=True)
class EarlierAttempt:
    """An attempt that did not end its unit (:class:`db.models.AttemptRow`): its worker,
    when it started and was last heard from (its heartbeat), and the unit's state when
    the next attempt took over (RUNNING: its lease ran out; LOST: its process died, as
    its worker saw; QUEUED: sent again, its worker lost or handed back; FAILED,
    CANCELLED: reset by a resume), with its error."""

    worker: str | None
    started_at: datetime
    last_heard_at: datetime | None
    state: str
    error: str | None


@dataclass(frozen=True, slots=True)
class LostUnit:
    """A unit to send again (see :meth:`Store.requeue_lost`): where to send it, under
    which task id, and where it was lost: RUNNING (its delivery died with its worker),
    QUEUED (claimed, but its message never reached the broker) or SENT (its message was
    taken and dropped by a worker that is not of this store)."""

    campaign_id: str
    key: str
    task: str
    queue: str
    task_id: str
    lost_in: str = RUNNING
    worker: str | None = None  # lost in RUNNING: the worker that ran it


class OpenedStage(NamedTuple):
    """What :meth:`Store.open_stage` decided: every unit's route (failures applied), the
    keys claimed in plan order with their task ids, and the units it failed, each with
    its error (their input failed: ``preprocessing failed: …``)."""

    routes: list[UnitRoute]
    claimed: list[str]
    task_ids: dict[str, str]
    failed: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class UnitRoute:
    """What deciding and sending the next stage needs of a unit: no params, no times."""

    key: str
    stage: int
    state: str
    task: str
    queue: str


@dataclass(frozen=True, slots=True)
class Result:
    unit_key: str
    train_acc: float | None
    val_acc: float | None
    test_acc: float | None
    val_confusion: list[list[int]] | None
    test_confusion: list[list[int]] | None
    fit_seconds: float
    extra: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Prediction:
    image_id: str
    label: int
    pred: int
    probs: list[float] | None = None


@dataclass(frozen=True, slots=True)
class Artifact:
    path: str
    kind: str
    sha256: str
    size: int
    campaign_id: str | None = None
    unit_key: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a finished unit hands to :meth:`Store.finish_unit`, written atomically."""

    fit_seconds: float
    train_acc: float | None = None
    val_acc: float | None = None
    test_acc: float | None = None
    val_confusion: list[list[int]] | None = None
    test_confusion: list[list[int]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    predictions: dict[str, Sequence[Prediction]] = field(default_factory=dict)  # split -> rows
    artifacts: Sequence[Artifact] = ()
    # artifact paths needed only while the unit ran (a fold's checkpoints): their
    # records go in the result's transaction, and the worker then removes the files
    scratch: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class Start:
    """Whether a task should run its unit.

    ``run`` False and ``reason``: ``finished`` (already terminal: nothing to do),
    ``leased`` (another delivery holds a live lease: come back in ``retry_in`` seconds,
    never drop the message), ``grace`` (the last attempt's lease ran out less than a
    lease period ago: its holder may still renew it; come back in ``retry_in``),
    ``gave up`` (too many attempts: now FAILED) or ``cancelled`` (the campaign was
    cancelled: now CANCELLED).
    """

    run: bool
    attempts: int
    state: str
    reason: str = ""
    retry_in: float = 0.0
    #: with ``run``: the unit as this start left it (RUNNING, its params) and its
    #: campaign, read in the start's transaction: the delivery needs no reads of its own
    unit: Unit | None = None
    campaign: Campaign | None = None
    #: with ``reason="newer format"``: the campaign's format
    format_version: int | None = None


#: what :meth:`Store.renew_lease` finds
LEASE_HELD, LEASE_LOST, LEASE_CANCELLED = "held", "lost", "cancelled"
#: What a renewal finds when the unit is no longer in the store: `orchard delete`.
LEASE_GONE = "gone"


@dataclass(frozen=True, slots=True)
class Cancelled:
    """What ``cancel_campaign`` did: the task ids to revoke and how many units it stopped."""

    state: str  # the campaign's state afterwards
    task_ids: list[str]
    units: int
    already_finished: bool = False  # it was not RUNNING: nothing was done


@dataclass(frozen=True, slots=True)
class Deletion:
    """What ``delete_campaign`` removed (or, in a dry run, would remove) from the store."""

    campaign_id: str
    state: str  # the campaign's state when it was deleted
    units: int
    artifacts: list[Artifact]  # the records of files in the campaign's own folder


# ---------------------------------------------------------------- the store


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
_READ_ONLY = "orchard_read_only"


def _sqlite_begin(conn: Any) -> None:
    # IMMEDIATE takes the write lock up front: a deferred transaction that later
    # writes can fail with SQLITE_BUSY at once, with no wait, under contention.
    # A transaction that only reads begins deferred: in WAL mode it reads a snapshot
    # without the write lock, so it neither waits for another worker's write (SQLite's
    # busy handler sleeps 1 ms and more per try) nor makes a writer wait for it.
    conn.exec_driver_sql(
        "BEGIN" if conn.get_execution_options().get(_READ_ONLY) else "BEGIN IMMEDIATE"
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


class _TransientError(StoreUnreachableError):
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


def _is_transient(exc: DBAPIError) -> bool:
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


def _retried(method: Callable[..., _T]) -> Callable[..., _T]:
    """Run a store method again, with exponential backoff, while the database is away.

    Every public method is one transaction, so running it again is safe; the writes
    are idempotent (upserts, conditional updates). Nested calls retry only once, at
    the outermost level.
    """

    @functools.wraps(method)
    def wrapper(self: Store, *args: Any, **kwargs: Any) -> _T:
        if getattr(_retrying_now, "active", False):
            return method(self, *args, **kwargs)
        _retrying_now.active = True
        try:
            deadline = time.monotonic() + self.retry_seconds
            delay = 0.1
            while True:
                try:
                    return method(self, *args, **kwargs)
                except _TransientError as exc:
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


class Store:
    def __init__(
        self, url: str, *, engine: Engine | None = None, retry_seconds: float | None = None
    ) -> None:
        self.url = url
        if retry_seconds is None:  # checked first: a bad setting makes no folder
            try:
                retry_seconds = env_number(
                    "ORCHARD_DB_RETRY_SECONDS",
                    DEFAULT_RETRY_SECONDS,
                    float,
                    "a number of seconds",
                    maximum=MAX_RETRY_SECONDS,
                    limit=f"{MAX_RETRY_SECONDS} (1 day)",
                    zero=True,  # 0: give up at the first lost connection
                )
            except OrchardError as exc:
                raise StoreError(str(exc)) from None
        self.retry_seconds = retry_seconds
        self.engine = engine or make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # PostgreSQL serves workers on many hosts: its clock is the one they share
        self._server_clock = self.engine.dialect.name == "postgresql"

    def __repr__(self) -> str:
        return f"Store({mask_url(self.url)!r})"

    def dispose(self) -> None:
        self.engine.dispose()

    # -- schema

    def upgrade(self) -> tuple[str | None, str]:
        """Create or migrate the schema to the newest; returns the revisions before
        (None: no schema yet) and after."""
        try:
            # read under the migration's lock: of several upgrades at once, one says
            # "created" and the others what they found
            before = migrate.upgrade(self.engine)
        except migrate.UnknownRevisionError as exc:
            raise SchemaError(self._unknown_schema(exc.revision, exc.store_tables)) from None
        except migrate.TablesInTheWayError as exc:
            raise SchemaError(self._tables_in_the_way(exc.tables)) from None
        except migrate.BrokenReferencesError as exc:
            raise SchemaError(f"database {mask_url(self.url)}: {exc}") from None
        except (OperationalError, DBAPIError) as exc:
            raise self.describe_error(exc) from None
        return before, migrate.head_revision()

    def create_or_check(self) -> None:
        """A submit's check: create the schema in a database that has none (a first
        campaign needs no `orchard db upgrade`); an existing schema must be this
        orchard's, as for every other command. Migrating one is `orchard db upgrade`'s,
        run once while the workers are stopped, never a side effect of a submit."""
        if self.revision() is None:
            self.upgrade()  # another submit may have created it meanwhile: checked below
        self.check_schema()

    def revision(self) -> str | None:
        """The schema's Alembic revision (None: no schema yet)."""
        try:
            return migrate.current_revision(self.engine)
        except (OperationalError, DBAPIError) as exc:
            raise self.describe_error(exc) from None

    def check_schema(self) -> None:
        """Raise StoreError unless the schema is at the newest migration."""
        current = self.revision()
        if current == migrate.head_revision():
            return
        if current is None:
            if found := self._orchard_tables():
                raise SchemaError(self._tables_in_the_way(found))
            raise SchemaError(
                f"database {mask_url(self.url)} has no orchard tables yet: run `orchard db upgrade`"
            )
        if current not in migrate.known_revisions():
            found = self._orchard_tables()
            store_tables = any(table in found for table in migrate.STORE_TABLES)
            raise SchemaError(self._unknown_schema(current, store_tables))
        raise SchemaError(
            f"database {mask_url(self.url)} is at schema {current}, expected "
            f"{migrate.head_revision()}: run `orchard db upgrade`"
        )

    def check_writable(self) -> None:
        """Raise StoreError unless the store takes writes: a read-only SQLite file (or
        folder), a PostgreSQL hot standby or ``default_transaction_read_only``, a role
        that may only read. A worker started against one kept every unit's message
        for later, for ever, while `orchard status` blamed missing workers. Writes
        nothing: an update of no row, rolled back (SQLite takes its write lock, and
        PostgreSQL checks the privilege and the transaction, all the same)."""
        try:
            with self.engine.connect() as conn, conn.begin() as transaction:
                conn.execute(update(UnitRow).where(false()).values(id=UnitRow.id))
                transaction.rollback()
        except DBAPIError as exc:
            raise self.describe_error(exc) from None

    def _orchard_tables(self) -> list[str]:
        try:
            return migrate.orchard_tables(self.engine)
        except (OperationalError, DBAPIError) as exc:
            raise self.describe_error(exc) from None

    def _unknown_schema(self, current: str, store_tables: bool) -> str:
        if not store_tables:
            # another application's Alembic revision, in a database shared with it: no
            # orchard, newer or not, made this; its tables are not orchard's to touch
            return (
                f"database {mask_url(self.url)} holds another application's Alembic schema "
                f"(revision {current}) and no orchard tables: give orchard a database of its own"
            )
        # a newer orchard upgraded it (on another host, or before a rollback): upgrading
        # from here cannot work, and downgrading would throw away what it added
        return (
            f"database {mask_url(self.url)} is at schema {current}, newer than this orchard "
            f"knows (its newest is {migrate.head_revision()}): run the orchard that upgraded "
            "it, on every host"
        )

    def _tables_in_the_way(self, tables: list[str]) -> str:
        # no alembic_version, yet a table orchard would create: another application's
        # (creating orchard's would fail on it), or a store that lost its alembic_version
        what = f"tables orchard would create ({', '.join(tables)})"
        if len(tables) == 1:
            what = f"a table orchard would create ({tables[0]})"
        return (
            f"database {mask_url(self.url)} has no orchard schema but already holds {what}: "
            "give orchard a database of its own"
        )

    # -- transactions

    def _now(self, s: Session) -> datetime:
        """The time of every timestamp and lease the store writes or compares.

        On PostgreSQL the server's clock, so workers on hosts whose clocks disagree
        still agree on whether a lease has run out (and unit times from different hosts
        can be compared); SQLite is one file on one host, whose clock all its workers
        read. Always in UTC: psycopg hands the server's time back in the session's time
        zone, where adding a lease's seconds is local-clock arithmetic, an hour off
        across a summer time change.
        """
        if self._server_clock:
            return as_utc(s.scalar(select(func.clock_timestamp())))
        return utcnow()

    @_retried
    def live_leases(self, limit: int = 3) -> tuple[int, list[tuple[str, str | None]]]:
        """How many units a delivery runs now (RUNNING, the lease not run out), and the
        ``limit`` longest running, with their workers: what `orchard db upgrade` asks
        before it migrates. Reads only columns every schema since 0002 has."""
        with self._transaction(read_only=True) as s:
            live = (UnitRow.state == RUNNING) & (UnitRow.lease_expires_at > self._now(s))
            count = s.scalar(select(func.count()).select_from(UnitRow).where(live)) or 0
            first = s.execute(
                select(UnitRow.key, UnitRow.worker)
                .where(live)
                .order_by(UnitRow.started_at, UnitRow.key)
                .limit(limit)
            ).all()
        return count, [(key, worker) for key, worker in first]

    @_retried
    def now(self) -> datetime:
        """The store's clock (:meth:`_now`), aware UTC: what a lease read from the store
        is to be compared with, whatever this host's clock says."""
        with self._transaction(read_only=True) as s:
            return self._now(s)

    def _unreachable(self, exc: Exception) -> StoreUnreachableError:
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
        return StoreUnreachableError(f"database {mask_url(self.url)} {what}: {reason}")

    def _refused(self, exc: DBAPIError) -> StoreError:
        reason = str(exc.orig).strip().splitlines()[0] + self._sqlite_disk_note(exc)
        return StoreError(f"database {mask_url(self.url)} refused: {reason}")

    def _sqlite_disk_note(self, exc: DBAPIError) -> str:
        """Where SQLite says its disk is full or failed (``disk I/O error``: its -shm
        file could not grow), how much room the store's disk has left, if little."""
        errorname = getattr(exc.orig, "sqlite_errorname", "")
        if not errorname.startswith(("SQLITE_FULL", "SQLITE_IOERR")):
            return ""
        database = make_url(self.url).database
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

    def describe_error(self, exc: DBAPIError) -> StoreError:
        """One line for what opening the store met. "Unreachable" (a StoreUnreachableError:
        a worker keeps its unit for later) only where asking again may succeed: a server
        that refused or lost the connection, a lock held too long. Anything else is the
        database's answer, which asking again cannot change."""
        if _is_transient(exc):
            return self._unreachable(exc)
        if self.engine.dialect.name == "sqlite" and (problem := self._sqlite_file_problem(exc)):
            return StoreError(f"database {mask_url(self.url)}: {problem}")
        return self._refused(exc)

    def _sqlite_file_problem(self, exc: DBAPIError) -> str | None:
        """What is wrong with a SQLite store's path, where SQLite's own line does not say
        (``unable to open database file``, ``file is not a database``); None: nothing
        the path shows."""
        database = make_url(self.url).database
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

    @contextmanager
    def _transaction(self, *, read_only: bool = False) -> Iterator[Session]:
        session = self._sessions()
        try:
            with session.begin():
                if read_only:  # before the first statement, which begins the transaction
                    session.connection(execution_options={_READ_ONLY: True})
                yield session
        except DBAPIError as exc:
            if _is_transient(exc):
                raise _TransientError(str(self._unreachable(exc))) from None
            if not isinstance(exc, IntegrityError):
                # reached, and it answered no: a read-only file, a full disk, a table
                # gone, a read-only server (a hot standby, default_transaction_read_only),
                # a role without the privilege; not "unreachable", which sends one
                # looking for the server. A worker keeps its unit's message for later
                raise self._refused(exc) from None
            raise  # orchard's writes are idempotent: a constraint broken is its bug
        finally:
            session.close()

    # -- campaigns

    @_retried
    def create_campaign(
        self,
        campaign_id: str,
        *,
        name: str,
        source: str,
        digest: str,
        spec: dict[str, Any],
        classes: Sequence[str],
        units: Sequence[UnitPlan],
        artifacts: Iterable[Artifact] = (),
        data_digest: str | None = None,
        format_version: int = CAMPAIGN_FORMAT,
    ) -> None:
        # Core inserts of many rows each (executemany), not one ORM object per unit: the
        # ORM inserted units and params a row per statement on SQLite (it needs each new
        # id back in order), five statements per unit
        with self._transaction() as s:
            recorded = s.execute(
                select(CampaignRow.digest, CampaignRow.source).where(CampaignRow.id == campaign_id)
            ).first()
            if recorded is not None:
                # a retry whose first try committed, its reply lost with the connection:
                # done already (ids carry the time and a random part; one that names
                # another campaign is a collision, refused)
                if tuple(recorded) == (digest, source):
                    return
                raise StoreError(f"campaign {campaign_id} already exists")
            now = self._now(s)
            s.execute(
                _table(CampaignRow).insert(),
                {
                    "id": campaign_id,
                    "name": name,
                    "source": source,
                    "digest": digest,
                    "spec": spec,
                    "classes": list(classes),
                    "state": "RUNNING",
                    "created_at": now,
                    "data_digest": data_digest,
                    "format_version": format_version,
                },
            )
            if units:
                s.execute(
                    _table(UnitRow).insert(),
                    [
                        {
                            "key": plan.key,
                            "campaign_id": campaign_id,
                            "family": plan.family,
                            "stage": plan.stage,
                            "fold": plan.fold,
                            "params_hash": plan.params_hash,
                            "task": plan.task,
                            "queue": plan.queue,
                            "position": position,
                            "state": PENDING,
                            "attempts": 0,
                        }
                        for position, plan in enumerate(units)
                    ],
                )
                ids = dict(
                    s.execute(
                        select(UnitRow.key, UnitRow.id).where(UnitRow.campaign_id == campaign_id)
                    ).all()
                )
                params = [
                    {"unit_id": ids[plan.key], "name": k, "value": v}
                    for plan in units
                    for k, v in plan.params.items()
                ]
                if params:
                    s.execute(_table(UnitParamRow).insert(), params)
            for artifact in artifacts:
                self._record_artifact_without_commit(s, artifact, now)

    @_retried
    def find_campaign(self, campaign_id: str) -> Campaign | None:
        with self._transaction(read_only=True) as s:
            row = s.get(CampaignRow, campaign_id)
            return _campaign(row) if row else None

    def get_campaign(self, campaign_id: str) -> Campaign:
        campaign = self.find_campaign(campaign_id)
        if campaign is None:
            raise self._no_campaign(campaign_id)
        return campaign

    @_retried
    def deleted_at(self, campaign_id: str) -> datetime | None:
        """When ``orchard delete`` removed the campaign; None if it never did."""
        with self._transaction(read_only=True) as s:
            return self._deleted_at(s, campaign_id)

    @_retried
    def deleted_campaign_created_at(self, campaign_id: str) -> datetime | None:
        """When a campaign ``orchard delete`` removed had been submitted; None if none."""
        with self._transaction(read_only=True) as s:
            row = s.get(DeletedCampaignRow, campaign_id)
            return as_utc(row.created_at) if row is not None else None

    @staticmethod
    def _deleted_at(s: Session, campaign_id: str) -> datetime | None:
        row = s.get(DeletedCampaignRow, campaign_id)
        return as_utc(row.deleted_at) if row is not None else None

    def _no_campaign(self, campaign_id: str, s: Session | None = None) -> NotFoundError:
        """The error for a campaign id not in the store: deleted, or never there."""
        when = self._deleted_at(s, campaign_id) if s is not None else self.deleted_at(campaign_id)
        if when is not None:
            return CampaignDeletedError(campaign_id, when)
        return NotFoundError(f"no campaign {campaign_id!r} in {mask_url(self.url)}")

    @_retried
    def list_campaigns(self, limit: int | None = 50) -> list[Campaign]:
        """The newest ``limit`` campaigns, newest first (``None``: every one)."""
        with self._transaction(read_only=True) as s:
            rows = s.scalars(
                select(CampaignRow).order_by(CampaignRow.created_at.desc()).limit(limit)
            )
            return [_campaign(r) for r in rows]

    @_retried
    def unit_counts(self, campaign_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        """Campaign id -> unit state -> how many, for each of ``campaign_ids`` that has
        units: what ``orchard status`` shows per campaign, in one aggregate over the
        (campaign, state) index instead of every unit of every campaign listed."""
        out: dict[str, dict[str, int]] = {}
        with self._transaction(read_only=True) as s:
            for chunk in _chunks(list(dict.fromkeys(campaign_ids)), KEYS_PER_STATEMENT):
                rows = s.execute(
                    select(UnitRow.campaign_id, UnitRow.state, func.count())
                    .where(UnitRow.campaign_id.in_(chunk))
                    .group_by(UnitRow.campaign_id, UnitRow.state)
                )
                for campaign_id, state, count in rows:
                    out.setdefault(campaign_id, {})[state] = count
        return out

    @_retried
    def family_counts(self, campaign_id: str) -> dict[str, dict[str, int]]:
        """Family -> unit state -> how many, for one campaign: what a poll of its
        progress needs, one aggregate (10 ms at 25,000 units, where reading every unit
        with its params took 0.9 s)."""
        out: dict[str, dict[str, int]] = {}
        with self._transaction(read_only=True) as s:
            for family, state, count in s.execute(
                select(UnitRow.family, UnitRow.state, func.count())
                .where(UnitRow.campaign_id == campaign_id)
                .group_by(UnitRow.family, UnitRow.state)
                .order_by(func.min(UnitRow.position))  # families in plan order
            ):
                out.setdefault(family, {})[state] = count
        return out

    @_retried
    def count_campaigns(self) -> int:
        with self._transaction(read_only=True) as s:
            return s.scalar(select(func.count()).select_from(CampaignRow)) or 0

    @_retried
    def complete_campaign(self, campaign_id: str) -> str | None:
        """Close a RUNNING campaign whose units are all terminal: DONE, or PARTIAL when
        some failed. Returns the new state, or None if it is not finished (or already
        closed by another caller)."""
        with self._transaction() as s:
            # locked before the units are read: `orchard resume` (which locks it too)
            # must not reopen units between this read and the update below
            campaign = s.get(CampaignRow, campaign_id, with_for_update=_CAMPAIGN_LOCK)
            if campaign is None or campaign.state != "RUNNING":
                return None
            states = s.scalars(
                select(UnitRow.state).where(UnitRow.campaign_id == campaign_id)
            ).all()
            if not states or any(state not in TERMINAL for state in states):
                return None
            campaign.state = "DONE" if all(st == SUCCESS for st in states) else "PARTIAL"
            campaign.finished_at = self._now(s)
            return campaign.state

    # -- units

    @_retried
    def units(
        self, campaign_id: str, *, state: str | None = None, family: str | None = None
    ) -> list[Unit]:
        """Every unit of the campaign in plan order (or those in ``state`` of ``family``),
        with its params: two plain queries whatever its size (ORM objects, params loaded
        500 units at a time, cost ~0.1 ms a unit: half a second per poll of a
        5,000-unit campaign)."""
        which = [UnitRow.campaign_id == campaign_id]
        if state is not None:
            which.append(UnitRow.state == state)
        if family is not None:
            which.append(UnitRow.family == family)
        with self._transaction(read_only=True) as s:
            # the units first, then their params: on PostgreSQL (read committed) each
            # statement sees what was committed when it began, and a unit's params are
            # committed with it and never change, so the second read has those of every
            # unit the first one saw (read the other way round, a campaign committed in
            # between came back as units without params)
            rows = s.execute(select(*_UNIT_COLUMNS).where(*which).order_by(UnitRow.position)).all()
            params: dict[int, dict[str, Any]] = {}
            for unit_id, name, value in s.execute(
                select(UnitParamRow.unit_id, UnitParamRow.name, UnitParamRow.value)
                .join(UnitRow, UnitRow.id == UnitParamRow.unit_id)
                .where(*which)
                .order_by(UnitParamRow.unit_id, UnitParamRow.name)
            ):
                params.setdefault(unit_id, {})[name] = value
            return [_unit_of(row, params.get(row.id, {})) for row in rows]

    @_retried
    def open_stage(self, campaign_id: str, new_task_id: Callable[[], str]) -> OpenedStage:
        """What ``advance`` does to the store, in one transaction: read every unit's
        route, fail the PENDING units that can no longer run and claim the ones that
        may (``shared.plan.next_actions``), each claim under a task id from
        ``new_task_id``.

        The campaign row is held (FOR NO KEY UPDATE on PostgreSQL; SQLite's BEGIN
        IMMEDIATE serialises every writer) from before the read to the commit:
        `orchard resume`, which reopens finished units under the same lock, cannot
        reset a unit between the states read and the claims made on them (a report
        sent while a model unit was to run again; model units failed for a shard that
        resume had just reset). Other writers only move units forward (a unit read
        unfinished that finishes meanwhile is seen by the next ``advance``)."""
        with self._transaction() as s:
            s.get(CampaignRow, campaign_id, with_for_update=_CAMPAIGN_LOCK)
            routes = [
                UnitRoute(*row)
                for row in s.execute(
                    select(UnitRow.key, UnitRow.stage, UnitRow.state, UnitRow.task, UnitRow.queue)
                    .where(UnitRow.campaign_id == campaign_id)
                    .order_by(UnitRow.position)
                )
            ]
            now = self._now(s)
            failures: list[tuple[str, str]] = []
            while True:
                actions = next_actions(UnitState(u.key, u.stage, u.state) for u in routes)
                if not actions.fail:
                    break
                # failing units can open the next stage (the report): decide again
                self._fail_pending(s, actions.fail, now)
                failures += actions.fail
                failed = {key for key, _ in actions.fail}
                routes = [replace(u, state=FAILED) if u.key in failed else u for u in routes]
            task_ids = {key: new_task_id() for key in actions.enqueue}
            claimed = self._claim(s, actions.enqueue, task_ids, now)
            return OpenedStage(routes, claimed, {key: task_ids[key] for key in claimed}, failures)

    @_retried
    def stage_may_open(self, campaign_id: str) -> bool:
        """Whether ``shared.plan.next_actions`` could enqueue or fail a unit of the
        RUNNING campaign now, or the campaign could be complete: what ``advance`` asks after
        every unit, before it reads every unit's state.

        A stage opens only once every earlier stage is terminal, so next_actions acts
        only on the PENDING units of the lowest stage that has unfinished units (and
        with none unfinished, the campaign is complete). Put the other way: nothing can
        happen exactly when a QUEUED or RUNNING unit lies below the lowest PENDING one
        (below every stage, when none is PENDING). One statement that stops at the
        first such unit it finds on the (campaign, state) index, where counting the
        unfinished units read a row per unit still queued: O(units) after each unit,
        O(units²) over a grid. It reads the PENDING rows (the later stages' units) to
        find the lowest.
        """
        lowest_pending = (
            select(func.min(UnitRow.stage))
            .where(UnitRow.campaign_id == campaign_id, UnitRow.state == PENDING)
            .scalar_subquery()
        )
        below = select(UnitRow.id).where(
            UnitRow.campaign_id == campaign_id,
            UnitRow.state.in_((QUEUED, RUNNING)),
            UnitRow.stage < func.coalesce(lowest_pending, REPORT + 1),  # none: every stage
        )
        # a campaign closed (done, cancelled, being deleted) has nothing to open: its
        # late messages, thousands after a cancel and a resume, each cost this query,
        # not a read of every unit under the store's lock
        running = select(CampaignRow.id).where(
            CampaignRow.id == campaign_id, CampaignRow.state == "RUNNING"
        )
        with self._transaction(read_only=True) as s:
            return bool(s.scalar(select(and_(running.exists(), ~below.exists()))))

    @_retried
    def untaken_queues(self, campaign_id: str, after: float) -> dict[str, float]:
        """Queue -> seconds its oldest waiting unit has waited, for each queue on which
        a unit of the campaign has been QUEUED for ``after`` seconds or more while that
        queue was idle: no unit of it (of any campaign in this store) started or
        finished in the last ``after`` seconds, and none runs under a live lease.

        Workers busy with other units are not missed: they hold live leases, or finish
        and start units. What is left is a queue that no worker of this store consumes:
        none runs (never started, or killed: its unit's lease runs out), or the workers
        use another database (they find no such unit and drop the message) or another
        broker. Times are the store's clock (:meth:`_now`).
        """
        with self._transaction(read_only=True) as s:
            now = self._now(s)
            horizon = now - timedelta(seconds=after)
            oldest = s.execute(
                select(UnitRow.queue, func.min(UnitRow.queued_at))
                .where(
                    UnitRow.campaign_id == campaign_id,
                    UnitRow.state == QUEUED,
                    UnitRow.queued_at <= horizon,
                )
                .group_by(UnitRow.queue)
            ).all()
            busy = _busy_queues(s, [queue for queue, _ in oldest], now, horizon)
            return {
                queue: (as_utc(now) - as_utc(since)).total_seconds()
                for queue, since in oldest
                if queue not in busy
            }

    @_retried
    def find_unit(self, key: str) -> Unit | None:
        with self._transaction(read_only=True) as s:
            row = s.scalar(
                select(UnitRow).where(UnitRow.key == key).options(selectinload(UnitRow.params))
            )
            return _unit(row) if row else None

    def get_unit(self, key: str) -> Unit:
        unit = self.find_unit(key)
        if unit is None:
            raise NotFoundError(f"no unit {key!r} in {mask_url(self.url)}")
        return unit

    @_retried
    def claim_for_queue(
        self, keys: Sequence[str], task_ids: Mapping[str, str] | None = None
    ) -> list[str]:
        """Move units PENDING -> QUEUED; returns the keys this call moved.

        Several workers may try to open the next stage at once: only one of them
        wins each unit, so each is sent to the broker once. ``task_ids`` (key -> the
        Celery task id it will be sent with) are recorded so `orchard cancel` can
        revoke queued tasks.
        """
        if not keys:
            return []
        with self._transaction() as s:
            return self._claim(s, keys, task_ids or {}, self._now(s))

    @staticmethod
    def _claim(
        s: Session, keys: Sequence[str], task_ids: Mapping[str, str], now: datetime
    ) -> list[str]:
        won: list[str] = []
        # a statement per KEYS_PER_STATEMENT keys: the CASE below is evaluated for
        # every row updated, so one over a whole stage cost O(units²)
        for chunk in _chunks(list(keys), KEYS_PER_STATEMENT):
            values: dict[str, Any] = {"state": QUEUED, "sent_at": None, "queued_at": now}
            ids = {k: task_ids[k] for k in chunk if k in task_ids}
            if ids:
                values["task_id"] = case(ids, value=UnitRow.key, else_=UnitRow.task_id)
            won += s.scalars(
                update(UnitRow)
                .where(UnitRow.key.in_(chunk), UnitRow.state == PENDING)
                .values(**values)
                .returning(UnitRow.key)
            ).all()
        order = {k: i for i, k in enumerate(keys)}
        return sorted(won, key=order.__getitem__)

    @_retried
    def mark_sent(self, task_ids: Sequence[str]) -> None:
        """Record that the messages of these task ids reached the broker. A unit left
        QUEUED without this (its claimer died before sending) is sent again by the
        workers (:meth:`requeue_lost`). Whatever the unit's state: a worker may have
        started it before this write, and a unit it then hands back is QUEUED again,
        with its message back on the queue, not a claim never sent."""
        if not task_ids:
            return
        with self._transaction() as s:
            now = self._now(s)
            for chunk in _chunks(list(task_ids), KEYS_PER_STATEMENT):
                s.execute(
                    update(UnitRow)
                    .where(UnitRow.task_id.in_(chunk), UnitRow.sent_at.is_(None))
                    .values(sent_at=now)
                )

    @_retried
    def unclaim(self, keys: Sequence[str]) -> None:
        """QUEUED -> PENDING for units whose message could not be sent (broker away):
        the next ``advance`` claims and sends them again."""
        if not keys:
            return
        with self._transaction() as s:
            for chunk in _chunks(list(keys), KEYS_PER_STATEMENT):
                s.execute(
                    update(UnitRow)
                    .where(UnitRow.key.in_(chunk), UnitRow.state == QUEUED)
                    .values(state=PENDING, queued_at=None, sent_at=None, task_id=None)
                )

    @_retried
    def requeue_lost(
        self,
        grace_seconds: float,
        new_task_id: Callable[[], str],
        limit: int = 100,
        *,
        idle_consumer_of: Sequence[str] = (),
        dropped_after: float | None = None,
    ) -> list[LostUnit]:
        """Put back to QUEUED, under a new task id, the units of running campaigns
        whose message is lost, and return them for the caller to send (then
        :meth:`mark_sent`; if sending fails, :meth:`unclaim` lets ``advance`` send them):

        - RUNNING units whose lease ran out more than ``grace_seconds`` ago: their
          worker died (killed, out of memory, host lost) and the broker would hand
          their message out again only after its visibility timeout (hours);
        - QUEUED units claimed more than ``grace_seconds`` ago whose message was never
          marked sent: the process that claimed them died before sending;
        - QUEUED units sent more than ``dropped_after`` seconds ago to one of the queues
          ``idle_consumer_of``, which the caller has consumed for all that time without
          holding a single message: an idle consumer would have taken the message, so
          the broker lost it (restarted without persistence, keys evicted), or
          something else took it and dropped it, typically a worker on another
          database, which finds no such unit (``lost_in="SENT"``). Other workers may
          run units of those queues meanwhile: a long fold on one GPU worker no longer
          holds back the lost folds an idle one could run.

        Only one caller gets each unit (rows locked, SKIP LOCKED on PostgreSQL). Safe
        beside the original message coming back: whichever delivery starts first takes
        the lease, and the other finds the unit leased or done.
        """

        def expired(s: Session, now: datetime) -> Select[tuple[UnitRow]]:
            horizon = now - timedelta(seconds=grace_seconds)
            lost = ((UnitRow.state == RUNNING) & (UnitRow.lease_expires_at < horizon)) | (
                (UnitRow.state == QUEUED)
                & UnitRow.sent_at.is_(None)
                & (UnitRow.queued_at < horizon)
            )
            if idle_consumer_of and dropped_after is not None:
                since = now - timedelta(seconds=dropped_after)
                lost |= (
                    (UnitRow.state == QUEUED)
                    & (UnitRow.sent_at < since)
                    & UnitRow.queue.in_(sorted(set(idle_consumer_of)))
                )
            # the running campaigns' units through the (campaign, state) index: as a
            # join, SQLite's planner read every unit of the store (finished campaigns'
            # too) once the OR named a queue
            running = select(CampaignRow.id).where(CampaignRow.state == "RUNNING")
            return (
                select(UnitRow)
                .where(UnitRow.campaign_id.in_(running), lost)
                .order_by(UnitRow.position)
                .limit(limit)
            )

        # Every worker calls this every lease period: the usual answer (nothing lost)
        # comes from a read, which on SQLite waits for no writer; only a loss takes the
        # write lock.
        with self._transaction(read_only=True) as s:
            if s.scalar(expired(s, self._now(s)).with_only_columns(UnitRow.id)) is None:
                return []
        with self._transaction() as s:
            now = self._now(s)
            rows = s.scalars(expired(s, now).with_for_update(of=UnitRow, skip_locked=True)).all()
            lost = []
            for row in rows:
                lost_in = "SENT" if row.state == QUEUED and row.sent_at is not None else row.state
                worker = row.worker if row.state == RUNNING else None
                row.state, row.queued_at, row.task_id = QUEUED, now, new_task_id()
                row.sent_at = row.lease_holder = row.lease_expires_at = None
                lost.append(
                    LostUnit(
                        row.campaign_id, row.key, row.task, row.queue, row.task_id, lost_in, worker
                    )
                )
            return lost

    @_retried
    def stalled_campaigns(self, quiet_seconds: float, limit: int = 100) -> list[str]:
        """Running campaigns that nothing moves: no unit QUEUED or RUNNING, none
        finished and the campaign not created in the last ``quiet_seconds``. Their next
        stage (or their completion) was left undone: the task that finished their last
        unit died before it advanced them, or gave up while the store or the broker was
        away. The workers advance them (``workers.reaper``)."""
        with self._transaction(read_only=True) as s:
            horizon = self._now(s) - timedelta(seconds=quiet_seconds)
            active = select(UnitRow.id).where(
                UnitRow.campaign_id == CampaignRow.id,
                UnitRow.state.in_((QUEUED, RUNNING)) | (UnitRow.finished_at > horizon),
            )
            return list(
                s.scalars(
                    select(CampaignRow.id)
                    .where(
                        CampaignRow.state == "RUNNING",
                        CampaignRow.created_at < horizon,
                        ~active.exists(),
                    )
                    .order_by(CampaignRow.created_at)
                    .limit(limit)
                )
            )

    @_retried
    def release_leases_of(self, holder_prefix: str) -> int:
        """End now the leases of the running units whose holder starts with
        ``holder_prefix``: a process that died (a prefork child its parent saw killed),
        whose units' next delivery then starts at once instead of waiting the lease
        out. How many units were released."""
        with self._transaction() as s:
            released = s.execute(
                update(UnitRow)
                .where(
                    UnitRow.state == RUNNING,
                    UnitRow.lease_holder.startswith(holder_prefix, autoescape=True),
                )
                # no holder: it is known dead, so its last attempt's grace is not waited
                .values(lease_expires_at=self._now(s), lease_holder=None)
            )
            return released.rowcount

    @_retried
    def start_unit(
        self,
        key: str,
        *,
        worker: str,
        task_id: str | None,
        holder: str | None = None,
        lease_seconds: float = 60.0,
        max_attempts: int | None = None,
        newest_format: int | None = None,
    ) -> Start:
        """Mark a unit RUNNING for this delivery, unless it must not run now.

        ``newest_format``: the newest campaign format the delivery's worker runs; a unit
        of a campaign of a newer one is left as it is (``reason="newer format"``, the
        campaign's format in ``Start.format_version``).

        With ``holder`` (one id per delivery) the unit is leased to this delivery for
        ``lease_seconds``; a delivery that finds someone else's live lease is told to
        come back later (``reason="leased"``). ``max_attempts`` caps how many
        deliveries may start the unit: a task that kills its worker every time (a
        poison task) ends FAILED instead of looping forever.

        The row is locked (FOR UPDATE on PostgreSQL; SQLite's BEGIN IMMEDIATE takes
        the write lock) so two deliveries starting at once see each other's lease.
        """
        with self._transaction() as s:
            row = s.scalar(select(UnitRow).where(UnitRow.key == key).with_for_update())
            if row is None:
                raise NotFoundError(f"no unit {key!r} in {mask_url(self.url)}")
            now = self._now(s)  # after the lock: a wait for it must not shorten the lease
            if row.state in TERMINAL:
                return Start(False, row.attempts, row.state, reason="finished")
            if row.state == PENDING:
                # every message is sent after its unit's claim (PENDING -> QUEUED): this
                # one is stale, from before `orchard resume` reset the unit or from a
                # send that failed; running it now could run a stage before its inputs
                return Start(False, row.attempts, row.state, reason="not queued")
            campaign = s.get(CampaignRow, row.campaign_id)
            if campaign is not None and campaign.state in (CANCELLED, DELETING):
                row.state, row.finished_at = CANCELLED, now
                return Start(False, row.attempts, CANCELLED, reason="cancelled")
            if (
                newest_format is not None
                and campaign is not None
                and campaign.format_version > newest_format
            ):
                return Start(
                    False,
                    row.attempts,
                    row.state,
                    reason="newer format",
                    format_version=campaign.format_version,
                )
            expires = as_utc(row.lease_expires_at)
            if (
                holder is not None
                and row.lease_holder not in (None, holder)
                and expires is not None
                and expires > now
            ):
                # no more than a lease period: one further ahead was taken before the
                # store's clock stepped back, and its holder renews it on time or dies
                wait = min((expires - now).total_seconds(), lease_seconds)
                return Start(False, row.attempts, row.state, reason="leased", retry_in=wait)
            # this very call, retried after its commit's answer was lost: holders are
            # one per delivery, so the start it made counts once
            again = holder is not None and row.state == RUNNING and row.lease_holder == holder
            if max_attempts is not None and row.attempts >= max_attempts and not again:
                grace = (
                    expires + timedelta(seconds=lease_seconds)
                    if holder is not None
                    and row.state == RUNNING
                    and row.lease_holder is not None
                    and expires is not None
                    else None
                )
                if grace is not None and grace > now:
                    # the last attempt's holder may live, cut off from the database for a
                    # lease (its heartbeats failed): a late renewal takes its lease back.
                    # It has one more lease period before the unit is failed for it
                    wait = (grace - now).total_seconds()
                    return Start(False, row.attempts, row.state, reason="grace", retry_in=wait)
                row.state, row.finished_at = FAILED, now
                row.lease_holder = row.lease_expires_at = None
                row.error = (f"gave up after {row.attempts} attempts: " + (row.error or NO_RESULT))[
                    :4000
                ]
                return Start(False, row.attempts, FAILED, reason="gave up")
            params = dict(
                s.execute(
                    select(UnitParamRow.name, UnitParamRow.value)
                    .where(UnitParamRow.unit_id == row.id)
                    .order_by(UnitParamRow.name)
                ).all()
            )
            if not again and row.started_at is not None:
                # the attempt before, which did not end the unit: the row forgets it now.
                # RUNNING without a holder: its process died, and its worker ended the
                # lease (release_leases_of); with one, the lease ran out
                ended = LOST if row.state == RUNNING and row.lease_holder is None else row.state
                s.add(_earlier_attempt(row, ended))
            row.state = RUNNING
            row.attempts += 0 if again else 1
            row.worker = worker
            row.task_id = task_id
            row.started_at = row.heartbeat_at = now
            row.error = None
            row.lease_holder = holder
            row.lease_expires_at = now + timedelta(seconds=lease_seconds) if holder else None
            return Start(
                run=True,
                attempts=row.attempts,
                state=RUNNING,
                unit=_unit_of(row, params),
                campaign=_campaign(campaign) if campaign is not None else None,
            )

    @_retried
    def renew_lease(self, key: str, holder: str, lease_seconds: float) -> str:
        """Extend this delivery's lease (the heartbeat). Returns LEASE_HELD, or, when
        the run must stop, LEASE_CANCELLED (the campaign was cancelled), LEASE_GONE (it
        was deleted) or LEASE_LOST (another delivery took the unit over, or finished it)."""
        with self._transaction() as s:
            now = self._now(s)
            renewed = s.execute(
                update(UnitRow)
                .where(UnitRow.key == key, UnitRow.state == RUNNING, UnitRow.lease_holder == holder)
                .values(lease_expires_at=now + timedelta(seconds=lease_seconds), heartbeat_at=now)
            )
            if renewed.rowcount == 1:
                return LEASE_HELD
            state = s.scalar(select(UnitRow.state).where(UnitRow.key == key))
            if state is None:
                return LEASE_GONE
            return LEASE_CANCELLED if state == CANCELLED else LEASE_LOST

    @_retried
    def hand_back(self, key: str, holder: str, *, count_attempt: bool = False) -> bool:
        """RUNNING -> QUEUED for a delivery that stops at a clean point (its worker is
        shutting down, the fold's checkpoint is recorded): the lease is released so the
        next delivery starts at once, and the attempt is not counted against
        ``max_attempts``, since nothing failed; unless ``count_attempt`` (a database
        that went away mid-unit: a unit that meets one every time must still end). True
        if this delivery still held it."""
        with self._transaction() as s:
            handed = s.execute(
                update(UnitRow)
                .where(UnitRow.key == key, UnitRow.state == RUNNING, UnitRow.lease_holder == holder)
                .values(
                    state=QUEUED,
                    queued_at=self._now(s),
                    # its message goes back on the queue now (Reject, requeue)
                    sent_at=self._now(s),
                    attempts=UnitRow.attempts - (0 if count_attempt else 1),
                    lease_holder=None,
                    lease_expires_at=None,
                )
            )
            return handed.rowcount == 1

    @_retried
    def fail_unit(self, key: str, error: str, *, holder: str | None = None) -> bool:
        """Mark a unit FAILED unless it already succeeded or was cancelled; True if this
        call did it. With ``holder``, only while that delivery still holds the lease (a
        run that lost its lease must not fail the run that took over, nor a unit that
        the reaper or ``resume`` put back in the queue, which holds no lease)."""
        with self._transaction() as s:
            query = update(UnitRow).where(
                UnitRow.key == key, UnitRow.state.not_in((SUCCESS, CANCELLED))
            )
            if holder is not None:
                query = query.where(UnitRow.state == RUNNING, UnitRow.lease_holder == holder)
            done = s.execute(
                query.values(
                    state=FAILED,
                    error=error[:4000],
                    finished_at=self._now(s),
                    lease_holder=None,
                    lease_expires_at=None,
                )
            )
            return done.rowcount == 1

    @_retried
    def fail_units(self, failures: Sequence[tuple[str, str]]) -> None:
        """Give up on PENDING units that can no longer run (their input failed)."""
        if not failures:
            return
        with self._transaction() as s:
            self._fail_pending(s, failures, self._now(s))

    @staticmethod
    def _fail_pending(s: Session, failures: Sequence[tuple[str, str]], now: datetime) -> None:
        units = _table(UnitRow)
        # one executemany (pipelined by psycopg), not a statement (and on PostgreSQL a
        # clock read) per unit: a failed shard fails every model unit of a campaign
        s.connection().execute(
            update(units)
            .where(units.c.key == bindparam("b_key"), units.c.state == PENDING)
            .values(state=FAILED, error=bindparam("b_error"), finished_at=now),
            [{"b_key": key, "b_error": reason} for key, reason in failures],
        )

    @_retried
    def record_metrics(self, key: str, step: int, values: dict[str, float]) -> None:
        """Upsert one step's numbers; a re-run of the same step overwrites them. A value
        that is not a finite number (the loss of an empty validation set) is left out,
        on both databases (SQLite would store NaN as NULL, which the column refuses)."""
        with self._transaction() as s:
            unit_id = self._unit_id(s, key)
            s.execute(
                update(UnitRow).where(UnitRow.id == unit_id).values(heartbeat_at=self._now(s))
            )
            rows = [
                {"unit_id": unit_id, "name": name, "step": step, "value": float(value)}
                for name, value in values.items()
                if math.isfinite(value)
            ]
            if not rows:
                return
            insert = _insert(s)(MetricRow).values(rows)
            s.execute(
                insert.on_conflict_do_update(
                    index_elements=["unit_id", "name", "step"],
                    set_={"value": insert.excluded.value},
                )
            )

    @_retried
    def metrics(self, key: str) -> dict[str, list[tuple[int, float]]]:
        with self._transaction(read_only=True) as s:
            rows = s.execute(
                select(MetricRow.name, MetricRow.step, MetricRow.value)
                .join(UnitRow, UnitRow.id == MetricRow.unit_id)
                .where(UnitRow.key == key)
                .order_by(MetricRow.name, MetricRow.step)
            )
            out: dict[str, list[tuple[int, float]]] = {}
            for name, step, value in rows:
                out.setdefault(name, []).append((step, value))
            return out

    @_retried
    def finish_unit(self, key: str, outcome: Outcome, *, holder: str | None = None) -> bool:
        """Record a unit's result, predictions and artifacts and mark it SUCCESS.

        All in one transaction, which also forgets the outcome's ``scratch`` artifacts.
        If the unit already has a result (the same task ran twice) nothing is written
        and False is returned: first write wins. A unit cancelled while it ran stays
        CANCELLED: nothing is written and :class:`UnitCancelledError` is raised. With
        ``holder``, the delivery must still hold the unit's lease, else nothing is
        written and :class:`LeaseLostError` is raised (`orchard resume` reset it, or
        another delivery took it over).
        """
        with self._transaction() as s:
            unit = s.scalar(select(UnitRow).where(UnitRow.key == key).with_for_update())
            if unit is None:
                raise NotFoundError(f"no unit {key!r} in {mask_url(self.url)}")
            if unit.state == CANCELLED:
                raise UnitCancelledError(f"{key} was cancelled; its result is not recorded")
            if unit.state == SUCCESS:
                return False
            if holder is not None and (unit.state != RUNNING or unit.lease_holder != holder):
                raise LeaseLostError(
                    f"{key} is {unit.state} and no longer held by this delivery; "
                    "its result is not recorded"
                )
            now = self._now(s)
            inserted = s.execute(
                _insert(s)(ResultRow)
                .values(
                    unit_id=unit.id,
                    train_acc=finite_or_none(outcome.train_acc),
                    val_acc=finite_or_none(outcome.val_acc),
                    test_acc=finite_or_none(outcome.test_acc),
                    val_confusion=outcome.val_confusion,
                    test_confusion=outcome.test_confusion,
                    fit_seconds=outcome.fit_seconds,
                    extra=finite_or_none(outcome.extra),
                    created_at=now,
                )
                .on_conflict_do_nothing(index_elements=["unit_id"])
                .returning(ResultRow.id)
            ).scalar()
            if inserted is None:
                return False
            rows = [
                {
                    "unit_id": unit.id,
                    "split": split,
                    "image_id": p.image_id,
                    "label": p.label,
                    "pred": p.pred,
                    # probabilities with a NaN are none: the label alone (a blend
                    # that averages probabilities leaves the model out, as a forest
                    # without them)
                    "probs": p.probs
                    if p.probs is None or all(map(math.isfinite, p.probs))
                    else None,
                }
                for split, predictions in outcome.predictions.items()
                for p in predictions
            ]
            if rows:
                # one executemany of one cached statement (pipelined by psycopg), not a
                # multi-row VALUES per split: SQLAlchemy compiled that anew for every
                # unit, row by row through the ORM, ~5 ms of a grid point's 3 ms fit
                s.connection().execute(
                    _insert(s)(_table(PredictionRow)).on_conflict_do_nothing(), rows
                )
            for artifact in outcome.artifacts:
                self._record_artifact_without_commit(s, artifact, now)
            if outcome.scratch:
                s.execute(delete(ArtifactRow).where(ArtifactRow.path.in_(outcome.scratch)))
            unit.state = SUCCESS
            unit.error = None
            unit.finished_at = now
            unit.lease_holder = unit.lease_expires_at = None
            return True

    def _unit_id(self, s: Session, key: str) -> int:
        unit_id = s.scalar(select(UnitRow.id).where(UnitRow.key == key))
        if unit_id is None:
            raise NotFoundError(f"no unit {key!r} in {mask_url(self.url)}")
        return unit_id

    # -- cancel, resume, reuse

    @_retried
    def cancel_campaign(self, campaign_id: str, *, revoke_again_within: float = 0.0) -> Cancelled:
        """Mark a RUNNING campaign and its unfinished units CANCELLED.

        Returns the task ids of its queued and running units for the caller to revoke.
        A delivery that arrives later finds the unit CANCELLED and does nothing; a run
        in progress finds it at its next heartbeat and stops.

        A campaign cancelled less than ``revoke_again_within`` seconds ago (a cancel
        retried: the one before may have been stopped between its commit and its
        revokes) returns the task ids that cancel stopped, to revoke again.
        """
        with self._transaction() as s:
            campaign = s.get(CampaignRow, campaign_id, with_for_update=_CAMPAIGN_LOCK)
            if campaign is None:
                raise self._no_campaign(campaign_id, s)
            now = self._now(s)
            if campaign.state != "RUNNING":
                again: list[str] = []
                ended = as_utc(campaign.finished_at)
                if (
                    campaign.state == CANCELLED
                    and ended is not None
                    and (now - ended).total_seconds() < revoke_again_within
                ):
                    again = [
                        t
                        for t in s.scalars(
                            select(UnitRow.task_id).where(
                                UnitRow.campaign_id == campaign_id,
                                UnitRow.state == CANCELLED,
                                UnitRow.finished_at == campaign.finished_at,
                            )
                        )
                        if t
                    ]
                return Cancelled(campaign.state, again, 0, already_finished=True)
            # one statement, however many units: an UPDATE per row held the campaign's
            # lock (on SQLite the store's) for seconds at 20,000 units. A PENDING unit
            # has no task id to revoke, or one whose message was never sent
            task_ids = s.scalars(
                update(UnitRow)
                .where(UnitRow.campaign_id == campaign_id, UnitRow.state.not_in(TERMINAL))
                .values(
                    state=CANCELLED,
                    finished_at=now,
                    error="cancelled",
                    lease_holder=None,
                    lease_expires_at=None,
                )
                .returning(UnitRow.task_id)
                .execution_options(synchronize_session=False)
            ).all()
            campaign.state, campaign.finished_at = CANCELLED, now
            return Cancelled(CANCELLED, [t for t in task_ids if t], len(task_ids))

    @_retried
    def resume_campaign(self, campaign_id: str, redo: Collection[str] = ()) -> list[str]:
        """Put every unit that did not succeed back to PENDING, attempts reset, and the
        campaign back to RUNNING; returns the keys reset (the caller then advances).
        ``redo`` names succeeded units to run again too (their results are dropped): a
        preprocessing shard whose file is gone or changed.

        Left alone: SUCCESS units, and RUNNING units whose holder is alive (live lease).
        QUEUED units are reset too: their message may be gone (a broker that lost it);
        if it is not, that delivery finds the unit PENDING and drops itself, and the
        unit is sent anew once it is claimed. When any model unit is reset, the report
        is too, even a running one (its old result is dropped; a run in progress loses
        its lease and records nothing): it must blend the new results.
        """
        with self._transaction() as s:
            campaign = s.get(CampaignRow, campaign_id, with_for_update=_CAMPAIGN_LOCK)
            if campaign is None:
                raise self._no_campaign(campaign_id, s)
            if campaign.state == DELETING:
                raise BeingDeletedError(campaign_id)
            now = self._now(s)
            # read as plain rows and reset in one statement: ORM objects and an UPDATE
            # per row held the campaign's lock (on SQLite the store's) for seconds at
            # 20,000 units
            columns = (
                UnitRow.id,
                UnitRow.key,
                UnitRow.stage,
                UnitRow.state,
                UnitRow.position,
                UnitRow.lease_expires_at,
                # what the reset forgets of its last attempt (AttemptRow keeps it)
                UnitRow.worker,
                UnitRow.started_at,
                UnitRow.heartbeat_at,
                UnitRow.error,
            )
            rows = s.execute(
                select(*columns)
                .where(UnitRow.campaign_id == campaign_id)
                .where((UnitRow.state != SUCCESS) | (UnitRow.stage == REPORT))
                .with_for_update()
            ).all()
            for chunk in _chunks(list(redo), KEYS_PER_STATEMENT):  # succeeded, to run again
                rows += s.execute(
                    select(*columns)
                    .where(UnitRow.campaign_id == campaign_id, UnitRow.state == SUCCESS)
                    .where(UnitRow.stage != REPORT, UnitRow.key.in_(chunk))
                    .with_for_update()
                ).all()

            def alive(row: Any) -> bool:  # noqa: ANN401 - a Row of the columns above
                expires = as_utc(row.lease_expires_at)
                return row.state == RUNNING and expires is not None and expires > now

            reset = [r for r in rows if r.state != SUCCESS and not alive(r)]
            reset += [r for r in rows if r.key in redo and r.state == SUCCESS]
            if any(r.stage < REPORT for r in reset):
                reset += [r for r in rows if r.stage == REPORT and r not in reset]
            # their old results go: a shard redone, a report that must blend anew
            dropped = [r.id for r in reset if r.state == SUCCESS]
            for chunk in _chunks(dropped, KEYS_PER_STATEMENT):
                s.execute(delete(ResultRow).where(ResultRow.unit_id.in_(chunk)))
            earlier = [
                _earlier_attempt(r, r.state)
                for r in reset
                if r.started_at is not None and r.state != SUCCESS
            ]
            if earlier:
                s.execute(
                    _table(AttemptRow).insert(),
                    [{c: getattr(a, c) for c in _ATTEMPT_COLUMNS} for a in earlier],
                )
            for chunk in _chunks([r.id for r in reset], KEYS_PER_STATEMENT):
                s.execute(
                    update(UnitRow)
                    .where(UnitRow.id.in_(chunk))
                    .values(
                        state=PENDING,
                        attempts=0,
                        error=None,
                        queued_at=None,
                        sent_at=None,
                        started_at=None,
                        finished_at=None,
                        task_id=None,
                        lease_holder=None,
                        lease_expires_at=None,
                    )
                    .execution_options(synchronize_session=False)
                )
            campaign.state, campaign.finished_at = "RUNNING", None
            return [r.key for r in sorted(reset, key=lambda r: r.position)]

    def delete_campaign(
        self,
        campaign_id: str,
        *,
        quiet_seconds: float,
        dry_run: bool = False,
        before_commit: Callable[[], None] | None = None,
        batch_rows: int = DELETE_BATCH_ROWS,
    ) -> Deletion:
        """Delete a finished or cancelled campaign's rows: the campaign, its units with
        their parameters, results, predictions and metrics, and the records of the files
        in its own folder (``campaigns/<id>/``; the caller removes the files). Shards it
        wrote to the shared cache keep their records, without a campaign.

        Refused, as :class:`DeleteRefusedError`, for a campaign that is RUNNING; one
        cancelled less than ``quiet_seconds`` ago while some of its units ran (their
        workers stop at their next store call, and a CNN fold may still write its
        epoch's checkpoint); and one whose results another campaign reuses
        (``submit --reuse`` shares the model files, which stay in this one's folder).
        The campaign row is locked first, so a resume or cancel waits, and a reuse
        that already copied from it is seen.

        The decision commits first: the campaign becomes DELETING and loses its files'
        records (so no reuse finds it); ``before_commit`` runs just before that commit
        (an exception from it deletes nothing). Its rows then go in transactions of at
        most ``batch_rows`` rows each, the campaign's own row last, so workers' store
        calls are not held up behind a large campaign. A delete stopped midway leaves a
        DELETING campaign, which deleting it again finishes. Each transaction is retried
        on its own (a store that goes away for a moment while thousands of batches go).
        """
        deletion = self._decide_delete(campaign_id, quiet_seconds, dry_run, before_commit)
        if dry_run:
            return deletion
        try:
            self._delete_rows_in_batches(campaign_id, batch_rows)
        except StoreError as exc:
            raise StoreError(
                f"{exc}; campaign {campaign_id} is DELETING: `orchard delete {campaign_id}` "
                "finishes it"
            ) from None
        return deletion

    @_retried
    def _decide_delete(
        self,
        campaign_id: str,
        quiet_seconds: float,
        dry_run: bool,
        before_commit: Callable[[], None] | None,
    ) -> Deletion:
        """The delete's first transaction: its checks, then (unless ``dry_run``) the
        campaign DELETING and its files' records gone. What it will have removed."""
        with self._transaction(read_only=dry_run) as s:
            campaign = s.get(CampaignRow, campaign_id, with_for_update=not dry_run)
            if campaign is None:
                raise self._no_campaign(campaign_id, s)
            if campaign.state != DELETING:  # decided already, by a delete stopped midway
                self._check_deletable(s, campaign, quiet_seconds)
            units = s.scalar(
                select(func.count()).select_from(UnitRow).where(UnitRow.campaign_id == campaign_id)
            )
            own = _files_under(f"campaigns/{campaign_id}/")
            artifacts = [
                Artifact(r.path, r.kind, r.sha256, r.size, r.campaign_id, r.unit_key)
                for r in s.scalars(select(ArtifactRow).where(own).order_by(ArtifactRow.path))
            ]
            deletion = Deletion(campaign_id, campaign.state, units or 0, artifacts)
            if dry_run:
                return deletion
            s.execute(delete(ArtifactRow).where(own))
            campaign.state = DELETING
            if before_commit is not None:
                before_commit()
        return deletion

    def _check_deletable(self, s: Session, campaign: CampaignRow, quiet_seconds: float) -> None:
        """Raise :class:`DeleteRefusedError` if ``campaign`` must not be deleted now."""
        campaign_id = campaign.id
        if campaign.state == "RUNNING":
            raise DeleteRefusedError(
                f"campaign {campaign_id} is RUNNING: cancel it first "
                f"(`orchard cancel {campaign_id}`), or let it finish"
            )
        stopped_at = as_utc(campaign.finished_at)
        if campaign.state == CANCELLED and stopped_at is not None:
            # cancel clears the leases; a unit that renewed its lease shortly
            # (within quiet_seconds) before the cancel was running then
            since = (self._now(s) - stopped_at).total_seconds()
            ran = s.execute(
                select(UnitRow.key, UnitRow.worker)
                .where(
                    UnitRow.campaign_id == campaign_id,
                    UnitRow.state == CANCELLED,
                    UnitRow.heartbeat_at > stopped_at - timedelta(seconds=quiet_seconds),
                )
                .order_by(UnitRow.position)
            ).all()
            if ran and since < quiet_seconds:
                named = ", ".join(f"{r.key} on {r.worker}" for r in ran[:3])
                more = f" and {len(ran) - 3} more" if len(ran) > 3 else ""
                raise DeleteRefusedError(
                    f"campaign {campaign_id} was cancelled {since:.0f} s ago while "
                    f"{len(ran)} of its units ran ({named}{more}); "
                    "their workers stop at their next store call: try again in "
                    f"{math.ceil(quiet_seconds - since)} s"
                )
        reusers = sorted(
            {
                other
                for other, extra in s.execute(
                    select(UnitRow.campaign_id, ResultRow.extra)
                    .join(ResultRow, ResultRow.unit_id == UnitRow.id)
                    .where(
                        UnitRow.campaign_id != campaign_id,
                        # a cheap superset; the source key is checked below
                        cast(ResultRow.extra, Text).contains(campaign_id),
                    )
                )
                if str((extra or {}).get("reused_from", "")).startswith(f"{campaign_id}/")
            }
        )
        if reusers:
            named = ", ".join(reusers[:3]) + (
                f" and {len(reusers) - 3} more" if len(reusers) > 3 else ""
            )
            raise DeleteRefusedError(
                f"campaign {campaign_id}: campaign(s) {named} reuse its results, whose "
                "model files stay in its folder: delete them first"
            )

    def _delete_rows_in_batches(self, campaign_id: str, batch_rows: int) -> None:
        """Delete a DELETING campaign's rows. On SQLite at most ``batch_rows`` per
        transaction: the units' rows table by table, then the units, then the campaign.
        PostgreSQL locks rows, not the store: there workers go on beside one
        transaction, which is also much faster there (5 million prediction rows: 3 s,
        against 55 s in batches, each of which walks past the index entries that the
        batches before it left dead until a vacuum)."""
        if self.engine.dialect.name != "sqlite":
            batch_rows = 0  # no batches: the campaign's row, and the rest by cascade
        of_campaign = select(UnitRow.id).where(UnitRow.campaign_id == campaign_id)
        for table in (PredictionRow, MetricRow, UnitParamRow, ResultRow, AttemptRow):
            while batch_rows and self._delete_batch(
                table, table.unit_id.in_(of_campaign), batch_rows
            ):
                time.sleep(SQLITE_BATCH_PAUSE)  # a worker waiting for the lock takes it
        # nothing under them now: a batch of units is as quick as one of rows
        while batch_rows and self._delete_batch(
            UnitRow, UnitRow.campaign_id == campaign_id, batch_rows
        ):
            time.sleep(SQLITE_BATCH_PAUSE)
        self._bury(campaign_id)

    @_retried
    def _bury(self, campaign_id: str) -> None:
        """A DELETING campaign's last step: its row goes (on PostgreSQL, with all its
        rows by cascade) and a :class:`DeletedCampaignRow` stays in its place."""
        with self._transaction() as s:
            campaign = s.get(CampaignRow, campaign_id, with_for_update=True)  # it goes
            if campaign is None or campaign.state != DELETING:
                return  # buried already: a retry of a commit whose answer was lost
            if self.engine.dialect.name == "postgresql":
                # a DBA's statement_timeout is meant for queries, not for a cascade of
                # millions of rows, which it cancelled every time: the campaign stayed
                # DELETING for good. For this transaction alone (safe behind a pooler)
                s.execute(text("SET LOCAL statement_timeout = 0"))
            s.add(
                DeletedCampaignRow(
                    id=campaign.id,
                    name=campaign.name,
                    created_at=campaign.created_at,
                    deleted_at=self._now(s),
                )
            )
            # not the ORM's delete, which would first null the units' campaign ids
            s.execute(delete(CampaignRow).where(CampaignRow.id == campaign_id))

    @_retried
    def _delete_batch(self, table: Any, where: Any, batch_rows: int) -> bool:
        """Delete up to ``batch_rows`` rows of ``table`` matching ``where`` in one
        transaction; True while there may be more."""
        with self._transaction() as s:
            batch = select(table.id).where(where).limit(batch_rows)
            gone = s.execute(delete(table).where(table.id.in_(batch))).rowcount
        return gone >= batch_rows

    @_retried
    def reuse_finished(
        self,
        campaign_id: str,
        *,
        equivalent_manifests: Sequence[str] = (),
        present: Callable[[str, int], bool] | None = None,
    ) -> dict[str, str]:
        """Fill a new campaign's model units from identical units that already succeeded.

        Identical means same family, parameters (hash) and fold, in a campaign with the
        same seed and a byte-identical manifest (same images, labels, splits and folds,
        same preprocessing), or the same data digest (that manifest but for where the
        dataset lies: the same images mounted elsewhere), or one whose manifest's sha256
        is in ``equivalent_manifests`` (the same data as an earlier orchard wrote it), and
        the same campaign format (``shared.spec.CAMPAIGN_FORMAT`` at its submit); for an
        SVM point, a grid of the same largest ``n_components`` too (its PCA's). The
        result, predictions and metrics are copied (the result's ``extra["reused_from"]``
        names the unit that ran, whose artifacts stay where they are) and the unit is
        marked SUCCESS without running. Returns new key -> that unit's key.

        With ``present`` (a recorded path and size -> whether that file is there), a
        unit is copied only from a twin whose files are: the model files of the unit
        that ran and its campaign's manifest. The store restored from a backup newer
        than the artifact folder, or from before an `orchard delete`, records campaigns
        whose files are gone; the newest twin whose files are there is taken instead.
        """
        with self._transaction() as s:
            campaign = s.get(CampaignRow, campaign_id)
            if campaign is None:
                raise self._no_campaign(campaign_id, s)
            manifest_sha = s.scalar(
                select(ArtifactRow.sha256).where(
                    ArtifactRow.campaign_id == campaign_id, ArtifactRow.kind == "manifest"
                )
            )
            if manifest_sha is None:
                return {}
            same_data = CampaignRow.id.in_(
                select(ArtifactRow.campaign_id).where(
                    ArtifactRow.kind == "manifest",
                    ArtifactRow.sha256.in_([manifest_sha, *equivalent_manifests]),
                )
            )
            if campaign.data_digest is not None:
                same_data = or_(same_data, CampaignRow.data_digest == campaign.data_digest)
            twins = [
                c
                for c in s.scalars(
                    select(CampaignRow)
                    .where(
                        CampaignRow.id != campaign_id,
                        # re-checked on the locked row: a delete that committed DELETING
                        # while this waited for its lock is seen (its manifest's record,
                        # read in this statement's snapshot, may still look there)
                        CampaignRow.state != DELETING,
                        same_data,
                        # computed as this campaign's would be: a format raised since
                        # means a unit computes otherwise now (unless it only added to
                        # the report)
                        CampaignRow.format_version.in_(
                            sorted(formats_alike(campaign.format_version))
                        ),
                    )
                    # FOR SHARE: a delete of a twin (FOR UPDATE) waits for this copy and
                    # then sees it, or this waits for the delete and skips the twin
                    .with_for_update(read=True)
                )
                if c.spec.get("seed") == campaign.spec.get("seed") and c.state != DELETING
            ]
            if not twins:
                return {}
            # an SVM point slices its fold's PCA, fitted with the grid's largest width: a
            # point of a grid whose largest differs has (slightly) other components
            pca_width = largest_n_components(campaign.spec)
            svm_twins = {c.id for c in twins if largest_n_components(c.spec) == pca_width}
            wanted = s.scalars(
                select(UnitRow).where(
                    UnitRow.campaign_id == campaign_id,
                    UnitRow.stage > PREPROCESS,  # model units and forest merges
                    UnitRow.stage < REPORT,
                    UnitRow.state == PENDING,
                )
            ).all()
            candidates: dict[tuple[str, str, int | None], list[UnitRow]] = {}
            hashes = sorted({w.params_hash for w in wanted})
            for chunk in _chunks(hashes, KEYS_PER_STATEMENT):  # a hash is in one chunk
                for row in s.scalars(
                    select(UnitRow)
                    .where(
                        UnitRow.campaign_id.in_([c.id for c in twins]),
                        UnitRow.state == SUCCESS,
                        UnitRow.params_hash.in_(chunk),
                    )
                    .order_by(UnitRow.finished_at)
                ):
                    if row.family != "svm" or row.campaign_id in svm_twins:
                        candidates.setdefault((row.family, row.params_hash, row.fold), []).append(
                            row
                        )
            usable = self._files_there(s, candidates, present) if present else None
            sources = {  # the newest wins
                twin: next((row for row in reversed(rows) if usable is None or usable(row)), None)
                for twin, rows in candidates.items()
            }
            pairs = [
                (source, unit)
                for unit in wanted
                if (source := sources.get((unit.family, unit.params_hash, unit.fold)))
            ]
            return self._copy_outcomes_without_commit(s, pairs)

    @staticmethod
    def _files_there(
        s: Session,
        candidates: Mapping[tuple[str, str, int | None], list[UnitRow]],
        present: Callable[[str, int], bool],
    ) -> Callable[[UnitRow], bool]:
        """Whether a candidate's files are there: those of the unit that ran (a copy names
        it in ``reused_from``) and its campaign's manifest, each looked at once."""
        rows = [row for group in candidates.values() for row in group]
        origin = {row.key: row.key for row in rows}
        for chunk in _chunks([row.id for row in rows], KEYS_PER_STATEMENT):
            for key, extra in s.execute(
                select(UnitRow.key, ResultRow.extra)
                .join(ResultRow, ResultRow.unit_id == UnitRow.id)
                .where(UnitRow.id.in_(chunk))
            ):
                origin[key] = (extra or {}).get("reused_from", key)
        files: dict[str, list[tuple[str, int]]] = {}
        origins = sorted(set(origin.values()))
        campaigns = sorted({key.split("/", 1)[0] for key in origins})
        wanted = set(origins)
        # by campaign (the artifacts' index), then by unit here: unit_key has no index
        for chunk in _chunks(campaigns, KEYS_PER_STATEMENT):
            for path, size, key in s.execute(
                select(ArtifactRow.path, ArtifactRow.size, ArtifactRow.unit_key).where(
                    ArtifactRow.campaign_id.in_(chunk), ArtifactRow.kind != "manifest"
                )
            ):
                if key in wanted:
                    files.setdefault(key, []).append((path, size))
        manifests: dict[str, tuple[str, int]] = {}
        for chunk in _chunks(campaigns, KEYS_PER_STATEMENT):
            for path, size, campaign in s.execute(
                select(ArtifactRow.path, ArtifactRow.size, ArtifactRow.campaign_id).where(
                    ArtifactRow.kind == "manifest", ArtifactRow.campaign_id.in_(chunk)
                )
            ):
                manifests[campaign] = (path, size)
        seen: dict[tuple[str, int], bool] = {}

        def there(path: str, size: int) -> bool:
            if (path, size) not in seen:
                seen[(path, size)] = present(path, size)
            return seen[(path, size)]

        def usable(row: UnitRow) -> bool:
            key = origin[row.key]
            manifest = manifests.get(key.split("/", 1)[0])
            return (manifest is None or there(*manifest)) and all(
                there(path, size) for path, size in files.get(key, [])
            )

        return usable

    def _copy_outcomes_without_commit(
        self, s: Session, pairs: Sequence[tuple[UnitRow, UnitRow]]
    ) -> dict[str, str]:
        """Copy each source unit's result, predictions and metrics to its target and mark
        the target SUCCESS; returns target key -> the key of the unit that ran (the
        source, or what the source itself copied) for those copied (a source without a
        result is skipped). A few statements per KEYS_PER_STATEMENT pairs, not
        several per unit: ``--reuse`` of a grid of thousands of points."""
        now = self._now(s)
        results = {}
        for chunk in _chunks([source.id for source, _ in pairs], KEYS_PER_STATEMENT):
            results.update(
                (r.unit_id, r)
                for r in s.scalars(select(ResultRow).where(ResultRow.unit_id.in_(chunk)))
            )
        pairs = [(source, target) for source, target in pairs if source.id in results]
        if not pairs:
            return {}
        s.execute(
            _table(ResultRow).insert(),
            [
                {
                    "unit_id": target.id,
                    "train_acc": (r := results[source.id]).train_acc,
                    "val_acc": r.val_acc,
                    "test_acc": r.test_acc,
                    "val_confusion": r.val_confusion,
                    "test_confusion": r.test_confusion,
                    "fit_seconds": r.fit_seconds,
                    # a copy of a copy names the unit that ran, whose files are kept
                    "extra": {**r.extra, "reused_from": r.extra.get("reused_from", source.key)},
                    "created_at": now,
                }
                for source, target in pairs
            ],
        )
        ids = [{"b_source": source.id, "b_target": target.id} for source, target in pairs]
        for table, columns in (
            (_table(PredictionRow), ("split", "image_id", "label", "pred", "probs")),
            (_table(MetricRow), ("name", "step", "value")),
        ):
            # INSERT ... SELECT per pair, as one executemany: the rows never leave the
            # database
            copied = select(
                bindparam("b_target", type_=table.c.unit_id.type),
                *(table.c[c] for c in columns),
            ).where(table.c.unit_id == bindparam("b_source"))
            s.connection().execute(table.insert().from_select(["unit_id", *columns], copied), ids)
        units = _table(UnitRow)
        s.connection().execute(
            update(units)
            .where(units.c.id == bindparam("b_target"))
            .values(state=SUCCESS, finished_at=now, worker=bindparam("b_worker")),
            [{"b_target": target.id, "b_worker": source.worker} for source, target in pairs],
        )
        # the unit that ran, as the copies' reused_from says
        return {
            target.key: results[source.id].extra.get("reused_from", source.key)
            for source, target in pairs
        }

    # -- results

    @_retried
    def results(self, campaign_id: str) -> dict[str, Result]:
        """unit key -> result, for every unit of the campaign that has one."""
        with self._transaction(read_only=True) as s:
            # plain columns, not ORM objects: half the time at 25,000 results
            rows = s.execute(
                select(
                    UnitRow.key,
                    ResultRow.train_acc,
                    ResultRow.val_acc,
                    ResultRow.test_acc,
                    ResultRow.val_confusion,
                    ResultRow.test_confusion,
                    ResultRow.fit_seconds,
                    ResultRow.extra,
                )
                .join(ResultRow, ResultRow.unit_id == UnitRow.id)
                .where(UnitRow.campaign_id == campaign_id)
            )
            return {row[0]: Result(*row) for row in rows}

    @_retried
    def predictions(self, key: str, split: str) -> list[Prediction]:
        with self._transaction(read_only=True) as s:
            rows = s.scalars(
                select(PredictionRow)
                .join(UnitRow, UnitRow.id == PredictionRow.unit_id)
                .where(UnitRow.key == key, PredictionRow.split == split)
                .order_by(PredictionRow.image_id)
            )
            return [Prediction(r.image_id, r.label, r.pred, r.probs) for r in rows]

    @_retried
    def earlier_attempts(self, campaign_id: str) -> dict[str, list[EarlierAttempt]]:
        """Each unit's earlier attempts (those that did not end it), oldest first, by
        key; units with none are left out."""
        with self._transaction(read_only=True) as s:
            rows = s.execute(
                select(
                    UnitRow.key,
                    AttemptRow.worker,
                    AttemptRow.started_at,
                    AttemptRow.last_heard_at,
                    AttemptRow.state,
                    AttemptRow.error,
                )
                .join(UnitRow, UnitRow.id == AttemptRow.unit_id)
                .where(UnitRow.campaign_id == campaign_id)
                .order_by(UnitRow.position, AttemptRow.started_at)
            ).all()
        attempts: dict[str, list[EarlierAttempt]] = {}
        for key, worker, started, heard, state, error in rows:
            attempts.setdefault(key, []).append(
                EarlierAttempt(worker, as_utc(started), as_utc(heard), state, error)
            )
        return attempts

    @_retried
    def count_rows(self, campaign_id: str) -> dict[str, int]:
        """How many result, prediction and metric rows a campaign has (for checks)."""
        with self._transaction(read_only=True) as s:
            ids = select(UnitRow.id).where(UnitRow.campaign_id == campaign_id)
            return {
                table.__tablename__: s.scalar(
                    select(func.count()).select_from(table).where(table.unit_id.in_(ids))
                )
                for table in (ResultRow, PredictionRow, MetricRow)
            }

    # -- artifacts

    @_retried
    def record_artifact(self, artifact: Artifact) -> None:
        with self._transaction() as s:
            self._record_artifact_without_commit(s, artifact, self._now(s))

    def _record_artifact_without_commit(
        self, s: Session, artifact: Artifact, now: datetime
    ) -> None:
        values = {
            "path": artifact.path,
            "kind": artifact.kind,
            "sha256": artifact.sha256,
            "size": artifact.size,
            "campaign_id": artifact.campaign_id,
            "unit_key": artifact.unit_key,
            "created_at": now,
        }
        insert = _insert(s)(ArtifactRow).values(values)
        # a rewritten file (same path) replaces its checksum: the newest bytes are truth
        s.execute(
            insert.on_conflict_do_update(
                index_elements=["path"],
                set_={k: insert.excluded[k] for k in ("kind", "sha256", "size", "created_at")},
            )
        )

    @_retried
    def count_artifacts(self, prefix: str) -> int:
        """How many files under ``prefix`` (a folder, ending in ``/``) are recorded."""
        with self._transaction(read_only=True) as s:
            return s.scalar(select(func.count()).where(_files_under(prefix)))

    @_retried
    def forget_artifacts(self, prefix: str) -> int:
        """Drop the records of every file under ``prefix`` (a folder, ending in ``/``):
        files removed on purpose (``orchard prune``). Returns how many."""
        with self._transaction() as s:
            return s.execute(delete(ArtifactRow).where(_files_under(prefix))).rowcount

    @_retried
    def find_artifact(self, path: str) -> Artifact | None:
        with self._transaction(read_only=True) as s:
            row = s.scalar(select(ArtifactRow).where(ArtifactRow.path == path))
            if row is None:
                return None
            return Artifact(row.path, row.kind, row.sha256, row.size, row.campaign_id, row.unit_key)

    @_retried
    def find_artifacts(self, paths: Sequence[str]) -> dict[str, Artifact]:
        """The records of those of ``paths`` the store has, by path: one query per
        KEYS_PER_STATEMENT paths, where :meth:`find_artifact` is one per path."""
        found: dict[str, Artifact] = {}
        with self._transaction(read_only=True) as s:
            for chunk in _chunks(list(dict.fromkeys(paths)), KEYS_PER_STATEMENT):
                for r in s.scalars(select(ArtifactRow).where(ArtifactRow.path.in_(chunk))):
                    found[r.path] = Artifact(
                        r.path, r.kind, r.sha256, r.size, r.campaign_id, r.unit_key
                    )
        return found

    @_retried
    def artifacts(self, campaign_id: str, kind: str | None = None) -> list[Artifact]:
        with self._transaction(read_only=True) as s:
            query = select(ArtifactRow).where(ArtifactRow.campaign_id == campaign_id)
            if kind is not None:
                query = query.where(ArtifactRow.kind == kind)
            rows = s.scalars(query.order_by(ArtifactRow.path))
            return [
                Artifact(r.path, r.kind, r.sha256, r.size, r.campaign_id, r.unit_key) for r in rows
            ]

    @_retried
    def campaign_metrics(
        self, campaign_id: str, keys: Sequence[str] | None = None
    ) -> dict[str, dict[str, list[tuple[int, float]]]]:
        """unit key -> {metric name -> [(step, value)]} for a campaign, in one query.

        ``keys`` limits it to those units (the report reads only the points it plots).
        """
        with self._transaction(read_only=True) as s:
            query = (
                select(UnitRow.key, MetricRow.name, MetricRow.step, MetricRow.value)
                .join(UnitRow, UnitRow.id == MetricRow.unit_id)
                .where(UnitRow.campaign_id == campaign_id)
                .order_by(UnitRow.key, MetricRow.name, MetricRow.step)
            )
            if keys is not None:
                query = query.where(UnitRow.key.in_(list(keys)))
            out: dict[str, dict[str, list[tuple[int, float]]]] = {}
            for key, name, step, value in s.execute(query):
                out.setdefault(key, {}).setdefault(name, []).append((step, value))
            return out


def _busy_queues(s: Session, queues: Sequence[str], now: datetime, since: datetime) -> set[str]:
    """Those of ``queues`` from which a unit (of any campaign) started or finished after
    ``since``, or on which one runs under a live lease: a worker takes from them.

    Per queue, three EXISTS over the indexes of migration 0004 (queue + state, queue +
    started_at, queue + finished_at), each stopping at its first row, rather than one
    OR over them, which both databases answered by reading every unit of every campaign
    in the store.
    """
    names = sorted(set(queues))
    if not names:
        return set()

    def busy(queue: str) -> Any:
        of_queue = select(UnitRow.id).where(UnitRow.queue == queue)
        running = of_queue.where(
            UnitRow.state == RUNNING,
            UnitRow.lease_expires_at.is_(None) | (UnitRow.lease_expires_at > now),
        )
        started = of_queue.where(UnitRow.started_at > since)
        finished = of_queue.where(UnitRow.finished_at > since)
        return or_(running.exists(), started.exists(), finished.exists())

    row = s.execute(select(*(busy(queue) for queue in names))).one()
    return {queue for queue, is_busy in zip(names, row, strict=True) if is_busy}


def _files_under(folder: str) -> Any:
    """Artifact records of the files under ``folder`` (relative, ending in ``/``; ``_``
    and ``%`` in it are not wildcards). The prefix is compared as well: SQLite's LIKE
    ignores the case of ASCII letters (``cache/ABC/`` would match ``cache/abc/``)."""
    return ArtifactRow.path.startswith(folder, autoescape=True) & (
        func.substr(ArtifactRow.path, 1, len(folder)) == folder
    )


def _insert(s: Session) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT (SQLite >= 3.24 and PostgreSQL)."""
    name = s.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert
    if name == "sqlite":
        return sqlite.insert
    raise StoreError(f"unsupported database dialect {name!r}: use SQLite or PostgreSQL")


def _table(entity: Any) -> Any:
    """The mapped class's table, for plain Core statements (executemany, no ORM)."""
    return entity.__table__


def _campaign(row: CampaignRow) -> Campaign:
    return Campaign(
        id=row.id,
        name=row.name,
        source=row.source,
        digest=row.digest,
        spec=row.spec,
        classes=tuple(row.classes),
        state=row.state,
        created_at=as_utc(row.created_at),
        finished_at=as_utc(row.finished_at),
        format_version=row.format_version,
    )


def _unit(row: UnitRow) -> Unit:
    return _unit_of(row, {p.name: p.value for p in row.params})


#: the unit columns :class:`Unit` needs, read as plain rows by :meth:`Store.units`
_UNIT_COLUMNS = (
    UnitRow.id,
    UnitRow.key,
    UnitRow.campaign_id,
    UnitRow.family,
    UnitRow.stage,
    UnitRow.fold,
    UnitRow.params_hash,
    UnitRow.task,
    UnitRow.queue,
    UnitRow.state,
    UnitRow.attempts,
    UnitRow.worker,
    UnitRow.started_at,
    UnitRow.finished_at,
    UnitRow.error,
    UnitRow.task_id,
    UnitRow.lease_holder,
    UnitRow.lease_expires_at,
    UnitRow.heartbeat_at,
)


_ATTEMPT_COLUMNS = ("unit_id", "worker", "started_at", "last_heard_at", "state", "error")


def _earlier_attempt(row: Any, state: str) -> AttemptRow:  # noqa: ANN401
    """The unit's last attempt, from its row (a UnitRow, or a row of its columns, its id
    among them), as the unit's state ends it."""
    return AttemptRow(
        unit_id=row.id,
        worker=row.worker,
        started_at=row.started_at,
        last_heard_at=row.heartbeat_at,
        state=state,
        error=row.error,
    )


def _unit_of(row: Any, params: dict[str, Any]) -> Unit:
    """A :class:`Unit` from a row of ``_UNIT_COLUMNS`` and its params."""
    return Unit(
        key=row.key,
        campaign_id=row.campaign_id,
        family=row.family,
        stage=row.stage,
        fold=row.fold,
        params=params,
        params_hash=row.params_hash,
        task=row.task,
        queue=row.queue,
        state=row.state,
        attempts=row.attempts,
        worker=row.worker,
        started_at=as_utc(row.started_at),
        finished_at=as_utc(row.finished_at),
        error=row.error,
        task_id=row.task_id,
        lease_holder=row.lease_holder,
        lease_expires_at=as_utc(row.lease_expires_at),
        heartbeat_at=as_utc(row.heartbeat_at),
    )


__all__ = [
    "Artifact",
    "Campaign",
    "CampaignDeletedError",
    "EarlierAttempt",
    "Outcome",
    "Prediction",
    "Result",
    "Start",
    "Store",
    "StoreError",
    "NotFoundError",
    "Cancelled",
    "Unit",
    "UnitRoute",
]
