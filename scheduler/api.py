"""The Python API: submit a campaign file, follow it, wait for it.

from scheduler import submit
run = submit("campaigns/quick.toml", broker="redis://:pw@head:6379/0",
             database="postgresql+psycopg://orchard@head/orchard")
status = run.wait(progress=True)

Following a campaign is :mod:`scheduler.run`'s (``CampaignRun``), removing one
:mod:`scheduler.cleanup`'s (``delete``, ``prune_cache``); ``from scheduler import ...``
finds each where it lives.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from db.store import (
    DELETING,
    Artifact,
    BeingDeletedError,
    Campaign,
    Cancelled,
    Store,
    StoreError,
    StoreUnreachableError,
)
from scheduler.canvas import advance
from scheduler.deployment import existing_store, resolve_settings
from scheduler.folders import (
    CAMPAIGN_ID_PATTERN,
    DELETING_MARK,
    SUBMITTING_MARK,
    left_by_a_killed_submit,
    unmark,
)
from scheduler.run import CampaignRun, CampaignStatus, WaitTimeout, damaged_report_files
from scheduler.stopsignals import Stopped
from shared.artifacts import atomic_write_text
from shared.datasets import DatasetError
from shared.errors import OrchardError, printable
from shared.manifest import (
    Manifest,
    ManifestError,
    build_manifest,
    manifest_path,
    recorded_root,
    synthetic_root,
)
from shared.plan import (
    RUNNING,
    SUCCESS,
    UnitPlan,
    data_problems,
    plan_units,
)
from shared.preprocess import shard_ranges
from shared.settings import Settings, mask_url
from shared.spec import Campaign as CampaignSpec
from shared.spec import CampaignError, campaign_format, load_campaign

if TYPE_CHECKING:
    from shared.memory import Sizes

try:
    import fcntl
except ImportError:  # not on Windows: submits there take no lock
    fcntl = None  # type: ignore[assignment]


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
    settings = resolve_settings(settings, broker, database, artifacts)
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
                        from workers.data import load_manifest

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
    took_over = chosen and left_by_a_killed_submit(folder)
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
            unmark(folder)
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
    unmark(folder)
    return manifest, store


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
    check_creatable(settings.artifacts)
    if campaign.dataset.kind == "synthetic":  # where a submit generates it, if not there yet
        root = synthetic_root(campaign.dataset, settings.artifacts)
        try:
            if not os.path.lexists(root):
                check_creatable(root, "[dataset] root")
        except OrchardError as exc:
            raise CampaignError(f"{path}: {exc}") from None
    if settings.broker_is_filesystem:
        check_creatable(settings.broker_folder, "ORCHARD_BROKER_URL: broker folder")
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
        """About the most each CNN fold holds on its GPU, by unit key: its images, the
        network and its optimiser's state, and a training step's activations or a
        prediction's (``shared.memory.cnn_device_bytes``)."""
        from shared.memory import cnn_device_bytes

        sizes = self._sizes()
        return {
            unit.key: cnn_device_bytes(unit.params, sizes, unit.fold)
            for unit in self.units
            if unit.family == "cnn"
        }

    def _sizes(self) -> Sizes:
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
    settings = resolve_settings(settings, None, None, artifacts)
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


def check_creatable(folder: Path, what: str = "artifact folder") -> None:
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
    settings = resolve_settings(settings, broker, database, artifacts)
    store = existing_store(settings)
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
    return list(damaged_report_files(store, settings, campaign_id))


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


#: The Python API (``from scheduler import submit``; ``delete`` and ``prune_cache`` are
#: :mod:`scheduler.cleanup`'s), and what the CLI checks with before it calls it
__all__ = [
    "CampaignRun",
    "CampaignStatus",
    "NotSentError",
    "Plan",
    "WaitTimeout",
    "attach",
    "cancel",
    "check_campaign_path",
    "check_chosen_id",
    "check_creatable",
    "check_sqlite_store",
    "plan",
    "resume",
    "submit",
]
