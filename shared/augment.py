"""The study's training augmentations (section 1.2.1), batched on the images' device.

The study ran, per image on the CPU::

    RandomVerticalFlip() -> RandomHorizontalFlip() -> RandomRotation(30)
    -> RandomPerspective()  # distortion_scale=0.5, p=0.5
    -> ColorJitter((0.8, 1.2), (0.8, 1.2), (0.8, 1.2))

Here a whole uint8 batch is transformed where it lives (the GPU in production, the
CPU in tests), in three steps:

1. :func:`sample_params` draws every random choice for the batch from one
   ``torch.Generator``, with torchvision's distributions (flips p=0.5, angle uniform in
   [-30, 30], perspective corners as ``RandomPerspective.make_params`` draws them,
   applied with p=0.5, jitter factors uniform in [0.8, 1.2], and a random order of
   the three jitter operations per image, as ``ColorJitter`` does with ``randperm``).
2. The four geometric steps become ONE 3x3 homography per image, which maps an
   output pixel to where the sequential pipeline would have read it in the input:
   ``vflip^-1 . hflip^-1 . rotation^-1 . perspective^-1``. One ``grid_sample`` warps the
   batch (bilinear, zero padding, like torchvision with fill=0). A mask reproduces
   the black corners the sequential pipeline creates when the perspective step reads
   outside the rotated frame. Differences from the study, on purpose: one bilinear
   resampling instead of a nearest one (``RandomRotation``'s default) followed by a
   bilinear one, so edges are smoother and nothing is resampled twice.
3. Colour jitter by broadcasting, in each image's own random order, on floats in
   [0, 1] clamped after every step as torchvision does: brightness multiplies,
   contrast blends with the mean of the image's grayscale, saturation blends with
   the grayscale.

Coordinates follow torchvision's tensor kernels: pixel ``i`` has its centre at
``i + 0.5``, the grid is normalised with ``align_corners=False``, rotation turns
counter-clockwise for positive angles about the image centre, and the perspective
coefficients map ``endpoints`` back onto ``startpoints``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MAX_ANGLE = 30.0
DISTORTION_SCALE = 0.5
PERSPECTIVE_P = 0.5
FLIP_P = 0.5
JITTER_RANGE = (0.8, 1.2)
#: column order of :attr:`AugmentParams.jitter` and the values in ``jitter_order``
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2
#: ITU-R 601-2 luma, as torchvision's ``rgb_to_grayscale``
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def constant(
    values: tuple, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A small constant tensor, made once per device: building one from a Python list
    on CUDA is a host-to-device copy that waits for the GPU. Never modify the result.

    Under ``torch.compile`` it is a plain constant of the graph (no cache to trace)."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    return _cached_constant(values, device, dtype)


@functools.lru_cache(maxsize=64)
def _cached_constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


@dataclass(frozen=True, slots=True)
class AugmentParams:
    """Every random choice for a batch of ``n`` images of ``height`` x ``width``."""

    height: int
    width: int
    hflip: torch.Tensor  # (n,) bool
    vflip: torch.Tensor  # (n,) bool
    angle: torch.Tensor  # (n,) float degrees, counter-clockwise
    perspective: torch.Tensor  # (n,) bool: RandomPerspective fired
    endpoints: torch.Tensor  # (n, 4, 2) float pixel coords: tl, tr, br, bl corners' targets
    jitter: torch.Tensor  # (n, 3) factors: brightness, contrast, saturation
    jitter_order: torch.Tensor  # (n, 3) long: a permutation of (0, 1, 2) per image

    @property
    def startpoints(self) -> torch.Tensor:
        """(4, 2) the image corners, as torchvision's RandomPerspective names them."""
        w, h = self.width - 1, self.height - 1
        return constant(((0, 0), (w, 0), (w, h), (0, h)), self.endpoints.device, torch.float64)


def sample_params(
    n: int,
    height: int,
    width: int,
    generator: torch.Generator,
    device: torch.device | None = None,
) -> AugmentParams:
    """Draw the study's random augmentation choices for ``n`` images.

    Draws on the generator's device (a CUDA generator keeps the whole step free of
    host syncs) and moves the result to ``device`` when that differs.
    """
    on = generator.device

    def uniform(*shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=on) * (high - low) + low

    def randint(low: int, high: int, *shape: int) -> torch.Tensor:
        return torch.randint(low, high, shape, generator=generator, device=on)

    vflip = uniform(n) < FLIP_P
    hflip = uniform(n) < FLIP_P
    angle = uniform(n, low=-MAX_ANGLE, high=MAX_ANGLE)
    perspective = uniform(n) < PERSPECTIVE_P
    # RandomPerspective.make_params: integer corners, each moved inwards by < bound
    bound_h = int(DISTORTION_SCALE * (height // 2)) + 1
    bound_w = int(DISTORTION_SCALE * (width // 2)) + 1
    dx = randint(0, bound_w, n, 4)
    dy = randint(0, bound_h, n, 4)
    inward_x = constant((1, -1, -1, 1), on, torch.int64)  # tl, tr, br, bl
    inward_y = constant((1, 1, -1, -1), on, torch.int64)
    corner_x = constant((0, width - 1, width - 1, 0), on, torch.int64)
    corner_y = constant((0, 0, height - 1, height - 1), on, torch.int64)
    endpoints = torch.stack((corner_x + inward_x * dx, corner_y + inward_y * dy), dim=-1)
    jitter = uniform(n, 3, low=JITTER_RANGE[0], high=JITTER_RANGE[1])
    jitter_order = torch.argsort(uniform(n, 3), dim=1)  # a uniform random permutation
    params = AugmentParams(
        height,
        width,
        hflip,
        vflip,
        angle,
        perspective,
        endpoints.to(torch.float64),
        jitter,
        jitter_order,
    )
    if device is not None and torch.device(device) != on:
        params = params_to(params, torch.device(device))
    return params


def params_to(params: AugmentParams, device: torch.device) -> AugmentParams:
    fields = ("hflip", "vflip", "angle", "perspective", "endpoints", "jitter", "jitter_order")
    moved = {name: getattr(params, name).to(device) for name in fields}
    return AugmentParams(params.height, params.width, **moved)


# ---------------------------------------------------------------- geometry


def _perspective_inverse(start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """(n, 3, 3) homographies taking ``end`` points to ``start`` points (float64).

    The same linear system as torchvision's ``_get_perspective_coeffs`` (four point
    pairs, eight unknowns), solved for the whole batch at once.
    """
    n = end.shape[0]
    start = start.expand(n, 4, 2)
    x, y = end[..., 0], end[..., 1]
    u, v = start[..., 0], start[..., 1]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack((x, y, one, zero, zero, zero, -u * x, -u * y), dim=-1)
    rows_v = torch.stack((zero, zero, zero, x, y, one, -v * x, -v * y), dim=-1)
    a = torch.stack((rows_u, rows_v), dim=2).reshape(n, 8, 8)
    b = torch.stack((u, v), dim=2).reshape(n, 8, 1)
    coeffs, _ = torch.linalg.solve_ex(a, b)  # no error check: no host sync on CUDA
    return torch.cat((coeffs.view(n, 8), one[:, :1]), dim=1).view(n, 3, 3)


def sampling_matrices(params: AugmentParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, 3) float64 maps of output pixels (edge coords) to where they are read.

    Returns the whole map into the input image and the perspective step alone (into
    the rotated frame). The study's steps run flip, flip, rotate, perspective on the
    image, so reading an output pixel goes back through them in reverse:
    ``vflip . hflip . rotation^-1 . perspective^-1``.
    """
    h, w = params.height, params.width
    n = params.angle.shape[0]
    device = params.angle.device
    eye = torch.eye(3, dtype=torch.float64, device=device).expand(n, 3, 3)

    persp = _perspective_inverse(params.startpoints, params.endpoints)
    persp = torch.where(params.perspective.view(n, 1, 1), persp, eye)

    theta = params.angle.to(torch.float64) * (math.pi / 180)
    cos, sin = torch.cos(theta), torch.sin(theta)
    cx, cy = w / 2, h / 2
    # about the centre: T(c) R T(-c), with R the inverse of a counter-clockwise turn
    rot = torch.zeros(n, 3, 3, dtype=torch.float64, device=device)
    rot[:, 0, 0], rot[:, 0, 1] = cos, -sin
    rot[:, 1, 0], rot[:, 1, 1] = sin, cos
    rot[:, 0, 2] = cx - cos * cx + sin * cy
    rot[:, 1, 2] = cy - sin * cx - cos * cy
    rot[:, 2, 2] = 1

    flip = eye.clone()
    hflip, vflip = params.hflip.to(torch.float64), params.vflip.to(torch.float64)
    flip[:, 0, 0] = 1 - 2 * hflip  # x -> w - x
    flip[:, 0, 2] = w * hflip
    flip[:, 1, 1] = 1 - 2 * vflip  # y -> h - y
    flip[:, 1, 2] = h * vflip
    return flip @ rot @ persp, persp


def _inside(coord: torch.Tensor, size: int) -> torch.Tensor:
    return (coord >= 0) & (coord <= size)


def _pixel_centres(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(h, w, 3) homogeneous edge coordinates (x + 0.5, y + 0.5, 1) of every pixel."""
    if torch.compiler.is_compiling():
        return _make_pixel_centres(h, w, device)  # fused into the warp's kernels
    return _cached_pixel_centres(h, w, device)


@functools.lru_cache(maxsize=16)
def _cached_pixel_centres(h: int, w: int, device: torch.device) -> torch.Tensor:
    return _make_pixel_centres(h, w, device)


def _make_pixel_centres(h: int, w: int, device: torch.device) -> torch.Tensor:
    ys = torch.arange(h, device=device, dtype=torch.float32) + 0.5
    xs = torch.arange(w, device=device, dtype=torch.float32) + 0.5
    ones = torch.ones(h, w, device=device)
    return torch.stack((xs.expand(h, w), ys.view(h, 1).expand(h, w), ones), dim=-1)


def warp(images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Flip, rotate and perspective-warp a float (n, C, H, W) batch in one resampling."""
    n, _, h, w = images.shape
    device = images.device
    full, persp = (m.to(device) for m in sampling_matrices(params))
    to_unit = constant(((2 / w, 0, -1), (0, 2 / h, -1), (0, 0, 1)), device, torch.float64)
    # one (n, 2, 3, 3) stack: the full map, normalised for grid_sample, and the
    # perspective step alone (where it reads the rotated frame, for the mask)
    mats = torch.stack((to_unit @ full, persp), dim=1).to(torch.float32)
    points = torch.einsum("nkij,hwj->nkhwi", mats, _pixel_centres(h, w, device))
    points = points[..., :2] / points[..., 2:]
    grid, read = points[:, 0], points[:, 1]
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # the sequential pipeline's perspective step reads the ROTATED frame, which is
    # black outside [0, w] x [0, h] even where the original image continues
    # (a hard edge: within half a pixel of it the two differ by a bilinear blend)
    inside = _inside(read[..., 0], w) & _inside(read[..., 1], h)
    return out * inside.unsqueeze(1)


# ---------------------------------------------------------------- colour


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) float -> (n, 1, H, W), torchvision's weights."""
    r, g, b = images.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def color_jitter(images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Brightness, contrast and saturation in each image's own order, floats in [0, 1].

    Each of the three is ``a * x + b * gray(x) + c * mean(gray(x))`` with per-image
    coefficients, so a step of the random order is one broadcast expression.
    """
    n = images.shape[0]
    device = images.device
    order = params.jitter_order.to(device)
    factors = params.jitter.to(device=device, dtype=images.dtype)
    for step in range(3):
        op = order[:, step]
        f = factors.gather(1, op.view(n, 1)).view(n, 1, 1, 1)
        op = op.view(n, 1, 1, 1)
        gray = grayscale(images)
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        toward = torch.where(op == SATURATION, gray, torch.where(op == CONTRAST, mean, 0.0))
        images = (f * images + (1 - f) * toward).clamp(0, 1)
    return images


# ---------------------------------------------------------------- the whole pipeline


def augment_batch(batch: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """uint8 (n, 3, H, W) on any device -> float32 in [0, 1], the study's augmentations."""
    images = batch.float() / 255.0
    return color_jitter(warp(images, params), params)


def random_augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw fresh parameters from ``generator`` and augment ``batch`` with them."""
    n, _, h, w = batch.shape
    return augment_batch(batch, sample_params(n, h, w, generator, batch.device))
