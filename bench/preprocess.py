"""Preprocessing throughput: orchard's decode-once path against plain ``cv2.imread`` + resize.

For each image set and each of ``--sizes`` (1280x1024 = 1.3 MP and 1280x960 = 1.2 MP,
the usual 4:3 camera shape, by default), writes ``--n`` JPEGs (quality ``--quality``,
4:2:0 chroma, as cameras write them) in a temporary folder, then, on ONE core
(``cv2.setNumThreads(1)``), times

- baseline: ``cv2.imread`` (full decode) + ``cv2.resize(..., INTER_AREA)`` to 256x256,
  the path orchard used before (INTER_AREA: the same antialiasing orchard applies);
- baseline-linear: the same with ``cv2.resize``'s default INTER_LINEAR (aliased, faster);
- orchard: ``shared.preprocess.decode_resize`` as a worker calls it (the sha256 of the
  bytes checked against the one recorded at submit, header check, libjpeg reduced
  decoding at 1/2 or 1/4 scale when the image is at least 1.5x that much larger than
  the output, INTER_AREA resize, RGB);
- previous rule: what ``decode_resize`` did before (the largest reduction of 1/2, 1/4,
  1/8 that keeps the output size, then bilinear when under 2x is left): faster, but
  under 35 dB against the full decode on detailed photos at most camera sizes;

- nvjpeg (with ``--nvjpeg DEVICE``): ``shared.nvjpeg.decode_shard``, what a GPU
  worker runs for ``[preprocessing] decoder = "nvjpeg"``: the set's JPEGs decoded as one
  batch by torchvision's nvJPEG binding on ``DEVICE`` (``cuda``; ``cpu`` runs the same
  code with libjpeg, a smoke run), resized on the device and copied back. Its "per
  core" figure is images per CPU second of this process, every thread counted (the
  CUDA driver's waits included); its wall-clock rate is printed beside it;

and, to show where the time goes (decoding from bytes already in memory, no resize):

- full decode: ``cv2.imdecode`` at full size;
- floor: ``cv2.imdecode`` at 1/8 scale, which skips nearly all inverse-DCT, upsampling
  and colour work but must still entropy-decode every byte: no libjpeg-based path that
  returns pixels can be faster than this on these files.

The image sets:

- ``synthetic``: ``shared.synthetic`` photos as generated (wicker background, sensor
  noise), the set earlier reports used;
- ``photo-mosaic``: tiles (4x4 at 1.3 MP) cut from the real photographs that scikit-image and
  scikit-learn ship (coffee, cat, astronaut, rocket, motorcycle, temple, flower), so the
  pixels have the statistics of real camera photos reduced from a larger picture, as a
  1.3 MP dataset photo taken with a phone would be; about as many bits per pixel as
  ``synthetic`` (the synthetic photos are not unusually hard to compress);
- ``synthetic-soft``: the synthetic photos blurred (Gaussian ``--soft-sigma``), a
  lower-entropy case like an unsharpened, denoised camera image at its native size.

JPEG files cost time in proportion to their compressed size (entropy decoding), so the
output states each set's mean file size and bits per pixel. Each path reads the same
files (from the page cache: a warm-up pass reads them all first); the best of
``--repeat`` interleaved passes of process CPU time is kept. Quality: PSNR of orchard's
256x256 output (and the previous rule's) against the baseline's (full decode +
INTER_AREA), per image; the target asks at least 35 dB.

    python bench/preprocess.py            # 40 images per set, under a minute on one core
    python bench/preprocess.py --tiny     # 3 images per set, a smoke run
    python bench/preprocess.py --nvjpeg cuda   # and the GPU workers' decoder

Prints a table per set and writes ``bench/results/preprocess.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import importlib.util
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
from shared.preprocess import check_image, decode_flag, decode_resize, read_header  # noqa: E402
from shared.synthetic import GRADES, synthetic_photo  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "preprocess.json"
IMAGE_SETS = ("synthetic", "photo-mosaic", "synthetic-soft")
FLAG_NAMES = {
    cv2.IMREAD_COLOR: "full",
    cv2.IMREAD_REDUCED_COLOR_2: "reduced/2",
    cv2.IMREAD_REDUCED_COLOR_4: "reduced/4",
    cv2.IMREAD_REDUCED_COLOR_8: "reduced/8",
}
REDUCED_FLAGS = {
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}
LABELS = {
    "baseline": "baseline: cv2.imread + resize INTER_AREA",
    "baseline-linear": "baseline-linear: cv2.imread + resize LINEAR",
    "orchard": "orchard: decode_resize",
    "previous-rule": "previous rule: largest reduction + LINEAR",
    "full-decode": "  (full decode only, no resize)",
    "floor": "  (floor: decode at 1/8, entropy decoding)",
}
# Real colour photographs shipped inside two of orchard's dependencies (no download).
REAL_PHOTOS = (
    ("skimage", "data/coffee.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/rocket.jpg"),
    ("skimage", "data/motorcycle_left.png"),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
)
# Mosaic tiles are at most this size, smaller than every photo above, so no tile is ever
# enlarged: 1280x1024 is 4x4 tiles of 320x256 (whole 16x16 JPEG blocks).
_TILE = (320, 256)


def real_photos() -> list[np.ndarray]:
    photos = []
    for package, name in REAL_PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"photo-mosaic needs {package} installed")
        path = Path(spec.submodule_search_locations[0]) / name
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise RuntimeError(f"photo-mosaic: cannot read {path}")
        photos.append(image)
    return photos


def photo_mosaic(photos: list[np.ndarray], index: int, width: int, height: int) -> np.ndarray:
    """Image ``index``: a grid of random crops (randomly mirrored) of real photographs."""
    rng = np.random.default_rng((7, index))
    cols, rows = -(-width // _TILE[0]), -(-height // _TILE[1])
    tile_w, tile_h = -(-width // cols), -(-height // rows)
    out = np.empty((tile_h * rows, tile_w * cols, 3), np.uint8)
    for row in range(rows):
        for col in range(cols):
            photo = photos[rng.integers(len(photos))]
            y = rng.integers(photo.shape[0] - tile_h + 1)
            x = rng.integers(photo.shape[1] - tile_w + 1)
            tile = photo[y : y + tile_h, x : x + tile_w]
            if rng.random() < 0.5:
                tile = tile[:, ::-1]
            out[row * tile_h : (row + 1) * tile_h, col * tile_w : (col + 1) * tile_w] = tile
    return np.ascontiguousarray(out[:height, :width])


def make_image(kind: str, index: int, args: argparse.Namespace, photos: list) -> np.ndarray:
    size = (args.width, args.height)
    if kind == "photo-mosaic":
        return photo_mosaic(photos, index, *size)
    image = synthetic_photo(seed=0, index=index + 1, size=size, grade=GRADES[index % 3])
    if kind == "synthetic-soft":
        image = cv2.GaussianBlur(image, (0, 0), args.soft_sigma)
    return image


def write_jpegs(folder: Path, kind: str, args: argparse.Namespace) -> list[Path]:
    photos = real_photos() if kind == "photo-mosaic" else []
    params = [
        cv2.IMWRITE_JPEG_QUALITY,
        args.quality,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
    ]
    folder.mkdir()
    paths = []
    for i in range(args.n):
        ok, buf = cv2.imencode(".jpg", make_image(kind, i, args, photos), params)
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


def previous_rule(size: int) -> Callable[[Path], np.ndarray]:
    """``decode_resize`` as it was: reduce as far as the output size allows, then resize."""

    def run(path: Path) -> np.ndarray:
        data = path.read_bytes()
        header = read_header(data, path)
        flag = cv2.IMREAD_COLOR
        if header.format in ("JPEG", "MPO"):
            for factor in (8, 4, 2):
                if min(header.width, header.height) >= factor * size:
                    flag = REDUCED_FLAGS[factor]
                    break
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
        area = min(image.shape[:2]) >= 2 * size
        interpolation = cv2.INTER_AREA if area else cv2.INTER_LINEAR
        image = cv2.resize(image, (size, size), interpolation=interpolation)
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    return run


def decode_only(blobs: dict[Path, np.ndarray], flag: int) -> Callable[[Path], np.ndarray]:
    return lambda path: cv2.imdecode(blobs[path], flag)


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


def measure_set(kind: str, folder: Path, args: argparse.Namespace) -> dict:
    paths = write_jpegs(folder, kind, args)
    sizes = [p.stat().st_size for p in paths]
    blobs = {p: np.frombuffer(p.read_bytes(), np.uint8) for p in paths}
    checked = {p: check_image(p) for p in paths}  # what submit records: header, sha256
    modes = sorted({FLAG_NAMES[decode_flag(checked[p][0], args.size)] for p in paths})
    reference = baseline(args.size, cv2.INTER_AREA)
    runs: dict[str, Callable[[Path], object]] = {
        "baseline": reference,
        "baseline-linear": baseline(args.size, cv2.INTER_LINEAR),
        "orchard": lambda p: decode_resize(p, args.size, sha256=checked[p][1]),
        "previous-rule": previous_rule(args.size),
        "full-decode": decode_only(blobs, cv2.IMREAD_COLOR),
        "floor": decode_only(blobs, cv2.IMREAD_REDUCED_COLOR_8),
    }
    for path in paths:  # warm the page cache and every code path
        for run in runs.values():
            run(path)
    rates = best_rate(paths, runs, args.repeat)
    psnr, psnr_previous = [], []
    for path in paths:
        expected = cv2.cvtColor(reference(path), cv2.COLOR_BGR2RGB)
        psnr.append(cv2.PSNR(expected, decode_resize(path, args.size)))
        psnr_previous.append(cv2.PSNR(expected, runs["previous-rule"](path)))
    extra = measure_nvjpeg(paths, reference, args) if args.nvjpeg else {}
    if extra:
        rates["nvjpeg"] = extra.pop("nvjpeg_per_core")
    ms = {name: 1000 / rate for name, rate in rates.items() if name != "nvjpeg"}
    return {
        **extra,
        "image_set": kind,
        "source": {
            "synthetic": "shared.synthetic as generated",
            "photo-mosaic": "tiles cut from real photos shipped with scikit-image/scikit-learn",
            "synthetic-soft": f"shared.synthetic, Gaussian blur sigma {args.soft_sigma}",
        }[kind],
        "n": args.n,
        "width": args.width,
        "height": args.height,
        "jpeg_quality": args.quality,
        "chroma_subsampling": "4:2:0",
        "jpeg_mean_kb": round(statistics.mean(sizes) / 1024, 1),
        "jpeg_min_kb": round(min(sizes) / 1024, 1),
        "jpeg_max_kb": round(max(sizes) / 1024, 1),
        "bits_per_pixel": round(statistics.mean(sizes) * 8 / (args.width * args.height), 3),
        "orchard_decode_modes": modes,
        "img_per_s_per_core": {name: round(rate, 1) for name, rate in rates.items()},
        "ratio_orchard_over_baseline": round(rates["orchard"] / rates["baseline"], 3),
        "ratio_orchard_over_baseline_linear": round(rates["orchard"] / rates["baseline-linear"], 3),
        # Where one image's time goes, in ms of one core.
        "ms_per_image": {
            "entropy_decoding_floor": round(ms["floor"], 3),
            "full_decode": round(ms["full-decode"], 3),
            "full_decode_beyond_entropy": round(ms["full-decode"] - ms["floor"], 3),
            "baseline": round(ms["baseline"], 3),
            "orchard": round(ms["orchard"], 3),
            "orchard_beyond_entropy": round(ms["orchard"] - ms["floor"], 3),
        },
        "floor_share_of_orchard": round(ms["floor"] / ms["orchard"], 3),
        "psnr_db": {"mean": round(float(np.mean(psnr)), 2), "min": round(float(min(psnr)), 2)},
        "psnr_db_previous_rule": {
            "mean": round(float(np.mean(psnr_previous)), 2),
            "min": round(float(min(psnr_previous)), 2),
        },
    }


def measure_nvjpeg(paths: list[Path], reference: Callable, args: argparse.Namespace) -> dict:
    """The set decoded as one batch on ``args.nvjpeg``: CPU and wall time, best of passes."""
    import torch

    from shared import nvjpeg

    device = torch.device(args.nvjpeg)
    out, on_device = nvjpeg.decode_shard(paths, args.size, device)  # warm-up: nvJPEG's set-up
    if on_device != len(paths):  # the figures would be OpenCV's
        raise SystemExit(
            f"bench/preprocess.py: --nvjpeg {args.nvjpeg}: the decoder took {on_device} of "
            f"{len(paths)} JPEGs (is torchvision built with nvJPEG?)"
        )
    cpu = wall = float("inf")
    for _ in range(args.repeat):
        started, clock = time.process_time(), time.perf_counter()
        nvjpeg.decode_shard(paths, args.size, device)  # ends with the copy to the host
        cpu = min(cpu, time.process_time() - started)
        wall = min(wall, time.perf_counter() - clock)
    psnr = [
        cv2.PSNR(cv2.cvtColor(reference(p), cv2.COLOR_BGR2RGB), image)
        for p, image in zip(paths, out, strict=True)
    ]
    name = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
    return {
        "nvjpeg_device": name,
        "nvjpeg_per_core": round(len(paths) / cpu, 1),
        "nvjpeg_wall_img_per_s": round(len(paths) / wall, 1),
        "psnr_db_nvjpeg": {"mean": round(float(np.mean(psnr)), 2), "min": round(min(psnr), 2)},
    }


def print_set(kind: str, r: dict, args: argparse.Namespace) -> None:
    rates, ms = r["img_per_s_per_core"], r["ms_per_image"]
    print(
        f"\n[{kind}] {r['n']} JPEGs {r['width']}x{r['height']} "
        f"({r['width'] * r['height'] / 1e6:.2f} MP, q{r['jpeg_quality']} 4:2:0, mean "
        f"{r['jpeg_mean_kb']:.0f} KB = {r['bits_per_pixel']:.2f} bit/pixel) -> "
        f"{args.size}x{args.size}, one thread"
    )
    print(f"  orchard decodes: {', '.join(r['orchard_decode_modes'])}")
    print(f"  source: {r['source']}")
    print(f"  {'path':<46} {'img/s per core':>15} {'orchard / path':>15}")
    for name, label in LABELS.items():
        print(f"  {label:<46} {rates[name]:>15.1f} {rates['orchard'] / rates[name]:>14.2f}x")
    print(
        f"  ratio orchard/baseline: {r['ratio_orchard_over_baseline']:.2f}x "
        f"(orchard/baseline-linear: {r['ratio_orchard_over_baseline_linear']:.2f}x)"
    )
    print(
        f"  ms per image: entropy-decoding floor {ms['entropy_decoding_floor']:.2f}, "
        f"orchard {ms['orchard']:.2f} (floor is {r['floor_share_of_orchard']:.0%} of it), "
        f"full decode {ms['full_decode']:.2f}, baseline {ms['baseline']:.2f}"
    )
    psnrs = [("orchard", r["psnr_db"]), ("previous rule", r["psnr_db_previous_rule"])]
    if "nvjpeg" in rates:
        print(
            f"  nvjpeg on {r['nvjpeg_device']}: {rates['nvjpeg']:.1f} img/s per core "
            f"({rates['nvjpeg'] / rates['baseline']:.2f}x the baseline), "
            f"{r['nvjpeg_wall_img_per_s']:.1f} img/s wall clock"
        )
        psnrs.append(("nvjpeg", r["psnr_db_nvjpeg"]))
    for name, psnr in psnrs:
        print(
            f"  PSNR {name} vs full decode + INTER_AREA: mean {psnr['mean']:.2f} dB, "
            f"min {psnr['min']:.2f} dB"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40, help="JPEGs per image set")
    parser.add_argument(
        "--sizes", default="1280x1024,1280x960", help="comma-separated WIDTHxHEIGHT of the JPEGs"
    )
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument(
        "--sets",
        default=",".join(IMAGE_SETS),
        help=f"comma-separated image sets, of {', '.join(IMAGE_SETS)}",
    )
    parser.add_argument(
        "--soft-sigma", type=float, default=1.0, help="Gaussian sigma of synthetic-soft"
    )
    parser.add_argument("--size", type=int, default=256, help="cache size (output side)")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes; the best counts")
    parser.add_argument(
        "--nvjpeg",
        metavar="DEVICE",
        help="also time shared.nvjpeg on DEVICE (cuda; cpu for a smoke run)",
    )
    parser.add_argument("--tiny", action="store_true", help="3 images, one pass: a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)
    if args.tiny:
        args.n, args.repeat = 3, 1
    kinds = [kind for kind in args.sets.split(",") if kind]
    if unknown := set(kinds) - set(IMAGE_SETS):
        parser.error(f"unknown image sets {sorted(unknown)}; choose from {IMAGE_SETS}")
    try:
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",") if s]
    except ValueError:
        parser.error(f"--sizes wants WIDTHxHEIGHT,...; got {args.sizes!r}")
    if not sizes or any(len(s) != 2 or min(s) < 16 for s in sizes):
        parser.error(f"--sizes wants WIDTHxHEIGHT,... of at least 16x16; got {args.sizes!r}")

    cv2.setNumThreads(1)  # per-core figures: no OpenCV worker threads for any path
    rows = []
    with tempfile.TemporaryDirectory(prefix="orchard-bench-") as tmp:
        for width, height in sizes:
            for kind in kinds:
                run_args = argparse.Namespace(**{**vars(args), "width": width, "height": height})
                rows.append(measure_set(kind, Path(tmp) / f"{kind}-{width}x{height}", run_args))
                print_set(kind, rows[-1], args)

    print("\nsummary (img/s per core, one thread):")
    print(
        f"  {'image set':<26} {'KB':>5} {'bit/px':>7} {'baseline':>9} {'orchard':>8} "
        f"{'ratio':>6} {'PSNR min':>9} {'previous':>9} {'PSNR min':>9} {'floor':>7}"
    )
    for r in rows:
        rates = r["img_per_s_per_core"]
        name = f"{r['image_set']} {r['width']}x{r['height']}"
        print(
            f"  {name:<26} {r['jpeg_mean_kb']:>5.0f} {r['bits_per_pixel']:>7.2f} "
            f"{rates['baseline']:>9.1f} {rates['orchard']:>8.1f} "
            f"{r['ratio_orchard_over_baseline']:>5.2f}x {r['psnr_db']['min']:>9.2f} "
            f"{rates['previous-rule']:>9.1f} {r['psnr_db_previous_rule']['min']:>9.2f} "
            f"{rates['floor']:>7.1f}"
        )
        if "nvjpeg" in rates:
            print(
                f"  {'':<26} nvjpeg {rates['nvjpeg']:.1f} per core "
                f"({rates['nvjpeg'] / rates['baseline']:.2f}x), "
                f"{r['nvjpeg_wall_img_per_s']:.1f} wall, PSNR min {r['psnr_db_nvjpeg']['min']:.2f}"
            )
    result = {
        "benchmark": "preprocess",
        "date": now(),
        "machine": machine_info(opencv=cv2.__version__),
        "args": vars(args),
        "results": rows,
    }
    print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
