"""The store's tables, one per concept.

Every write a task makes is keyed by its unit (unique constraints below), so a task
that Celery delivers twice finds its rows already there instead of adding more.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator, TypeEngine

from shared.datasets import MAX_IMAGE_ID_CHARS


def utcnow() -> datetime:
    return datetime.now(UTC)


class JsonValue(TypeDecorator):
    """One JSON value, a bare number included, that reads back as it was written.

    SQLite gives a column declared JSON numeric affinity: the text ``1.0`` is stored as
    the integer 1 and read back as ``1``, and for scikit-learn ``max_features=1`` is one
    feature where ``1.0`` is all of them. On SQLite the column is TEXT, so the JSON
    text is kept as written; PostgreSQL's ``json`` keeps it already."""

    impl = JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        return dialect.type_descriptor(Text() if dialect.name == "sqlite" else JSON())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:  # noqa: ANN401
        return json.dumps(value) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:  # noqa: ANN401
        if dialect.name != "sqlite" or value is None:
            return value
        # a row written before revision 0006 may hold a number SQLite stored as one
        return json.loads(value) if isinstance(value, str) else value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class CampaignRow(Base):
    __tablename__ = "campaigns"

    id: Mapped[str] = mapped_column(String(80), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(Text)  # the campaign file it came from
    digest: Mapped[str] = mapped_column(String(64))  # hash of the validated spec
    spec: Mapped[dict[str, Any]]
    classes: Mapped[list[Any]]  # class names, in label-index order
    state: Mapped[str] = mapped_column(String(16), default="RUNNING")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # the manifest's sha256 without where the dataset lies (Manifest.data_digest): the
    # campaigns over the same data, wherever mounted, that `submit --reuse` copies from;
    # None before 0007, or for a manifest without its images' sha256 (0007)
    data_digest: Mapped[str | None] = mapped_column(String(64), index=True)
    # shared.spec.CAMPAIGN_FORMAT of the orchard that submitted it (1 before 0008): a
    # worker of an older format runs none of its units
    format_version: Mapped[int] = mapped_column(Integer, server_default=text("1"))

    units: Mapped[list[UnitRow]] = relationship(back_populates="campaign")


class UnitRow(Base):
    __tablename__ = "units"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    family: Mapped[str] = mapped_column(String(32))
    stage: Mapped[int] = mapped_column(Integer)
    fold: Mapped[int | None] = mapped_column(Integer)
    params_hash: Mapped[str] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(String(64))
    queue: Mapped[str] = mapped_column(String(64))
    position: Mapped[int] = mapped_column(Integer)  # order in the plan
    state: Mapped[str] = mapped_column(String(16), default="PENDING")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    task_id: Mapped[str | None] = mapped_column(String(64))
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When the unit's message reached the broker. QUEUED without it: claimed, but the
    # process that claimed it may have died before sending; the workers send it again.
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    # The delivery running the unit now, and until when that claim holds unless renewed.
    # A second delivery of the same task (visibility timeout, two workers) finds a live
    # lease and steps back; a dead holder's lease expires and the next delivery takes over.
    lease_holder: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    campaign: Mapped[CampaignRow] = relationship(back_populates="units")
    params: Mapped[list[UnitParamRow]] = relationship(
        cascade="all, delete-orphan", order_by="UnitParamRow.name"
    )

    __table_args__ = (
        Index("ix_units_campaign_state", "campaign_id", "state"),
        # what asks across every campaign of the store (0004): ``mark_sent`` finds units
        # by task id, and whether a queue is busy (``untaken_queues``, ``requeue_lost``)
        # looks at its running, recently started and recently finished units; without
        # these each was a full scan of every unit ever recorded
        Index("ix_units_task_id", "task_id"),
        Index("ix_units_queue_state", "queue", "state"),
        Index("ix_units_queue_started_at", "queue", "started_at"),
        Index("ix_units_queue_finished_at", "queue", "finished_at"),
    )


class UnitParamRow(Base):
    __tablename__ = "unit_params"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    unit_id: Mapped[int] = mapped_column(ForeignKey("units.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[Any] = mapped_column(JsonValue)

    __table_args__ = (UniqueConstraint("unit_id", "name"),)


class MetricRow(Base):
    """Per-epoch (or per-step) numbers: ``train_loss``, ``val_acc``, ..."""

    __tablename__ = "metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    unit_id: Mapped[int] = mapped_column(ForeignKey("units.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    step: Mapped[int] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Float)

    __table_args__ = (UniqueConstraint("unit_id", "name", "step"),)


class AttemptRow(Base):
    """An earlier attempt at a unit, one that did not end it: its worker lost (killed,
    out of memory, its host gone), the attempt handed back by a stopping worker, or one
    that failed before `orchard resume` reset the unit. The unit's row holds its latest
    attempt only; this is copied from it when the next one starts (or the resume resets
    it), so `orchard status` can tell what happened before."""

    __tablename__ = "unit_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    unit_id: Mapped[int] = mapped_column(ForeignKey("units.id", ondelete="CASCADE"))
    worker: Mapped[str | None] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_heard_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # the unit's state when the next attempt took over: RUNNING (its lease ran out), LOST
    # (its process died, its worker ended the lease), QUEUED (sent again: its worker
    # lost, or handed back), FAILED or CANCELLED (resumed)
    state: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (UniqueConstraint("unit_id", "started_at"),)


class ResultRow(Base):
    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    unit_id: Mapped[int] = mapped_column(ForeignKey("units.id", ondelete="CASCADE"), unique=True)
    train_acc: Mapped[float | None] = mapped_column(Float)
    val_acc: Mapped[float | None] = mapped_column(Float)
    test_acc: Mapped[float | None] = mapped_column(Float)
    val_confusion: Mapped[list[Any] | None]
    test_confusion: Mapped[list[Any] | None]
    fit_seconds: Mapped[float] = mapped_column(Float)
    extra: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PredictionRow(Base):
    """One sample's prediction by one unit; ``label`` is the truth (-1 when unknown)."""

    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    unit_id: Mapped[int] = mapped_column(ForeignKey("units.id", ondelete="CASCADE"))
    split: Mapped[str] = mapped_column(String(8))  # "val" or "test"
    image_id: Mapped[str] = mapped_column(String(MAX_IMAGE_ID_CHARS))
    label: Mapped[int] = mapped_column(Integer)
    pred: Mapped[int] = mapped_column(Integer)
    probs: Mapped[list[Any] | None]

    __table_args__ = (UniqueConstraint("unit_id", "split", "image_id"),)


class ArtifactRow(Base):
    """A file orchard wrote (shard, manifest, model, report), with its checksum."""

    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(String(1000), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    campaign_id: Mapped[str | None] = mapped_column(ForeignKey("campaigns.id", ondelete="SET NULL"))
    unit_key: Mapped[str | None] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (
        # a campaign's artifacts of a kind (its report, its manifest), asked by every
        # poll of `orchard status --watch`; and the campaigns whose manifest has given
        # bytes, asked by `--reuse`: not a scan of every campaign's artifacts (0004)
        Index("ix_artifacts_campaign_kind", "campaign_id", "kind"),
        Index("ix_artifacts_kind_sha256", "kind", "sha256"),
    )


class DeletedCampaignRow(Base):
    """What ``orchard delete`` leaves of a campaign: its id, name and dates, so that a
    message of it still in a queue, or a command naming it, learns that it was deleted
    rather than that it was never in this store (0005)."""

    __tablename__ = "deleted_campaigns"

    id: Mapped[str] = mapped_column(String(80), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    deleted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
