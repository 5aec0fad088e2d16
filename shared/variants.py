"""Feature variants derived from the 256x256 preprocessing cache.

| name          | what                                                           |
|---------------|----------------------------------------------------------------|
| ``full``      | the cached image itself                                        |
| ``crop<N>``   | centre crop N x N (``crop224``: the CNN input, as in the study) |
| ``resize<N>`` | the whole image resized to N x N (``resize128``: the RF input)  |
| ``polar<N>``  | resized to N, then a polar warp around the centre with the      |
|               | radius running down the rows, so the centred fruit fills the   |
|               | upper half (the study's SVM input, ``polar192``)               |
| ``polarcrop<N>`` | the upper half of ``polar<N>`` (the study's "cropped")     |
"""

from __future__ import annotations

import re

import cv2
import numpy as np

_VARIANT = re.compile(r"^(full|crop(\d+)|resize(\d+)|polar(\d+)|polarcrop(\d+))$")


def check_variant(name: str, cache_size: int | None = None) -> None:
    """Raise ValueError unless ``name`` is a known variant (that fits ``cache_size``)."""
    match = _VARIANT.match(name)
    if not match:
        raise ValueError(
            f"unknown variant {name!r} (expected full, crop<N>, resize<N>, polar<N> "
            "or polarcrop<N>)"
        )
    side = next((int(g) for g in match.groups()[1:] if g), None)
    if side is not None and not 8 <= side <= 1024:
        raise ValueError(f"variant {name!r}: size must be between 8 and 1024")
    if cache_size is not None and name.startswith("crop") and side > cache_size:
        raise ValueError(f"variant {name!r}: cannot crop {side} from a {cache_size} cache")


def variant_shape(name: str, cache_size: int) -> tuple[int, int, int]:
    check_variant(name, cache_size)
    if name == "full":
        return (cache_size, cache_size, 3)
    side = int(re.sub(r"\D", "", name))
    if name.startswith("polarcrop"):
        return (side // 2, side, 3)
    return (side, side, 3)


def derive(images: np.ndarray, name: str) -> np.ndarray:
    """Derive a variant from cached images of shape (n, S, S, 3) uint8; returns uint8."""
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected (n, S, S, 3) images, got {images.shape}")
    cache_size = images.shape[1]
    shape = variant_shape(name, cache_size)
    if name == "full":
        return images
    out = np.empty((len(images), *shape), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = _derive_one(image, name, shape[1])
    return out


def _derive_one(image: np.ndarray, name: str, side: int) -> np.ndarray:
    if name.startswith("crop"):
        top = (image.shape[0] - side) // 2
        return image[top : top + side, top : top + side]
    resized = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
    if name.startswith("resize"):
        return resized
    polar = polar_warp(resized)
    return polar[: side // 2] if name.startswith("polarcrop") else polar


def polar_warp(image: np.ndarray) -> np.ndarray:
    """Polar warp around the image centre: rows = radius (0 at top), columns = angle."""
    side = image.shape[0]
    centre = (side / 2, side / 2)
    # warpPolar puts the angle on rows and the radius on columns; transpose so the
    # centre of the photo (where the fruit is) lands in the top rows.
    warped = cv2.warpPolar(
        image, (side, side), centre, side / 2, cv2.INTER_LINEAR + cv2.WARP_POLAR_LINEAR
    )
    return np.ascontiguousarray(warped.transpose(1, 0, 2))
