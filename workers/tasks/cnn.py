"""orchard.train_cnn_fold: one cross-validation fold of the study's CNN (queue ``gpu``).

Torch is not imported when the module loads: every worker imports all task modules to
know the task names, and a CPU worker should not load torch. A GPU worker loads it
before it takes tasks (``workers.app.preload``). GPU workers run the solo pool: CUDA is
initialised in the process that trains, never in a parent that forks.

After every epoch the fold's full training state is written (atomically) to one of two
files, ``<campaign>/checkpoints/cnn-<params hash>-f<fold>-s<epochs done % 2>.pt``, and
its sha256 to the store. The two slots alternate, so the previous epoch's file and
record stay intact while the next one is written: a worker killed between a file and
its record leaves one verified checkpoint, one epoch older. A later delivery of the
same unit (the worker was killed, the machine went away) resumes from the verified
checkpoint with the most epochs, and starts from epoch 0 when neither file has its
recorded checksum: a checkpoint that cannot be verified is never loaded. A worker
asked to shut down (SIGTERM, Ctrl-C) hands the fold back right after its next
checkpoint, and another GPU worker resumes it from there. Once the fold's result is
recorded its checkpoints go (files and records): only the model file stays.
"""

from __future__ import annotations

import io
import os
from dataclasses import replace
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from db.store import Artifact, Outcome, Store
from shared.artifacts import WrittenFile, atomic_write_bytes, read_if_intact
from shared.variants import cnn_variant
from workers.outcomes import model_outcome
from workers.tasks.base import UnitContext, log, unit_task

if TYPE_CHECKING:
    import torch

    from shared.cnn import EpochStats


@cache
def torch_module() -> ModuleType:
    """torch, imported on first use, with ``ORCHARD_TORCH_THREADS`` applied once."""
    import torch

    from workers.config import torch_threads

    if threads := torch_threads():
        torch.set_num_threads(threads)
    return torch


CHECKPOINT_SLOTS = 2


def checkpoint_path(campaign_dir: Path, params_hash: str, fold: int, epochs_done: int) -> Path:
    """The slot for the checkpoint taken after ``epochs_done`` epochs (they alternate)."""
    slot = epochs_done % CHECKPOINT_SLOTS
    return campaign_dir / "checkpoints" / f"cnn-{params_hash}-f{fold}-s{slot}.pt"


def checkpoint_paths(campaign_dir: Path, params_hash: str, fold: int) -> list[Path]:
    return [
        checkpoint_path(campaign_dir, params_hash, fold, slot) for slot in range(CHECKPOINT_SLOTS)
    ]


def write_checkpoint(
    store: Store,
    path: Path,
    relative: str,
    checkpoint: dict[str, Any],
    *,
    campaign_id: str,
    unit_key: str,
) -> WrittenFile:
    """Replace one slot's checkpoint file, then record its checksum (an upsert by path).

    Killed between the two, that slot's file and record disagree and the slot is not
    trusted; the other slot still holds the previous epoch, verified.
    """
    buffer = io.BytesIO()
    torch_module().save(checkpoint, buffer)
    written = atomic_write_bytes(path, buffer.getvalue())
    store.record_artifact(
        Artifact(relative, "checkpoint", written.sha256, written.size, campaign_id, unit_key)
    )
    return written


def _remove_partial_writes(slots: list[Path], unit_key: str) -> None:
    """Remove the temporary files of checkpoint writes that a killed delivery left
    (``atomic_write_bytes`` writes ``.<name>.<random>.tmp`` beside the slot, then renames
    it): this delivery holds the unit's lease, so no live run is writing them."""
    for slot in slots:
        for partial in slot.parent.glob(f".{slot.name}.*.tmp"):
            try:
                partial.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("%s: could not remove %s: %s", unit_key, partial, exc)
            else:
                log.info("%s: removed %s, a checkpoint write cut short", unit_key, partial.name)


def read_checkpoint(
    store: Store,
    slots: list[tuple[Path, str]],
    *,
    unit_key: str,
    params: dict[str, Any],
    num_classes: int,
) -> dict[str, Any] | None:
    """Of the ``(path, relative)`` slots, the verified checkpoint with the most epochs
    done, or None; every file not used is logged with the reason."""
    recorded = [
        (path, record)
        for path, relative in slots
        if (record := store.find_artifact(relative)) is not None
    ]
    usable = [
        checkpoint
        for path, record in recorded
        if (
            checkpoint := _verified_checkpoint(
                path, record, unit_key=unit_key, params=params, num_classes=num_classes
            )
        )
        is not None
    ]
    if not usable:
        if recorded:
            log.warning("%s: no checkpoint can be used; starting from epoch 0", unit_key)
        return None
    return max(usable, key=lambda checkpoint: checkpoint["epochs_done"])


def _verified_checkpoint(
    path: Path,
    record: Artifact,
    *,
    unit_key: str,
    params: dict[str, Any],
    num_classes: int,
) -> dict[str, Any] | None:
    """The checkpoint in ``path`` if it is exactly ``record``, else None (logged)."""
    relative = record.path
    try:
        blob = read_if_intact(path, record.sha256)  # what is loaded is what was checked
    except FileNotFoundError:
        log.warning("%s: checkpoint %s is recorded but missing; not used", unit_key, relative)
        return None
    if blob is None:
        log.warning(
            "%s: checkpoint %s does not match its recorded sha256 (truncated, altered, or "
            "its writer was killed before recording it); not used",
            unit_key,
            relative,
        )
        return None
    try:
        # weights_only: tensors and plain Python values only, nothing executed on load
        checkpoint = torch_module().load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file means: do not use it
        log.warning("%s: checkpoint %s unreadable (%s); not used", unit_key, relative, exc)
        return None
    from shared.cnn import checkpoint_problem

    problem = checkpoint_problem(checkpoint, params, num_classes)
    if problem is None and checkpoint.get("unit_key") not in (None, unit_key):
        problem = f"it belongs to {checkpoint['unit_key']}"
    if problem is not None:
        log.warning("%s: checkpoint %s not used: %s", unit_key, relative, problem)
        return None
    return checkpoint


def out_of_memory_message(
    error: str, params: dict[str, Any], images: int, device: str, estimate: int | None = None
) -> str:
    """The one line a fold that ran out of GPU memory records: torch's first sentence
    or two (what it tried to allocate, what the GPU holds), then what to do about it,
    with orchard's estimate of what the fold holds on its device where there is one."""
    from shared.memory import about

    first = " ".join(error.split())
    if len(first) > 600:
        first = first[:600] + "…"
    needs = f" (by orchard's estimate, {about(estimate)} in all)" if estimate else ""
    return (
        f"{first} — orchard: {device}, [cnn] batch_size {params['batch_size']}, "
        f"image_size {params['image_size']}, {images} images held on the device{needs}: "
        "submit the campaign again with a smaller [cnn] batch_size (--reuse copies the "
        "units that succeeded; orchard submit --dry-run gives a fold's GPU memory), or "
        "check that no other process uses this GPU (nvidia-smi)"
    )


def _device_estimate(ctx: UnitContext, device: torch.device) -> int | None:
    """What ``shared.memory`` estimates the fold holds on ``device`` (None: no estimate)."""
    from shared.memory import Sizes, cnn_device_bytes

    try:
        sizes = Sizes.of(ctx.manifest(), ctx.campaign.spec, [ctx.unit.fold])
        return cnn_device_bytes(ctx.unit.params, sizes, ctx.unit.fold, cuda=device.type == "cuda")
    except Exception:  # noqa: BLE001 - the message goes without it
        log.debug("%s: no memory estimate", ctx.unit.key, exc_info=True)
        return None


@unit_task("orchard.train_cnn_fold")
def train_cnn_fold(ctx: UnitContext) -> Outcome:
    torch = torch_module()
    from shared.cnn import Rows, describe_device, pick_device, train_fold

    params = ctx.unit.params
    key = ctx.unit.key
    data = ctx.fold_data(cnn_variant(ctx.manifest().size, params.get("input", "crop")))
    manifest = data.manifest
    num_classes = len(manifest.classes)
    device = pick_device(os.environ.get("ORCHARD_DEVICE"))
    log.info("%s trains on %s", key, describe_device(device))
    slots = [
        (path, ctx.relative(path))
        for path in checkpoint_paths(ctx.campaign_dir, ctx.unit.params_hash, ctx.unit.fold)
    ]
    resume = read_checkpoint(ctx.store, slots, unit_key=key, params=params, num_classes=num_classes)
    _remove_partial_writes([path for path, _ in slots], key)
    if resume is not None:
        log.info(
            "resuming %s from epoch %d (%d of %d epochs done)",
            key,
            resume["epochs_done"],
            resume["epochs_done"],
            params["epochs"],
        )

    def on_epoch(stats: EpochStats) -> None:
        # progress lives in the store: `orchard status` and the report read it there
        ctx.store.record_metrics(
            key,
            stats.epoch,
            {
                "train_loss": stats.train_loss,
                "train_acc": stats.train_acc,
                "val_loss": stats.val_loss,
                "val_acc": stats.val_acc,
                "epoch_seconds": stats.seconds,
            },
        )
        log.info(
            "%s epoch %d/%d train_acc=%.3f val_acc=%.3f",
            key,
            stats.epoch + 1,
            params["epochs"],
            stats.train_acc,
            stats.val_acc,
        )

    def on_checkpoint(checkpoint: dict[str, Any]) -> None:
        ctx.check_stop()  # a delivery that lost its unit must not overwrite the file
        path = checkpoint_path(
            ctx.campaign_dir, ctx.unit.params_hash, ctx.unit.fold, checkpoint["epochs_done"]
        )
        write_checkpoint(
            ctx.store,
            path,
            ctx.relative(path),
            checkpoint,
            campaign_id=ctx.campaign.id,
            unit_key=key,
        )
        if checkpoint["epochs_done"] < params["epochs"]:  # after the last one, just finish
            ctx.hand_back_if_worker_stopping()

    out_of_memory = None
    try:
        labels = manifest.label_index
        result = train_fold(  # each split gathered as it goes to the device: no copy of it
            Rows(data.images, data.train),
            labels(data.train),
            Rows(data.images, data.val),
            labels(data.val),
            Rows(data.images, data.test),
            params,
            num_classes=num_classes,
            seed=ctx.seed + ctx.unit.fold,
            device=device,
            on_epoch=on_epoch,
            resume=resume,
            on_checkpoint=on_checkpoint,
            unit_key=key,
        )
    except torch.OutOfMemoryError as exc:
        out_of_memory = str(exc)
    if out_of_memory is not None:
        # out of the except block, the failed step's frames and tensors are gone: the
        # memory they held goes back to the GPU before this worker's next unit
        torch.cuda.empty_cache()
        raise torch.OutOfMemoryError(
            out_of_memory_message(
                out_of_memory,
                params,
                len(data.train) + len(data.val) + len(data.test),
                describe_device(device),
                _device_estimate(ctx, device),
            )
        )
    # the model file describes itself: enough to rebuild and evaluate the model alone
    buffer = io.BytesIO()
    torch.save(
        {
            "state_dict": result.state_dict,
            "params": params,
            "classes": list(manifest.classes),
            "unit_key": key,
            "epochs": len(result.history),
            "val_acc": result.val_acc,
        },
        buffer,
    )
    model_path = ctx.campaign_dir / "models" / f"cnn-{ctx.unit.params_hash}-f{ctx.unit.fold}.pt"
    # the file is the unit's, not this delivery's: one that lost the unit since its
    # last epoch (cancelled, then resumed and run again) stops here rather than
    # overwrite what another delivery wrote, with its own weights, and recorded
    ctx.check_stop()
    written = atomic_write_bytes(model_path, buffer.getvalue())
    outcome = model_outcome(
        manifest,
        val_idx=data.val,
        test_idx=data.test,
        val_pred=result.val_probs.argmax(1),
        test_pred=result.test_probs.argmax(1),
        val_probs=result.val_probs,
        test_probs=result.test_probs,
        train_acc=result.train_acc,
        seconds=result.seconds,
        extra={
            "device": str(device),
            "epochs": len(result.history),
            "resumed_from_epoch": result.resumed_from_epoch,
        },
        artifacts=[
            Artifact(
                ctx.relative(model_path),
                "model",
                written.sha256,
                written.size,
                ctx.campaign.id,
                key,
            )
        ],
    )
    # the checkpoints only served to resume this fold: gone once its result is recorded
    return replace(outcome, scratch=[relative for _, relative in slots])
