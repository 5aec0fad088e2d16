"""Decode once, resize to the cache size, store as uint8 shards keyed by content.

A shard is one ``.npy`` file of shape (n, S, S, 3), RGB, for a contiguous range of the
campaign manifest. Its folder is named by a fingerprint of the images' bytes and the
preprocessing parameters, so any later campaign over the same data finds it again.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from shared.artifacts import WrittenFile, atomic_write, sha256_file
from shared.errors import OrchardError

# A decompression bomb guard: no photo we grade is anywhere near this.
MAX_PIXELS = 100_000_000


class PreprocessError(OrchardError, ValueError):
    """An image that cannot be decoded, or a shard that fails its checksum."""


def decode_resize(path: Path, size: int) -> np.ndarray:
    """Decode an image file once and resize it to ``size`` x ``size`` RGB uint8."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise PreprocessError(f"{path}: cannot read image ({exc.strerror})") from None
    if data.size == 0:
        raise PreprocessError(f"{path}: empty file")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise PreprocessError(f"{path}: not a decodable image")
    if image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise PreprocessError(f"{path}: {image.shape[1]}x{image.shape[0]} exceeds the pixel limit")
    interpolation = cv2.INTER_AREA if min(image.shape[:2]) >= size else cv2.INTER_LINEAR
    image = cv2.resize(image, (size, size), interpolation=interpolation)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def preprocess_images(paths: Sequence[Path], size: int) -> np.ndarray:
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = decode_resize(Path(path), size)
    return out


def write_shard(path: Path, images: np.ndarray) -> WrittenFile:
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"shards hold (n, S, S, 3) uint8, got {images.dtype} {images.shape}")
    return atomic_write(Path(path), lambda fh: np.save(fh, images, allow_pickle=False))


def load_shard(path: Path, sha256: str | None = None) -> np.ndarray:
    """Load a shard; with ``sha256`` given, refuse a file whose bytes changed."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise PreprocessError(f"{path}: shard is missing") from None
    if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
        raise PreprocessError(f"{path}: shard checksum mismatch (truncated or altered)")
    try:
        return np.load(io.BytesIO(blob), allow_pickle=False)
    except (ValueError, EOFError) as exc:
        raise PreprocessError(f"{path}: not a readable shard ({exc})") from None


def shard_ranges(count: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + shard_size, count)) for start in range(0, count, shard_size)]


def dataset_fingerprint(items: Sequence[tuple[str, str, Path]]) -> str:
    """Hash of (split, image id, file bytes) for every image, in order.

    Labels are left out on purpose: relabelling does not change pixels, so it must
    not invalidate the cache.
    """
    digest = hashlib.sha256()
    for split, image_id, path in items:
        digest.update(f"{split}\0{image_id}\0{sha256_file(Path(path))}\n".encode())
    return digest.hexdigest()


def cache_key(fingerprint: str, size: int, shard_size: int) -> str:
    blob = f"{fingerprint}|size={size}|shard_size={shard_size}|decoder=cv2-area-rgb-v1"
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.npy"
