"""Training throughput: the obvious PyTorch input pipeline vs orchard's GPU-resident one.

Both train the same model (the study's CNN) on the same synthetic uint8 images with
the same batch size and the same augmentations (the study's section 1.2.1), and count
images per second over the same number of steps after warm-up steps.

- baseline: images as a numpy uint8 array in host RAM, a ``Dataset`` applying the
  study's torchvision transforms to each image, a ``DataLoader`` with
  ``--loader-workers`` worker processes and pinned memory, an fp32 model, one
  ``loss.item()`` per step;
- orchard: ``shared.cnn.train_one_epoch``: the uint8 set moved to the device once,
  batched augmentation there (``shared.augment``), bf16 autocast, channels-last,
  cuDNN autotuning, a fused optimiser, optional ``torch.compile``, one sync per epoch.

    python bench/train_throughput.py                       # tiny, CPU, < 1 min
    python bench/train_throughput.py --full --device cuda  # the study's size

Imports only torch, torchvision, numpy and ``shared.cnn`` / ``shared.augment`` (no
pydantic, Celery or SQLAlchemy), so it runs on a bare GPU image.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from bench._report import cpu_model, now, write_json  # noqa: E402
from shared.cnn import (  # noqa: E402
    STUDY_MEAN,
    STUDY_STD,
    build_model,
    make_optimizer,
    prepare_model,
    to_device,
    train_one_epoch,
)

RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput.json"


def study_transforms() -> Any:
    """The study's training transforms, per image, as torchvision runs them."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomVerticalFlip(),
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(30),
            v2.RandomPerspective(),
            v2.ColorJitter((0.8, 1.2), (0.8, 1.2), (0.8, 1.2)),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(STUDY_MEAN, STUDY_STD),
        ]
    )


class HostImages(Dataset):
    """(n, H, W, 3) uint8 numpy in host RAM; each item transformed on its own."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels
        self.transform = study_transforms()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(self.images[i]).permute(2, 0, 1)
        return self.transform(image), int(self.labels[i])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def baseline_throughput(
    images: np.ndarray, labels: np.ndarray, params: dict, device: torch.device, args: Any
) -> float:
    torch.manual_seed(0)
    model = build_model(params, 3).to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=params["lr"], momentum=params["momentum"], weight_decay=5e-4
    )
    loader = DataLoader(
        HostImages(images, labels),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.loader_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.loader_workers > 0,
    )

    def batches():
        while True:
            yield from loader

    stream = batches()
    model.train()
    running = 0.0

    def step() -> None:
        nonlocal running
        x, y = next(stream)
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running += loss.item()

    for _ in range(args.warmup):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - started)


def orchard_throughput(
    images: np.ndarray,
    labels: np.ndarray,
    params: dict,
    device: torch.device,
    args: Any,
    *,
    compile: bool,
) -> float:
    torch.manual_seed(0)
    x = to_device(images, device)  # once: the whole set lives on the device
    y = torch.as_tensor(labels, dtype=torch.long, device=device)
    model = build_model(params, 3).to(device)
    trained = prepare_model(model, device, compile=compile, mode=args.compile_mode)
    optimizer = make_optimizer(model, params, device)
    generator = torch.Generator(device=device).manual_seed(0)
    n_warm, n_timed = args.warmup * args.batch_size, args.steps * args.batch_size

    def epoch(n: int) -> None:
        train_one_epoch(
            trained,
            x[:n],
            y[:n],
            optimizer,
            batch_size=args.batch_size,
            augment=True,
            generator=generator,
        )

    epoch(n_warm)  # compiles and autotunes, when asked
    _sync(device)
    started = time.perf_counter()
    epoch(n_timed)  # returns after its one sync: every step has run
    _sync(device)
    return n_timed / (time.perf_counter() - started)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the study's size (224, width 1)")
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--image-size", type=int, default=None, help="default 64; full 224")
    parser.add_argument("--width", type=float, default=None, help="default 0.25; full 1.0")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32; full 256")
    parser.add_argument("--images", type=int, default=None, help="default 256; full 4096")
    parser.add_argument("--warmup", type=int, default=None, help="steps; default 2; full 4")
    parser.add_argument("--steps", type=int, default=None, help="timed; default 4; full 16")
    parser.add_argument(
        "--loader-workers", type=int, default=None, help="default 2; full: all CPU cores"
    )
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode, e.g. max-autotune-no-cudagraphs (default: torch's default)",
    )
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    full = args.full
    defaults = {
        "image_size": 224 if full else 64,
        "width": 1.0 if full else 0.25,
        "batch_size": 256 if full else 32,
        "images": 4096 if full else 256,
        "warmup": 4 if full else 2,
        "steps": 16 if full else 4,
        "loader_workers": (os.cpu_count() or 1) if full else 2,
        "compile": full,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.images = max(args.images, args.steps * args.batch_size, args.warmup * args.batch_size)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    compile_ = bool(args.compile and device.type == "cuda")  # compile is a CUDA path
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, args.image_size, args.image_size, 3), np.uint8)
    labels = rng.integers(0, 3, args.images)
    params = {
        "image_size": args.image_size,
        "width": args.width,
        "dropout": 0.5,
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 5e-4,
    }
    print(
        f"device {device} ({gpu or cpu_model()}), torch {torch.__version__}; "
        f"{args.image_size}x{args.image_size}, width {args.width}, batch {args.batch_size}, "
        f"{args.steps} timed steps after {args.warmup}",
        flush=True,
    )
    baseline = baseline_throughput(images, labels, params, device, args)
    print(f"baseline done: {baseline:,.0f} img/s", flush=True)
    rows = [
        (
            f"baseline: DataLoader ({args.loader_workers} workers), per-image torchvision, fp32",
            baseline,
        )
    ]
    figures: dict[str, Any] = {"baseline_img_s": baseline}
    fast = "bf16, channels-last" if device.type == "cuda" else "fp32"
    if compile_:
        eager = orchard_throughput(images, labels, params, device, args, compile=False)
        figures["orchard_eager_img_s"] = eager
        rows.append((f"orchard, eager: device-resident, batched augment, {fast}", eager))
        print(f"orchard eager done: {eager:,.0f} img/s", flush=True)
    orchard = orchard_throughput(images, labels, params, device, args, compile=compile_)
    figures["orchard_img_s"] = orchard
    label = "compiled" if compile_ else "eager"
    rows.append((f"orchard, {label}: device-resident, batched augment, {fast}", orchard))
    figures["ratio"] = orchard / baseline

    width = max(len(name) for name, _ in rows)
    print(f"\n{'pipeline':<{width}}  {'img/s':>10}")
    for name, value in rows:
        print(f"{name:<{width}}  {value:>10,.0f}")
    print(f"{'ratio orchard / baseline':<{width}}  {figures['ratio']:>9.2f}x")

    result = {
        "benchmark": "train_throughput",
        "date": now(),
        "device": str(device),
        "gpu": gpu,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "compiled": compile_,
        "args": vars(args),
        **figures,
    }
    print(f"wrote {write_json(args.json, result)}")
    return result


if __name__ == "__main__":
    main()
