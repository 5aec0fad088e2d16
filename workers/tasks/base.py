"""What every orchard task does around its body, in one place.

A task message carries two small strings, the campaign id and the unit key, checked
by a pydantic model on arrival. The wrapper then asks the store whether the unit
still needs running (a re-delivered finished unit returns at once), runs the body,
writes the outcome in one transaction (first write wins), and opens whatever stage
is now ready. The body itself only turns inputs into an :class:`Outcome`.

Delivery is at least once, so the wrapper also decides what a second delivery does:

- each delivery gets its own lease on the unit (``start_unit``) and renews it from a
  heartbeat thread; a delivery that finds another's live lease does not run and does
  not drop its message either: it comes back once the lease would have expired
  (``task.retry``), and then finds the unit done (no-op) or takes it over;
- a run whose lease was taken over, or whose campaign was cancelled, stops at its
  next store call (:class:`UnitAborted`), or at its next step where the body checks
  (a CNN fold: each epoch), writes nothing and fails nothing; a result that arrives
  after a cancel is not recorded, so a cancelled unit stays CANCELLED;
- a body that saves its progress (a CNN fold, every epoch) hands its unit back when
  its worker is asked to shut down (SIGTERM, Ctrl-C): the unit goes back to QUEUED,
  the message back to its queue, and another worker resumes it at once;
- a store that stays unreachable after its retries (a restart, a failover) is not the
  unit's failure: a finished unit's result is offered again for a lease period, then
  the unit is handed back (its attempt counted) for another delivery, or, when even
  that cannot be written, its message comes back once its lease has run out;
- a unit's own error that the store cannot record leaves the message for a later
  delivery;
- a delivery that finds its unit PENDING is stale (sent before `orchard resume` reset
  the unit, or by a send that failed): every message is sent after its unit's claim,
  so it is dropped, and the unit's next claim sends it anew.

Retries that wait for something to come back (the store, a live lease) are not
counted against a limit: a dropped message would leave its unit QUEUED for good.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, cast

import numpy as np
from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery import Task, signals
from celery.exceptions import Reject
from celery.utils.log import get_task_logger
from celery.worker.control import control_command
from celery.worker.request import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from db import migrate
from db.store import (
    DELETING,
    LEASE_CANCELLED,
    LEASE_GONE,
    LEASE_LOST,
    Campaign,
    LeaseLostError,
    NotFoundError,
    Outcome,
    SchemaError,
    Store,
    StoreError,
    StoreUnreachableError,
    Unit,
    UnitCancelledError,
)
from scheduler.canvas import advance
from scheduler.gpus import SAY_READY
from shared.errors import OrchardError, visible_controls
from shared.manifest import Manifest, manifest_path
from shared.settings import Settings, load_settings, mask_url
from shared.spec import CAMPAIGN_FORMAT
from workers.app import app
from workers.config import reliability
from workers.data import (
    NotOnThisHostError,
    load_manifest,
    load_variant,
    manifest_missing,
)
from workers.lease import GuardedStore, Heartbeat, UnitAborted

log = get_task_logger("orchard")
#: for the worker's main process, where no task runs (a task logger would say ???[???])
main_log = logging.getLogger(__name__)


class UnitMessage(BaseModel):
    """The whole payload of every orchard task: ids, never arrays."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    campaign_id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,79}$")
    # <campaign>/<family>/<hash>/f<fold>..., every part a plain name: never "..", never
    # an absolute path, whatever a message on the broker says
    unit_key: str = Field(max_length=200, pattern=r"^[a-z0-9][a-z0-9_-]*(/[a-z0-9_-]+)*$")

    @model_validator(mode="after")
    def _key_of_its_campaign(self) -> UnitMessage:
        if not self.unit_key.startswith(self.campaign_id + "/"):
            raise ValueError("unit_key must belong to campaign_id")
        return self


@functools.cache
def _settings(pid: int) -> Settings:
    return load_settings()


#: How often a worker process reads the store's schema revision again, before a unit:
#: a store migrated by `orchard db upgrade` under a worker left running (its host not
#: yet updated) stops that worker's units within this time, rather than never (their
#: messages wait, as at a start against an older store, until the worker is updated).
SCHEMA_RECHECK_SECONDS = 10.0

#: When this process last found the store at its schema (time.monotonic()).
_schema_checked_at = -math.inf

# the schema this worker's code was written for, read as it starts: a checkout updated
# under it must not change what it takes for the newest
migrate.head_revision()
migrate.known_revisions()


@functools.cache
def _store(pid: int) -> Store:
    # one engine per process: a pool inherited through fork would share sockets
    global _schema_checked_at
    store = Store(_settings(pid).database_url)
    try:
        store.check_schema()
    except StoreError:
        store.dispose()  # not cached: the next unit opens another
        raise
    _schema_checked_at = time.monotonic()
    return store


#: Schema lines (and campaigns of a newer format) this process has logged as errors:
#: said once, then at debug level.
_schema_told: set[str] = set()


def worker_settings() -> Settings:
    return _settings(os.getpid())


def worker_store() -> Store:
    """This process's store, its schema checked at most :data:`SCHEMA_RECHECK_SECONDS`
    ago (a ``SchemaError`` when it is no longer this orchard's)."""
    global _schema_checked_at
    store = _store(os.getpid())
    now = time.monotonic()
    if now - _schema_checked_at >= SCHEMA_RECHECK_SECONDS:
        store.check_schema()
        _schema_checked_at = now
    return store


@dataclass(frozen=True)
class FoldData:
    """Manifest indices of one fold's splits, and every cached image as one variant."""

    manifest: Manifest
    images: np.ndarray
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def split(self) -> tuple[np.ndarray, ...]:
        """(train images, train labels, val images, val labels, test images)."""
        labels = self.manifest.label_index
        return (
            self.images[self.train],
            labels(self.train),
            self.images[self.val],
            labels(self.val),
            self.images[self.test],
        )


#: why a delivery stops when its worker is shutting down (besides the store's reasons)
WORKER_STOPPING = "worker stopping"

_worker_stopping = threading.Event()


@signals.worker_shutting_down.connect
def _on_worker_shutting_down(**_: Any) -> None:
    # Celery sends this from its SIGTERM/SIGINT handler in the worker's main process,
    # which with the solo pool (GPU workers) is the process running the fold
    _worker_stopping.set()


#: The worker's consumer, in the worker's main process (its pid beside it): a solo pool
#: (GPU workers) runs each unit in that process's only thread, which also runs the
#: event loop that sends the task events Celery buffers (received, started) and the
#: worker's heartbeats. A CNN fold would hold them all until it ended: Flower showed
#: the fold PENDING and the worker offline, then "clock drift" once they came.
_consumer: tuple[Any, int] | None = None


@signals.worker_ready.connect
def _remember_consumer(sender: Any = None, **_: Any) -> None:  # noqa: ANN401
    global _consumer
    _consumer = (sender, os.getpid())


@signals.worker_ready.connect
def _say_ready(sender: Any = None, **_: Any) -> None:  # noqa: ANN401
    """Under `orchard worker --gpus` (``SAY_READY`` set), a worker whose log level hides
    Celery's ``<node> ready.`` (INFO) says it itself: its launcher tells a worker that
    started from one that could not by that line."""
    if os.environ.get(SAY_READY) != "1":
        return
    if logging.getLogger("celery.apps.worker").isEnabledFor(logging.INFO):
        return  # Celery says it
    # to the descriptor: Celery redirects sys.stdout to its log, at WARNING
    with contextlib.suppress(OSError):
        os.write(1, f"orchard: {getattr(sender, 'hostname', '?')} ready.\n".encode())


def _blocked_consumer() -> Any:  # noqa: ANN401
    """The consumer whose event loop this thread blocks while it runs a unit (a solo
    pool's), else None: a prefork child runs its unit beside the loop, and shares none
    of its connections (one forked after the loop started still has its pid apart)."""
    if _consumer is None:
        return None
    consumer, pid = _consumer
    if pid != os.getpid() or threading.current_thread() is not threading.main_thread():
        return None
    return consumer


def send_worker_events() -> None:
    """Send the task events the blocked event loop holds (solo pool). Monitoring only:
    a failure is logged, never raised; with the broker away they stay buffered (no
    retry here, which would block the unit until the broker came back)."""
    consumer = _blocked_consumer()
    if consumer is None or consumer.event_dispatcher is None:
        return
    try:
        consumer.event_dispatcher.flush()
    except Exception as exc:  # noqa: BLE001 - what Flower shows must not stop a unit
        log.debug("task events not sent: %s", exc)


@contextlib.contextmanager
def worker_heartbeats() -> Iterator[None]:
    """While a unit runs in the blocked event loop's thread (solo pool), send the
    worker's heartbeats from a thread of their own at the worker's interval (2 s), as
    the loop would: Flower counts a worker gone after two missed ones. The dispatcher
    serialises its sends; each is tried once (a broker away: the next one tries)."""
    consumer = _blocked_consumer()
    heart = getattr(consumer, "heart", None) if consumer is not None else None
    if heart is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(heart.interval):
            try:
                heart._send("worker-heartbeat", retry=False)
            except Exception as exc:  # noqa: BLE001 - monitoring only
                log.debug("worker heartbeat not sent: %s", exc)

    thread = threading.Thread(target=beat, name="worker heartbeats", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


@dataclass
class UnitContext:
    campaign: Campaign
    unit: Unit
    store: Store
    settings: Settings
    _manifest: Manifest | None = field(default=None, repr=False)
    heartbeat: Heartbeat | None = field(default=None, repr=False)

    def check_stop(self) -> None:
        """Raise :class:`UnitAborted` if this delivery lost its unit (cancelled, taken
        over). Asks the store now: bodies call it between steps (a CNN fold: each
        epoch), where stopping is cheap. Store calls check what the heartbeat knows."""
        send_worker_events()  # Flower: what a solo pool's blocked event loop holds
        if self.heartbeat is not None:
            self.heartbeat.renew_now()
            self.heartbeat.check()

    def confirm_lease(self) -> None:
        """Before a step that cannot be undone (files moved over the ones a unit's
        records describe): renew the lease now, and go on only if this delivery holds
        it. Unlike :meth:`check_stop`, a store that does not answer stops the step too:
        a run cut off from the database may have been taken over meanwhile (the
        ``StoreError`` raised hands the unit back, as any outage does)."""
        if self.heartbeat is not None:
            self.heartbeat.confirm()

    def hand_back_if_worker_stopping(self) -> None:
        """Raise :class:`UnitAborted` (WORKER_STOPPING) if the worker is shutting down.

        For bodies that save their progress: call it right after a save, so the next
        delivery loses nothing. The wrapper then puts the unit back to QUEUED and its
        message back on its queue, and the worker exits without waiting for the body.
        """
        if _worker_stopping.is_set():
            raise UnitAborted(WORKER_STOPPING)

    @property
    def campaign_dir(self) -> Path:
        return self.settings.artifacts / "campaigns" / self.campaign.id

    @property
    def seed(self) -> int:
        return int(self.campaign.spec.get("seed", 0))

    def manifest(self) -> Manifest:
        # once per task: each load asks the store for the manifest's checksum
        if self._manifest is None:
            self._manifest = load_manifest(self.store, self.settings, self.campaign.id)
        return self._manifest

    def check_folder_still_there(self) -> None:
        """Raise a :class:`NotOnThisHostError` if the manifest this unit read is gone
        since: the artifact folder was removed or its share unmounted while the unit
        ran, and what the unit wrote went to folders made anew where the share was (a
        local disk), where no other host sees it. Nothing of it is recorded."""
        if self._manifest is not None:
            path = manifest_path(self.campaign_dir)
            if not path.is_file():
                raise manifest_missing(self.store, self.settings, self.campaign.id, path)

    def fold_data(self, variant: str) -> FoldData:
        """This unit's fold of the cached images, as ``variant``, with labels."""
        manifest = self.manifest()
        _warn_if_larger_than_the_host(self.unit, self.campaign.spec, manifest)
        images = load_variant(self.store, self.settings, manifest, variant)
        train, val, test = manifest.fold_indices(self.unit.fold)
        return FoldData(manifest, images, train, val, test)

    def relative(self, path: Path) -> str:
        """Artifact paths are stored relative to the artifact root, so hosts may mount it
        at different places."""
        return path.relative_to(self.settings.artifacts).as_posix()


def _warn_if_larger_than_the_host(unit: Unit, spec: dict[str, Any], manifest: Manifest) -> None:
    """Log a warning where ``unit`` holds more, by ``shared.memory``'s estimate, than this
    process holds already (the variant kept from its last unit, say) and this host (or
    its container) has available together, as it loads its images: the kernel may kill
    it, and every delivery after it, which the store then tells only as deliveries that
    ended without a result. Advisory: nothing it meets stops the unit."""
    from shared.memory import (
        Sizes,
        about,
        available_bytes,
        cnn_on_the_cpu,
        process_bytes,
        unit_bytes,
    )

    try:
        if (available := available_bytes()) is None:
            return
        sizes = Sizes.of(manifest, spec, [unit.fold])
        if unit.family == "cnn" and _cnn_on_the_cpu():  # "the device" is this host
            needs = cnn_on_the_cpu(unit.params, sizes, unit.fold)
        else:
            needs = unit_bytes(unit, sizes)
        held = process_bytes()
    except Exception:  # noqa: BLE001
        log.debug("%s: no memory estimate", unit.key, exc_info=True)
        return
    if needs > available + held:
        log.warning(
            "%s holds %s in this process by orchard's estimate, more than the %s it holds "
            "now and the %s this host has available together: the kernel may kill it "
            "(README: How much memory a worker needs)",
            unit.key,
            about(needs),
            f"{held / 1e9:.1f} GB",
            f"{available / 1e9:.1f} GB",
        )


def _cnn_on_the_cpu() -> bool:
    """Whether this worker's CNN folds train on the CPU (``ORCHARD_DEVICE``, or no GPU
    that torch sees), where their images on "the device" are in the host's memory too."""
    import sys

    wanted = os.environ.get("ORCHARD_DEVICE")
    if wanted:
        return wanted.startswith("cpu")
    torch = sys.modules.get("torch")  # a GPU worker loaded it as it started
    return torch is None or not torch.cuda.is_available()


class UnitMemoryError(RuntimeError):
    """A unit's body ran out of memory (a MemoryError), which the unit's failure records:
    raised in its stead for Celery, which would end the worker for a MemoryError."""


#: The longest worker node name the store keeps whole (its units' ``worker`` and lease
#: holders are 200 characters wide, the holder with a pid and an id after the name).
MAX_NODE_NAME = 150


def node_label(hostname: str | None) -> str:
    """A worker's node name as the store keeps it: whole up to :data:`MAX_NODE_NAME`
    characters; a longer one (``--name`` with a long fully qualified host name) cut,
    with a hash of the whole after a ``~``, so that two such workers stay apart."""
    name = hostname or "?"
    if len(name) <= MAX_NODE_NAME:
        return name
    digest = hashlib.blake2b(name.encode(), digest_size=4).hexdigest()
    return f"{name[: MAX_NODE_NAME - len(digest) - 1]}~{digest}"


#: Drawn once per worker, in its main process before the pool's children are forked
#: (they inherit it): tells this worker from another of the same node name, a host
#: misconfigured as another (the same ORCHARD_NODE_NAME, and the same pids in containers).
WORKER_BOOT = uuid.uuid4().hex[:8]


def holder_prefix(hostname: str | None, pid: int) -> str:
    """The start of the lease holder of every delivery process ``pid`` of worker
    ``hostname`` runs (each adds an id of its own), this worker's :data:`WORKER_BOOT`
    with them: a namesake's dead child of the same pid releases none of its leases."""
    return f"{node_label(hostname)}/{WORKER_BOOT}/{pid}/"


_stopped_queues: set[str] = set()  # this worker's, for good: a pause's end leaves them


@control_command(
    args=[("queue", str), ("boot", str), ("seconds", float)],
    signature="<queue> <boot> [seconds]",
)
def orchard_stop_consuming(
    state: Any, queue: str, boot: str, seconds: float = 0.0, **_: Any
) -> dict[str, str]:
    """Celery's ``cancel_consumer`` for the worker whose :data:`WORKER_BOOT` is
    ``boot`` alone: a worker of the same node name (which a broadcast also reaches)
    keeps consuming. With ``seconds``, it consumes from ``queue`` again after them."""
    if boot != WORKER_BOOT:
        return {"ok": f"not this worker: {queue} still consumed"}
    consumer = state.consumer
    consumer.call_soon(consumer.cancel_task_queue, queue)
    if not seconds:
        _stopped_queues.add(queue)
        return {"ok": f"no longer consuming from {queue}"}
    # the timer's thread (or loop) hands it to the consumer's own, as commands run
    consumer.timer.call_after(float(seconds), consumer.call_soon, (_consume_again, consumer, queue))
    return {"ok": f"not consuming from {queue} for {seconds:g} s"}


def _consume_again(consumer: Any, queue: str) -> None:
    if queue in _stopped_queues or queue in consumer.app.amqp.queues.consume_from:
        return  # stopped for good since, or taken up again by another pause's end
    consumer.add_task_queue(queue)


#: The longest a unit is put off while its store is unusable (doubling from 2 s).
BACKOFF_SECONDS = 60
#: Beyond the longest countdown orchard's retries ask for, how late a retry may still be
#: due by this worker's clock (see :attr:`UnitRequest.eta`).
ETA_SLACK_SECONDS = 5


def latest_eta_seconds() -> float:
    """The longest an orchard retry's ETA may lie ahead, by the clock of the worker that
    receives it: every countdown orchard sets (a lease period and a second, the store's
    backoff, 5 s), and a few seconds more."""
    return max(BACKOFF_SECONDS, reliability().lease_seconds + 1) + ETA_SLACK_SECONDS


class UnitRequest(Request):
    """A unit's request in the worker's main process. When its prefork child is killed
    (SIGKILL, the OOM killer), Celery requeues the message (reject on worker lost);
    the dead child's lease is ended first, so that delivery runs at once instead of
    waiting out a lease that nobody renews."""

    @property
    def eta(self) -> datetime | None:
        """When a retry is due. Celery sends ``countdown`` as a time of the sender's
        clock, which this worker waits for by its own: a sender minutes ahead made the
        retry, and the worker's slot it keeps (``workers.etaslot``), wait those minutes
        too. No later than :func:`latest_eta_seconds` from now, by this worker's clock."""
        eta = self._eta
        if eta is None:
            return None
        return min(eta, datetime.now(UTC) + timedelta(seconds=latest_eta_seconds()))

    def on_failure(
        self, exc_info: ExceptionInfo, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):  # as Celery's own handler unwraps it
            exc = exc.exc
        if isinstance(exc, WorkerLostError) and self.worker_pid:
            unit = (self.kwargs or {}).get("unit_key") or self.id
            _release_leases_of_dead_child(self.hostname, self.worker_pid, f"{unit}: {exc}")
        return super().on_failure(exc_info, send_failed_event, return_ok)


#: How long the worker's event loop waits for a dead child's leases to be released
#: before its message goes back to the broker.
RELEASE_WAIT_SECONDS = 1.0


def _release_leases_of_dead_child(hostname: str | None, pid: int, what: str) -> None:
    """End the leases of the units child ``pid`` held, before its message is requeued
    (so the next delivery runs at once); ``what``: the unit and how the child ended, for
    the log line. In a thread, waited for at most
    :data:`RELEASE_WAIT_SECONDS`: this runs on the worker's event loop, which must not
    block for a store that is slow or away (its retries take a minute); the lease is
    then released later, or runs out, and the next delivery waits for it."""
    done = threading.Event()

    def release() -> None:
        try:
            released = worker_store().release_leases_of(holder_prefix(hostname, pid))
        except Exception as exc:  # noqa: BLE001 - the lease then runs out by itself
            main_log.warning("lease of dead child %d not released: %s", pid, exc)
        else:
            if released:
                main_log.warning(
                    "child %d was lost mid-unit (%s); its unit is sent again now", pid, what
                )
        finally:
            done.set()

    threading.Thread(target=release, name=f"release leases of child {pid}", daemon=True).start()
    if not done.wait(RELEASE_WAIT_SECONDS):
        main_log.warning(
            "child %d was lost mid-unit (%s); the store is slow to release its lease, so its "
            "unit starts again once it has (or the lease runs out)",
            pid,
            what,
        )


def unit_task(name: str) -> Callable[[Callable[[UnitContext], Outcome]], Task]:
    """Register ``body`` as the Celery task ``name`` with orchard's unit protocol."""

    def register(body: Callable[[UnitContext], Outcome]) -> Task:
        # max_retries=None: `task.retry(max_retries=None)` means "the task's limit",
        # which Celery otherwise sets to 3; the retries that must stop give their own
        # throws: a failure that is the unit's input or settings (a changed image, a
        # diverged training), recorded in one line, is logged by Celery in one line
        # too, not with a traceback as an error in orchard
        @app.task(
            name=name, bind=True, max_retries=None, Request=UnitRequest, throws=(OrchardError,)
        )
        @functools.wraps(body)
        def task(self: Task, **kwargs: Any) -> dict[str, Any]:
            try:
                message = UnitMessage.model_validate(kwargs)
            except ValidationError as exc:
                # a malformed message can never succeed: drop it, loudly
                log.error(
                    "%s: rejected malformed message %s: %s",
                    name,
                    json.dumps(kwargs)[:200],
                    exc.errors()[0]["msg"],
                )
                raise Reject(
                    f"malformed message: {exc.errors()[0]['msg']}", requeue=False
                ) from None
            return run_unit(self, message, body)

        return task

    return register


def _one_line(exc: BaseException) -> str:
    """The error a failed unit records: `orchard status` and the report show it. Its
    first line that says something: some messages (matplotlib's, for one) start with a
    newline, and their first line alone would leave just ``ValueError:``."""
    name = type(exc).__name__
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return visible_controls(f"{name}: {first}" if first else name)[:2000]


def _advance_or_retry(task: Task, store: Store, campaign_id: str) -> None:
    """Open the next stage; if the store or broker is away, come back later: the
    redelivered message finds the unit finished and advances again."""
    try:
        advance(store, task.app, campaign_id)
    except Exception as exc:
        log.error("%s: could not open the next stage, will retry: %s", campaign_id, exc)
        raise task.retry(countdown=5, max_retries=20, exc=exc) from None


def _remove_scratch(settings: Settings, key: str, paths: Sequence[str]) -> None:
    """Files the unit no longer needs now that its result is recorded (their records
    went with it); one left behind by a crash is unrecorded, so never read."""
    for relative in paths:
        try:
            (settings.artifacts / relative).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("%s: could not remove %s: %s", key, relative, exc)


def _remove_scratch_off_record(
    store: Store, settings: Settings, key: str, paths: Sequence[str]
) -> None:
    """The unit's result was in before this delivery's (another delivery's, or this
    one's whose commit reply was lost and whose retry found it done): the scratch
    files whose records that commit took are read by nobody; one still on record
    (another delivery's, should it somehow hold the unit) is left alone."""
    try:
        unrecorded = [p for p in paths if store.find_artifact(p) is None]
    except StoreError as exc:
        log.warning("%s: scratch files left until `orchard delete`: %s", key, exc)
        return
    _remove_scratch(settings, key, unrecorded)


def _hand_back(
    store: Store,
    key: str,
    holder: str,
    why: str = "at its checkpoint: the worker is shutting down",
    *,
    count_attempt: bool = False,
) -> None:
    """Back to QUEUED for the next delivery; the caller requeues the message."""
    try:
        handed = store.hand_back(key, holder, count_attempt=count_attempt)
    except StoreError as exc:
        # the message goes back anyway: its next delivery waits out this lease
        log.warning("%s: not handed back in the store (%s); its lease will run out", key, exc)
        return
    if handed:
        log.warning("%s handed back %s", key, why)


def _fail(
    task: Task,
    store: Store,
    message: UnitMessage,
    key: str,
    holder: str,
    exc: Exception,
    started: float,
    lease_seconds: float,
) -> None:
    """Record the unit FAILED with ``exc`` in one line and open what may follow; the
    caller re-raises it. A failure the store cannot record leaves the unit to a later
    delivery (this one comes back)."""
    error = _one_line(exc)
    log.error("%s failed after %.1f s: %s", key, time.perf_counter() - started, error)
    try:
        store.fail_unit(key, error, holder=holder)
    except StoreError as store_exc:
        # cannot even record the failure: leave the unit to a later delivery
        log.error("%s: failure not recorded, the store did not take it: %s", key, store_exc)
        raise task.retry(countdown=lease_seconds + 1, max_retries=30, exc=exc) from None
    _advance_or_retry(task, store, message.campaign_id)


#: How often a worker holding a result for a database that is away says so again.
AWAY_TOLD_EVERY_SECONDS = 60.0
#: Lease periods a prefork child offers a result for, at most: it does not hear of its
#: worker's warm shutdown (Celery tells the main process alone), which would wait for it.
CHILD_OFFER_LEASES = 5
#: This worker's main process: where this module is imported, before the pool's
#: children are forked (see WORKER_BOOT).
_MAIN_PID = os.getpid()


def _finish(store: Store, key: str, outcome: Outcome, holder: str, lease_seconds: float) -> bool:
    """``store.finish_unit``, offered again while the database is away: the result is in
    hand, and running the body again for it (an hour of a CNN fold's last epochs, a
    whole forest) costs far more than waiting, while this worker could start no other
    unit meanwhile (each starts in the store). It was offered for a lease period only,
    and a failover longer than that threw finished results away. In the worker's main
    process (a solo pool: GPU workers) for as long as the database is away, until the
    worker stops; in a prefork child for :data:`CHILD_OFFER_LEASES` lease periods. The
    delivery's lease runs out meanwhile; the workers' reapers leave it a lease period
    to be renewed once the database answers (``workers.reaper``), and a delivery that
    took the unit over all the same makes this offer a lost lease
    (``LeaseLostError``). Given up, the unit is handed back if it can be."""
    told = None
    deadline = None
    if os.getpid() != _MAIN_PID:
        deadline = time.monotonic() + CHILD_OFFER_LEASES * lease_seconds
    while True:
        try:
            return store.finish_unit(key, outcome, holder=holder)
        except StoreUnreachableError as exc:
            if _worker_stopping.is_set() or (deadline is not None and time.monotonic() >= deadline):
                raise
            if told is None or time.monotonic() - told >= AWAY_TOLD_EVERY_SECONDS:
                log.warning("%s finished, but the database is away (%s); trying again", key, exc)
                told = time.monotonic()
            time.sleep(5.0)


def _outlast_the_outage(
    task: Task, store: Store, key: str, holder: str, exc: StoreError, lease_seconds: float
) -> NoReturn:
    """The database was away longer than the store's retries while the unit ran (a
    restart, a failover): nothing is wrong with the unit, so it is not failed. If the
    store answers now, the unit is handed back and its message requeued: the next
    delivery, on whichever worker is free, resumes from the unit's checkpoint. The
    attempt counts (``ORCHARD_MAX_ATTEMPTS``), so that a unit whose calls meet an error
    taken for an outage every time (a proxy that cuts a long statement) still ends.
    Otherwise the message comes back once this delivery's lease has run out (the lease
    is what tells the other deliveries this one is gone)."""
    log.warning("%s: the database is away (%s); handing the unit back", key, exc)
    try:
        handed = store.hand_back(key, holder, count_attempt=True)
    except StoreError as again:
        log.warning(
            "%s: not handed back, the database is still away (%s); this delivery comes "
            "back in %.0f s",
            key,
            again,
            lease_seconds + 1,
        )
        # as many times as it takes (the task's own limit: none): nothing else would
        # send the unit again
        raise task.retry(countdown=lease_seconds + 1, exc=exc) from None
    if handed:
        log.warning("%s handed back: the database was away; it runs again", key)
        raise Reject("the database was away: handed back", requeue=True)
    # no longer this delivery's (taken over, reset by resume, cancelled): as for a lost
    # lease, this message comes back should the one that holds it die too
    raise task.retry(countdown=lease_seconds + 1) from None


def _queue_of(task: Task) -> str:
    """The queue the current message came from ("?" where the request does not say)."""
    return (task.request.delivery_info or {}).get("routing_key") or "?"


def _stop_consuming(task: Task, queue: str, seconds: float = 0.0) -> None:
    """Ask this worker to take no more messages from ``queue`` (a broadcast its main
    process answers, and a namesake's ignores); with ``seconds``, for that long."""
    hostname = task.request.hostname
    if hostname and queue != "?":
        arguments: dict[str, Any] = {"queue": queue, "boot": WORKER_BOOT}
        if seconds:
            arguments["seconds"] = seconds
        try:
            task.app.control.broadcast(
                "orchard_stop_consuming", arguments=arguments, destination=[hostname]
            )
        except Exception as exc:  # noqa: BLE001 - the hand-back stands without it
            log.warning("could not stop consuming %s: %s", queue, exc)


def _unknown_unit(store: Store, message: UnitMessage, exc: NotFoundError) -> str | None:
    """Why a unit is not in this worker's store, in one line; None when its campaign
    was deleted, or is being deleted (a message left in a queue: nothing is wrong).
    Otherwise most often its campaign was submitted to another database than the
    workers' (another ORCHARD_DATABASE_URL, another ORCHARD_HOME), which the submitter
    cannot see."""
    try:
        campaign = store.find_campaign(message.campaign_id)
        deleted = store.deleted_at(message.campaign_id) if campaign is None else None
    except StoreError:
        return str(exc)
    if deleted is not None or (campaign is not None and campaign.state == DELETING):
        return None
    if campaign is not None:
        return str(exc)
    return (
        f"campaign {message.campaign_id} is not in this worker's store "
        f"({mask_url(store.url)}): it was submitted to another database (the submitter's "
        "ORCHARD_DATABASE_URL must name the workers' database). Message dropped"
    )


def _unit_gone(store: Store, key: str) -> bool:
    """Whether the unit is no longer in the store (its campaign deleted); False when the
    store cannot say."""
    try:
        return store.find_unit(key) is None
    except StoreError:
        return False


def _deleted_under(settings: Settings, campaign_id: str, key: str) -> dict:
    """A run whose campaign `orchard delete` removed: nothing to record, nothing to retry;
    a file it wrote since is in a folder without a manifest, which a delete removes."""
    folder = settings.artifacts / "campaigns" / campaign_id
    left = (
        f"; what it wrote is left in {folder}: `orchard delete {campaign_id}` removes it"
        if folder.exists()
        else ""
    )
    log.warning("%s stopped: its campaign was deleted while it ran%s", key, left)
    return {"unit": key, "state": "DELETED", "why": "campaign deleted: stopped"}


def _backoff(task: Task) -> float:
    """The countdown of a message kept for later: doubling from 2 s, at most
    :data:`BACKOFF_SECONDS`, and at most half the visibility timeout: Redis hands a
    message held longer than that out again while its holder still fires it, so under
    a short timeout (a test's, a benchmark's) the kept messages multiplied, one more
    each round, while the store stayed unusable."""
    longest = min(BACKOFF_SECONDS, reliability().visibility_timeout / 2)
    return min(longest, 2 ** min((task.request.retries or 0) + 1, 6))


def run_unit(task: Task, message: UnitMessage, body: Callable[[UnitContext], Outcome]) -> dict:
    settings = worker_settings()
    rules = reliability()
    key = message.unit_key
    # one holder per delivery: two deliveries of one message share the task id
    holder = holder_prefix(task.request.hostname, os.getpid()) + uuid.uuid4().hex[:8]
    try:
        # a process opens its store at its first unit, when the database may be away
        store = worker_store()
        start = store.start_unit(
            key,
            worker=node_label(task.request.hostname),
            task_id=task.request.id,
            holder=holder,
            lease_seconds=rules.lease_seconds,
            max_attempts=rules.max_attempts,
            newest_format=CAMPAIGN_FORMAT,
        )
    except NotFoundError as exc:
        # a message for a unit this store never had: it can never run here
        reason = _unknown_unit(store, message, exc)
        if reason is None:
            # a message sent before its campaign was deleted: done with, as its unit is
            log.info("%s: its campaign was deleted (`orchard delete`): dropped", key)
            return {"unit": key, "state": "DELETED", "why": "campaign deleted: not run"}
        log.error("%s: rejected: %s", key, reason)
        raise Reject("not in this worker's store (see the error above)", requeue=False) from None
    except StoreError as exc:
        # nothing ran and nothing could be written: keep the message for later, as long
        # as it takes (nothing else would send this unit again)
        if isinstance(exc, StoreUnreachableError):
            log.error("%s: store unreachable, message kept for later: %s", key, exc)
        elif not isinstance(exc, SchemaError):
            # the database answered, but not as a store can be used (a file that is not
            # SQLite, a folder SQLite may not write): kept all the same, until it is mended
            log.error("%s: store unusable, message kept for later: %s", key, exc)
        elif str(exc) not in _schema_told:
            # the store is there but not at this orchard's schema (this worker was started
            # without `orchard worker`'s check, or the store restored from a backup): said
            # once; the units run once the schema matches
            _schema_told.add(str(exc))
            log.error("%s: %s; its units wait until then (said once)", key, exc)
        else:
            log.debug("%s: store's schema still not this orchard's: %s", key, exc)
        raise task.retry(countdown=_backoff(task), exc=exc) from None
    if not start.run:
        if start.reason == "newer format":
            # submitted by a newer orchard: this one would ignore what it does not know,
            # or compute the units the old way, and record them as any others. Kept for
            # an updated worker, as long as it takes
            told = f"{message.campaign_id}/{start.format_version}"
            line = (
                "%s: campaign %s was submitted by a newer orchard (campaign format %d; this "
                "worker runs format %d at most): its units wait for a worker updated to it"
            )
            args = (key, message.campaign_id, start.format_version, CAMPAIGN_FORMAT)
            if told not in _schema_told:
                _schema_told.add(told)
                log.error(line + "; update orchard on this host (said once)", *args)
            else:
                log.debug(line, *args)
            raise task.retry(countdown=_backoff(task))
        if start.reason == "leased":
            log.info("%s is running elsewhere (live lease); back in %.0f s", key, start.retry_in)
            raise task.retry(countdown=max(1.0, start.retry_in + 1))
        if start.reason == "grace":
            log.warning(
                "%s: the lease of its last attempt ran out; its worker has %.0f s to renew "
                "it before the unit is failed",
                key,
                start.retry_in,
            )
            raise task.retry(countdown=max(1.0, start.retry_in + 1))
        if start.reason == "gave up":
            log.error("%s gave up after %d attempts", key, start.attempts)
        elif start.reason == "not queued":
            log.warning("%s is PENDING, not queued: a stale message, dropped", key)
        else:
            log.info("%s already %s; nothing to do", key, start.state)
        _advance_or_retry(task, store, message.campaign_id)
        # what Flower shows as the task's result: this delivery ran nothing, and why
        why = {"gave up": "gave up", "not queued": "stale message (unit PENDING): not run"}.get(
            start.reason, f"already {start.state}: not run"
        )
        return {"unit": key, "state": start.state, "why": why}

    heartbeat = Heartbeat(store, key, holder, rules).start()
    started = time.perf_counter()
    try:
        # read by start_unit with the lease: no more round trips before the body runs
        campaign = start.campaign or store.get_campaign(message.campaign_id)
        unit = start.unit or store.get_unit(key)
        guarded = cast(Store, GuardedStore(store, heartbeat.check))
        context = UnitContext(campaign, unit, guarded, settings, heartbeat=heartbeat)
        log.info("%s started (attempt %d)", key, start.attempts)
        send_worker_events()  # task-started, now rather than when the body ends
        with worker_heartbeats():
            outcome = body(context)
        heartbeat.check()  # a run that lost its unit records nothing
        context.check_folder_still_there()  # nor does one whose files went astray
        heartbeat.stop()
        try:
            recorded = _finish(store, key, outcome, holder, rules.lease_seconds)
        except UnitCancelledError:  # cancelled since the heartbeat's last renewal
            raise UnitAborted(LEASE_CANCELLED) from None
        except LeaseLostError:  # reset by `orchard resume` or taken over since then
            raise UnitAborted(LEASE_LOST) from None
    except UnitAborted as exc:
        heartbeat.stop()
        if exc.reason == WORKER_STOPPING:
            _hand_back(store, key, holder)
            raise Reject(WORKER_STOPPING, requeue=True) from None
        if exc.reason == LEASE_CANCELLED:
            log.info("%s stopped: its campaign was cancelled", key)  # as asked
            return {"unit": key, "state": "CANCELLED", "why": "campaign cancelled: stopped"}
        if exc.reason == LEASE_GONE:
            return _deleted_under(settings, message.campaign_id, key)
        # another delivery runs the unit now; should it die too, this message must
        # bring the unit back: return when that delivery's lease would have run out
        log.warning(
            "%s stopped: another delivery took it over, or resume reset it (lease lost)", key
        )
        raise task.retry(countdown=rules.lease_seconds + 1) from None
    except NotOnThisHostError as exc:
        # this worker's setting or host, not the unit, is wrong: another worker runs it,
        # and this one takes no more from the queue (it would hand back every unit it took)
        heartbeat.stop()
        if _unit_gone(store, key):
            return _deleted_under(settings, message.campaign_id, key)
        if not (exc.counts_attempt and start.attempts >= rules.max_attempts):
            _hand_back(store, key, holder, "to another worker", count_attempt=exc.counts_attempt)
            queue = _queue_of(task)
            if exc.keeps_queue:
                log.error("%s: %s. Handed back to another worker", key, exc)
            elif queue == "gpu" and exc.gpu_keeps_queue:
                # for a lease period: the workers that have the dataset decode the shards
                # meanwhile, instead of this one taking each again and again (an attempt
                # each time, until a shard FAILED). Its folds wait for every shard of
                # their campaign; another campaign's wait at most that long
                _stop_consuming(task, queue, rules.lease_seconds)
                log.error(
                    "%s: %s. Handed back to another worker; this worker takes nothing from "
                    "queue gpu for %g s",
                    key,
                    exc,
                    rules.lease_seconds,
                )
            else:
                _stop_consuming(task, queue)
                log.error(
                    "%s: %s. This worker takes no more units from queue %s: restart it %s",
                    key,
                    exc,
                    queue,
                    exc.remedy,
                )
            raise Reject("not on this worker's host (see the error above)", True) from None
        # met by as many deliveries as a unit may have: most likely not this host alone
        # (the data moved away since the submit): the unit fails, saying why
        _fail(task, store, message, key, holder, exc, started, rules.lease_seconds)
        raise
    except StoreUnreachableError as exc:
        heartbeat.stop()
        _outlast_the_outage(task, store, key, holder, exc, rules.lease_seconds)
    except Exception as exc:
        heartbeat.stop()
        if _unit_gone(store, key):  # what failed was a write for a campaign deleted meanwhile
            return _deleted_under(settings, message.campaign_id, key)
        if _worker_stopping.is_set():
            # raised as the worker stops: a second Ctrl-C's cold shutdown raises inside a
            # solo pool's running unit (NotImplementedError: no kill_job). Not the
            # unit's failure: the next worker runs it, from its checkpoint
            log.warning("%s stopped with its worker: %s", key, _one_line(exc))
            _hand_back(store, key, holder, "as its worker stopped")
            raise Reject(WORKER_STOPPING, requeue=True) from None
        _fail(task, store, message, key, holder, exc, started, rules.lease_seconds)
        if isinstance(exc, MemoryError):
            # Celery raises a task's MemoryError again from its failure handler, which
            # ends the worker (with a solo pool, a GPU's whole worker): the unit failed
            # (an allocation refused, unwound), not the worker
            raise UnitMemoryError(f"{key}: {_one_line(exc)}") from None
        raise
    if recorded:
        _remove_scratch(settings, key, outcome.scratch)
    else:
        _remove_scratch_off_record(store, settings, key, outcome.scratch)
    log.info(
        "%s %s in %.1f s",
        key,
        "succeeded"
        if recorded
        else "finished, but its result was already recorded (by another delivery, or by "
        "this one before the database's reply was lost)",
        time.perf_counter() - started,
    )
    _advance_or_retry(task, store, message.campaign_id)
    return {"unit": key, "state": "SUCCESS", "recorded": recorded}
