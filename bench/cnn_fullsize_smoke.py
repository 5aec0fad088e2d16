"""Smoke check (not a benchmark): the study's CNN at full size trains on this machine.

Generates a small synthetic dataset, preprocesses it as orchard does (256 cache,
centre crop 224), and trains one fold of MangoCNN(width=1.0, image_size=224) with
the study's optimiser for a few epochs, printing the device, the parameter count,
seconds and images per second per epoch, and validation accuracy. Run it on a GPU
machine to see the real architecture run where it is meant to:

    python bench/cnn_fullsize_smoke.py --per-class 100 --epochs 3 [--compile]

It goes through ``train_fold``, so on CUDA it exercises the production path: the
batched study augmentations on the device, bf16 autocast, channels-last and, with
``--compile``, ``torch.compile`` (the first epoch then includes compilation).
For a throughput comparison use ``bench/train_throughput.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from shared.cnn import KNOB_DEFAULTS, EpochStats, MangoCNN, pick_device, train_fold  # noqa: E402
from shared.datasets import AicupDataset  # noqa: E402
from shared.manifest import assign_folds  # noqa: E402
from shared.preprocess import preprocess_images  # noqa: E402
from shared.synthetic import generate_synthetic  # noqa: E402
from shared.variants import derive  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--compile", action="store_true", help="torch.compile (CUDA only)")
    parser.add_argument("--no-augment", action="store_true", help="train without augmentation")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    device = pick_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_synthetic(
            Path(tmp) / "data", seed=0, train_per_class=args.per_class, test_per_class=10
        )
        samples = AicupDataset(root).samples()
        started = time.perf_counter()
        cache = preprocess_images([s.path for s in samples], 256)
        decode_s = time.perf_counter() - started
    crops = derive(cache, "crop224")
    labels = np.array([{"A": 0, "B": 1, "C": 2}.get(s.label, -1) for s in samples])
    folds = np.array(assign_folds([s.label for s in samples], [s.split for s in samples], 5, 0))
    train, val = np.flatnonzero((folds >= 0) & (folds != 0)), np.flatnonzero(folds == 0)
    test = np.flatnonzero(folds < 0)
    params = {
        **KNOB_DEFAULTS,
        "compile": args.compile,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "width": args.width,
        "image_size": args.image_size,
        "dropout": 0.5,
        "augment": not args.no_augment,
    }
    n_params = sum(
        p.numel() for p in MangoCNN(3, image_size=args.image_size, width=args.width).parameters()
    )
    print(
        f"device {device} ({name}); MangoCNN width={args.width} image_size={args.image_size}: "
        f"{n_params:,} parameters; {len(samples)} images decoded in {decode_s:.1f} s"
    )

    def report(stats: EpochStats) -> None:
        print(
            f"epoch {stats.epoch + 1}: {stats.seconds:.2f} s, "
            f"{len(train) / stats.seconds:,.0f} train img/s (incl. validation), "
            f"train_acc={stats.train_acc:.3f} val_acc={stats.val_acc:.3f}"
        )

    result = train_fold(
        crops[train],
        labels[train],
        crops[val],
        labels[val],
        crops[test],
        params,
        num_classes=3,
        seed=0,
        device=device,
        on_epoch=report,
    )
    ok = all(np.isfinite([h.train_loss for h in result.history]))
    ok = ok and np.allclose(result.test_probs.sum(1), 1, atol=1e-4)
    figures = {
        "device": name,
        "parameters": n_params,
        "train_images": int(len(train)),
        "epoch_seconds": [round(h.seconds, 3) for h in result.history],
        "val_acc": result.val_acc,
        "finite_and_normalised": bool(ok),
    }
    print(json.dumps(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
