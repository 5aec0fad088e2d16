"""Correctness of the CUDA-only fast paths, checked where they run (not a benchmark).

The suite runs on CPU-only machines, where these paths are never taken; this script
checks them on a GPU and exits non-zero when one disagrees:

- the batched augmentation on CUDA against the same parameters on the CPU;
- the compiled augmentation + normalisation (``prepare_inputs(compile=True)``)
  against the eager one, same parameters;
- the first conv padded to 4 and 8 input channels (``RgbConv2d``) against the plain
  conv: output, weight and bias gradients, fp32 and under bf16 autocast;
- ``shared.nvjpeg`` (``[preprocessing] decoder = "nvjpeg"``) on CUDA against the
  OpenCV path and the full decode: baseline, progressive, EXIF-rotated, grey, CMYK and
  RGB-coded JPEGs and a PNG (the CMYK and RGB-coded ones, and any nvJPEG refuses, go
  through OpenCV);
- the first block with its conv biases added apart (``StudyConv2d.bias_apart``, an
  alternative ``bench/train_throughput.py --bias-apart`` times) against the plain
  block, both compiled, under bf16 autocast: output, every gradient;
- a CNN fold's peak memory on the GPU (``train_fold`` at the study's size, batch 256)
  against ``shared.memory.cnn_device_bytes``, which ``orchard submit --dry-run`` shows;
- one short ``train_fold`` through the production path with ``compile = true``,
  including a checkpoint and a resume;
- the study's CNN with each BatchNorm folded into the next layer (``MangoCNN.fold_norm``,
  which ``--fold-norm`` times), compiled in bf16, against float32 eager: its output,
  gradients and running estimates no further from it than twice the plain network's
  compiled in bf16 (relative L2).

They run in that order, the slowest to compile last, and each prints its line as it
finishes, so a run cut by its time limit still says what the first ones found.

    python bench/gpu_checks.py            # writes bench/results/gpu_checks.json

Imports torch, numpy, OpenCV, Pillow and orchard's ``shared`` library only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench._report import now, write_json  # noqa: E402
from shared.augment import augment_batch, params_to, sample_params  # noqa: E402
from shared.cnn import (  # noqa: E402
    MangoCNN,
    RgbConv2d,
    StudyConv2d,
    _augmented_input,
    compile_options,
    conv_block,
    prepare_inputs,
    train_fold,
)

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_checks.json"


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float().cpu() - b.float().cpu()).abs().max().item()


def augmentation_cpu_vs_cuda(device: torch.device) -> dict[str, Any]:
    batch = torch.randint(0, 256, (64, 3, 224, 224), dtype=torch.uint8)
    params = sample_params(64, 224, 224, torch.Generator().manual_seed(3))
    on_cpu = augment_batch(batch, params)
    on_gpu = augment_batch(batch.to(device), params_to(params, device))
    diff = _max_diff(on_cpu, on_gpu)
    return {"max_abs_diff": diff, "tolerance": 1e-4, "ok": diff <= 1e-4}


def compiled_inputs_vs_eager(device: torch.device) -> dict[str, Any]:
    batch = torch.randint(0, 256, (256, 3, 224, 224), dtype=torch.uint8, device=device)
    generator = torch.Generator(device=device).manual_seed(5)
    params = sample_params(256, 224, 224, generator)
    eager = _augmented_input(batch, params)
    compiled = prepare_inputs(device, compile=True)(batch, params)
    diff = _max_diff(eager, compiled)
    # normalised units (about 1/0.23 per unit of [0, 1]); the warp's coordinates are
    # float32 either way, fused differently
    return {
        "max_abs_diff": diff,
        "mean_abs_diff": (eager - compiled).abs().mean().item(),
        "channels_last": compiled.is_contiguous(memory_format=torch.channels_last),
        "tolerance": 1e-3,
        "ok": diff <= 1e-3 and compiled.is_contiguous(memory_format=torch.channels_last),
    }


@contextlib.contextmanager
def _fp32_convs() -> Iterator[None]:
    """cuDNN convolutions in float32, not TF32, so that float32 is compared as float32."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def padded_first_conv(device: torch.device) -> dict[str, Any]:
    results: dict[str, Any] = {}
    torch.manual_seed(0)
    x = torch.randn(32, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    with _fp32_convs():
        for pad in (4, 8):
            for autocast in (False, True):
                plain = RgbConv2d(3, 32, 3, 1, 1).to(device, memory_format=torch.channels_last)
                padded = RgbConv2d(3, 32, 3, 1, 1).to(device, memory_format=torch.channels_last)
                padded.load_state_dict(plain.state_dict())
                padded.pad_channels = pad
                outs, grads = [], []
                for conv in (plain, padded):
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                        out = conv(x)
                    out.float().square().mean().backward()
                    outs.append(out)
                    grads.append((conv.weight.grad, conv.bias.grad))
                tol = 2e-2 if autocast else 1e-4
                diffs = {
                    "output": _max_diff(*outs) / outs[0].float().abs().max().item(),
                    "weight_grad": _max_diff(grads[0][0], grads[1][0])
                    / grads[0][0].abs().max().item(),
                    "bias_grad": _max_diff(grads[0][1], grads[1][1])
                    / grads[0][1].abs().max().item(),
                }
                results[f"pad{pad}_{'bf16' if autocast else 'fp32'}"] = {
                    "relative_max_diff": diffs,
                    "tolerance": tol,
                    "ok": all(d <= tol for d in diffs.values()),
                }
    return {"cases": results, "ok": all(c["ok"] for c in results.values())}


def compiled_bias_apart(device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    plain = conv_block(3, 32).to(device, memory_format=torch.channels_last)
    apart = conv_block(3, 32).to(device, memory_format=torch.channels_last)
    apart.load_state_dict(plain.state_dict())
    for block in (plain, apart):
        block[0].pad_channels = 8  # the RgbConv2d, as prepare_model pads it on CUDA
    for module in apart.modules():
        if isinstance(module, StudyConv2d):
            module.bias_apart = True
    x = torch.randn(64, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    outs = []
    for block in (plain, apart):
        model = torch.compile(block, options=compile_options())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        outs.append(out)
    diffs = {"output": _max_diff(*outs) / outs[0].float().abs().max().item()}
    for (name, p1), (_, p2) in zip(plain.named_parameters(), apart.named_parameters(), strict=True):
        diffs[f"{name}.grad"] = _max_diff(p1.grad, p2.grad) / p1.grad.abs().max().item()
    tol = 3e-2  # bf16, fused differently
    ok = all(d <= tol for d in diffs.values())
    return {"relative_max_diff": diffs, "tolerance": tol, "ok": ok}


def compiled_fold_norm(
    device: torch.device,
    *,
    image_size: int = 224,
    width: float = 1.0,
    batch: int = 32,
    backend: str = "inductor",
) -> dict[str, Any]:
    """The study's CNN with each BatchNorm folded into the next layer, compiled in bf16,
    against float32 eager, beside the plain network compiled in bf16: folding puts
    each map's mean into the next layer's weights and bias, where bf16 rounds it, so
    it must not stray much further from float32 than the plain network does. (The
    suite runs it tiny on the CPU with the aot_eager backend.)"""
    torch.manual_seed(0)

    def network(fold: bool) -> MangoCNN:
        model = MangoCNN(image_size=image_size, width=width, dropout=0.0)
        model.fold_norm = fold
        return model.to(device, memory_format=torch.channels_last)

    reference = network(False)
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    with _fp32_convs():
        out = reference(x)
        out.square().mean().backward()

    def relative(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
        """Relative L2 error of the tensors taken as one vector."""
        a = torch.cat([t.float().flatten() for t in got])
        b = torch.cat([t.float().flatten() for t in want])
        return ((a - b).norm() / b.norm()).item()

    def figures(model: nn.Module, out: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        return {
            "output": [out.detach()],
            "gradients": [p.grad for p in model.parameters()],
            "running_estimates": [b for n, b in model.named_buffers() if "running" in n],
        }

    want = figures(reference, out)
    errors = {}
    for name, fold in (("plain", False), ("folded", True)):
        model = network(fold)
        model.load_state_dict(initial)
        options = compile_options(tune=False) if backend == "inductor" else None
        compiled = torch.compile(model, backend=backend, options=options)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = compiled(x)
        out.float().square().mean().backward()
        got = figures(model, out)
        errors[name] = {k: relative(got[k], v) for k, v in want.items()}
    ok = all(
        np.isfinite(folded) and folded <= max(2 * errors["plain"][k], 1e-2)
        for k, folded in errors["folded"].items()
    )
    return {
        "relative_l2_to_fp32": errors,
        "rule": "each of folded's <= max(2 * plain's, 1e-2)",
        "ok": ok,
    }


def compiled_train_fold(device: torch.device) -> dict[str, Any]:
    rng = np.random.default_rng(0)

    def images(n: int) -> np.ndarray:
        return rng.integers(0, 256, (n, 224, 224, 3), np.uint8)

    params = {
        "image_size": 224,
        "width": 1.0,
        "dropout": 0.5,
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "epochs": 2,
        "batch_size": 64,
        "augment": True,
        "compile": True,
    }
    train, val, test = images(256), images(64), images(32)
    labels = rng.integers(0, 3, 256)
    val_labels = rng.integers(0, 3, 64)
    saved: list[dict[str, Any]] = []

    def fold(**extra: Any) -> Any:
        return train_fold(
            train, labels, val, val_labels, test, params, num_classes=3, seed=0, device=device,
            **extra,
        )  # fmt: skip

    outcome = fold(on_checkpoint=saved.append)
    resumed = fold(resume=saved[0])
    finite = bool(np.isfinite(outcome.test_probs).all() and np.isfinite(resumed.test_probs).all())
    return {
        "epochs": len(outcome.history),
        "resumed_from_epoch": resumed.resumed_from_epoch,
        "val_acc": outcome.val_acc,
        "seconds": outcome.seconds,
        "test_probs_max_diff_after_resume": float(
            np.abs(outcome.test_probs - resumed.test_probs).max()
        ),
        "ok": finite and len(outcome.history) == 2 and resumed.resumed_from_epoch == 1,
    }


class _PeakMemory:
    """The most memory a run has held on ``device`` since :meth:`reset`, above what it
    held when this was made: CUDA's allocator's peak, or on the CPU the process's
    resident high-water mark (Linux)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()
        self.start = self._held()

    def _held(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return self._status_bytes("VmRSS")

    @staticmethod
    def _status_bytes(name: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {name}")

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to VmRSS

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.start
        return self._status_bytes("VmHWM") - self.start


def cnn_memory_estimate(
    device: torch.device,
    *,
    splits: tuple[int, int, int] = (1200, 400, 400),
    image_size: int = 224,
    width: float = 1.0,
    batch_size: int = 256,
    optimizer: str = "sgd",
) -> dict[str, Any]:
    """A CNN fold's memory on its device against ``shared.memory.cnn_device_bytes``
    (what ``orchard submit --dry-run`` shows as GPU): ``train_fold`` as a GPU worker
    runs it, for two epochs over random images, the peak measured from the first
    epoch's end (cuDNN has tried its algorithms by then, with workspaces of their own;
    that first peak is given beside it). It holds if the measured peak is 0.8-1.25
    times the estimate, the band ``tests/workers/test_memory_estimate.py`` holds the
    CPU's to. (The suite runs it small on the CPU.)"""
    from shared.cnn import KNOB_DEFAULTS
    from shared.memory import Sizes, cnn_device_bytes

    rng = np.random.default_rng(0)
    params = {
        **KNOB_DEFAULTS,
        "image_size": image_size,
        "width": width,
        "dropout": 0.5,
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "epochs": 2,
        "batch_size": batch_size,
        "augment": True,
        "optimizer": optimizer,
    }
    train, val, test = (
        rng.integers(0, 256, (n, image_size, image_size, 3), np.uint8) for n in splits
    )
    peaks: list[int] = []

    def on_epoch(stats: Any) -> None:
        peaks.append(memory.peak())
        memory.reset()

    if device.type == "cuda":
        torch.cuda.empty_cache()
    memory = _PeakMemory(device)
    train_fold(
        train, rng.integers(0, 3, splits[0]), val, rng.integers(0, 3, splits[1]), test, params,
        num_classes=3, seed=0, device=device, on_epoch=on_epoch,
    )  # fmt: skip
    peaks.append(memory.peak())  # the second epoch and the last predictions
    sizes = Sizes(sum(splits), image_size, 256, 3, {0: splits}, splits[2], {})
    estimate = cnn_device_bytes(params, sizes, 0, cuda=device.type == "cuda")
    steady = max(peaks[1:])
    return {
        "estimate_gb": round(estimate / 1e9, 3),
        "measured_gb": round(steady / 1e9, 3),
        "first_epoch_gb": round(peaks[0] / 1e9, 3),
        "ratio": round(steady / estimate, 3),
        "band": [0.8, 1.25],
        "ok": 0.8 <= steady / estimate <= 1.25,
    }


def nvjpeg_decode(device: torch.device) -> dict[str, Any]:
    import io
    import tempfile

    import cv2
    from PIL import Image

    from shared import nvjpeg
    from shared.preprocess import decode_resize
    from shared.synthetic import synthetic_photo

    def photo(index: int, width: int, height: int) -> Image.Image:
        return Image.fromarray(synthetic_photo(0, index, (width, height))[..., ::-1])

    def upright(image: torch.Tensor, path: Path) -> np.ndarray:
        orientation, _ = nvjpeg.jpeg_facts(path.read_bytes())
        return nvjpeg.resize(nvjpeg.orient(image, orientation), 256).permute(1, 2, 0).cpu().numpy()

    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown upright
    cases = {
        "baseline.jpg": (photo(1, 1280, 1024), {"quality": 90}),
        "progressive.jpg": (photo(2, 1280, 960), {"quality": 90, "progressive": True}),
        "rotated.jpg": (photo(3, 1280, 960), {"quality": 90, "exif": exif.tobytes()}),
        "grey.jpg": (photo(4, 800, 600).convert("L"), {"quality": 90}),
        "cmyk.jpg": (photo(5, 800, 600).convert("CMYK"), {"quality": 90}),
        "rgb-coded.jpg": (photo(8, 800, 600), {"quality": 90, "keep_rgb": True}),
        "small.jpg": (photo(6, 320, 240), {"quality": 90}),
        "image.png": (photo(7, 640, 480), {}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, (image, options) in cases.items():
            buf = io.BytesIO()
            image.save(buf, "PNG" if name.endswith(".png") else "JPEG", **options)
            paths.append(Path(tmp) / name)
            paths[-1].write_bytes(buf.getvalue())
        jpegs = [p for p in paths if p.suffix == ".jpg"]
        decoded = nvjpeg.decode_jpegs([p.read_bytes() for p in jpegs], device)
        refused = [p.name for p, image in zip(jpegs, decoded, strict=True) if image is None]
        # what nvJPEG itself makes of each, the ones orchard keeps from it included (CMYK,
        # RGB-coded): for the record, not part of the check
        direct = {
            p.name: round(cv2.PSNR(decode_resize(p, 256), upright(image, p)), 2)
            for p, image in zip(jpegs, decoded, strict=True)
            if image is not None
        }
        ours, on_device = nvjpeg.decode_shard(paths, 256, device)
        psnr = {}
        for path, image in zip(paths, ours, strict=True):
            full = cv2.resize(cv2.imread(str(path)), (256, 256), interpolation=cv2.INTER_AREA)
            psnr[path.name] = {
                "vs_opencv_path": round(cv2.PSNR(decode_resize(path, 256), image), 2),
                "vs_full_decode": round(cv2.PSNR(cv2.cvtColor(full, cv2.COLOR_BGR2RGB), image), 2),
            }
    worst = min(min(v.values()) for v in psnr.values())
    return {
        "ok": worst >= 35 and "baseline.jpg" not in refused and on_device >= 5,
        "min_psnr_db": worst,
        "refused_by_nvjpeg": refused,
        "decoded_on_device": f"{on_device} of {len(paths)}",
        "nvjpeg_alone_psnr_db": direct,
        "psnr_db": psnr,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--only", default=None, help="comma-separated check names")
    args = parser.parse_args(argv)
    checks = {
        "augmentation_cpu_vs_cuda": augmentation_cpu_vs_cuda,
        "compiled_inputs_vs_eager": compiled_inputs_vs_eager,
        "padded_first_conv": padded_first_conv,
        "nvjpeg_decode": nvjpeg_decode,
        "compiled_bias_apart": compiled_bias_apart,
        "cnn_memory_estimate": cnn_memory_estimate,
        "compiled_train_fold": compiled_train_fold,
        # last: two whole-network compiles, for an option orchard does not use yet
        "compiled_fold_norm": compiled_fold_norm,
    }
    if args.only:
        names = set(args.only.split(","))
        if unknown := names - set(checks):
            parser.error(f"unknown checks {sorted(unknown)}; known: {', '.join(checks)}")
        checks = {k: v for k, v in checks.items() if k in names}
    if not torch.cuda.is_available():
        print("gpu_checks: no CUDA device here; nothing to check", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    results: dict[str, Any] = {}
    for name, check in checks.items():
        try:
            results[name] = check(device)
        except Exception as exc:  # report every check, then fail
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        status = "ok" if results[name]["ok"] else "FAILED"
        print(f"{time.strftime('%H:%M:%S')} {name}: {status} {results[name]}", flush=True)
    payload = {
        "benchmark": "gpu_checks",
        "date": now(),
        "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "checks": results,
        "ok": all(r["ok"] for r in results.values()),
    }
    print(f"wrote {write_json(args.json, payload)}")
    return 0 if payload["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
