"""Deterministic synthetic mango photos in the AI CUP layout (grades A/B/C).

Each photo is a shaded, rotated mango on a cluttered wicker background with a second fruit
and a hand at the edges. Grade A is clean, B has an uneven-colour patch or one blemish, C
has black spots, anthracnose speckle or rot. Image ``i`` depends only on ``(seed, i)``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from shared.datasets import DatasetError

GRADES = ("A", "B", "C")
MARKER = "synthetic.json"
GENERATOR_VERSION = 1
_JPEG_PARAMS = [cv2.IMWRITE_JPEG_QUALITY, 90]
# BGR colours. Ripening gradient stops along the long axis: green, yellow, red-orange.
_GREEN = np.array([40, 170, 140], np.float32)
_YELLOW = np.array([40, 200, 235], np.float32)
_RED = np.array([45, 90, 215], np.float32)
_OTHER_FRUITS = np.array([[40, 170, 140], [40, 200, 235], [45, 90, 215], [60, 60, 170]], np.float32)
_SKIN = np.array([150, 175, 225], np.float32)
# Uneven-colour patches of grade B: bruised, pale, unripe green.
_PATCHES = np.array([[30, 80, 110], [170, 230, 250], [30, 120, 70]], np.float32)
_ROT = np.array([25, 45, 80], np.float32)  # dark brown
_SPOT = np.array([15, 20, 28], np.float32)  # brown-black

Box = tuple[slice, slice]


class _Grid:
    """Pixel coordinate grids for one image size (cached: the same for every photo)."""

    _cache: dict[tuple[int, int], _Grid] = {}

    def __init__(self, width: int, height: int) -> None:
        self.w, self.h = width, height
        self.y, self.x = np.mgrid[0:height, 0:width].astype(np.float32)

    @classmethod
    def get(cls, width: int, height: int) -> _Grid:
        if (width, height) not in cls._cache:
            cls._cache[(width, height)] = cls(width, height)
        return cls._cache[(width, height)]

    def box(self, cx: float, cy: float, r: float) -> Box:
        """The window of pixels within ``r`` of (cx, cy), clipped to the image."""
        y0, y1 = max(0, int(cy - r) - 1), min(self.h, int(cy + r) + 2)
        x0, x1 = max(0, int(cx - r) - 1), min(self.w, int(cx + r) + 2)
        return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))

    def rotated(self, box: Box, cx: float, cy: float, angle: float) -> tuple[np.ndarray, ...]:
        """Pixel coordinates in ``box`` in a frame centred at (cx, cy), rotated by ``angle``."""
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = self.x[box] - float(cx), self.y[box] - float(cy)
        return dx * c + dy * s, dy * c - dx * s


@dataclass(frozen=True, slots=True)
class _Fruit:
    cx: float
    cy: float
    a: float  # half length of the long axis
    b: float  # half width
    angle: float

    def points(self, rng: np.random.Generator, n: int, spread: float = 0.75) -> np.ndarray:
        """``n`` random pixel positions on the fruit, within ``spread`` of its radius."""
        rho = spread * np.sqrt(rng.uniform(0, 1, n))
        phi = rng.uniform(0, 2 * np.pi, n)
        u, v = rho * np.cos(phi) * self.a, rho * np.sin(phi) * self.b
        c, s = math.cos(self.angle), math.sin(self.angle)
        return np.stack([self.cx + u * c - v * s, self.cy + u * s + v * c], 1).astype(np.int32)


def _paste(img: np.ndarray, mask: np.ndarray, colour: np.ndarray, box: Box) -> None:
    """Alpha-blend ``colour`` (per-pixel or constant) into ``img[box]`` where ``mask`` is set."""
    m = mask[..., None]
    img[box] = img[box] * (1 - m) + colour * m


def _edge_point(rng: np.random.Generator, g: _Grid) -> tuple[float, float]:
    side, t = int(rng.integers(4)), rng.uniform(0.1, 0.9)
    return [(t * g.w, 0.0), (t * g.w, float(g.h)), (0.0, t * g.h), (float(g.w), t * g.h)][side]


def _background(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    # Wicker: crossed sinusoidal strands in browns, plus grain.
    full = (slice(None), slice(None))
    u, v = g.rotated(full, 0.0, 0.0, rng.uniform(0, np.pi))
    f1, f2 = rng.uniform(0.15, 0.35), rng.uniform(0.15, 0.35)
    weave = np.sign(np.sin(u * f1) * np.sin(v * f2 + rng.uniform(0, 6)))
    strands = 0.5 + 0.5 * np.abs(np.sin(u * (f1 * 0.5))) * weave
    tex = 0.64 + 0.3 * strands + 0.12 * rng.random((g.h, g.w), np.float32)
    base = np.array([rng.uniform(30, 60), rng.uniform(70, 100), rng.uniform(110, 150)], np.float32)
    return tex[..., None] * base


def _other_fruit(rng: np.random.Generator, g: _Grid, img: np.ndarray) -> None:
    cx, cy = _edge_point(rng, g)
    b = g.h * rng.uniform(0.18, 0.3)
    a = b * rng.uniform(1, 1.4)
    box = g.box(cx, cy, a)
    u, v = g.rotated(box, cx, cy, rng.uniform(0, np.pi))
    r2 = (u / a) ** 2 + (v / b) ** 2
    mask = np.clip((1 - r2) * 6, 0, 1)
    colour = _OTHER_FRUITS[rng.integers(len(_OTHER_FRUITS))] * rng.uniform(0.6, 0.95)
    _paste(img, mask, (1 - 0.4 * np.clip(r2, 0, 1))[..., None] * colour, box)


def _hand(rng: np.random.Generator, g: _Grid, img: np.ndarray) -> None:
    """A skin-tone palm at an edge with fingers reaching towards the centre."""
    cx, cy = _edge_point(rng, g)
    mask = np.zeros((g.h, g.w), np.uint8)
    r = int(g.h * rng.uniform(0.12, 0.18))
    centre = (int(cx), int(cy))
    cv2.ellipse(mask, centre, (int(r * 1.4), r), rng.uniform(0, 360), 0, 360, 255, -1)
    to_centre = math.atan2(g.h / 2 - cy, g.w / 2 - cx) + rng.uniform(-0.4, 0.4)
    for k in range(4):
        dirn = to_centre + (k - 1.5) * 0.3
        length = r * rng.uniform(1.7, 2.2)
        tip = (int(cx + math.cos(dirn) * length), int(cy + math.sin(dirn) * length))
        cv2.line(mask, centre, tip, 255, max(2, r // 3))
    box = g.box(cx, cy, r * 2.3 + 6)
    soft = cv2.GaussianBlur(mask[box], (0, 0), 2).astype(np.float32) * (1 / 255)
    _paste(img, soft, _SKIN * rng.uniform(0.8, 1.05), box)


def _blob(rng: np.random.Generator, centre: np.ndarray, radius: float) -> np.ndarray:
    """An irregular polygon around ``centre`` (a rot patch)."""
    phi = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    r = radius * rng.uniform(0.6, 1.3, 12)
    return (centre + np.stack([np.cos(phi) * r, np.sin(phi) * r], 1)).astype(np.int32)


def _damage(
    rng: np.random.Generator, g: _Grid, grade: str, fruit: _Fruit
) -> tuple[np.ndarray, ...]:
    """Masks (uint8, full image) of dark spots and of rot patches for the grade: none for A."""
    spots = np.zeros((g.h, g.w), np.uint8)
    rot = np.zeros((g.h, g.w), np.uint8)
    unit = g.h / 100
    if grade == "B":  # exactly one small blemish
        (px, py) = fruit.points(rng, 1)[0]
        cv2.circle(spots, (int(px), int(py)), int(unit * rng.uniform(2, 3.5)), 255, -1)
    elif grade == "C":  # rot plus black spots and/or anthracnose
        for centre in fruit.points(rng, int(rng.integers(1, 4)), 0.5):
            cv2.fillPoly(rot, [_blob(rng, centre, unit * rng.uniform(9, 15))], 255)
        kinds = list(rng.permutation(["spots", "speckle"])[: rng.integers(1, 3)])
        if "spots" in kinds:
            for px, py in fruit.points(rng, int(rng.integers(5, 12))):
                cv2.circle(spots, (int(px), int(py)), int(unit * rng.uniform(1.5, 3)), 255, -1)
        if "speckle" in kinds:  # anthracnose: clusters of tiny dark dots
            for cx, cy in fruit.points(rng, int(rng.integers(2, 4))):
                pts = np.array([cx, cy]) + rng.normal(0, unit * 4, size=(25, 2))
                for px, py in pts.astype(int):
                    radius = int(unit * rng.uniform(0.5, 1.2))
                    cv2.circle(spots, (int(px), int(py)), radius, 255, -1)
    return spots, rot


def _photo(rng: np.random.Generator, g: _Grid, grade: str) -> np.ndarray:
    img = _background(rng, g)
    _other_fruit(rng, g, img)

    a = g.h * rng.uniform(0.45, 0.65) / 2
    fruit = _Fruit(
        cx=g.w / 2 + rng.uniform(-0.06, 0.06) * g.w,
        cy=g.h / 2 + rng.uniform(-0.06, 0.06) * g.h,
        a=a,
        b=a * rng.uniform(0.6, 0.8),
        angle=rng.uniform(0, np.pi),
    )
    box = g.box(fruit.cx, fruit.cy, fruit.a)
    u, v = g.rotated(box, fruit.cx, fruit.cy, fruit.angle)
    un = u * (1 / fruit.a)
    # Slightly egg-shaped: wider towards one end.
    r2 = un**2 + (v / (fruit.b * (1 + 0.12 * un))) ** 2
    mask = np.clip((1 - r2) * 8, 0, 1)

    # Ripening gradient along the long axis: green -> yellow -> red, random extent and direction.
    direction = 1.0 if rng.random() < 0.5 else -1.0
    t = np.clip(un * (rng.uniform(0.3, 0.8) * direction) + rng.uniform(-0.2, 0.2), -1, 1)
    w_green, w_red = np.clip(-t, 0, 1)[..., None], np.clip(t, 0, 1)[..., None]
    stops = rng.normal(0, 8, size=(3, 3)).astype(np.float32) + [_GREEN, _YELLOW, _RED]
    colour = w_green * stops[0] + (1 - w_green - w_red) * stops[1] + w_red * stops[2]

    if grade == "B" and rng.random() < 0.75:  # a large lighter, darker or greener patch
        (px, py), r = fruit.points(rng, 1, 0.3)[0], fruit.b * rng.uniform(0.7, 1.0)
        patch = np.zeros((g.h, g.w), np.uint8)
        axes = (int(r * 1.3), int(r))
        cv2.ellipse(patch, (int(px), int(py)), axes, rng.uniform(0, 360), 0, 360, 255, -1)
        shift = cv2.GaussianBlur(patch, (0, 0), r / 5)[box].astype(np.float32) * (1 / 255)
        target = _PATCHES[rng.integers(len(_PATCHES))]
        colour += (target - colour) * (shift * rng.uniform(0.7, 0.9))[..., None]
    else:
        spots, rot = _damage(rng, g, grade, fruit)
        tone = rng.uniform(0.7, 1.2)
        for marks, sigma, dark in ((rot, 2.5, _ROT), (spots, 1.2, _SPOT)):
            alpha = cv2.GaussianBlur(marks, (0, 0), sigma)[box].astype(np.float32) * (1 / 255)
            colour += (dark * tone - colour) * alpha[..., None]

    # Soft shading: darker rim, lighter highlight spot.
    rim = 1 - 0.45 * np.clip(r2, 0, 1) ** 2
    hx, hy = fruit.points(rng, 1, 0.5)[0]
    dist2 = (g.x[box] - float(hx)) ** 2 + (g.y[box] - float(hy)) ** 2
    highlight = np.exp(dist2 * (-0.5 / (fruit.b * 0.35) ** 2)) * (255 * 0.2)
    _paste(img, mask, colour * rim[..., None] + highlight[..., None], box)
    _hand(rng, g, img)

    # Lighting: global contrast and brightness, a slight colour cast, sensor noise.
    mean = float(img.mean())
    contrast, brightness = rng.uniform(0.8, 1.15), rng.uniform(0.8, 1.15)
    cast = rng.uniform(0.92, 1.08, size=3).astype(np.float32)
    img = (img - mean) * contrast + mean * brightness
    img *= cast
    img += 10 * (rng.random((g.h, g.w, 1), np.float32) - 0.5)
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_photo(
    seed: int, index: int, size: tuple[int, int] = (320, 240), grade: str = "A"
) -> np.ndarray:
    """Photo ``index`` of a dataset generated with ``seed``, as BGR uint8 (height, width, 3).

    The same pixels :func:`generate_synthetic` encodes; tests and benchmarks use it for
    photo-like images of any size.
    """
    if grade not in GRADES:
        raise ValueError(f"grade must be one of {GRADES}, got {grade!r}")
    return _photo(np.random.default_rng((seed, 1, index)), _Grid.get(*size), grade)


def _noisy_label(rng: np.random.Generator, grade: str, label_noise: float) -> str:
    if rng.random() >= label_noise:
        return grade
    if grade == "B":
        return "A" if rng.random() < 0.5 else "C"
    return "B"


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _write_split(
    out: Path, split: str, grades: list[str], first: int, params: dict, labelled: bool
) -> None:
    (out / split).mkdir()
    seed, g = params["seed"], _Grid.get(*params["size"])
    lines = ["image_id,label"]
    for index, grade in enumerate(grades, start=first):
        image_id = f"{index:05d}.jpg"
        img = _photo(np.random.default_rng((seed, 1, index)), g, grade)
        ok, buf = cv2.imencode(".jpg", img, _JPEG_PARAMS)
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for {image_id}")
        (out / split / image_id).write_bytes(buf.tobytes())
        # Labels draw from their own stream, so label_noise never changes the photos.
        label = _noisy_label(np.random.default_rng((seed, 2, index)), grade, params["label_noise"])
        lines.append(f"{image_id},{label if labelled else ''}")
    (out / f"{split}.csv").write_text("\n".join(lines) + "\n")


def generate_synthetic(
    root: Path,
    *,
    seed: int = 0,
    train_per_class: int = 40,
    test_per_class: int = 10,
    size: tuple[int, int] = (320, 240),
    label_noise: float = 0.1,
    test_labels: bool = True,
    dev_per_class: int = 0,
) -> Path:
    """Generate (or reuse) a synthetic mango dataset in the aicup layout at ``root``,
    with a labelled dev split when ``dev_per_class`` is set.

    Same arguments give byte-identical files. An existing dataset with the same parameters
    is left untouched; any other non-empty ``root`` raises ``DatasetError``.
    """
    if (
        seed < 0
        or train_per_class < 1
        or test_per_class < 0
        or dev_per_class < 0
        or not 0 <= label_noise <= 1
    ):
        raise ValueError(
            "need seed >= 0, train_per_class >= 1, test_per_class >= 0, dev_per_class >= 0, "
            "0 <= label_noise <= 1"
        )
    if min(size) < 16:
        raise ValueError(f"size must be at least 16x16, got {size}")
    root = Path(root)
    params = {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "train_per_class": int(train_per_class),
        "test_per_class": int(test_per_class),
        "size": [int(size[0]), int(size[1])],
        "label_noise": float(label_noise),
        "test_labels": bool(test_labels),
        "classes": list(GRADES),
    }
    if dev_per_class:  # absent when 0: datasets made before it keep their marker
        params["dev_per_class"] = int(dev_per_class)
    if _read_marker(root) == params:
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DatasetError(
            f"{root}: exists and is not a synthetic dataset with these parameters; "
            "refusing to overwrite it"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is meant to be shared
        first = 1
        splits = [("train", train_per_class), ("dev", dev_per_class), ("test", test_per_class)]
        for split, per_class in splits:
            if split == "dev" and not per_class:
                continue
            grades = [grade for grade in GRADES for _ in range(per_class)]
            # Shuffle so that file names say nothing about the class.
            order = np.random.default_rng((seed, 3, first)).permutation(len(grades))
            labelled = split != "test" or test_labels
            _write_split(tmp, split, [grades[i] for i in order], first, params, labelled)
            first += len(grades)
        (tmp / MARKER).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        try:
            os.replace(tmp, root)  # atomically replaces an empty root directory, too
        except OSError:
            if _read_marker(root) != params:  # not a concurrent run that finished first
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
