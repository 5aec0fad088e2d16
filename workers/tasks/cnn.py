"""orchard.train_cnn_fold: one cross-validation fold of the study's CNN (queue ``gpu``).

Torch is imported here, not in the app module, so CPU-only workers never load it.
GPU workers run the solo pool: CUDA is initialised in the process that trains,
never in a parent that forks.
"""

from __future__ import annotations

import io
import os

import torch

from db.store import Artifact, Outcome
from shared.artifacts import atomic_write_bytes
from shared.cnn import EpochStats, pick_device, train_fold
from workers.outcomes import model_outcome
from workers.tasks.base import UnitContext, log, unit_task

if threads := os.environ.get("ORCHARD_TORCH_THREADS"):
    torch.set_num_threads(int(threads))


def cnn_variant(cache_size: int) -> str:
    """The study's centre crop, 224 of a 256 resize; the same 7/8 of any cache size."""
    return f"crop{cache_size * 7 // 8}"


@unit_task("orchard.train_cnn_fold")
def train_cnn_fold(ctx: UnitContext) -> Outcome:
    params = ctx.unit.params
    data = ctx.fold_data(cnn_variant(ctx.manifest().size))
    manifest = data.manifest
    device = pick_device(os.environ.get("ORCHARD_DEVICE"))

    def on_epoch(stats: EpochStats) -> None:
        # progress lives in the store: `orchard status` and the report read it there
        ctx.store.record_metrics(
            ctx.unit.key,
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
            ctx.unit.key,
            stats.epoch + 1,
            params["epochs"],
            stats.train_acc,
            stats.val_acc,
        )

    result = train_fold(
        *data.split(),
        params,
        num_classes=len(manifest.classes),
        seed=ctx.seed + ctx.unit.fold,
        device=device,
        on_epoch=on_epoch,
    )
    # the checkpoint describes itself: enough to rebuild and evaluate the model alone
    buffer = io.BytesIO()
    torch.save(
        {
            "state_dict": result.state_dict,
            "params": params,
            "classes": list(manifest.classes),
            "unit_key": ctx.unit.key,
            "epochs": len(result.history),
            "val_acc": result.val_acc,
        },
        buffer,
    )
    model_path = ctx.campaign_dir / "models" / f"cnn-{ctx.unit.params_hash}-f{ctx.unit.fold}.pt"
    written = atomic_write_bytes(model_path, buffer.getvalue())
    return model_outcome(
        manifest,
        val_idx=data.val,
        test_idx=data.test,
        val_pred=result.val_probs.argmax(1),
        test_pred=result.test_probs.argmax(1),
        val_probs=result.val_probs,
        test_probs=result.test_probs,
        train_acc=result.train_acc,
        seconds=result.seconds,
        extra={"device": str(device), "epochs": len(result.history)},
        artifacts=[
            Artifact(
                ctx.relative(model_path),
                "model",
                written.sha256,
                written.size,
                ctx.campaign.id,
                ctx.unit.key,
            )
        ],
    )
