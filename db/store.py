"""The store: every public method is one transaction and returns frozen values.

SQLite (the default, one file) and PostgreSQL share the code. Writes that a
re-delivered task may repeat are idempotent by construction: results, predictions
and metrics are unique per unit, and state changes are conditional updates that
report whether they won.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, make_url, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from db import migrate
from db.models import (
    ArtifactRow,
    CampaignRow,
    MetricRow,
    PredictionRow,
    ResultRow,
    UnitParamRow,
    UnitRow,
    utcnow,
)
from shared.errors import OrchardError
from shared.plan import FAILED, PENDING, QUEUED, RUNNING, SUCCESS, TERMINAL, UnitPlan
from shared.settings import mask_url


class StoreError(OrchardError):
    """The store is unreachable, not initialised, or asked for something absent."""


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


@dataclass(frozen=True, slots=True)
class Start:
    """Whether a task should run its unit: ``run`` False means it is already done."""

    run: bool
    attempts: int
    state: str


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


def _sqlite_begin(conn: Any) -> None:
    # IMMEDIATE takes the write lock up front: a deferred transaction that later
    # writes can fail with SQLITE_BUSY at once, with no wait, under contention.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True, connect_args=_connect_args(url))


def _connect_args(url: str) -> dict[str, Any]:
    if url.startswith("postgresql"):
        return {"connect_timeout": 5}  # fail within seconds when the server is away
    return {}


class Store:
    def __init__(self, url: str, *, engine: Engine | None = None) -> None:
        self.url = url
        self.engine = engine or make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def __repr__(self) -> str:
        return f"Store({mask_url(self.url)!r})"

    def dispose(self) -> None:
        self.engine.dispose()

    # -- schema

    def upgrade(self) -> None:
        try:
            migrate.upgrade(self.engine)
        except (OperationalError, DBAPIError) as exc:
            raise self._unreachable(exc) from None

    def check_schema(self) -> None:
        """Raise StoreError unless the schema is at the newest migration."""
        try:
            current = migrate.current_revision(self.engine)
        except (OperationalError, DBAPIError) as exc:
            raise self._unreachable(exc) from None
        if current != migrate.head_revision():
            raise StoreError(
                f"database {mask_url(self.url)} is at schema {current or 'none'}, "
                f"expected {migrate.head_revision()}: run `orchard db upgrade`"
            )

    # -- transactions

    def _unreachable(self, exc: Exception) -> StoreError:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        return StoreError(f"database {mask_url(self.url)} unreachable: {reason}")

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        session = self._sessions()
        try:
            with session.begin():
                yield session
        except OperationalError as exc:
            raise self._unreachable(exc) from None
        finally:
            session.close()

    # -- campaigns

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
    ) -> None:
        with self._transaction() as s:
            s.add(
                CampaignRow(
                    id=campaign_id,
                    name=name,
                    source=source,
                    digest=digest,
                    spec=spec,
                    classes=list(classes),
                )
            )
            for position, plan in enumerate(units):
                row = UnitRow(
                    key=plan.key,
                    campaign_id=campaign_id,
                    family=plan.family,
                    stage=plan.stage,
                    fold=plan.fold,
                    params_hash=plan.params_hash,
                    task=plan.task,
                    queue=plan.queue,
                    position=position,
                    params=[UnitParamRow(name=k, value=v) for k, v in plan.params.items()],
                )
                s.add(row)
            s.flush()
            for artifact in artifacts:
                self._record_artifact_without_commit(s, artifact)

    def find_campaign(self, campaign_id: str) -> Campaign | None:
        with self._transaction() as s:
            row = s.get(CampaignRow, campaign_id)
            return _campaign(row) if row else None

    def get_campaign(self, campaign_id: str) -> Campaign:
        campaign = self.find_campaign(campaign_id)
        if campaign is None:
            raise StoreError(f"no campaign {campaign_id!r} in {mask_url(self.url)}")
        return campaign

    def list_campaigns(self, limit: int = 50) -> list[Campaign]:
        with self._transaction() as s:
            rows = s.scalars(
                select(CampaignRow).order_by(CampaignRow.created_at.desc()).limit(limit)
            )
            return [_campaign(r) for r in rows]

    def complete_campaign(self, campaign_id: str) -> str | None:
        """Close a RUNNING campaign whose units are all terminal: DONE, or PARTIAL when
        some failed. Returns the new state, or None if it is not finished (or already
        closed by another caller)."""
        with self._transaction() as s:
            states = s.scalars(
                select(UnitRow.state).where(UnitRow.campaign_id == campaign_id)
            ).all()
            if not states or any(state not in TERMINAL for state in states):
                return None
            state = "DONE" if all(st == SUCCESS for st in states) else "PARTIAL"
            done = s.execute(
                update(CampaignRow)
                .where(CampaignRow.id == campaign_id, CampaignRow.state == "RUNNING")
                .values(state=state, finished_at=utcnow())
            )
            return state if done.rowcount == 1 else None

    # -- units

    def units(self, campaign_id: str) -> list[Unit]:
        with self._transaction() as s:
            rows = s.scalars(
                select(UnitRow)
                .where(UnitRow.campaign_id == campaign_id)
                .options(selectinload(UnitRow.params))
                .order_by(UnitRow.position)
            )
            return [_unit(r) for r in rows]

    def find_unit(self, key: str) -> Unit | None:
        with self._transaction() as s:
            row = s.scalar(
                select(UnitRow).where(UnitRow.key == key).options(selectinload(UnitRow.params))
            )
            return _unit(row) if row else None

    def get_unit(self, key: str) -> Unit:
        unit = self.find_unit(key)
        if unit is None:
            raise StoreError(f"no unit {key!r} in {mask_url(self.url)}")
        return unit

    def claim_for_queue(self, keys: Sequence[str]) -> list[str]:
        """Move units PENDING -> QUEUED; returns the keys this call moved.

        Several workers may try to open the next stage at once: only one of them
        wins each unit, so each is sent to the broker once.
        """
        if not keys:
            return []
        with self._transaction() as s:
            won = s.scalars(
                update(UnitRow)
                .where(UnitRow.key.in_(keys), UnitRow.state == PENDING)
                .values(state=QUEUED, queued_at=utcnow())
                .returning(UnitRow.key)
            ).all()
        order = {k: i for i, k in enumerate(keys)}
        return sorted(won, key=order.__getitem__)

    def start_unit(self, key: str, *, worker: str, task_id: str | None) -> Start:
        """Mark a unit RUNNING for this delivery, unless it already finished."""
        with self._transaction() as s:
            row = s.scalar(select(UnitRow).where(UnitRow.key == key).with_for_update())
            if row is None:
                raise StoreError(f"no unit {key!r} in {mask_url(self.url)}")
            if row.state in TERMINAL:
                return Start(run=False, attempts=row.attempts, state=row.state)
            row.state = RUNNING
            row.attempts += 1
            row.worker = worker
            row.task_id = task_id
            row.started_at = row.heartbeat_at = utcnow()
            row.error = None
            return Start(run=True, attempts=row.attempts, state=RUNNING)

    def fail_unit(self, key: str, error: str) -> bool:
        """Mark a unit FAILED unless it already succeeded; True if this call did it."""
        with self._transaction() as s:
            done = s.execute(
                update(UnitRow)
                .where(UnitRow.key == key, UnitRow.state != SUCCESS)
                .values(state=FAILED, error=error[:4000], finished_at=utcnow())
            )
            return done.rowcount == 1

    def fail_units(self, failures: Sequence[tuple[str, str]]) -> None:
        """Give up on PENDING units that can no longer run (their input failed)."""
        with self._transaction() as s:
            for key, reason in failures:
                s.execute(
                    update(UnitRow)
                    .where(UnitRow.key == key, UnitRow.state == PENDING)
                    .values(state=FAILED, error=reason, finished_at=utcnow())
                )

    def record_metrics(self, key: str, step: int, values: dict[str, float]) -> None:
        """Upsert one step's numbers; a re-run of the same step overwrites them."""
        with self._transaction() as s:
            unit_id = self._unit_id(s, key)
            s.execute(update(UnitRow).where(UnitRow.id == unit_id).values(heartbeat_at=utcnow()))
            rows = [
                {"unit_id": unit_id, "name": name, "step": step, "value": float(value)}
                for name, value in values.items()
            ]
            insert = _insert(s)(MetricRow).values(rows)
            s.execute(
                insert.on_conflict_do_update(
                    index_elements=["unit_id", "name", "step"],
                    set_={"value": insert.excluded.value},
                )
            )

    def metrics(self, key: str) -> dict[str, list[tuple[int, float]]]:
        with self._transaction() as s:
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

    def finish_unit(self, key: str, outcome: Outcome) -> bool:
        """Record a unit's result, predictions and artifacts and mark it SUCCESS.

        All in one transaction. If the unit already has a result (the same task ran
        twice) nothing is written and False is returned: first write wins.
        """
        with self._transaction() as s:
            unit = s.scalar(select(UnitRow).where(UnitRow.key == key).with_for_update())
            if unit is None:
                raise StoreError(f"no unit {key!r} in {mask_url(self.url)}")
            inserted = s.execute(
                _insert(s)(ResultRow)
                .values(
                    unit_id=unit.id,
                    train_acc=outcome.train_acc,
                    val_acc=outcome.val_acc,
                    test_acc=outcome.test_acc,
                    val_confusion=outcome.val_confusion,
                    test_confusion=outcome.test_confusion,
                    fit_seconds=outcome.fit_seconds,
                    extra=outcome.extra,
                    created_at=utcnow(),
                )
                .on_conflict_do_nothing(index_elements=["unit_id"])
                .returning(ResultRow.id)
            ).scalar()
            if inserted is None:
                return False
            for split, predictions in outcome.predictions.items():
                rows = [
                    {
                        "unit_id": unit.id,
                        "split": split,
                        "image_id": p.image_id,
                        "label": p.label,
                        "pred": p.pred,
                        "probs": p.probs,
                    }
                    for p in predictions
                ]
                if rows:
                    s.execute(_insert(s)(PredictionRow).values(rows).on_conflict_do_nothing())
            for artifact in outcome.artifacts:
                self._record_artifact_without_commit(s, artifact)
            unit.state = SUCCESS
            unit.error = None
            unit.finished_at = utcnow()
            return True

    def _unit_id(self, s: Session, key: str) -> int:
        unit_id = s.scalar(select(UnitRow.id).where(UnitRow.key == key))
        if unit_id is None:
            raise StoreError(f"no unit {key!r} in {mask_url(self.url)}")
        return unit_id

    # -- results

    def results(self, campaign_id: str) -> dict[str, Result]:
        """unit key -> result, for every unit of the campaign that has one."""
        with self._transaction() as s:
            rows = s.execute(
                select(UnitRow.key, ResultRow)
                .join(ResultRow, ResultRow.unit_id == UnitRow.id)
                .where(UnitRow.campaign_id == campaign_id)
            )
            return {key: _result(key, r) for key, r in rows}

    def predictions(self, key: str, split: str) -> list[Prediction]:
        with self._transaction() as s:
            rows = s.scalars(
                select(PredictionRow)
                .join(UnitRow, UnitRow.id == PredictionRow.unit_id)
                .where(UnitRow.key == key, PredictionRow.split == split)
                .order_by(PredictionRow.image_id)
            )
            return [Prediction(r.image_id, r.label, r.pred, r.probs) for r in rows]

    def count_rows(self, campaign_id: str) -> dict[str, int]:
        """How many result, prediction and metric rows a campaign has (for checks)."""
        with self._transaction() as s:
            ids = select(UnitRow.id).where(UnitRow.campaign_id == campaign_id)
            return {
                table.__tablename__: s.scalar(
                    select(func.count()).select_from(table).where(table.unit_id.in_(ids))
                )
                for table in (ResultRow, PredictionRow, MetricRow)
            }

    # -- artifacts

    def record_artifact(self, artifact: Artifact) -> None:
        with self._transaction() as s:
            self._record_artifact_without_commit(s, artifact)

    def _record_artifact_without_commit(self, s: Session, artifact: Artifact) -> None:
        values = {
            "path": artifact.path,
            "kind": artifact.kind,
            "sha256": artifact.sha256,
            "size": artifact.size,
            "campaign_id": artifact.campaign_id,
            "unit_key": artifact.unit_key,
            "created_at": utcnow(),
        }
        insert = _insert(s)(ArtifactRow).values(values)
        # a rewritten file (same path) replaces its checksum: the newest bytes are truth
        s.execute(
            insert.on_conflict_do_update(
                index_elements=["path"],
                set_={k: insert.excluded[k] for k in ("kind", "sha256", "size", "created_at")},
            )
        )

    def find_artifact(self, path: str) -> Artifact | None:
        with self._transaction() as s:
            row = s.scalar(select(ArtifactRow).where(ArtifactRow.path == path))
            if row is None:
                return None
            return Artifact(row.path, row.kind, row.sha256, row.size, row.campaign_id, row.unit_key)

    def artifacts(self, campaign_id: str, kind: str | None = None) -> list[Artifact]:
        with self._transaction() as s:
            query = select(ArtifactRow).where(ArtifactRow.campaign_id == campaign_id)
            if kind is not None:
                query = query.where(ArtifactRow.kind == kind)
            rows = s.scalars(query.order_by(ArtifactRow.path))
            return [
                Artifact(r.path, r.kind, r.sha256, r.size, r.campaign_id, r.unit_key) for r in rows
            ]


def _insert(s: Session) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT (SQLite >= 3.24 and PostgreSQL)."""
    name = s.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert
    if name == "sqlite":
        return sqlite.insert
    raise StoreError(f"unsupported database dialect {name!r}: use SQLite or PostgreSQL")


def _campaign(row: CampaignRow) -> Campaign:
    return Campaign(
        id=row.id,
        name=row.name,
        source=row.source,
        digest=row.digest,
        spec=row.spec,
        classes=tuple(row.classes),
        state=row.state,
        created_at=row.created_at,
        finished_at=row.finished_at,
    )


def _unit(row: UnitRow) -> Unit:
    return Unit(
        key=row.key,
        campaign_id=row.campaign_id,
        family=row.family,
        stage=row.stage,
        fold=row.fold,
        params={p.name: p.value for p in row.params},
        params_hash=row.params_hash,
        task=row.task,
        queue=row.queue,
        state=row.state,
        attempts=row.attempts,
        worker=row.worker,
        started_at=row.started_at,
        finished_at=row.finished_at,
        error=row.error,
    )


def _result(key: str, row: ResultRow) -> Result:
    return Result(
        unit_key=key,
        train_acc=row.train_acc,
        val_acc=row.val_acc,
        test_acc=row.test_acc,
        val_confusion=row.val_confusion,
        test_confusion=row.test_confusion,
        fit_seconds=row.fit_seconds,
        extra=row.extra,
    )


__all__ = [
    "Artifact",
    "Campaign",
    "Outcome",
    "Prediction",
    "Result",
    "Start",
    "Store",
    "StoreError",
    "Unit",
]
