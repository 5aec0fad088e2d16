"""Preprocessing throughput: orchard's decode-once path against plain ``cv2.imread`` + resize.

Generates ``--n`` photo-like JPEGs (``shared.synthetic``, 1280x1024 = 1.3 MP by default)
in a temporary folder, then, on ONE core (``cv2.setNumThreads(1)``), times

- baseline: ``cv2.imread`` (full decode) + ``cv2.resize(..., INTER_AREA)`` to 256x256,
  the path orchard used before (INTER_AREA: the same antialiasing orchard applies);
- baseline-linear: the same with ``cv2.resize``'s default INTER_LINEAR (aliased, faster);
- orchard: ``shared.preprocess.decode_resize`` (header check, libjpeg reduced decoding
  at 1/2, 1/4 or 1/8 scale when the image allows it, INTER_AREA resize, RGB).

Each path reads the same files (from the page cache: a warm-up pass reads them all
first); the best of ``--repeat`` interleaved passes is kept. Quality: PSNR of orchard's
256x256 output against the baseline's (full decode + INTER_AREA), per image.

    python bench/preprocess.py            # 40 images, about half a minute on one core
    python bench/preprocess.py --tiny     # 3 images, a smoke run

Prints a table and writes ``bench/results/preprocess.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from bench._report import machine_info, now, write_json  # noqa: E402
from shared.preprocess import check_image, decode_flag, decode_resize  # noqa: E402
from shared.synthetic import GRADES, synthetic_photo  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "preprocess.json"
FLAG_NAMES = {
    cv2.IMREAD_COLOR: "full",
    cv2.IMREAD_REDUCED_COLOR_2: "reduced/2",
    cv2.IMREAD_REDUCED_COLOR_4: "reduced/4",
    cv2.IMREAD_REDUCED_COLOR_8: "reduced/8",
}


def write_photos(folder: Path, args: argparse.Namespace) -> list[Path]:
    paths = []
    for i in range(args.n):
        size = (args.width, args.height)
        image = synthetic_photo(seed=0, index=i + 1, size=size, grade=GRADES[i % 3])
        if args.blur > 0:
            image = cv2.GaussianBlur(image, (0, 0), args.blur)
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, args.quality])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        path = folder / f"{i:05d}.jpg"
        path.write_bytes(buf.tobytes())
        paths.append(path)
    return paths


def baseline(size: int, interpolation: int) -> Callable[[Path], np.ndarray]:
    def run(path: Path) -> np.ndarray:
        return cv2.resize(cv2.imread(str(path)), (size, size), interpolation=interpolation)

    return run


def best_rate(paths: list[Path], runs: dict[str, Callable[[Path], object]], repeat: int) -> dict:
    """Images per CPU second for each path: the best of ``repeat`` passes, interleaved.

    CPU time of this one-threaded process, not wall time, so that other work on the
    machine does not count against either path.
    """
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeat):
        for name, run in runs.items():
            started = time.process_time()
            for path in paths:
                run(path)
            best[name] = min(best[name], time.process_time() - started)
    return {name: len(paths) / seconds for name, seconds in best.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40, help="number of JPEGs")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument(
        "--blur", type=float, default=0.0, help="Gaussian sigma before encoding (less noise)"
    )
    parser.add_argument("--size", type=int, default=256, help="cache size (output side)")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes; the best counts")
    parser.add_argument("--tiny", action="store_true", help="3 images, one pass: a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)
    if args.tiny:
        args.n, args.repeat = 3, 1

    cv2.setNumThreads(1)  # per-core figures: no OpenCV worker threads for either path
    with tempfile.TemporaryDirectory(prefix="orchard-bench-") as tmp:
        paths = write_photos(Path(tmp), args)
        jpeg_kb = statistics.mean(p.stat().st_size for p in paths) / 1024
        modes = sorted({FLAG_NAMES[decode_flag(check_image(p)[0], args.size)] for p in paths})
        reference = baseline(args.size, cv2.INTER_AREA)
        runs: dict[str, Callable[[Path], object]] = {
            "baseline": reference,
            "baseline-linear": baseline(args.size, cv2.INTER_LINEAR),
            "orchard": lambda p: decode_resize(p, args.size),
        }
        for path in paths:  # warm the page cache and every code path
            for run in runs.values():
                run(path)
        rates = best_rate(paths, runs, args.repeat)
        psnr = [
            cv2.PSNR(cv2.cvtColor(reference(p), cv2.COLOR_BGR2RGB), decode_resize(p, args.size))
            for p in paths
        ]

    ratio = rates["orchard"] / rates["baseline"]
    ratio_linear = rates["orchard"] / rates["baseline-linear"]
    labels = {
        "baseline": "baseline: cv2.imread + resize INTER_AREA",
        "baseline-linear": "baseline-linear: cv2.imread + resize LINEAR",
        "orchard": "orchard: decode_resize",
    }
    print(
        f"{args.n} JPEGs {args.width}x{args.height} ({args.width * args.height / 1e6:.2f} MP, "
        f"q{args.quality}, blur {args.blur}, mean {jpeg_kb:.0f} KB) -> {args.size}x{args.size}, "
        f"one thread; orchard decodes: {', '.join(modes)}"
    )
    print(f"{'path':<44} {'img/s per core':>15} {'orchard / path':>15}")
    for name, label in labels.items():
        print(f"{label:<44} {rates[name]:>15.1f} {rates['orchard'] / rates[name]:>14.2f}x")
    print(f"ratio orchard/baseline: {ratio:.2f}x (orchard/baseline-linear: {ratio_linear:.2f}x)")
    print(
        f"PSNR orchard vs full decode + INTER_AREA: mean {np.mean(psnr):.2f} dB, "
        f"min {min(psnr):.2f} dB"
    )

    result = {
        "benchmark": "preprocess",
        "date": now(),
        "machine": machine_info(opencv=cv2.__version__),
        "args": vars(args),
        "jpeg_mean_kb": round(jpeg_kb, 1),
        "orchard_decode_modes": modes,
        "img_per_s_per_core": {name: round(rate, 1) for name, rate in rates.items()},
        "ratio_orchard_over_baseline": round(ratio, 3),
        "ratio_orchard_over_baseline_linear": round(ratio_linear, 3),
        "psnr_db": {"mean": round(float(np.mean(psnr)), 2), "min": round(float(min(psnr)), 2)},
    }
    print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
