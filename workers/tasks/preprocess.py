"""orchard.preprocess_shard: decode a range of the manifest once into a uint8 shard."""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from db.store import Artifact, Outcome
from shared.manifest import Manifest
from shared.preprocess import PreprocessError, preprocess_images, write_shard
from workers.data import DatasetElsewhereError, exclusive, shard_intact, shard_rel
from workers.tasks.base import UnitContext, log, unit_task

_warned: set[str] = set()  # this worker said it has no CUDA device for nvjpeg


@unit_task("orchard.preprocess_shard")
def preprocess_shard(ctx: UnitContext) -> Outcome:
    started = time.perf_counter()
    manifest = ctx.manifest()
    params = ctx.unit.params
    rel = shard_rel(manifest, params["shard"])
    path = ctx.settings.artifacts / rel
    # The cache is keyed by content: a shard another campaign wrote is reused when its
    # bytes still match the checksum recorded for them. Checked, written and recorded
    # under the shard's lock: two campaigns over the same images (or a delivery and a
    # second one) take turns, so the file is always the one whose checksum is on
    # record (without it, one's rename could win and the other's record: every model
    # unit of both would then find the shard changed). A shard already whole is reused
    # without the lock, which a worker that may only read the cache cannot take
    reused = Outcome(0.0, extra={"images": params["stop"] - params["start"], "reused": True})
    if shard_intact(ctx.store, ctx.settings.artifacts, rel):
        return replace(reused, fit_seconds=time.perf_counter() - started)
    with exclusive(path, "writing the shard"):
        if shard_intact(ctx.store, ctx.settings.artifacts, rel):  # written while we waited
            return replace(reused, fit_seconds=time.perf_counter() - started)
        extra = _decode_and_write(ctx, manifest, path, rel)
    return Outcome(fit_seconds=time.perf_counter() - started, extra=extra)


def _absent(root: Path) -> bool:
    """Whether ``root`` is not there as a folder: no such path, or a path through a
    file. Any other error (a share that timed out, a folder we may not read) is left to
    the images' own reads, which name it."""
    try:
        return not stat.S_ISDIR(os.stat(root).st_mode)
    except OSError as exc:
        return exc.errno in (errno.ENOENT, errno.ENOTDIR)


def _decode_and_write(ctx: UnitContext, manifest: Manifest, path: Path, rel: str) -> dict:
    """Decode the unit's range of the manifest into the shard at ``path`` and record it."""
    params = ctx.unit.params
    entries = manifest.entries[params["start"] : params["stop"]]
    # Images were header-checked at submit; one that still fails to decode fails the
    # shard with one line naming it, and nothing is written (shards are written atomically).
    root = manifest.dataset_root(ctx.settings.artifacts)
    if root is not None and _absent(root):
        # on a host that does not mount the data, every shard would fail as if its images
        # had been removed: the worker hands this one back and takes no more (a GPU worker,
        # whose folds need no dataset, keeps its queue)
        raise DatasetElsewhereError(
            f"{root}: the campaign's dataset is not on this worker's host (the share it is "
            "on not mounted here, or the data moved away since the submit)"
        )
    paths = manifest.image_paths(entries, ctx.settings.artifacts)
    # this worker's own rule, whatever the submitter's was (a symbolic link counts where
    # it leads, now)
    if outside := next((p for p in paths if ctx.settings.outside_dataset_roots(p)), None):
        roots = os.pathsep.join(map(str, ctx.settings.dataset_roots))
        raise PreprocessError(
            f"{outside}: outside this worker's ORCHARD_DATASET_ROOTS ({roots}); not read"
        )
    # the bytes hashed at submit, and no others: the cache is keyed by them
    digests = [e.sha256 or None for e in entries]
    decoded_on, by_nvjpeg = "cpu", 0
    # the manifest's decoder, which its cache key names (the unit's params route it)
    if manifest.decoder == "nvjpeg":
        images, decoded_on, by_nvjpeg = _nvjpeg(
            ctx.unit.key, paths, manifest.size, manifest.max_pixels, digests
        )
    else:
        images = preprocess_images(paths, manifest.size, manifest.max_pixels, digests)
    written = write_shard(path, images)
    ctx.store.record_artifact(
        Artifact(rel, "shard", written.sha256, written.size, ctx.campaign.id, ctx.unit.key)
    )
    return {
        "images": len(entries),
        "reused": False,
        "decoded_on": decoded_on,  # the worker's device for nvJPEG, else "cpu"
        "by_nvjpeg": by_nvjpeg,
        "by_opencv": len(entries) - by_nvjpeg,
    }


def _nvjpeg(
    key: str, paths: list[str], size: int, max_pixels: int, digests: list[str | None]
) -> tuple[np.ndarray, str, int]:
    """Decode on this GPU worker's CUDA device; on a worker without one, with OpenCV.
    Returns the images, the device, and how many of them nvJPEG decoded."""
    from shared.cnn import describe_device, pick_device

    device = pick_device(os.environ.get("ORCHARD_DEVICE"))
    if device.type != "cuda":
        level = logging.INFO if _warned else logging.WARNING  # once a worker, not a shard
        where = describe_device(device)
        log.log(level, "%s decodes on %s with OpenCV: nvJPEG needs a CUDA device", key, where)
        _warned.add(where)
        return preprocess_images(paths, size, max_pixels, digests), "cpu", 0
    import torch

    from shared import nvjpeg

    log.info("%s decodes on %s", key, describe_device(device))
    try:
        images, on_device = nvjpeg.decode_shard(paths, size, device, max_pixels, digests)
    finally:  # up to a GB of decoded batches: back to the GPU for the folds that follow
        torch.cuda.empty_cache()
    return images, describe_device(device), on_device  # the others: OpenCV (not JPEG, CMYK, ...)
