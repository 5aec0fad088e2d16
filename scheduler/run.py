"""A submitted campaign's handle (:class:`CampaignRun`): its status, results and report as
the store holds them, and waiting for it to finish."""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from db.store import (
    Artifact,
    Campaign,
    Result,
    Store,
    StoreUnreachableError,
    Unit,
)
from scheduler.progress import ProgressBars, ProgressLines, progress_display
from shared.errors import EXIT_TIMEOUT, OrchardError
from shared.manifest import manifest_path
from shared.plan import (
    CANCELLED,
    FAILED,
    PENDING,
    QUEUED,
    RUNNING,
    SUCCESS,
)
from shared.settings import Settings, mask_url

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
            for files in damaged_report_files(self.store, self.settings, self.id).values()
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
        display: ProgressBars | ProgressLines | None = None
        next_stall_check = time.monotonic() + STALL_CHECK_SECONDS
        told: set[str] = set()
        try:
            display = progress_display() if progress else None
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


def damaged_report_files(
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
