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

Beside it: :mod:`db.engine` (connecting, and which errors are worth a retry),
:mod:`db.values` and :mod:`db.errors` (what its methods take, return and raise, all
importable from here), :mod:`db.statements` (keys in chunks, the dialect's INSERT) and
:mod:`db.reuse` (``submit --reuse``'s copies).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    Engine,
    Select,
    Text,
    and_,
    bindparam,
    case,
    cast,
    delete,
    false,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from db import migrate
from db.engine import (
    DEFAULT_RETRY_SECONDS,
    MAX_RETRY_SECONDS,
    READ_ONLY,
    TransientError,
    describe_error,
    is_transient,
    make_engine,
    refused,
    retried,
    unreachable,
)
from db.errors import (
    BeingDeletedError,
    CampaignDeletedError,
    DeleteRefusedError,
    LeaseLostError,
    NotFoundError,
    SchemaError,
    StoreError,
    StoreUnreachableError,
    UnitCancelledError,
)
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
from db.reuse import reuse_finished_without_commit
from db.statements import KEYS_PER_STATEMENT, chunks, files_under, insert_of, table_of
from db.values import (
    DELETING,
    LEASE_CANCELLED,
    LEASE_GONE,
    LEASE_HELD,
    LEASE_LOST,
    LOST,
    NO_RESULT,
    Artifact,
    Campaign,
    Cancelled,
    Deletion,
    EarlierAttempt,
    LostUnit,
    OpenedStage,
    Outcome,
    Prediction,
    Result,
    Start,
    Unit,
    UnitRoute,
)
from shared.errors import OrchardError
from shared.metrics import finite_or_none
from shared.plan import (
    CANCELLED,
    FAILED,
    PENDING,
    QUEUED,
    REPORT,
    RUNNING,
    SUCCESS,
    TERMINAL,
    UnitPlan,
    UnitState,
    next_actions,
)
from shared.settings import env_number, mask_url
from shared.spec import CAMPAIGN_FORMAT
from shared.times import as_utc

_T = TypeVar("_T")


#: Rows ``delete_campaign`` removes per transaction. On SQLite each transaction holds
#: the store's write lock, so workers' calls wait for one batch (about 0.1 s), not for
#: the whole campaign (5 million prediction rows: 7 s in one transaction).
DELETE_BATCH_ROWS = 50_000

#: Seconds a delete on SQLite waits between its batches. SQLite has no queue for its
#: lock: a writer that waits polls it, at most 0.1 s apart, and a delete that took the
#: lock again at once would keep it from a worker for many batches (seen: 3.9 s).
SQLITE_BATCH_PAUSE = 0.1


#: How the campaign row is held while units are reopened, claimed or closed under it:
#: FOR NO KEY UPDATE on PostgreSQL (SQLite's BEGIN IMMEDIATE already serialises
#: writers), which these writers take in turn, but which does not stop a worker
#: recording a file or result of the campaign meanwhile (that insert takes the row's
#: KEY SHARE lock for its foreign key): with FOR UPDATE, a worker's finish (unit row
#: locked, then the campaign's) and a cancel (the campaign's, then the unit rows)
#: deadlocked, one of them waiting out PostgreSQL's deadlock_timeout before its retry
_CAMPAIGN_LOCK = {"key_share": True}


# ---------------------------------------------------------------- the store


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

    @retried
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

    @retried
    def now(self) -> datetime:
        """The store's clock (:meth:`_now`), aware UTC: what a lease read from the store
        is to be compared with, whatever this host's clock says."""
        with self._transaction(read_only=True) as s:
            return self._now(s)

    def describe_error(self, exc: DBAPIError) -> StoreError:
        """One line for what opening the store met (:func:`db.engine.describe_error`)."""
        return describe_error(self.url, exc)

    @contextmanager
    def _transaction(self, *, read_only: bool = False) -> Iterator[Session]:
        session = self._sessions()
        try:
            with session.begin():
                if read_only:  # before the first statement, which begins the transaction
                    session.connection(execution_options={READ_ONLY: True})
                yield session
        except DBAPIError as exc:
            if is_transient(exc):
                raise TransientError(str(unreachable(self.url, exc))) from None
            if not isinstance(exc, IntegrityError):
                # reached, and it answered no: a read-only file, a full disk, a table
                # gone, a read-only server (a hot standby, default_transaction_read_only),
                # a role without the privilege; not "unreachable", which sends one
                # looking for the server. A worker keeps its unit's message for later
                raise refused(self.url, exc) from None
            raise  # orchard's writes are idempotent: a constraint broken is its bug
        finally:
            session.close()

    # -- campaigns

    @retried
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
                table_of(CampaignRow).insert(),
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
                    table_of(UnitRow).insert(),
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
                    s.execute(table_of(UnitParamRow).insert(), params)
            for artifact in artifacts:
                self._record_artifact_without_commit(s, artifact, now)

    @retried
    def find_campaign(self, campaign_id: str) -> Campaign | None:
        with self._transaction(read_only=True) as s:
            row = s.get(CampaignRow, campaign_id)
            return _campaign(row) if row else None

    def get_campaign(self, campaign_id: str) -> Campaign:
        campaign = self.find_campaign(campaign_id)
        if campaign is None:
            raise self._no_campaign(campaign_id)
        return campaign

    @retried
    def deleted_at(self, campaign_id: str) -> datetime | None:
        """When ``orchard delete`` removed the campaign; None if it never did."""
        with self._transaction(read_only=True) as s:
            return self._deleted_at(s, campaign_id)

    @retried
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

    @retried
    def list_campaigns(self, limit: int | None = 50) -> list[Campaign]:
        """The newest ``limit`` campaigns, newest first (``None``: every one)."""
        with self._transaction(read_only=True) as s:
            rows = s.scalars(
                select(CampaignRow).order_by(CampaignRow.created_at.desc()).limit(limit)
            )
            return [_campaign(r) for r in rows]

    @retried
    def unit_counts(self, campaign_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        """Campaign id -> unit state -> how many, for each of ``campaign_ids`` that has
        units: what ``orchard status`` shows per campaign, in one aggregate over the
        (campaign, state) index instead of every unit of every campaign listed."""
        out: dict[str, dict[str, int]] = {}
        with self._transaction(read_only=True) as s:
            for chunk in chunks(list(dict.fromkeys(campaign_ids)), KEYS_PER_STATEMENT):
                rows = s.execute(
                    select(UnitRow.campaign_id, UnitRow.state, func.count())
                    .where(UnitRow.campaign_id.in_(chunk))
                    .group_by(UnitRow.campaign_id, UnitRow.state)
                )
                for campaign_id, state, count in rows:
                    out.setdefault(campaign_id, {})[state] = count
        return out

    @retried
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

    @retried
    def count_campaigns(self) -> int:
        with self._transaction(read_only=True) as s:
            return s.scalar(select(func.count()).select_from(CampaignRow)) or 0

    @retried
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

    @retried
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

    @retried
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

    @retried
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

    @retried
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

    @retried
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

    @retried
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
        for chunk in chunks(list(keys), KEYS_PER_STATEMENT):
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

    @retried
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
            for chunk in chunks(list(task_ids), KEYS_PER_STATEMENT):
                s.execute(
                    update(UnitRow)
                    .where(UnitRow.task_id.in_(chunk), UnitRow.sent_at.is_(None))
                    .values(sent_at=now)
                )

    @retried
    def unclaim(self, keys: Sequence[str]) -> None:
        """QUEUED -> PENDING for units whose message could not be sent (broker away):
        the next ``advance`` claims and sends them again."""
        if not keys:
            return
        with self._transaction() as s:
            for chunk in chunks(list(keys), KEYS_PER_STATEMENT):
                s.execute(
                    update(UnitRow)
                    .where(UnitRow.key.in_(chunk), UnitRow.state == QUEUED)
                    .values(state=PENDING, queued_at=None, sent_at=None, task_id=None)
                )

    @retried
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

    @retried
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

    @retried
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

    @retried
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

    @retried
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

    @retried
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

    @retried
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

    @retried
    def fail_units(self, failures: Sequence[tuple[str, str]]) -> None:
        """Give up on PENDING units that can no longer run (their input failed)."""
        if not failures:
            return
        with self._transaction() as s:
            self._fail_pending(s, failures, self._now(s))

    @staticmethod
    def _fail_pending(s: Session, failures: Sequence[tuple[str, str]], now: datetime) -> None:
        units = table_of(UnitRow)
        # one executemany (pipelined by psycopg), not a statement (and on PostgreSQL a
        # clock read) per unit: a failed shard fails every model unit of a campaign
        s.connection().execute(
            update(units)
            .where(units.c.key == bindparam("b_key"), units.c.state == PENDING)
            .values(state=FAILED, error=bindparam("b_error"), finished_at=now),
            [{"b_key": key, "b_error": reason} for key, reason in failures],
        )

    @retried
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
            insert = insert_of(s)(MetricRow).values(rows)
            s.execute(
                insert.on_conflict_do_update(
                    index_elements=["unit_id", "name", "step"],
                    set_={"value": insert.excluded.value},
                )
            )

    @retried
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

    @retried
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
                insert_of(s)(ResultRow)
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
                    insert_of(s)(table_of(PredictionRow)).on_conflict_do_nothing(), rows
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

    @retried
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

    @retried
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
            for chunk in chunks(list(redo), KEYS_PER_STATEMENT):  # succeeded, to run again
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
            for chunk in chunks(dropped, KEYS_PER_STATEMENT):
                s.execute(delete(ResultRow).where(ResultRow.unit_id.in_(chunk)))
            earlier = [
                _earlier_attempt(r, r.state)
                for r in reset
                if r.started_at is not None and r.state != SUCCESS
            ]
            if earlier:
                s.execute(
                    table_of(AttemptRow).insert(),
                    [{c: getattr(a, c) for c in _ATTEMPT_COLUMNS} for a in earlier],
                )
            for chunk in chunks([r.id for r in reset], KEYS_PER_STATEMENT):
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

    @retried
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
            own = files_under(f"campaigns/{campaign_id}/")
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

    @retried
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

    @retried
    def _delete_batch(self, table: Any, where: Any, batch_rows: int) -> bool:
        """Delete up to ``batch_rows`` rows of ``table`` matching ``where`` in one
        transaction; True while there may be more."""
        with self._transaction() as s:
            batch = select(table.id).where(where).limit(batch_rows)
            gone = s.execute(delete(table).where(table.id.in_(batch))).rowcount
        return gone >= batch_rows

    @retried
    def reuse_finished(
        self,
        campaign_id: str,
        *,
        equivalent_manifests: Sequence[str] = (),
        present: Callable[[str, int], bool] | None = None,
    ) -> dict[str, str]:
        """Fill a new campaign's model units from identical units that already succeeded
        (:func:`db.reuse.reuse_finished_without_commit` says which, and what is copied).
        Returns new key -> the key of the unit that ran."""
        with self._transaction() as s:
            campaign = s.get(CampaignRow, campaign_id)
            if campaign is None:
                raise self._no_campaign(campaign_id, s)
            return reuse_finished_without_commit(
                s,
                campaign,
                equivalent_manifests=equivalent_manifests,
                present=present,
                now=lambda: self._now(s),
            )

    # -- results

    @retried
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

    @retried
    def predictions(self, key: str, split: str) -> list[Prediction]:
        with self._transaction(read_only=True) as s:
            rows = s.scalars(
                select(PredictionRow)
                .join(UnitRow, UnitRow.id == PredictionRow.unit_id)
                .where(UnitRow.key == key, PredictionRow.split == split)
                .order_by(PredictionRow.image_id)
            )
            return [Prediction(r.image_id, r.label, r.pred, r.probs) for r in rows]

    @retried
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

    @retried
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

    @retried
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
        insert = insert_of(s)(ArtifactRow).values(values)
        # a rewritten file (same path) replaces its checksum: the newest bytes are truth
        s.execute(
            insert.on_conflict_do_update(
                index_elements=["path"],
                set_={k: insert.excluded[k] for k in ("kind", "sha256", "size", "created_at")},
            )
        )

    @retried
    def count_artifacts(self, prefix: str) -> int:
        """How many files under ``prefix`` (a folder, ending in ``/``) are recorded."""
        with self._transaction(read_only=True) as s:
            return s.scalar(select(func.count()).where(files_under(prefix)))

    @retried
    def forget_artifacts(self, prefix: str) -> int:
        """Drop the records of every file under ``prefix`` (a folder, ending in ``/``):
        files removed on purpose (``orchard prune``). Returns how many."""
        with self._transaction() as s:
            return s.execute(delete(ArtifactRow).where(files_under(prefix))).rowcount

    @retried
    def find_artifact(self, path: str) -> Artifact | None:
        with self._transaction(read_only=True) as s:
            row = s.scalar(select(ArtifactRow).where(ArtifactRow.path == path))
            if row is None:
                return None
            return Artifact(row.path, row.kind, row.sha256, row.size, row.campaign_id, row.unit_key)

    @retried
    def find_artifacts(self, paths: Sequence[str]) -> dict[str, Artifact]:
        """The records of those of ``paths`` the store has, by path: one query per
        KEYS_PER_STATEMENT paths, where :meth:`find_artifact` is one per path."""
        found: dict[str, Artifact] = {}
        with self._transaction(read_only=True) as s:
            for chunk in chunks(list(dict.fromkeys(paths)), KEYS_PER_STATEMENT):
                for r in s.scalars(select(ArtifactRow).where(ArtifactRow.path.in_(chunk))):
                    found[r.path] = Artifact(
                        r.path, r.kind, r.sha256, r.size, r.campaign_id, r.unit_key
                    )
        return found

    @retried
    def artifacts(self, campaign_id: str, kind: str | None = None) -> list[Artifact]:
        with self._transaction(read_only=True) as s:
            query = select(ArtifactRow).where(ArtifactRow.campaign_id == campaign_id)
            if kind is not None:
                query = query.where(ArtifactRow.kind == kind)
            rows = s.scalars(query.order_by(ArtifactRow.path))
            return [
                Artifact(r.path, r.kind, r.sha256, r.size, r.campaign_id, r.unit_key) for r in rows
            ]

    @retried
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


#: Store, and the values and errors of its methods (defined in db.values and db.errors),
#: so that a caller imports what a store call takes, returns and raises from one place
__all__ = [
    "DELETE_BATCH_ROWS",
    "DELETING",
    "KEYS_PER_STATEMENT",
    "LEASE_CANCELLED",
    "LEASE_GONE",
    "LEASE_HELD",
    "LEASE_LOST",
    "LOST",
    "NO_RESULT",
    "Artifact",
    "BeingDeletedError",
    "Campaign",
    "CampaignDeletedError",
    "Cancelled",
    "DeleteRefusedError",
    "Deletion",
    "EarlierAttempt",
    "LeaseLostError",
    "LostUnit",
    "NotFoundError",
    "OpenedStage",
    "Outcome",
    "Prediction",
    "Result",
    "SchemaError",
    "Start",
    "Store",
    "StoreError",
    "StoreUnreachableError",
    "Unit",
    "UnitCancelledError",
    "UnitRoute",
]
