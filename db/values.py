"""The frozen values the store hands to its callers, and takes from them: never a live
ORM row (:mod:`db.models`), so nothing a caller holds reads the database behind its back
or goes stale when a session closes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from shared.plan import RUNNING

#: A campaign's state from the moment ``delete_campaign`` decides to delete it until
#: its last row goes: nothing resumes it, reuses its results or runs its units.
DELETING = "DELETING"


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
