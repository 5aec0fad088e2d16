"""The Python API: submit a campaign file, follow it, wait for it.

from scheduler import submit
run = submit("campaigns/quick.toml", broker="redis://:pw@head:6379/0",
             database="postgresql+psycopg://orchard@head/orchard")
status = run.wait(progress=True)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from db.store import (
    DELETING,
    Artifact,
    BeingDeletedError,
    Campaign,
    Cancelled,
    Result,
    Store,
    StoreError,
    StoreUnreachableError,
    Unit,
)
from scheduler.canvas import advance
from scheduler.stopsignals import Stopped
from shared.artifacts import atomic_write_text
from shared.datasets import DatasetError
from shared.errors import EXIT_TIMEOUT, OrchardError, printable
from shared.manifest import (
    Manifest,
    ManifestError,
    build_manifest,
    manifest_path,
    recorded_root,
    synthetic_root,
)
from shared.plan import (
    CANCELLED,
    FAILED,
    PENDING,
    QUEUED,
    RUNNING,
    SUCCESS,
    TERMINAL,
    UnitPlan,
    data_problems,
    plan_units,
)
from shared.preprocess import shard_ranges
from shared.settings import Settings, absolute_sqlite_url, load_settings, mask_url
from shared.spec import Campaign as CampaignSpec
from shared.spec import CampaignError, campaign_format, load_campaign

try:
    import fcntl
except ImportError:  # not on Windows: submits there take no lock
    fcntl = None  # type: ignore[assignment]

#: Seconds a unit may wait on its queue, with no worker taking any unit from that
#: queue, before ``orchard status`` and ``--wait`` say so (``CampaignRun.stalled``).
STALL_SECONDS = 60.0
#: The longest ``wait`` goes without reading the store (it reads less often than
#: ``poll`` only when a read itself takes long).
MAX_POLL_SECONDS = 5.0
#: How often ``CampaignRun.wait`` asks, when it is told what to do about it.
STALL_CHECK_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class CampaignStatus:
    """A campaign and its units as the store held them at one read. The campaign's
    ``state`` is RUNNING, DONE (every unit succeeded), PARTIAL (some unit failed, or
    every one), CANCELLED, or DELETING (`orchard delete` under way); each unit's is
    PENDING, QUEUED, RUNNING, SUCCESS, FAILED or CANCELLED."""

    campaign: Campaign
    units: list[Unit]

    @property
    def finished(self) -> bool:
        """Whether the campaign is no longer RUNNING."""
        return self.campaign.state != "RUNNING"

    def counts(self) -> Counter[str]:
        """Units per state."""
        return Counter(u.state for u in self.units)

    def by_family(self) -> dict[str, Counter[str]]:
        """Units per family (preprocess, cnn, svm, rf, report, ...) and state."""
        out: dict[str, Counter[str]] = {}
        for unit in self.units:
            out.setdefault(unit.family, Counter())[unit.state] += 1
        return out


class CampaignRun:
    """A handle on a submitted campaign; everything it reports comes from the store."""

    def __init__(self, campaign_id: str, store: Store, settings: Settings) -> None:
        self.id = campaign_id
        self.store = store
        self.settings = settings
        #: with ``submit(..., reuse=True)``: unit key -> the earlier unit that ran, whose
        #: result it copied (its ``reused_from``, also when it copied a copy)
        self.reused: dict[str, str] = {}
        #: with ``submit(..., campaign_id=...)``: the campaign an earlier submit recorded
        #: under that id (nothing was recorded again), else None
        self.resubmitted: Campaign | None = None

    def __repr__(self) -> str:
        return f"CampaignRun({self.id!r})"

    def close(self) -> None:
        """Close its store's connections (a script that keeps many runs holds one pool
        each); the run can still be used, and opens a connection again when it reads."""
        self.store.dispose()

    def __enter__(self) -> CampaignRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def status(self) -> CampaignStatus:
        """The campaign and every unit, read now."""
        return CampaignStatus(self.store.get_campaign(self.id), self.store.units(self.id))

    def results(self) -> dict[str, Result]:
        """Each unit that succeeded (preprocessing shards too), by key: its accuracies
        (train, validation, test; None where it has no such images), confusion
        matrices, fit seconds and ``extra`` (the family's own figures: an SVM's solver
        iterations, a forest's OOB score, ``reused_from``...). A model unit is one point
        of a sweep on one fold (``unit.params``, ``unit.fold``); the report blends them."""
        return self.store.results(self.id)

    def report_path(self) -> Path | None:
        """The HTML report, once the report task wrote it; None while its report unit is
        not SUCCESS: the files recorded then are an earlier run's (`resume` reset the
        unit, whose new run waits, runs, or failed), as `orchard report` says."""
        units = self.store.units(self.id, family="report")
        if units and units[0].state != "SUCCESS":
            return None
        for artifact in self.store.artifacts(self.id, kind="report"):
            if artifact.path.endswith("report.html"):
                return self.settings.artifacts / artifact.path
        return None

    def damaged_report(self) -> list[Path]:
        """The files its report unit wrote that are missing here or no longer have their
        recorded checksum (removed by hand, an artifact folder restored from an older
        backup): `orchard resume` writes them again. Empty while no report unit
        succeeded, and where the campaign's folder is not on this host at all (a host
        that watches the store without the share): nothing there to judge."""
        if not (self.settings.artifacts / "campaigns" / self.id).is_dir():
            return []
        return [
            self.settings.artifacts / artifact.path
            for files in _damaged_report_files(self.store, self.settings, self.id).values()
            for artifact in files
        ]

    def unit_memory(self) -> dict[str, int]:
        """About the most bytes each unit holds in its worker process, by key, as
        ``submit --dry-run`` estimates them (``shared.memory``); empty where the
        campaign's manifest is not on this host."""
        from shared.manifest import Manifest
        from shared.memory import Sizes, unit_bytes

        try:
            path = manifest_path(self.settings.artifacts / "campaigns" / self.id)
            manifest = Manifest.from_json(path.read_text(encoding="utf-8"), str(path))
            units = self.store.units(self.id)
            folds = [u.fold for u in units if u.fold is not None]
            sizes = Sizes.of(manifest, self.store.get_campaign(self.id).spec, folds)
            return {unit.key: unit_bytes(unit, sizes) for unit in units}
        except Exception:  # noqa: BLE001 - an estimate, which a warning adds: not its cause
            return {}

    def stalled(self, after: float | None = None) -> str | None:
        """Why nothing of this campaign may be running, or None: a line naming each
        queue whose units have waited ``after`` seconds (``STALL_SECONDS``) or more while
        the queue was idle, no worker of this store running or taking any of its units
        (:meth:`db.store.Store.untaken_queues`)."""
        after = STALL_SECONDS if after is None else after
        queues = self.store.untaken_queues(self.id, after)
        return self._stall_line(queues) if queues else None

    def _stall_line(self, queues: dict[str, float]) -> str:
        waits = ", ".join(f"`{q}` for {s:.0f} s" for q, s in sorted(queues.items()))
        return (
            f"campaign {self.id}: no worker has taken a unit from "
            f"queue{'s' if len(queues) > 1 else ''} {waits}. Is a "
            f"worker for {'that queue' if len(queues) == 1 else 'those queues'} running, "
            f"with ORCHARD_DATABASE_URL={mask_url(self.settings.database_url)} and "
            f"ORCHARD_BROKER_URL={mask_url(self.settings.broker_url)}{self._prefix_said()}? "
            "(A worker on "
            "another database drops the units as unknown, with an error in its log; a "
            "broker restarted without persistence loses them. A worker of this database, "
            "once it consumes the queue, sends them again within five lease periods; "
            f"`orchard resume {self.id}` sends them now.)"
        )

    def _prefix_said(self) -> str:
        """On Redis, the key prefix too: a worker with another ORCHARD_REDIS_PREFIX
        listens on other queues, and never sees these units."""
        if self.settings.broker_is_filesystem:
            return ""
        prefix = os.environ.get("ORCHARD_REDIS_PREFIX")
        return f" and ORCHARD_REDIS_PREFIX={prefix}" if prefix else " and no ORCHARD_REDIS_PREFIX"

    def epochs(self, status: CampaignStatus | None = None) -> dict[str, str]:
        """unit key -> "epoch i/n" for each running CNN fold that has reported one (of
        ``status``'s units, or read from the store: only the running folds)."""
        if status is None:
            running = self.store.units(self.id, state=RUNNING, family="cnn")
        else:
            running = [u for u in status.units if u.state == RUNNING and u.family == "cnn"]
        if not running:
            return {}
        # one query for every running fold, not one per fold on each poll
        metrics = self.store.campaign_metrics(self.id, keys=[u.key for u in running])
        out = {}
        for unit in running:
            steps = metrics.get(unit.key, {}).get("val_acc")
            if steps:
                out[unit.key] = f"f{unit.fold} epoch {steps[-1][0] + 1}/{unit.params['epochs']}"
        return out

    def wait(
        self,
        timeout: float | None = None,
        *,
        progress: bool = False,
        poll: float = 0.5,
        check: Callable[[], None] | None = None,
        on_stall: Callable[[str], None] | None = None,
    ) -> CampaignStatus:
        """Block until the campaign is finished and return its last status; ``check``
        may raise to stop waiting. After ``timeout`` seconds (None: no limit) it raises
        :class:`WaitTimeout`, which holds the last status; the campaign goes on, as it
        does when the wait is interrupted (Ctrl-C: ``cancel`` stops it).

        The store is read every ``poll`` seconds (longer while a read itself is slow).
        With ``progress``, a bar per family is drawn on stderr (in a notebook, below the
        cell: rich's display needs ipywidgets), or, where stderr is no terminal that can
        redraw them (a file, a pipe, TERM=dumb), a line each time the counts change.

        ``on_stall`` is called with :meth:`stalled`'s line when units have waited
        ``STALL_SECONDS`` with no worker taking any from their queue, once for each new
        set of such queues (it is asked every ``STALL_CHECK_SECONDS``); with
        ``progress`` and no ``on_stall``, the line is printed above the bars.

        A database that does not answer (a restart, a failover: the store's own retries
        spent) does not end the wait, whose campaign goes on meanwhile: ``on_stall`` is
        told once when it goes away and once when it answers again, and the wait goes
        on reading it, until ``timeout``.
        """
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be a number of seconds, at least 0, or None: {timeout}")
        if not (isinstance(poll, int | float) and poll > 0 and math.isfinite(poll)):
            raise ValueError(f"poll must be a number of seconds above 0: {poll!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        display: _Progress | _PlainProgress | None = None
        next_stall_check = time.monotonic() + STALL_CHECK_SECONDS
        told: set[str] = set()
        try:
            display = _progress_display() if progress else None
            if on_stall is None and display is not None:
                on_stall = display.warn
            away: StoreUnreachableError | None = None  # the outage of the last poll
            while True:
                read_started = time.monotonic()
                try:
                    # each poll reads the campaign's state (and, for the bars, its units
                    # counted per family and state, one aggregate); every unit once, at
                    # the end
                    finished = self.store.get_campaign(self.id).state != "RUNNING"
                    if display is not None:
                        counts = self.store.family_counts(self.id)
                        running_folds = counts.get("cnn", {}).get(RUNNING, 0)
                        display.update(counts, self.epochs() if running_folds else {})
                    if finished:
                        return self.status()
                    if check is not None:
                        check()
                    if on_stall is not None and time.monotonic() >= next_stall_check:
                        next_stall_check = time.monotonic() + STALL_CHECK_SECONDS
                        queues = self.store.untaken_queues(self.id, STALL_SECONDS)
                        if queues and set(queues) != told:  # told again only for new queues
                            on_stall(self._stall_line(queues))
                        told = set(queues)
                except StoreUnreachableError as exc:
                    if away is None and on_stall is not None:
                        on_stall(f"{exc}; campaign {self.id} goes on, and this wait with it")
                    away = exc
                else:
                    if away is not None and on_stall is not None:
                        on_stall(f"database {mask_url(self.store.url)} answers again")
                    away = None
                # a read that takes long (a busy database, thousands of running folds):
                # pause twice as long as it took, so that up to reads of 2.5 s the store
                # is read a third of the time at most, but never longer than
                # MAX_POLL_SECONDS (a read that sat out an outage is no measure of the next)
                read = time.monotonic() - read_started
                pause = max(poll, min(2 * read, MAX_POLL_SECONDS))
                if deadline is not None and time.monotonic() > deadline:
                    raise WaitTimeout(*self._not_finished(timeout, away))
                if deadline is not None:
                    pause = min(pause, max(0.0, deadline - time.monotonic()))
                if display is None:
                    time.sleep(pause)
                    continue
                # in slices, the bars redrawn between them: their clocks move on while
                # the store is read seldom
                resume = time.monotonic() + pause
                while (left := resume - time.monotonic()) > 0:
                    time.sleep(min(left, 0.5))
                    display.refresh()
        finally:
            if display is not None:
                display.close()

    def _not_finished(
        self, timeout: float, away: StoreUnreachableError | None
    ) -> tuple[str, CampaignStatus | None]:
        """:class:`WaitTimeout`'s line and last status (None: the store did not answer)."""
        after = f"{f'{timeout:.0f}' if timeout >= 1 else f'{timeout:.2g}'} s"
        if away is None:
            try:
                status = self.status()
            except StoreUnreachableError as exc:
                away = exc
            else:
                counts = _in_words(status.counts())
                return f"campaign {self.id} not finished after {after}: {counts}", status
        return f"campaign {self.id} not known to be finished after {after}: {away}", None


class WaitTimeout(OrchardError):
    """:meth:`CampaignRun.wait` gave up: the campaign was not finished after its
    ``timeout`` (it goes on; ``cancel`` stops it). ``status`` is the last one read;
    None when the database did not answer at the end."""

    exit_code = EXIT_TIMEOUT

    def __init__(self, message: str, status: CampaignStatus | None) -> None:
        super().__init__(message)
        self.status = status


#: How :func:`_in_words` names each unit state, in its order: ended, then under way.
_STATE_WORDS = {
    SUCCESS: "succeeded",
    FAILED: "failed",
    CANCELLED: "cancelled",
    RUNNING: "running",
    QUEUED: "queued",
    PENDING: "pending",
}


def _in_words(counts: Counter[str]) -> str:
    """``3 succeeded, 2 running, 4 queued``: the units of each state that has any."""
    return ", ".join(
        f"{counts[state]} {word}" for state, word in _STATE_WORDS.items() if counts[state]
    )


#: A campaign id: what :func:`new_campaign_id` makes, or one chosen with ``submit --id``.
CAMPAIGN_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,79}")
#: What :func:`new_campaign_id` makes: the name, the UTC time, four hex digits.
MADE_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,47}-[0-9]{8}-[0-9]{6}-[0-9a-f]{4}")


def new_campaign_id(name: str) -> str:
    return f"{name}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def _file_there(artifacts: Path) -> Callable[[str, int], bool]:
    """Whether a file recorded under ``artifacts`` (its path and size) is there: a store
    restored from a backup may record files the artifact folder no longer holds."""

    def there(path: str, size: int) -> bool:
        try:
            return (artifacts / path).stat().st_size == size
        except OSError:
            return False

    return there


def submit(
    path: str | Path,
    *,
    broker: str | None = None,
    database: str | None = None,
    artifacts: str | Path | None = None,
    settings: Settings | None = None,
    reuse: bool = False,
    campaign_id: str | None = None,
) -> CampaignRun:
    """Validate a campaign file, record its units and enqueue the first stage.

    With ``reuse``, model units that already succeeded, identically, in an earlier
    campaign (same data, folds, seed and parameters) are copied instead of run
    (``run.reused``); preprocessing shards are always reused from the cache.

    ``campaign_id`` chooses the campaign's id (``submit --id``), which is otherwise made
    of its name, the time and a random part. A submit retried with the same id and the
    same campaign (its validated settings; the file may lie elsewhere) records and runs
    nothing twice: it returns the campaign recorded then, with ``run.resubmitted`` set,
    and sends whatever that one recorded but could not send. Under the id of another
    campaign it is refused.
    """
    settings = _settings(settings, broker, database, artifacts)
    if campaign_id is not None:
        check_chosen_id(campaign_id)
    campaign = _load_checked(path, settings)
    from workers.app import check_broker_reachable, make_app

    # the app's broker connections close on the way out, the store's only on an error
    # (the run holds it: CampaignRun.close)
    with make_app(settings, with_tasks=False, broker_folders=False) as app, ExitStack() as on_error:
        check_broker_reachable(app)
        store: Store | None = None

        def open_store() -> Store:
            opened = Store(settings.database_url)
            on_error.callback(opened.dispose)
            opened.create_or_check()
            return opened

        if not settings.database_url.startswith("sqlite"):
            store = open_store()  # fail in seconds, before reading a dataset (minutes)
        done = _Submitting()
        try:
            # the id's lock held until the units are sent: a concurrent submit under the
            # same id finds the campaign recorded and its units reused and sent
            with (
                _synthetic_dataset_guard(campaign, settings.artifacts, done),
                _chosen_id_lock(settings.artifacts, campaign_id),
            ):
                earlier = None
                if campaign_id is not None:
                    # read once the lock is held: an SQLite store a concurrent submit
                    # under the same id created is there now
                    if store is None and _sqlite_file_there(settings.database_url):
                        store = open_store()
                    if store is not None:
                        earlier = _submitted_before(store, campaign_id, campaign)
                if earlier is None:
                    chosen = campaign_id is not None
                    campaign_id = campaign_id or new_campaign_id(campaign.name)
                    manifest, store = _record(
                        path, campaign, campaign_id, settings, store, open_store, done, chosen
                    )
                else:
                    done.recorded = True
                assert store is not None and campaign_id is not None
                run = CampaignRun(campaign_id, store, settings)
                run.resubmitted = earlier
                running = earlier is None or earlier.state == RUNNING
                if reuse and running:
                    if earlier is not None:  # what the submit stopped before may not have
                        from workers.tasks.base import load_manifest

                        manifest = load_manifest(store, settings, campaign_id)
                    # the same data: at another root (data_digest), or as an earlier
                    # orchard wrote its manifest
                    equivalent = manifest.earlier_digests(settings.artifacts)
                    run.reused = store.reuse_finished(
                        campaign_id,
                        equivalent_manifests=equivalent,
                        present=_file_there(settings.artifacts),
                    )
                if running:
                    _send(store, app, campaign_id)
        except (KeyboardInterrupt, Stopped) as exc:
            if done.recorded:  # the caller must learn its id: resume it, not submit again
                exc.campaign_id = campaign_id  # type: ignore[union-attr]
            raise
        on_error.pop_all()
    return run


@dataclass
class _Submitting:
    """How far a submit got, for its clean-ups: once its campaign is recorded nothing
    it made is removed (the folder, a synthetic dataset it generated)."""

    recorded: bool = False


def _record(
    path: str | Path,
    campaign: CampaignSpec,
    campaign_id: str,
    settings: Settings,
    store: Store | None,
    open_store: Callable[[], Store],
    done: _Submitting,
    chosen: bool,
) -> tuple[Manifest, Store]:
    """Plan the campaign over its data, write its manifest into its new folder and
    record it with its units; the folder is removed again if recording fails."""
    from workers.config import make_broker_folders

    manifest, units = _plan_checked(path, campaign, settings.artifacts, campaign_id)
    folder = settings.artifacts / "campaigns" / campaign_id
    # a chosen id's folder that holds no more than its manifest and the mark of a
    # submit under way is what a submit killed before recording left
    took_over = chosen and _left_by_a_killed_submit(folder)
    if chosen and folder.exists() and not took_over:
        whose = (
            f"what a delete left, which `orchard delete {campaign_id}` removes"
            if (folder / DELETING_MARK).exists()
            else "another store's campaign under ORCHARD_ARTIFACTS, or not a campaign's"
        )
        raise OrchardError(
            f"campaign {campaign_id}: its folder {folder} is there, but the store "
            f"({mask_url(settings.database_url)}) records no such campaign: {whose}; "
            "nothing submitted"
        )
    # a filesystem broker's folders are made once the campaign is known to be good
    make_broker_folders(settings)
    fresh = False  # removed on failure: only a folder this submit made (or took over)
    try:
        try:
            folder.mkdir(parents=True)
            fresh = True
        except FileExistsError:
            fresh = took_over  # never another campaign's, should two made ids collide
        # until the campaign is recorded: a submit killed before (SIGKILL, the OOM
        # killer) leaves a folder that `prune` and `delete` can tell from another store's
        (folder / SUBMITTING_MARK).touch()
        written = atomic_write_text(manifest_path(folder), manifest.to_json())
        if store is None:
            store = open_store()  # the SQLite file (and its folder): a campaign that can run
        store.create_campaign(
            campaign_id,
            name=campaign.name,
            source=str(Path(path).resolve()),
            digest=campaign.digest(),
            spec=campaign.model_dump(mode="json"),
            classes=manifest.classes,
            units=units,
            data_digest=manifest.data_digest(settings.artifacts),
            format_version=campaign_format(campaign),
            artifacts=[
                Artifact(
                    written.path.relative_to(settings.artifacts).as_posix(),
                    "manifest",
                    written.sha256,
                    written.size,
                    campaign_id,
                )
            ],
        )
        done.recorded = True
    except BaseException as exc:
        # recorded all the same (stopped just after the commit, or its answer lost):
        # the campaign is there, and its folder stays. A store that is away is not
        # asked (its retries take a minute): as before, the folder goes
        if not isinstance(exc, StoreUnreachableError) and _recorded(store, campaign_id):
            done.recorded = True
            _unmark(folder)
            if isinstance(exc, Exception) and not isinstance(exc, NotSentError):
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise NotSentError(campaign_id, f"recording it ended in: {reason}") from None
            raise
        if fresh:
            shutil.rmtree(folder, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, OrchardError):
            # the artifact folder: full, read-only, ... (an ArtifactWriteError
            # already says so, naming the file)
            raise OrchardError(
                f"cannot write {exc.filename or manifest_path(folder)}: {exc.strerror or exc}"
            ) from None
        raise
    _unmark(folder)
    return manifest, store


#: In a campaign's folder from before its manifest is written until the campaign is
#: recorded: one the store has no campaign of, with the mark an hour old, is what a
#: killed submit left.
SUBMITTING_MARK = ".submitting"


def _unmark(folder: Path) -> None:
    """The campaign is recorded: its folder is its own now (a mark left behind is
    harmless, the store names the campaign)."""
    with contextlib.suppress(OSError):
        (folder / SUBMITTING_MARK).unlink()


def _abandoned_submit(folder: Path) -> bool:
    """A campaign folder a submit killed before recording left (its mark untouched for
    :data:`STALE_WRITE_SECONDS`); the caller knows the store has no such campaign."""
    try:
        marked = (folder / SUBMITTING_MARK).lstat().st_mtime
    except OSError:
        return False
    return not folder.is_symlink() and marked < time.time() - STALE_WRITE_SECONDS


def _recorded(store: Store | None, campaign_id: str) -> bool:
    """Whether the store has the campaign (False when it cannot tell)."""
    try:
        return store is not None and store.find_campaign(campaign_id) is not None
    except Exception:  # noqa: BLE001 - the store away: as before, the folder goes
        return False


def check_chosen_id(campaign_id: str) -> None:
    """A campaign id a caller chooses (``submit --id``): one line unless it is one."""
    if CAMPAIGN_ID_PATTERN.fullmatch(campaign_id) is None:
        raise OrchardError(
            f"campaign id {printable(campaign_id)!r}: an id is 1 to 80 lowercase letters, "
            "digits, '-' and '_', the first a letter or a digit"
        )


def _sqlite_file_there(url: str) -> bool:
    """Whether a SQLite store's file exists (or the URL is not a plain file's)."""
    from db.urls import require_sqlite_file

    try:
        require_sqlite_file(url)
    except OrchardError:
        return False
    return True


def _submitted_before(store: Store, campaign_id: str, campaign: CampaignSpec) -> Campaign | None:
    """The campaign recorded under a chosen id by an earlier submit of the same campaign;
    None when the id is free; refused when it is another campaign's."""
    recorded = store.find_campaign(campaign_id)
    if recorded is None:
        return None
    if recorded.state == DELETING:
        raise OrchardError(
            f"campaign {campaign_id} is being deleted (`orchard delete {campaign_id}` "
            "finishes it): nothing submitted"
        )
    if recorded.digest != campaign.digest():
        raise OrchardError(
            f"campaign {campaign_id} was submitted already, from {recorded.source}, with "
            "other settings: nothing submitted; choose another id for this one"
        )
    return recorded


@contextmanager
def _chosen_id_lock(artifacts: Path, campaign_id: str | None) -> Iterator[None]:
    """Around deciding whether a chosen id is recorded and recording it: a concurrent
    submit under the same id waits, then finds it recorded (``.<id>.lock`` stays)."""
    if campaign_id is None:
        yield
        return
    with _dataset_lock(
        artifacts / "campaigns" / campaign_id, "another submit under this id is under way"
    ):
        yield


def _left_by_a_killed_submit(folder: Path) -> bool:
    """A campaign folder that holds the mark of a submit under way and nothing else but
    its manifest (or the temporary file of one being written): no unit of it ever ran.
    Without the mark it is a recorded campaign's, perhaps another store's."""
    try:
        names = [entry.name for entry in os.scandir(folder)]
    except OSError:
        return False
    manifest = manifest_path(folder).name
    return SUBMITTING_MARK in names and all(
        name in (manifest, SUBMITTING_MARK) or name.endswith(".tmp") for name in names
    )


class NotSentError(OrchardError):
    """A campaign recorded (or reset by a resume) whose units the broker did not take:
    they wait, unclaimed, for `orchard resume`."""

    def __init__(self, campaign_id: str, why: str) -> None:
        super().__init__(
            f"campaign {campaign_id}: not every unit it has ready was sent ({why}); the "
            f"campaign is recorded, and `orchard resume {campaign_id}` sends the rest once "
            "that is mended"
        )
        self.campaign_id = campaign_id


def _send(store: Store, app: Any, campaign_id: str) -> None:
    """``advance``, whose failure after the campaign is recorded names the campaign:
    the broker gone since its check (a dataset scan can take minutes), or the store."""
    from kombu.exceptions import OperationalError

    try:
        advance(store, app, campaign_id)
    except (OperationalError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # kombu's error after its retries: the broker went away; but a filesystem
        # broker's folder that refused the message (full, read-only) is not away
        url = app.conf.broker_url
        away = isinstance(exc, OperationalError) and not url.startswith("filesystem:")
        said = " unreachable" if away else ""
        raise NotSentError(campaign_id, f"broker {mask_url(url)}{said}: {reason}") from None
    except StoreError as exc:
        raise NotSentError(campaign_id, str(exc)) from None


def _load_checked(path: str | Path, settings: Settings) -> CampaignSpec:
    """The campaign file, read and validated, whose dataset root we may read, with the
    folders and the SQLite store it needs checked: what a submit checks before it
    contacts anything (``plan`` checks no more)."""
    check_campaign_path(path)
    campaign = load_campaign(path)
    root = getattr(campaign.dataset, "root", None)
    if root is not None and settings.outside_dataset_roots(root):
        raise CampaignError(
            f"{path}: [dataset] root {root} is outside ORCHARD_DATASET_ROOTS "
            f"({os.pathsep.join(map(str, settings.dataset_roots))}), the folders datasets "
            "may be read from"
        )
    _check_creatable(settings.artifacts)
    if campaign.dataset.kind == "synthetic":  # where a submit generates it, if not there yet
        root = synthetic_root(campaign.dataset, settings.artifacts)
        try:
            if not os.path.lexists(root):
                _check_creatable(root, "[dataset] root")
        except OrchardError as exc:
            raise CampaignError(f"{path}: {exc}") from None
    if settings.broker_is_filesystem:
        _check_creatable(settings.broker_folder, "ORCHARD_BROKER_URL: broker folder")
    check_sqlite_store(settings.database_url)
    return campaign


def _plan_checked(
    path: str | Path, campaign: CampaignSpec, artifacts: Path, campaign_id: str
) -> tuple[Manifest, list[UnitPlan]]:
    """The campaign's data and units, or one line saying why they cannot run."""
    try:
        manifest = build_manifest(campaign, artifacts)  # bad data stops us here
    except (DatasetError, ManifestError) as exc:
        raise CampaignError(f"{path}: {exc}") from None
    if next(campaign.families(), None) is None:  # after the data's checks, which say more
        raise CampaignError(
            f"{path}: no model family to train: add a [cnn], [svm] or [rf] section "
            "(one with enabled = false does not count)"
        )
    units = plan_units(
        campaign_id, campaign, shard_ranges(len(manifest.entries), manifest.shard_size)
    )
    folds = {u.fold for u in units if u.fold is not None}
    trains = {fold: manifest.fold_indices(fold)[0] for fold in folds}
    class_counts = {
        fold: Counter(manifest.entries[i].label for i in train) for fold, train in trains.items()
    }
    train_sizes = {fold: len(train) for fold, train in trains.items()}
    if problems := data_problems(units, train_sizes, manifest.size, class_counts):
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CampaignError(f"{path}: {problems[0]}{more}")
    return manifest, units


@dataclass(frozen=True, slots=True)
class Plan:
    """What ``submit`` would record and run (``orchard submit --dry-run``)."""

    campaign: CampaignSpec
    manifest: Manifest
    units: list[UnitPlan]

    def unit_memory(self) -> dict[str, int]:
        """About the most bytes each unit holds in its worker process, by unit key
        (``shared.memory``: the interpreter and its libraries come on top)."""
        from shared.memory import unit_bytes

        sizes = self._sizes()
        return {unit.key: unit_bytes(unit, sizes) for unit in self.units}

    def gpu_memory(self) -> dict[str, int]:
        """The bytes of images each CNN fold holds on its GPU, by unit key (its network
        and activations come on top; on a worker without a GPU, in its memory)."""
        from shared.memory import cnn_device_images

        sizes = self._sizes()
        return {
            unit.key: cnn_device_images(unit.params, sizes, unit.fold)
            for unit in self.units
            if unit.family == "cnn"
        }

    def _sizes(self):  # noqa: ANN202 - a shared.memory.Sizes
        from shared.memory import Sizes

        folds = [u.fold for u in self.units if u.fold is not None]
        return Sizes.of(self.manifest, self.campaign.model_dump(mode="json"), folds)


def plan(
    path: str | Path,
    *,
    artifacts: str | Path | None = None,
    settings: Settings | None = None,
) -> Plan:
    """Check a campaign file as ``submit`` does, its data included, and plan its units,
    recording, sending and writing nothing: no store, no broker. A synthetic dataset
    that does not exist yet is generated in a temporary folder and removed again."""
    settings = _settings(settings, None, None, artifacts)
    campaign = _load_checked(path, settings)
    with tempfile.TemporaryDirectory(prefix="orchard-plan-") as scratch:
        checked, root, stand_in = campaign, None, None
        if campaign.dataset.kind == "synthetic":
            root = synthetic_root(campaign.dataset, settings.artifacts)
            # where a submit would generate the dataset (nothing there, or an empty
            # folder), the dry run generates it in a folder of its own
            if not os.path.exists(root) or (os.path.isdir(root) and not any(root.iterdir())):
                stand_in = Path(scratch) / root.name
                dataset = campaign.dataset.model_copy(update={"root": stand_in})
                checked = campaign.model_copy(update={"dataset": dataset})
        try:
            manifest, units = _plan_checked(path, checked, settings.artifacts, campaign.name)
        except CampaignError as exc:
            if stand_in is None:
                raise
            # name the folder a submit would generate, not the stand-in, gone in a moment
            raise CampaignError(str(exc).replace(str(stand_in), str(root))) from None
    if stand_in is not None:  # the dataset's root where a submit will have it
        recorded, in_artifacts = recorded_root(root, settings.artifacts)
        manifest = replace(manifest, root=recorded, root_in_artifacts=in_artifacts)
    return Plan(campaign, manifest, units)


@contextmanager
def _synthetic_dataset_guard(
    campaign: CampaignSpec, artifacts: Path, done: _Submitting
) -> Iterator[None]:
    """Around generating a campaign's synthetic dataset and recording the campaign: the
    dataset is removed again when this submit generated it and then failed before
    recording the campaign (``done``; after, the campaign reads it). The block holds
    a lock beside the dataset, so that a concurrent submit of the same dataset, which would
    reuse it, waits for the outcome instead of losing the folder under its campaign. Where
    no lock can be had (a folder we may not write, a filesystem without locks), nothing is
    removed: a dataset left behind is reused by the next submit. Other datasets pass."""
    if campaign.dataset.kind != "synthetic":
        yield
        return
    root = synthetic_root(campaign.dataset, artifacts)
    with _dataset_lock(root) as locked:
        generated = locked and not os.path.exists(root)
        try:
            yield
        except BaseException:
            if generated and not done.recorded:
                shutil.rmtree(root, ignore_errors=True)
            raise


@contextmanager
def _dataset_lock(
    root: Path, held_by: str = "another submit is generating it or recording a campaign on it"
) -> Iterator[bool]:
    """Hold an exclusive lock on ``.<name>.lock`` beside ``root``, saying so on stderr if
    another submit holds it (``held_by``); yields whether the lock is held."""
    lock = root.parent / f".{root.name}.lock"
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a")  # noqa: SIM115 - closed below, which releases the lock
    except OSError:
        yield False
        return
    with handle:
        locked = fcntl is not None
        try:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"orchard: waiting for {root}: {held_by}",
                file=sys.stderr,
                flush=True,
            )
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)
            except OSError:
                locked = False
        except OSError:  # no locks on this filesystem
            locked = False
        yield locked


def check_campaign_path(path: str | Path) -> None:
    """One line when a campaign file's path is not UTF-8 text (the store records it, and
    its driver cannot encode it), before anything is created."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise CampaignError(
            f"campaign file {printable(path)}: its path is not UTF-8 text, which the store "
            "records; rename it (or copy it to a UTF-8 path)"
        ) from None


def check_sqlite_store(url: str) -> None:
    """One line when an existing SQLite store cannot be opened (a folder at its path, a
    file that is not a database), before a dataset is read or a folder created. Reads
    only; creates no file: a missing store is created once a campaign can run."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError

    from db import migrate

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - the URL's own check says what is wrong
        return
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return
    if database.startswith("file:") or parsed.query.get("uri"):
        return  # an SQLite URI: whatever it names, SQLite decides
    path = Path(database).expanduser()
    if not os.path.lexists(path):
        # as make_engine would say it, once it tried to make the folder
        in_the_way = next(p for p in (path.parent, *path.parent.parents) if os.path.exists(p))
        if not os.path.isdir(in_the_way):
            raise OrchardError(
                f"database {mask_url(url)}: cannot create {path.parent}: {in_the_way} is not "
                "a directory"
            )
        return
    if os.path.isdir(path):
        raise OrchardError(f"database {mask_url(url)}: {path} is a directory, not a SQLite file")
    store = Store(url)
    try:
        # whether it is a database at all; its schema is the submit's to check
        migrate.current_revision(store.engine)
    except DBAPIError as exc:
        raise OrchardError(str(store.describe_error(exc))) from None
    finally:
        store.dispose()


def _check_creatable(folder: Path, what: str = "artifact folder") -> None:
    """One line naming ``folder`` when it cannot be made a directory (a plain file in its
    way, no permission), before anything is created."""
    # os.path, not Path.exists: that raises for a folder we may not look into
    ancestor = next(p for p in (folder, *folder.parents) if os.path.exists(p))
    if not os.path.isdir(ancestor):
        raise OrchardError(f"{what} {folder}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OrchardError(f"{what} {folder}: {ancestor} is not writable")
    # os.access answers from the permission bits, and for root nearly always yes: a
    # folder made and removed says what making (or writing in) ``folder`` would (/proc,
    # a share that maps root to nobody, an immutable folder)
    try:
        probe = tempfile.mkdtemp(prefix=".orchard-probe-", dir=ancestor)
    except OSError as exc:
        raise OrchardError(
            f"{what} {folder}: cannot create a folder in {ancestor} ({exc.strerror or exc})"
        ) from None
    with contextlib.suppress(OSError):  # made, so writable: a probe left over is harmless
        os.rmdir(probe)


def _settings(
    settings: Settings | None,
    broker: str | None = None,
    database: str | None = None,
    artifacts: str | Path | None = None,
) -> Settings:
    settings = settings or load_settings()
    if broker:
        settings = replace(settings, broker_url=broker)
    if database:
        settings = replace(settings, database_url=absolute_sqlite_url(database))
    if artifacts:
        settings = replace(settings, artifacts=Path(artifacts).resolve())
    # their form, as the commands check it: one line, not a driver's traceback
    from db.urls import check_database_url
    from workers.config import check_broker_url

    check_database_url(settings.database_url)
    check_broker_url(settings.broker_url)
    return settings


def _existing_store(settings: Settings) -> Store:
    """The store of a call that reads or changes what is there: a SQLite file that does
    not exist is not created (one line: `no store at … yet`)."""
    from db.urls import require_sqlite_file

    require_sqlite_file(settings.database_url)
    return Store(settings.database_url)


@contextmanager
def _opened(settings: Settings) -> Iterator[Store]:
    """The existing store, its connections closed on the way out."""
    store = _existing_store(settings)
    try:
        yield store
    finally:
        store.dispose()


def attach(
    campaign_id: str,
    *,
    broker: str | None = None,
    database: str | None = None,
    artifacts: str | Path | None = None,
    settings: Settings | None = None,
) -> CampaignRun:
    """A handle on a campaign submitted earlier (by this script, another one, or
    ``orchard submit``), to follow or wait for as :func:`submit`'s."""
    settings = _settings(settings, broker, database, artifacts)
    store = _existing_store(settings)
    try:
        store.check_schema()
        store.get_campaign(campaign_id)
    except BaseException:
        store.dispose()
        raise
    return CampaignRun(campaign_id, store, settings)


def resume(
    campaign_id: str,
    *,
    broker: str | None = None,
    database: str | None = None,
    artifacts: str | Path | None = None,
    settings: Settings | None = None,
) -> tuple[CampaignRun, list[str]]:
    """Run again every unit of a campaign that did not succeed (failed, cancelled,
    lost with its worker or its message), every preprocessing shard whose file is
    now missing or changed (the units that read it failed on it), and the report when
    a file it wrote is (it writes them anew from the store); returns the run and
    the keys re-enqueued (a unit still queued is sent again, so a second resume
    returns those)."""
    from workers.app import check_broker_reachable, make_app

    run = attach(
        campaign_id, broker=broker, database=database, artifacts=artifacts, settings=settings
    )
    store, settings = run.store, run.settings
    try:
        if store.get_campaign(campaign_id).state == DELETING:  # before reading its files
            raise BeingDeletedError(campaign_id)
        _check_manifest_here(store, settings, campaign_id)
        with make_app(settings, with_tasks=False) as app:
            check_broker_reachable(app)
            redo = _damaged_shards(store, settings, campaign_id)
            redo += _damaged_report(store, settings, campaign_id)
            reset = store.resume_campaign(campaign_id, redo=redo)
            _send(store, app, campaign_id)
    except BaseException:
        run.close()
        raise
    return run, reset


def _check_manifest_here(store: Store, settings: Settings, campaign_id: str) -> None:
    """Refuse to resume a campaign whose recorded manifest is not in this host's artifact
    folder: every unit reads it, so each one sent would come back to its queue or fail."""
    from workers.data import missing_manifest

    # none recorded (its record lost): the units say what they find
    if path := missing_manifest(store, settings.artifacts, campaign_id):
        raise OrchardError(
            f"campaign {campaign_id}: its manifest {path} is not there, and every unit "
            f"reads it: ORCHARD_ARTIFACTS ({settings.artifacts}) must be the folder it was "
            "submitted with (on a cluster, the same share, mounted); nothing sent. If its "
            "folder is gone for good, submit the campaign again"
        )


def _damaged_report(store: Store, settings: Settings, campaign_id: str) -> list[str]:
    """The report unit's key when it succeeded but a file it wrote is missing or no
    longer has its recorded checksum (an artifact folder restored from an older backup,
    a report edited by hand): resumed, it writes them anew from the store's results."""
    return list(_damaged_report_files(store, settings, campaign_id))


def _damaged_report_files(
    store: Store, settings: Settings, campaign_id: str
) -> dict[str, list[Artifact]]:
    """Of each succeeded report unit, the recorded files that are missing or changed."""
    from workers.data import shard_matches  # a recorded file's check, shards' or not

    report = store.units(campaign_id, state=SUCCESS, family="report")
    if not report:
        return {}
    written: dict[str, list[Artifact]] = {}
    for artifact in store.artifacts(campaign_id):
        if artifact.unit_key is not None:
            written.setdefault(artifact.unit_key, []).append(artifact)
    damaged = {
        unit.key: [
            a for a in written.get(unit.key, []) if not shard_matches(settings.artifacts, a.path, a)
        ]
        for unit in report
    }
    return {key: files for key, files in damaged.items() if files}


def _damaged_shards(store: Store, settings: Settings, campaign_id: str) -> list[str]:
    """Keys of the campaign's succeeded preprocessing units whose shard file is missing or
    no longer has the checksum recorded for it (a cache cleaned up, a disk error). Run
    again, each writes its shard anew, as a fresh submit would."""
    from shared.manifest import Manifest
    from workers.data import shard_matches, shard_rel

    try:
        path = manifest_path(settings.artifacts / "campaigns" / campaign_id)
        manifest = Manifest.from_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []  # no manifest here: the units that need it say so themselves
    shards = {
        unit.key: shard_rel(manifest, unit.params["shard"])
        for unit in store.units(campaign_id, state=SUCCESS, family="preprocess")
    }
    # their records in one query, not one per shard (150 shards: 0.5 s)
    records = store.find_artifacts(list(shards.values()))
    return [
        key
        for key, rel in shards.items()
        if not shard_matches(settings.artifacts, rel, records.get(rel))
    ]


def cancel(
    campaign_id: str,
    *,
    broker: str | None = None,
    database: str | None = None,
    artifacts: str | Path | None = None,
    settings: Settings | None = None,
) -> Cancelled:
    """Mark a campaign and its unfinished units CANCELLED and revoke their tasks.

    Queued tasks are discarded by the workers (revoked ids, and the store says
    CANCELLED anyway); running ones are terminated on prefork workers and, on solo-pool
    (GPU) workers, stop at their next heartbeat-checked store call (each epoch).
    """
    from workers.app import check_broker_reachable, make_app
    from workers.config import reliability

    with (
        attach(
            campaign_id, broker=broker, database=database, artifacts=artifacts, settings=settings
        ) as run,
        make_app(run.settings, with_tasks=False) as app,
    ):
        check_broker_reachable(app)  # before anything changes: the revokes must reach it
        # a cancel retried within two lease periods (the one before stopped between its
        # commit and its revokes?) sends them again: a revoke twice is one
        outcome = run.store.cancel_campaign(
            campaign_id, revoke_again_within=2 * reliability().lease_seconds
        )
        if outcome.task_ids:
            app.control.revoke(outcome.task_ids, terminate=True, signal="SIGTERM")
    return outcome


@dataclass(frozen=True, slots=True)
class Deleted:
    """What :func:`delete` removed, or in a dry run would remove."""

    campaign_id: str
    state: str | None  # None: the store had no such campaign, only its folder's leftovers
    units: int
    folder: Path
    files: int  # files under the folder (with the store's records of them)
    size: int  # their bytes
    dry_run: bool = False


def delete(
    campaign_id: str,
    *,
    dry_run: bool = False,
    without_folder: bool = False,
    broker: str | None = None,
    database: str | None = None,
    artifacts: str | Path | None = None,
    settings: Settings | None = None,
) -> Deleted:
    """Delete a finished or cancelled campaign: its records in the store (units,
    results, predictions, metrics) and its folder under ``campaigns/`` (manifest, model
    files, checkpoints, PCA bases, report). The preprocessing cache and generated
    datasets, which campaigns over the same images share, stay.

    Refused (one line, nothing removed) while the campaign runs, shortly after a cancel
    that stopped running units (two lease periods), and while another campaign reuses
    its results. The store's rows go first, then the folder. The campaign becomes
    DELETING in one transaction (nothing resumes or reuses it from then on), and its
    rows go in batches, each its own short transaction (workers' store calls go on
    between them), the campaign's row last. The folder gets a ``.deleting`` mark
    before the first commit, and loses its manifest before the rest, so a folder left
    behind (a file that could not be removed, a delete killed midway) is known as a
    deleted campaign's; deleting the id again finishes a delete stopped at any point.
    With ``dry_run`` nothing changes: it says what would go.

    A campaign whose folder is not under this ORCHARD_ARTIFACTS (a share not mounted
    over a folder used before, another host's path) is refused: its rows would go and
    its folder stay for good, known to no campaign. ``without_folder`` deletes its rows
    all the same, for a folder that is gone for good.
    """
    settings = _settings(settings, broker, database, artifacts)
    with _opened(settings) as store:
        return _delete(store, settings, campaign_id, dry_run, without_folder)


def _delete(
    store: Store, settings: Settings, campaign_id: str, dry_run: bool, without_folder: bool
) -> Deleted:
    from workers.config import reliability

    store.check_schema()
    folder = settings.artifacts / "campaigns" / campaign_id
    campaign = store.find_campaign(campaign_id)
    if campaign is None:
        # what a delete could not remove: a campaign's folder without its manifest
        leftover = (
            CAMPAIGN_ID_PATTERN.fullmatch(campaign_id) is not None
            and folder.is_dir()
            and not folder.is_symlink()
            and (
                (folder / DELETING_MARK).exists()
                or _abandoned_submit(folder)
                # what an orchard before the mark left; a chosen id's, any folder's name
                or (MADE_ID_PATTERN.fullmatch(campaign_id) and not manifest_path(folder).exists())
                or _put_back_after_its_delete(store, folder, campaign_id)
            )
        )
        if not leftover:
            store.get_campaign(campaign_id)  # raises: no campaign ... in <store>
        files, size = _folder_size(folder)
        if not dry_run:
            _remove_folder(folder, campaign_id)
        return Deleted(campaign_id, None, 0, folder, files, size, dry_run)
    if not folder.parent.is_dir():
        # not the artifacts' folder the campaign was submitted with (a share not mounted
        # here): its rows would go and its folder stay, manifest and all, for good
        raise OrchardError(
            f"campaign {campaign_id}: {folder.parent} is not there; ORCHARD_ARTIFACTS "
            f"({settings.artifacts}) must be the folder it was submitted with (on a "
            "cluster, the same share, mounted): nothing deleted"
        )
    recorded = store.artifacts(campaign_id, kind="manifest")
    if campaign.state != DELETING and recorded and not folder.is_dir() and not without_folder:
        # its manifest is recorded, so it had a folder: not here, so this is not the
        # folder (or share) it was submitted with, or the folder was lost
        raise OrchardError(
            f"campaign {campaign_id}: its folder {folder} is not there; ORCHARD_ARTIFACTS "
            f"({settings.artifacts}) must be the folder it was submitted with (on a "
            "cluster, the same share, mounted): nothing deleted. If the folder is gone for "
            f"good, `orchard delete --without-folder {campaign_id}` deletes its records"
        )
    quiet = 2 * reliability().lease_seconds

    def mark() -> None:
        # a folder whose campaign is gone from the store, manifest or not: an
        # interrupted delete's, which deleting the id again removes
        if folder.is_dir() and not folder.is_symlink():
            try:
                (folder / DELETING_MARK).touch()
            except OSError as exc:
                raise OrchardError(
                    f"campaign {campaign_id}: cannot write {folder / DELETING_MARK} "
                    f"({exc.strerror or exc}), so its folder could not be removed either: "
                    "nothing deleted"
                ) from None

    deletion = store.delete_campaign(
        campaign_id, quiet_seconds=quiet, dry_run=dry_run, before_commit=mark
    )
    files, size = _folder_size(folder)
    if not dry_run:
        _remove_folder(folder, campaign_id)
    return Deleted(campaign_id, deletion.state, deletion.units, folder, files, size, dry_run)


def _put_back_after_its_delete(store: Store, folder: Path, campaign_id: str) -> bool:
    """The folder of a campaign this store deleted, put back by a restore of the artifact
    folder backed up before the delete: its manifest, written as that campaign was
    submitted, still has that time (a restore that keeps file times: `cp -a`, `rsync
    -a`, tar). Another store's campaign under that id, submitted since, wrote its own
    later; hosts' clocks may differ by minutes, hence the margin."""
    created_at = store.deleted_campaign_created_at(campaign_id)
    if created_at is None:
        return False
    try:
        written = manifest_path(folder).stat().st_mtime
    except OSError:
        return False
    return abs(written - created_at.timestamp()) <= PUT_BACK_MARGIN_SECONDS


#: How far a restored manifest's time may lie from its campaign's recorded submit time
#: (the submit writes it within seconds; the file server's clock may be off by minutes).
PUT_BACK_MARGIN_SECONDS = 600.0


#: In a campaign's folder from just before its rows are deleted: the folder of a
#: campaign the store no longer has, even with its manifest, is a deleted one's.
DELETING_MARK = ".deleting"


def _folder_size(folder: Path) -> tuple[int, int]:
    """Files under ``folder`` and their bytes (nothing for a folder that is not there,
    nor for a symbolic link: what it points to is not under the artifacts' folder)."""
    if os.path.islink(folder):
        return 0, 0
    files = size = 0
    for parent, _, names in os.walk(folder):
        for name in names:
            if name == DELETING_MARK and parent == str(folder):
                continue  # delete's own
            try:
                size += os.lstat(os.path.join(parent, name)).st_size
            except OSError:
                continue  # removed meanwhile
            files += 1
    return files, size


def _remove_folder(folder: Path, campaign_id: str) -> None:
    """Remove a deleted campaign's folder, its manifest first (see :func:`delete`)."""
    try:
        if folder.is_symlink():  # the link goes, never what it points to (another disk)
            folder.unlink()
            return
        manifest_path(folder).unlink(missing_ok=True)
    except OSError as exc:
        # the .deleting mark says whose it is: `orchard delete` again tries again
        raise OrchardError(
            f"campaign {campaign_id} is deleted from the store, but "
            f"{exc.filename or manifest_path(folder)} could not be removed "
            f"({exc.strerror or exc}): `orchard delete {campaign_id}` removes what is left"
        ) from None
    try:
        for _ in range(5):  # a file under it that goes meanwhile stops rmtree: again
            try:
                shutil.rmtree(folder)
                break
            except FileNotFoundError:
                if not folder.exists():
                    break
    except OSError as exc:
        where = exc.filename or folder
        raise OrchardError(
            f"campaign {campaign_id} is deleted from the store, but {where} could not be "
            f"removed ({exc.strerror or exc}): `orchard delete {campaign_id}` removes what "
            "is left"
        ) from None


@dataclass(frozen=True, slots=True)
class Pruned:
    """What :func:`prune_cache` removed, or in a dry run would remove."""

    folders: list[tuple[Path, int, int]]  # (cache folder, files, bytes) no campaign uses
    kept: int  # cache folders some campaign of the store uses
    dry_run: bool = False
    late: list[str] = field(default_factory=list)  # campaigns submitted meanwhile that use one
    unknown: int = 0  # of those kept, folders this store has no record of (another store's)
    #: (file, bytes): shard writes left unfinished in the folders kept (their worker
    #: killed as it wrote: the write's cleanup never ran), untouched for STALE_WRITE_SECONDS
    unfinished: list[tuple[Path, int]] = field(default_factory=list)
    #: (folder, files, bytes): synthetic datasets left half-generated under
    #: ``datasets/`` (``.<name>.<random>.tmp``: a submit killed as it generated one),
    #: nothing under them touched for STALE_WRITE_SECONDS
    unfinished_datasets: list[tuple[Path, int, int]] = field(default_factory=list)
    #: (folder, files, bytes): campaign folders submits killed before recording left
    #: (:data:`SUBMITTING_MARK`, untouched for STALE_WRITE_SECONDS), no campaign's
    unfinished_campaigns: list[tuple[Path, int, int]] = field(default_factory=list)
    #: of those kept, folders only the manifests of another store's campaigns name
    foreign: int = 0
    #: folders under ``campaigns/`` of no campaign in the store, nor of a submit (under
    #: way, or killed: ``unfinished_campaigns``): another store's campaigns sharing the
    #: artifact folder, or written after the store's backup was taken. Left alone
    unrecorded_campaigns: list[Path] = field(default_factory=list)
    #: folders under ``campaigns/`` of campaigns the store deleted that a restore of the
    #: artifacts put back, keeping file times: ``orchard delete ID`` removes each. Left
    #: alone (one whose times the restore changed is among ``unrecorded_campaigns``)
    deleted_campaigns: list[Path] = field(default_factory=list)


#: How long a shard's temporary file must have been left untouched before `orchard
#: prune` takes it for a killed worker's: a write in progress touches it every moment,
#: and no campaign runs meanwhile (a prune is refused then).
STALE_WRITE_SECONDS = 3600


def prune_cache(
    *,
    dry_run: bool = False,
    broker: str | None = None,
    database: str | None = None,
    artifacts: str | Path | None = None,
    settings: Settings | None = None,
) -> Pruned:
    """Remove the preprocessing cache folders (``cache/<key>``) that no campaign in the
    store uses, with their shards' records: what is left after ``delete``. A folder
    the store has no record of (another store's, sharing the artifact folder) stays,
    and so does one that the manifest of another store's campaign names.

    Refused while a campaign runs (its units read and write the cache), and when a
    campaign's manifest, which names the cache it uses, cannot be read. A campaign
    submitted while the prune removes folders may find its shards gone: it is named in
    ``late``, and ``orchard resume`` of it decodes them again.
    """
    settings = _settings(settings, broker, database, artifacts)
    with _opened(settings) as store:
        return _prune(store, settings, dry_run)


def _prune(store: Store, settings: Settings, dry_run: bool) -> Pruned:
    store.check_schema()
    before = {c.id for c in store.list_campaigns(limit=None)}
    in_use = ours_in_use = set(_caches_in_use(store, settings, refuse_running=True).values())
    # and those of another store's campaigns sharing the artifact folder (over the same
    # images, both stores record the folder's shards); not those killed submits left
    campaigns = settings.artifacts / "campaigns"
    abandoned = [
        (folder, *_folder_size(folder))
        for folder in (sorted(campaigns.iterdir()) if campaigns.is_dir() else [])
        if folder.name not in before and _abandoned_submit(folder)
    ]
    in_use = in_use | _caches_named_by_manifests(
        campaigns, skip=before | {folder.name for folder, _, _ in abandoned}
    )
    cache = settings.artifacts / "cache"
    folders = [
        folder
        for folder in (sorted(cache.iterdir()) if cache.is_dir() else [])
        if folder.is_dir() and not folder.is_symlink()
    ]
    # a folder this store recorded no shard of is another store's, sharing the folder
    # (a name that is not UTF-8 no record can hold)
    ours = [f for f in folders if _utf8(f.name) and store.count_artifacts(f"cache/{f.name}/")]
    unused = [folder for folder in ours if folder.name not in in_use]

    def late_users(names: Collection[str]) -> list[str]:
        """Campaigns recorded since the prune began whose manifest names one of ``names``."""
        found = _caches_in_use(store, settings, skip=before).items()
        return sorted(cid for cid, key in found if key in names)

    pruned: list[tuple[Path, int, int]] = []
    taken = 0  # folders a campaign submitted meanwhile came to use before their turn
    for folder in unused:
        files, size = _folder_size(folder)
        if not dry_run:
            if late_users({folder.name}):
                taken += 1
                continue
            # the files first: a folder that cannot be removed whole keeps its records,
            # so the next prune still knows it as this store's and tries again (a record
            # of a file gone meanwhile is harmless: a shard is checked before it is used)
            try:
                shutil.rmtree(folder)
            except OSError as exc:
                removed = [f.name for f, _, _ in pruned]
                late = []
                # a manifest that cannot be read must not hide what failed here
                with contextlib.suppress(OrchardError):
                    late = late_users({*removed, folder.name})
                said = f"{len(removed)} cache folder(s) removed before it; " if removed else ""
                raise OrchardError(
                    f"cannot remove {exc.filename or folder} ({exc.strerror or exc}); {said}"
                    + (
                        f"campaign(s) {', '.join(late)}, submitted during the prune, read "
                        f"what it removed: `orchard resume` decodes it again if their units "
                        "fail"
                        if late
                        else "`orchard prune` again removes what is left"
                    )
                ) from None
            store.forget_artifacts(f"cache/{folder.name}/")
        pruned.append((folder, files, size))
    late = []
    if pruned and not dry_run:
        late = late_users({folder.name for folder, _, _ in pruned})
    kept = len(folders) - len(unused) + taken
    unfinished = _unfinished_writes([folder for folder in ours if folder not in unused])
    if not dry_run:
        removed = []
        for path, size in unfinished:
            # one this user may not remove (the workers' user owns the cache) is left,
            # and not counted: the folders above are gone, and their summary is due
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append((path, size))
        unfinished = removed
    datasets = _unfinished_datasets(settings.artifacts / "datasets")
    if not dry_run:
        datasets = [found for found in datasets if _removed(found[0])]
        abandoned = [found for found in abandoned if _removed(found[0])]
    foreign = sum(f.name in in_use and f.name not in ours_in_use for f in ours)
    unrecorded, deleted = _unrecorded_campaign_folders(store, campaigns)
    return Pruned(
        pruned,
        kept,
        dry_run,
        late,
        len(folders) - len(ours),
        unfinished,
        datasets,
        abandoned,
        foreign,
        unrecorded,
        deleted,
    )


def _unrecorded_campaign_folders(store: Store, campaigns: Path) -> tuple[list[Path], list[Path]]:
    """The campaign folders under ``campaigns`` of no campaign in the store: those of no
    campaign it knows, then those of campaigns it deleted that a restore put back (as
    `orchard delete` tells them: :func:`_put_back_after_its_delete`). Neither holds a
    submit's folder: one with its mark, or as yet no manifest (just made)."""
    folders = []
    for folder in sorted(campaigns.iterdir()) if campaigns.is_dir() else []:
        with contextlib.suppress(OSError):
            if (
                not folder.name.startswith(".")
                and stat.S_ISDIR(folder.lstat().st_mode)
                and not (folder / SUBMITTING_MARK).exists()
                and manifest_path(folder).is_file()
            ):
                folders.append(folder)
    # read after the listing: a campaign a submit recorded meanwhile is the store's
    recorded = {campaign.id for campaign in store.list_campaigns(limit=None)}
    unknown: list[Path] = []
    deleted: list[Path] = []
    for folder in folders:
        if folder.name in recorded:
            continue
        # a name that is not UTF-8 no record can hold
        put_back = _utf8(folder.name) and _put_back_after_its_delete(store, folder, folder.name)
        (deleted if put_back else unknown).append(folder)
    return unknown, deleted


def _unfinished_datasets(folder: Path) -> list[tuple[Path, int, int]]:
    """The folders of synthetic datasets a generation left unfinished in ``folder``
    (``.<name>.<random>.tmp``; a finished one was renamed to its name), with their files
    and bytes: those under which nothing was touched for :data:`STALE_WRITE_SECONDS`. A
    generation in progress writes a file under it every moment; a submit killed as it
    generated (SIGKILL, the OOM killer, a closed terminal) never removes its own."""
    horizon = time.time() - STALE_WRITE_SECONDS
    found = []
    for path in sorted(folder.glob(".*.tmp")) if folder.is_dir() else []:
        with contextlib.suppress(OSError):
            if not stat.S_ISDIR(path.lstat().st_mode):  # a symbolic link is not one
                continue
            if _newest_change(path) < horizon:
                found.append((path, *_folder_size(path)))
    return found


def _newest_change(folder: Path) -> float:
    """The latest modification time of ``folder`` and of anything under it."""
    newest = folder.lstat().st_mtime
    for parent, names, files in os.walk(folder):
        for name in (*names, *files):
            with contextlib.suppress(OSError):  # removed meanwhile
                newest = max(newest, os.lstat(os.path.join(parent, name)).st_mtime)
    return newest


def _removed(folder: Path) -> bool:
    """Remove ``folder`` whole; False where it could not be (another user's: it stays,
    and is not counted)."""
    try:
        shutil.rmtree(folder)
    except OSError:
        return not folder.exists()
    return True


def _unfinished_writes(folders: Collection[Path]) -> list[tuple[Path, int]]:
    """The temporary files of atomic writes (``.<name>.<random>.tmp``) in ``folders``
    that nothing has touched for :data:`STALE_WRITE_SECONDS`: a worker killed (SIGKILL,
    the OOM killer) as it wrote a shard leaves one, which nothing else removes while
    the cache is in use."""
    horizon = time.time() - STALE_WRITE_SECONDS
    found = []
    for folder in folders:
        for path in sorted(folder.glob(".*.tmp")):
            with contextlib.suppress(OSError):
                info = path.lstat()  # a symlink is not a write's
                if stat.S_ISREG(info.st_mode) and info.st_mtime < horizon:
                    found.append((path, info.st_size))
    return found


def _caches_in_use(
    store: Store, settings: Settings, *, refuse_running: bool = False, skip: Collection[str] = ()
) -> dict[str, str]:
    """campaign id -> the cache key its manifest names, for each campaign in the store
    (but ``skip``); one line for a campaign that runs (``refuse_running``) or whose
    manifest cannot be read."""
    campaigns = [c for c in store.list_campaigns(limit=None) if c.id not in skip]
    running = [c.id for c in campaigns if c.state == RUNNING]
    if refuse_running and running:
        more = f" (and {len(running) - 1} more)" if len(running) > 1 else ""
        raise OrchardError(
            f"campaign {running[0]}{more} is RUNNING, reading and writing the cache: prune "
            "when no campaign runs"
        )
    keys = {}
    for campaign in campaigns:
        path = manifest_path(settings.artifacts / "campaigns" / campaign.id)
        try:
            keys[campaign.id] = _cache_key(path)
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            reason = getattr(exc, "strerror", None) or f"{type(exc).__name__}: {exc}"
            # a folder gone as a whole (a store restored newer than the artifacts): the
            # delete that removes the records needs --without-folder
            remedy = (
                f" `orchard delete {campaign.id}`"
                if path.parent.is_dir()
                else f", if its folder is gone for good, `orchard delete --without-folder "
                f"{campaign.id}`"
            )
            raise OrchardError(
                f"{path}: cannot be read ({reason}), so which cache campaign {campaign.id} "
                f"uses is unknown: restore the file, or{remedy}, then prune"
            ) from None
    return keys


def _cache_key(manifest: Path) -> str:
    """The cache key a manifest names; raises when it names none."""
    key = json.loads(manifest.read_text(encoding="utf-8"))["cache_key"]
    if not isinstance(key, str) or not key:
        raise TypeError(f"its cache_key is {json.dumps(key)}")
    return key


def _caches_named_by_manifests(campaigns: Path, *, skip: Collection[str]) -> set[str]:
    """The cache keys named by the manifests under ``campaigns`` but ``skip``'s: another
    store's campaigns sharing the artifact folder (one that cannot be read names none)."""
    try:
        folders = sorted(campaigns.iterdir()) if campaigns.is_dir() else []
    except OSError as exc:
        raise OrchardError(
            f"{campaigns}: cannot be listed ({exc.strerror or exc}), so which caches its "
            "campaigns use is unknown"
        ) from None
    keys = set()
    for folder in folders:
        if folder.name in skip:
            continue
        try:
            keys.add(_cache_key(manifest_path(folder)))
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            continue
    return keys


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a file name's bytes that are not UTF-8 (surrogateescape)
        return False
    return True


def _family_progress(
    family: str, counts: Mapping[str, int], epochs: dict[str, str]
) -> tuple[int, int, list[str]]:
    """A family's units ended, its units, and what to say of the rest (how many in each
    other state, its running folds' epochs)."""
    done = sum(n for state, n in counts.items() if state in TERMINAL)
    notes = [f"{n} {state.lower()}" for state, n in sorted(counts.items()) if state != "SUCCESS"]
    notes += [e for key, e in epochs.items() if key.split("/")[1] == family]
    return done, sum(counts.values()), notes


#: Where stderr is a file or a pipe (a CI job's log), a progress line at most this
#: often: a grid of a thousand short units would write a thousand lines a minute.
PIPED_LINE_SECONDS = 10.0
#: ... and at least this often, the same counts again: a fold that reports no epoch
#: for long must not leave the log silent (CI services kill a job after some minutes
#: without output).
PIPED_KEEPALIVE_SECONDS = 300.0


def _progress_display() -> _Progress | _PlainProgress:
    """Bars on a terminal that can redraw them, and in a notebook; a line per change
    elsewhere (TERM=dumb: an editor's shell, a job log through a pty; a file, a pipe, at
    most one per :data:`PIPED_LINE_SECONDS`), where rich would draw the bars once, at
    the end."""
    from rich.console import Console

    console = Console(stderr=True)
    if console.is_jupyter or (console.is_terminal and not console.is_dumb_terminal):
        return _Progress()
    if console.is_terminal:
        return _PlainProgress()
    return _PlainProgress(every=PIPED_LINE_SECONDS, again=PIPED_KEEPALIVE_SECONDS)


class _PlainProgress:
    """The families' done / total units as one line on stderr, printed when it changes,
    ``every`` so many seconds at most (and ``again``, when it has not changed for so
    long); the last change is printed as it closes."""

    def __init__(self, every: float = 0.0, again: float = math.inf) -> None:
        self._every = every
        self._again = again
        self._printed = ""
        self._printed_at = -math.inf
        self._pending: str | None = None

    def update(self, by_family: Mapping[str, Mapping[str, int]], epochs: dict[str, str]) -> None:
        parts = []
        for family, counts in by_family.items():
            done, total, notes = _family_progress(family, counts, epochs)
            parts.append(f"{family} {done}/{total}" + (f" ({', '.join(notes)})" if notes else ""))
        line = "; ".join(parts)
        self._pending = None if line == self._printed else line
        self.refresh()

    def refresh(self) -> None:
        since = time.monotonic() - self._printed_at
        if self._pending is None and self._printed and since >= self._again:
            self._pending = self._printed  # still so: said again, the log not silent
        if self._pending is not None and since >= self._every:
            self._print()

    def _print(self) -> None:
        line, self._pending = self._pending, None
        self._printed, self._printed_at = line, time.monotonic()
        # UTC, as every time orchard prints (README)
        print(f"{time.strftime('%H:%M:%SZ', time.gmtime())} {line}", file=sys.stderr, flush=True)

    def warn(self, line: str) -> None:
        print(f"orchard: warning: {line}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._pending is not None:
            self._print()  # the campaign's last counts, however soon after the line before


class _Progress:
    """A live bar per family (done / total units), drawn with rich."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.table import Column

        # on stderr, whose terminal the callers ask about: stdout holds what a script
        # reads (the campaign's id, the outcome)
        console = Console(stderr=True)
        # what the family (12), a bar (at least 10), its count (up to 11: 1000/1000)
        # and clock (7) and the gaps between them leave; none on a very narrow terminal
        detail_width = max(0, console.width - 44)
        self._progress = Progress(
            # markup=False: a note is printed as it is, never read as rich's markup
            TextColumn("{task.description:<12}", markup=False, table_column=Column(no_wrap=True)),
            BarColumn(),
            MofNCompleteColumn(table_column=Column(no_wrap=True)),
            TimeElapsedColumn(table_column=Column(no_wrap=True)),
            # last, and cut short (with an ellipsis) where the terminal is narrow: the
            # family, its bar and its count stay whole
            TextColumn(
                "{task.fields[detail]}",
                markup=False,
                table_column=Column(no_wrap=True, overflow="ellipsis", max_width=detail_width),
            ),
            transient=False,
            # redrawn at each poll by the waiting thread (update), with no refresh thread
            # of its own: one that a signal (the demo's SIGTERM) caught starting, or whose
            # stop rich does not wait for, could outlive the interpreter's shutdown and
            # die noisily ("Exception ignored in thread started by ... _RefreshThread")
            auto_refresh=False,
            console=console,
        )
        self._tasks: dict[str, int] = {}
        self._started: set[str] = set()  # families whose clock started ...
        self._stopped: set[str] = set()  # ... and stopped: every unit ended
        try:
            self._progress.start()
        except BaseException:
            # a signal turned into an exception (the demo's SIGTERM) as the display
            # started: no one else holds it to restore the terminal (the cursor); a stop
            # of a half-started display must not hide the signal
            with contextlib.suppress(Exception):
                self._progress.stop()
            raise

    def update(self, by_family: Mapping[str, Mapping[str, int]], epochs: dict[str, str]) -> None:
        """Redraw from the units counted per family and state (``Store.family_counts``,
        or ``CampaignStatus.by_family``) and the running folds' epochs."""
        for family, counts in by_family.items():
            done, total, notes = _family_progress(family, counts, epochs)
            if family not in self._tasks:
                # its clock starts when its stage does, not at submit
                self._tasks[family] = self._progress.add_task(
                    family, total=total, detail="", start=False
                )
            task = self._tasks[family]
            if family not in self._started and any(s not in (PENDING, QUEUED) for s in counts):
                self._started.add(family)
                self._progress.start_task(task)
            self._progress.update(task, completed=done, detail=", ".join(notes))
            if family in self._started - self._stopped and done == total:
                self._stopped.add(family)
                self._progress.stop_task(task)  # its time stays that of the stage
        self._progress.refresh()

    def refresh(self) -> None:
        """Redraw (the elapsed times move) without reading the store."""
        self._progress.refresh()

    def warn(self, line: str) -> None:
        """A line above the bars (they are redrawn below it)."""
        self._progress.console.print(
            f"orchard: warning: {line}", markup=False, highlight=False, soft_wrap=True
        )

    def close(self) -> None:
        self._progress.stop()
