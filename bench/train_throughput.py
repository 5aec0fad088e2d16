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
import ast
import contextlib
import fcntl
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
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
    compile_options,
    make_optimizer,
    prepare_inputs,
    prepare_model,
    to_device,
    train_one_epoch,
)

STARTED = time.monotonic()
RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput.json"
#: environment variables that change what is measured, recorded with the figures
ENV_PREFIXES = ("TORCHINDUCTOR_", "PYTORCH_", "TORCH_CUDNN")


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


Timed = Callable[[], float]  # runs the timed steps, returns images per second


def baseline_runner(
    images: np.ndarray, labels: np.ndarray, params: dict, device: torch.device, args: Any
) -> Timed:
    """Builds the obvious pipeline and runs its warm-up steps; returns the timed part."""
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

    def batches() -> Iterator[list[torch.Tensor]]:  # (images, labels), for ever
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

    def timed() -> float:
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        _sync(device)
        return args.steps * args.batch_size / (time.perf_counter() - started)

    return timed


def orchard_runner(
    images: np.ndarray,
    labels: np.ndarray,
    params: dict,
    device: torch.device,
    args: Any,
    *,
    compile: bool,
    profile: Path | None = None,
) -> Timed:
    """orchard's path, warmed up (compiled and autotuned, when asked); returns the timed
    part, which also writes a kernel profile of a few more steps to ``profile``."""
    torch.manual_seed(0)
    x = to_device(images, device)  # once: the whole set lives on the device
    y = torch.as_tensor(labels, dtype=torch.long, device=device)
    model = build_model(params, 3).to(device)
    options = compile_options(tune=args.tune, cudagraphs=args.cudagraphs) | dict(args.inductor)
    trained = prepare_model(
        model,
        device,
        compile=compile,
        mode=args.compile_mode,
        pad_input=args.pad_input,
        options=options,
        bias_apart=args.bias_apart,
        fold_norm=args.fold_norm,
    )
    transform = prepare_inputs(
        device, compile=compile and args.compile_inputs, options=compile_options(tune=args.tune)
    )
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
            transform=transform,
        )

    epoch(n_warm)  # compiles and autotunes, when asked
    _sync(device)

    def timed() -> float:
        started = time.perf_counter()
        epoch(n_timed)  # returns after its one sync: every step has run
        _sync(device)
        rate = n_timed / (time.perf_counter() - started)
        if profile is not None:
            profile_steps(epoch, args.batch_size, device, profile)
        return rate

    return timed


@contextlib.contextmanager
def timing_turn(args: Any) -> Iterator[None]:
    """With ``--barrier DIR``: several runs compile side by side, then time one at a time.

    Each run marks itself ready in ``DIR`` after its warm-up, waits until ``--parties``
    runs are ready (or ``--barrier-timeout`` seconds since it started), then times
    under an exclusive lock on ``DIR/lock``, so no timed step shares the GPU or the
    CPUs with another run's compilation or steps.
    """
    if args.barrier is None:
        yield
        return
    mark_ready(args.barrier)
    deadline = STARTED + args.barrier_timeout
    while len(list(args.barrier.glob("ready-*"))) < args.parties:
        if time.monotonic() > deadline:
            print("barrier: timed out waiting for the other runs", flush=True)
            break
        time.sleep(0.5)
    with (args.barrier / "lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def mark_ready(barrier: Path) -> None:
    barrier.mkdir(parents=True, exist_ok=True)
    (barrier / f"ready-{os.getpid()}").touch()


def profile_steps(epoch: Any, batch_size: int, device: torch.device, path: Path) -> None:
    """Where the time of a few more steps goes, kernel by kernel, into ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    steps = 3
    with profile(activities=activities) as prof:
        epoch(steps * batch_size)
        _sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{steps} steps of {batch_size}\n{table}\n")
    print(f"wrote {path}", flush=True)


def _inductor_option(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value  # a bare word, e.g. max_autotune_conv_backends=ATEN,TRITON


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
        help="torch.compile mode, e.g. max-autotune-no-cudagraphs (default: orchard's "
        "options, see --tune and --cudagraphs)",
    )
    parser.add_argument(
        "--compile-inputs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="when compiling, compile the augmentation and normalisation too (default on)",
    )
    parser.add_argument(
        "--tune",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="coordinate-descent tuning of the compiled kernels (orchard's default: on)",
    )
    parser.add_argument(
        "--cudagraphs", action="store_true", help="compiled steps replayed as CUDA graphs"
    )
    parser.add_argument(
        "--pad-input",
        type=int,
        default=None,
        help="channels the first conv's RGB input is padded to on CUDA (default: "
        "orchard's, 8; 0: none)",
    )
    parser.add_argument(
        "--bias-apart",
        action="store_true",
        help="each conv's bias added by its own op (shared.cnn.StudyConv2d; an "
        "alternative, off in orchard)",
    )
    parser.add_argument(
        "--fold-norm",
        action="store_true",
        help="each BatchNorm folded into the next layer in training (shared.cnn."
        "folded_forward; an alternative, off in orchard)",
    )
    parser.add_argument(
        "--inductor",
        type=_inductor_option,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="one more torch._inductor option for the network's compile, e.g. "
        "max_autotune=True (a Python literal; may be repeated)",
    )
    parser.add_argument(
        "--cudnn-benchmark-limit",
        type=int,
        default=None,
        help="cuDNN algorithms to try per conv (torch's default 10; 0: all)",
    )
    parser.add_argument(
        "--skip-baseline", action="store_true", help="measure orchard's path only (no ratio)"
    )
    parser.add_argument("--profile", type=Path, default=None, help="write a kernel table here")
    parser.add_argument("--label", default=None, help="a name for this configuration")
    parser.add_argument(
        "--barrier",
        type=Path,
        default=None,
        help="a folder shared by runs started side by side: they compile together and "
        "then time one at a time",
    )
    parser.add_argument("--parties", type=int, default=1, help="runs sharing --barrier")
    parser.add_argument(
        "--barrier-timeout", type=float, default=600.0, help="seconds from start, at most"
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
    if args.cudnn_benchmark_limit is not None:
        torch.backends.cudnn.benchmark_limit = args.cudnn_benchmark_limit
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
    fast = "bf16, channels-last" if device.type == "cuda" else "fp32"
    label = "compiled" if compile_ else "eager"
    runs: list[tuple[str, str, Timed]] = []  # (figure, row, timed steps)
    try:  # build and warm up every pipeline first: compilation is not timed
        if not args.skip_baseline:
            runs.append(
                (
                    "baseline_img_s",
                    f"baseline: DataLoader ({args.loader_workers} workers), per-image "
                    "torchvision, fp32",
                    baseline_runner(images, labels, params, device, args),
                )
            )
        if compile_ and not args.skip_baseline:
            runs.append(
                (
                    "orchard_eager_img_s",
                    f"orchard, eager: device-resident, batched augment, {fast}",
                    orchard_runner(images, labels, params, device, args, compile=False),
                )
            )
        runs.append(
            (
                "orchard_img_s",
                f"orchard, {label}: device-resident, batched augment, {fast}",
                orchard_runner(
                    images, labels, params, device, args, compile=compile_, profile=args.profile
                ),
            )
        )
    finally:  # a run that failed must not keep the others waiting
        if args.barrier is not None:
            mark_ready(args.barrier)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # leave memory to runs still compiling
    rows: list[tuple[str, float]] = []
    figures: dict[str, Any] = {}
    with timing_turn(args):
        for key, row, timed in runs:
            figures[key] = timed()
            rows.append((row, figures[key]))
            print(f"{row}: {figures[key]:,.0f} img/s", flush=True)
    if "baseline_img_s" in figures:
        figures["ratio"] = figures["orchard_img_s"] / figures["baseline_img_s"]

    width = max(len(name) for name, _ in rows)
    print(f"\n{'pipeline':<{width}}  {'img/s':>10}")
    for name, value in rows:
        print(f"{name:<{width}}  {value:>10,.0f}")
    if "ratio" in figures:
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
        "label": args.label,
        "env": {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **figures,
    }
    print(f"wrote {write_json(args.json, result)}")
    return result


if __name__ == "__main__":
    main()
