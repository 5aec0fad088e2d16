"""``orchard delete`` and ``orchard prune``: a finished campaign's records and folder
removed, then the preprocessing cache no campaign uses any more."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from db.store import (
    DELETING,
    Store,
)
from scheduler.deployment import opened_store, resolve_settings
from scheduler.folders import (
    CAMPAIGN_ID_PATTERN,
    DELETING_MARK,
    MADE_ID_PATTERN,
    STALE_WRITE_SECONDS,
    SUBMITTING_MARK,
    abandoned_submit,
)
from shared.errors import OrchardError
from shared.manifest import manifest_path
from shared.plan import RUNNING
from shared.settings import Settings


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
    settings = resolve_settings(settings, broker, database, artifacts)
    with opened_store(settings) as store:
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
                or abandoned_submit(folder)
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
    settings = resolve_settings(settings, broker, database, artifacts)
    with opened_store(settings) as store:
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
        if folder.name not in before and abandoned_submit(folder)
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
