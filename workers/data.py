"""Loading a campaign's manifest and cached images in a worker, checked against the store,
and what a unit says when its host lacks them (:class:`NotOnThisHostError`)."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Collection, Iterator
from pathlib import Path

import numpy as np

from db.store import Artifact, Store
from shared.artifacts import read_if_intact, sha256_file
from shared.manifest import Manifest, manifest_path
from shared.preprocess import PreprocessError, load_shard, shard_name, shard_ranges
from shared.settings import Settings
from shared.variants import derive

try:
    import fcntl
except ImportError:  # not on Windows: no lock, racing (see exclusive)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("orchard")

# A CPU worker runs many grid points over the same images in a row: keep the last
# variant it derived instead of reading every shard again for each point.
_last: tuple[tuple[str, str], np.ndarray] | None = None


def cache_dir_rel(manifest: Manifest) -> str:
    return f"cache/{manifest.cache_key}"


def shard_rel(manifest: Manifest, index: int) -> str:
    return f"{cache_dir_rel(manifest)}/{shard_name(index)}"


@contextlib.contextmanager
def exclusive(path: Path, doing: str) -> Iterator[None]:
    """Hold an exclusive advisory lock beside ``path`` (``.NAME.lock``, on the shared
    folder: the workers of every host take turns) while ``doing``. Best effort: where
    the lock file cannot be opened or locked, the work goes on without it, racing
    (writes stay atomic; a shard's record may then name the other writer's bytes,
    which the next reader detects and a resume decodes again)."""
    if fcntl is None:
        yield
        return
    lock = path.with_name(f".{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock, "a+b")  # noqa: SIM115 - closed below, after the caller's work
    except OSError as exc:  # a folder this worker may not write: the work says so itself
        log.warning("%s: cannot open (%s); %s without the lock", lock, exc.strerror, doing)
        fh = None
    if fh is None:
        yield
        return
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError as exc:  # a filesystem without locks
            log.warning("%s: cannot lock (%s); %s without it", lock, exc, doing)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fh, fcntl.LOCK_UN)


def shard_intact(store: Store, artifacts: Path, rel: str) -> bool:
    """Whether the shard at ``rel`` is recorded and its file still has the recorded
    checksum (a cache cleaned up, a disk error, an edit make it not)."""
    return shard_matches(artifacts, rel, store.find_artifact(rel))


def shard_matches(artifacts: Path, rel: str, record: Artifact | None) -> bool:
    """:func:`shard_intact` with the shard's ``record`` in hand (None: not recorded),
    for a caller that read many at once."""
    path = artifacts / rel
    return record is not None and path.is_file() and sha256_file(path) == record.sha256


#: How many of the newest campaigns tell whether an artifact folder is the one the
#: campaigns are submitted with.
WITNESSES = 5


def holds_other_manifests(store: Store, artifacts: Path, besides: Collection[str]) -> bool:
    """Whether ``artifacts`` is the folder the campaigns are submitted with, as far as
    the newest campaigns other than ``besides`` that ran a unit tell (up to
    :data:`WITNESSES` of them, among the newest 20): it holds most of the manifests the
    store records for them. False where none tells (no such campaign, or none with its
    manifest recorded).

    Tells a manifest missing from this worker's folder alone (its ``ORCHARD_ARTIFACTS``
    is another folder, a share not mounted: every manifest is missing) from one missing
    everywhere (its campaign's folder removed by hand, or written by a submitter whose
    ``ORCHARD_ARTIFACTS`` was another folder)."""
    # witnesses: campaigns a unit of which succeeded, so some worker found its manifest
    # (not those of a submitter with another folder, never run, which would blame the
    # right folder)
    newest = store.list_campaigns(limit=WITNESSES * 4 + len(besides))
    others = [c.id for c in newest if c.id not in besides and c.state != "DELETING"]
    counts = store.unit_counts(others)
    ran = [c for c in others if counts.get(c, {}).get("SUCCESS", 0) > 0]
    paths = [manifest_rel(c) for c in ran[:WITNESSES]]
    recorded = store.find_artifacts(paths)
    here = sum((artifacts / rel).is_file() for rel in recorded)
    return here > len(recorded) - here


def manifest_rel(campaign_id: str) -> str:
    """A campaign's manifest as the store records it: relative to the artifact folder."""
    return manifest_path(Path("campaigns") / campaign_id).as_posix()


def missing_manifest(store: Store, artifacts: Path, campaign_id: str) -> Path | None:
    """Where the manifest the store records for a campaign should be under ``artifacts``,
    when it is not there; None when it is, or when none is recorded."""
    rel = manifest_rel(campaign_id)
    path = artifacts / rel
    if store.find_artifact(rel) is None or path.is_file():
        return None
    return path


def _shard(
    store: Store, settings: Settings, manifest: Manifest, index: int, count: int
) -> np.ndarray:
    """Shard ``index`` of the manifest's cache, checked against its record: ``count``
    images, (count, S, S, 3) uint8."""
    rel = shard_rel(manifest, index)
    record = store.find_artifact(rel)
    if record is None:
        raise PreprocessError(f"{settings.artifacts / rel}: shard not recorded in the store")
    images = load_shard(settings.artifacts / rel, record.sha256)
    if len(images) != count:
        raise PreprocessError(
            f"cache {cache_dir_rel(manifest)}: shard {index} holds {len(images)} images "
            f"where the manifest has {count}"
        )
    return images


def load_variant(store: Store, settings: Settings, manifest: Manifest, variant: str) -> np.ndarray:
    """Every manifest image as ``variant`` (n, H, W, 3) uint8, in manifest order."""
    global _last
    key = (manifest.cache_key, variant)
    if _last is not None and _last[0] == key:
        return _last[1]
    # the variant held before goes first, and the shards are written into one array
    # as they load: the peak is this variant's images and one shard, not twice them
    # (a list of shards then their concatenation) beside the variant held before
    _last = None
    n = len(manifest.entries)
    images = None
    for index, (start, stop) in enumerate(shard_ranges(n, manifest.shard_size)):
        part = derive(_shard(store, settings, manifest, index, stop - start), variant)
        if images is None:
            images = np.empty((n, *part.shape[1:]), np.uint8)
        images[start:stop] = part
        del part
    if images is None:
        images = np.empty((0, 1, 1, 3), np.uint8)
    _last = (key, images)
    return images


def load_rows(
    store: Store, settings: Settings, manifest: Manifest, variant: str, rows: np.ndarray
) -> np.ndarray:
    """The images at manifest indices ``rows`` (ascending) as ``variant``, reading only
    the shards that hold them; the variant a worker holds (:func:`load_variant`) is used
    when it is this one, and never replaced: a report's few images need not hold them
    all in its process."""
    rows = np.asarray(rows, dtype=np.int64)
    n = len(manifest.entries)
    if len(rows) and (rows[0] < 0 or rows[-1] >= n or (np.diff(rows) <= 0).any()):
        raise ValueError(f"rows must be ascending manifest indices in 0..{n - 1}")
    if _last is not None and _last[0] == (manifest.cache_key, variant):
        return _last[1][rows]
    out = None
    for index, (start, stop) in enumerate(shard_ranges(n, manifest.shard_size)):
        first, last = np.searchsorted(rows, [start, stop])
        if first == last:
            continue  # none of its images asked for: not read
        shard = _shard(store, settings, manifest, index, stop - start)
        part = derive(shard[rows[first:last] - start], variant)
        if out is None:
            out = np.empty((len(rows), *part.shape[1:]), np.uint8)
        out[first:last] = part
    return out if out is not None else np.empty((0, 1, 1, 3), np.uint8)


@functools.lru_cache(maxsize=4)
def _read_manifest(path: Path, sha256: str) -> Manifest:
    data = read_if_intact(path, sha256)
    if data is None:
        raise PreprocessError(f"{path}: manifest checksum mismatch (truncated or altered)")
    return Manifest.from_json(data.decode("utf-8"), str(path))


class NotOnThisHostError(PreprocessError):
    """What a unit needs is not where this worker's host should have it: this worker's
    setting or mounts, not the unit, are wrong. Every unit it takes would fail, so it
    hands them back and takes no more from their queue (but for ``keeps_queue`` and
    ``gpu_keeps_queue``)."""

    #: what to do about it, said after "restart it"
    remedy = ""
    #: whether the hand-back counts as an attempt: when what is missing may be missing
    #: on every host, the unit still ends (FAILED) after ORCHARD_MAX_ATTEMPTS of them
    counts_attempt = False
    #: whether a worker of queue ``gpu`` keeps taking from it: where only some of its
    #: units need what is missing
    gpu_keeps_queue = False
    #: whether every worker keeps taking from its queue: where what is missing is most
    #: likely missing on every host, not this one's alone
    keeps_queue = False


class ArtifactsElsewhereError(NotOnThisHostError):
    """The store records a campaign's manifest that this worker's artifact folder lacks:
    the worker's ``ORCHARD_ARTIFACTS`` is not the submitter's (another path, a share not
    mounted)."""

    remedy = "with the right ORCHARD_ARTIFACTS"


class DatasetElsewhereError(NotOnThisHostError):
    """A campaign's dataset root is not a folder on this worker's host: the share it is
    on is not mounted here, or the data was moved away since the submit (then it is
    missing everywhere: each hand-back counts as an attempt)."""

    remedy = "once the dataset is there"
    counts_attempt = True
    # a GPU worker's folds need no dataset (its nvJPEG shards do), and a GPU left idle
    # costs more than a shard handed back
    gpu_keeps_queue = True


class ManifestGoneError(NotOnThisHostError):
    """The store records a campaign's manifest that this worker's artifact folder lacks,
    though it holds the other campaigns' (``holds_other_manifests``): the folder is the
    shared one, and the manifest is missing on every host (its campaign's folder removed
    by hand, or written by a submitter whose ``ORCHARD_ARTIFACTS`` was another folder).
    The worker keeps its queues, for the other campaigns; the hand-backs count, so the
    unit ends FAILED, in case another worker sees the manifest after all."""

    counts_attempt = True
    keeps_queue = True


def load_manifest(store: Store, settings: Settings, campaign_id: str) -> Manifest:
    rel = manifest_rel(campaign_id)
    path = settings.artifacts / rel
    record = store.find_artifact(rel)
    if record is None:
        raise PreprocessError(f"{path}: manifest not recorded in the store")
    if not path.is_file():
        raise manifest_missing(store, settings, campaign_id, path)
    return _read_manifest(path, record.sha256)


def manifest_missing(
    store: Store, settings: Settings, campaign_id: str, path: Path
) -> NotOnThisHostError:
    # recorded, so written on the submitter's host: most often this worker's artifact
    # folder is another folder, or the share is not mounted here; unless the folder
    # holds the other campaigns' manifests
    if holds_other_manifests(store, settings.artifacts, {campaign_id}):
        return ManifestGoneError(
            f"{path}: the campaign's manifest is not there, though this folder "
            "(ORCHARD_ARTIFACTS) holds the other campaigns': its folder was removed, "
            "or it was submitted with another ORCHARD_ARTIFACTS"
        )
    return ArtifactsElsewhereError(
        f"{path}: the campaign's manifest is not there; ORCHARD_ARTIFACTS on this worker "
        f"({settings.artifacts}) must be the folder the campaign was submitted with "
        "(on a cluster, the same share, mounted)"
    )
