"""Feature variants derived from the 256x256 preprocessing cache.

| name             | what                                                           |
|------------------|----------------------------------------------------------------|
| ``full``         | the cached image itself                                        |
| ``crop<N>``      | centre crop N x N (``crop224``: the CNN input, as in the study) |
| ``resize<N>``    | the whole image resized to N x N (``resize128``: the RF input)  |
| ``polar<N>``     | resized to N, then a polar warp around the centre with the      |
|                  | radius running down the rows: the centred fruit fills the upper |
|                  | half, the corners of the photo the lower half                  |
| ``polarcrop<N>`` | the upper half of ``polar<N>``, N/2 x N                         |

The study's SVM section (2.3) names its three inputs; they are aliases here:

| alias       | same as        | the study's                                        |
|-------------|----------------|----------------------------------------------------|
| ``original``  | ``resize192``    | "Original": the photo resized to 192 x 192         |
| ``polarized`` | ``polar192``     | "Polarized" (its best SVM input)                   |
| ``cropped``   | ``polarcrop192`` | "Cropped": 96 x 192 x 3, the half with the fruit   |

"Cropped" keeps the upper half. The study says the mangoes "were mostly transformed to
the upper half in the polarized image ... Hence, we cropped the lower-half image" to a
96 x 192 x 3 array: "cropped" there means cut away. Keeping the lower half would keep the
photo's corners (hands, other fruit, baskets) and drop the fruit being graded.
"""

from __future__ import annotations

import math
import re

import cv2
import numpy as np

#: the study's names for its SVM inputs (section 2.3), at its 192 x 192 setting
ALIASES: dict[str, str] = {
    "original": "resize192",
    "polarized": "polar192",
    "cropped": "polarcrop192",
}

# ASCII digits and a whole-string match: \d would take "resize３２" and $ "resize32\n",
# each another name for resize32 that a sweep would run as a point of its own
_VARIANT = re.compile(r"(full|crop|resize|polar|polarcrop)([0-9]*)")


def canonical_variant(name: str) -> str:
    """The parametrised name behind ``name`` (an alias such as ``cropped``, or itself)."""
    return ALIASES.get(name, name)


def check_variant(name: str, cache_size: int | None = None) -> None:
    """Raise ValueError unless ``name`` is a known variant (that fits ``cache_size``)."""
    name = canonical_variant(name)
    match = _VARIANT.fullmatch(name)
    if not match or (match[1] == "full") != (match[2] == ""):
        raise ValueError(
            f"unknown variant {name!r} (expected full, crop<N>, resize<N>, polar<N>, "
            f"polarcrop<N> or one of {', '.join(ALIASES)})"
        )
    if len(match[2]) > 1 and match[2].startswith("0"):
        # resize032 would be resize32 under a second name
        raise ValueError(f"variant {name!r}: write its size without leading zeros")
    # a run of digits too long for 1024 is not read (int() refuses beyond 4300 of them)
    side = (int(match[2]) if len(match[2]) <= 4 else 10**4) if match[2] else None
    if side is not None and not 8 <= side <= 1024:
        raise ValueError(f"variant {name!r}: size must be between 8 and 1024")
    if cache_size is not None and name.startswith("crop") and side > cache_size:
        raise ValueError(f"variant {name!r}: cannot crop {side} from a {cache_size} cache")


def cnn_variant(cache_size: int, framing: str = "crop") -> str:
    """The network's input, 7/8 of the cache's side (224 of the study's 256): by default
    the study's centre crop; ``framing = "resize"`` the whole image shrunk to that size."""
    return f"{'resize' if framing == 'resize' else 'crop'}{cache_size * 7 // 8}"


def variant_shape(name: str, cache_size: int) -> tuple[int, int, int]:
    check_variant(name, cache_size)
    name = canonical_variant(name)
    if name == "full":
        return (cache_size, cache_size, 3)
    side = int(_VARIANT.fullmatch(name)[2])
    if name.startswith("polarcrop"):
        return (side // 2, side, 3)
    return (side, side, 3)


def derive(images: np.ndarray, name: str) -> np.ndarray:
    """Derive a variant from cached images of shape (n, S, S, 3) uint8; returns uint8."""
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected (n, S, S, 3) images, got {images.shape}")
    cache_size = images.shape[1]
    shape = variant_shape(name, cache_size)
    name = canonical_variant(name)
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
    """Polar warp around the image centre: rows = radius (0 at top), columns = angle.

    The radius runs to the corners, as skimage's ``warp_polar`` (the study's package) does
    by default, so no pixel of the photo is lost and a centred fruit lands in the upper
    half. Samples beyond the photo's edge (towards the sides, at large radii) are black.
    """
    side = image.shape[0]
    centre = ((side - 1) / 2, (side - 1) / 2)  # the centre between the middle pixels
    # warpPolar puts the angle on rows and the radius on columns; transpose so the
    # centre of the photo (where the fruit is) lands in the top rows. Without
    # WARP_FILL_OUTLIERS the samples outside the photo would be left uninitialised.
    warped = cv2.warpPolar(
        image,
        (side, side),
        centre,
        side / math.sqrt(2),
        cv2.INTER_LINEAR + cv2.WARP_POLAR_LINEAR + cv2.WARP_FILL_OUTLIERS,
    )
    return np.ascontiguousarray(warped.transpose(1, 0, 2))
