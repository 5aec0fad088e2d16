"""Decode once, resize to the cache size, store as uint8 shards keyed by content.

A shard is one ``.npy`` file of shape (n, S, S, 3), RGB, for a contiguous range of the
campaign manifest. Its folder is named by a fingerprint of the images' bytes and the
preprocessing parameters, so any later campaign over the same data finds it again.

Decoding is the expensive step, so each image is decoded exactly once, and a large JPEG
is decoded at 1/2 or 1/4 scale by libjpeg itself (it skips most of the inverse DCT,
upsampling and colour work), then shrunk the rest of the way with INTER_AREA. What no
reduction skips is entropy (Huffman) decoding of every compressed byte: at camera-like
file sizes (about 2 bits per pixel at quality 90) that is most of the time left;
``shared.nvjpeg`` moves it to a GPU (``[preprocessing] decoder = "nvjpeg"``).
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
from PIL import Image

from shared.artifacts import (
    NotRegularFileError,
    TooLargeError,
    WrittenFile,
    atomic_write,
    read_bounded,
    sha256_file,
)
from shared.errors import OrchardError

#: The decompression-bomb guard, checked from the header before any pixel is decoded.
#: No photo we grade is anywhere near it; ``[preprocessing] max_pixels`` changes it.
MAX_PIXELS = 100_000_000
#: What Pillow calls the formats OpenCV decodes for us (MPO: a JPEG with extra pictures).
DECODABLE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM"})
#: What Pillow calls the JPEG formats (libjpeg and nvJPEG decode both).
JPEG_FORMATS = frozenset({"JPEG", "MPO"})
# libjpeg's scaled decoding, largest reduction first. 1/8 (DC only: the mean of each 8x8
# block, fixed to the block grid) is left out: on detailed photos it fell under 35 dB
# against the full decode even with a 1.5x-2x area shrink after it, and where it would
# apply (12 MP and more) 1/4 costs 9-15% more, entropy decoding being the bulk of both.
_REDUCED_FLAGS = (
    (4, cv2.IMREAD_REDUCED_COLOR_4),
    (2, cv2.IMREAD_REDUCED_COLOR_2),
)
#: How much INTER_AREA must still shrink (on the short side) after a reduced decode.
#: A reduced decode is close to a 2x2 or 4x4 average on the JPEG block grid. Followed by
#: a bilinear resize, or by an area resize of little more than 1x, it differs from one
#: area average of the full image too much on detailed photos: on crops of real photos
#: (bench/preprocess.py, photo-mosaic) the worst image fell to 32.5-34.7 dB at 1280x960,
#: 1600x1200, 1920x1080 and 4032x3024 against the 35 dB asked (36.5 at 1280x1024). With
#: INTER_AREA shrinking 1.5x or more it was 36 dB or more at every size tried, 40 or more
#: at those five. One very detailed whole photo (scikit-learn's china.jpg) still falls to
#: 33-34 dB at 1.5x-1.7x; a margin of 2 covers it, but a 1280x960 photo then gets no
#: reduced decode at all.
REDUCED_MARGIN = 1.5
_JPEG_SOI, _JPEG_SOS, _JPEG_EOI = 0xD8, 0xDA, 0xD9
# The next marker: 0xFF and a code. 0xFF00 is a stuffed 0xFF byte and RST0-7 sit inside
# entropy-coded data, so neither ends a scan; 0xFF may repeat before a marker (fill).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# A Python object's repr in an exception message (Pillow names the BytesIO it was given):
# its memory address would make the same bad image's reason differ from run to run.
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


class PreprocessError(OrchardError, ValueError):
    """An image that cannot be decoded, or a shard that fails its checksum."""


class UnreadableFileError(PreprocessError):
    """A file this process may not read, or whose read failed (permissions, an I/O
    error): the host's or the user's problem, not the image's."""


@dataclass(frozen=True, slots=True)
class ImageHeader:
    format: str  # Pillow's name for it: "JPEG", "PNG", ...
    width: int
    height: int


@contextmanager
def _pillow_pixel_limit(max_pixels: int) -> Iterator[None]:
    # Pillow refuses (DecompressionBombError) at twice its limit and only warns below;
    # orchard applies its own limit exactly, so Pillow's must not be lower than ours.
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(max_pixels, previous or 0)
    try:
        with warnings.catch_warnings():
            # Pillow warns of what orchard reports in one line (a bomb, a TIFF cut short:
            # "Truncated File Read"): a warning would add lines to submit's output
            warnings.simplefilter("ignore")
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _jpeg_truncated(data: bytes) -> bool:
    """Whether the main image of a JPEG is cut short: no end-of-image marker after its
    last scan (libjpeg would pad it with grey).

    Walks the marker segments from the start, skipping each by its length field (an EXIF
    thumbnail in APP1 is passed over whole) and each scan's entropy-coded data up to the
    next marker (progressive JPEGs have several scans, with tables between them). What
    follows the main image's EOI is ignored: an MPO's other pictures, a Motion Photo's
    video, a maker's trailer. Garbage between segments is skipped up to the next marker,
    as libjpeg does.
    """
    size = len(data)
    if size < 4 or data[0] != 0xFF or data[1] != _JPEG_SOI:
        return True
    pos, scanned = 2, False
    while True:
        found = _JPEG_MARKER.search(data, pos)
        if found is None:
            # the file ends before the main image's EOI (inside a scan: cut short there)
            return True
        pos = found.start()
        marker = data[pos + 1]
        if marker == _JPEG_EOI:
            return not scanned  # an EOI before any scan: no picture at all
        if marker in (_JPEG_SOI, 0x01):  # TEM; neither has a length field
            pos += 2
            continue
        if pos + 4 > size:
            return True
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if end > size:
            return True  # a segment cut short
        scanned = scanned or marker == _JPEG_SOS
        # after an SOS header, the search for the next marker skips its entropy-coded data
        pos = end


def _pixel_data_end(image: Image.Image) -> int | None:
    """Where the first picture's pixel data ends in the file, from its header alone: for a
    BMP stored uncompressed, the pixel-data offset plus the padded rows; for a TIFF, the
    furthest strip or tile (offset plus byte count, compressed or not). None where the
    header does not say (an RLE-compressed BMP, a TIFF without byte counts)."""
    if image.format == "BMP":
        tiles = image.tile
        if tiles and all(tile[0] == "raw" and tile[3][1] > 0 for tile in tiles):
            # ("raw", (x0, y0, x1, y1), offset, (rawmode, stride, direction)); OpenCV
            # reads whole rows, the last one's padding included
            return max(tile[2] + tile[3][1] * (tile[1][3] - tile[1][1]) for tile in tiles)
        return None
    tags = getattr(image, "tag_v2", None)
    if image.format != "TIFF" or tags is None:
        return None
    for offsets_tag, counts_tag in ((273, 279), (324, 325)):  # strips, tiles
        offsets, counts = tags.get(offsets_tag), tags.get(counts_tag)
        if offsets is None or counts is None:
            continue
        offsets = offsets if isinstance(offsets, tuple) else (offsets,)
        counts = counts if isinstance(counts, tuple) else (counts,)
        if offsets and len(offsets) == len(counts):
            return max(int(o) + int(c) for o, c in zip(offsets, counts, strict=True))
    return None


def _netpbm_cut_short(image: Image.Image, data: bytes) -> str | None:
    """Why a PBM/PGM/PPM file is cut short, None if it is whole, or "unknown" for a kind
    this does not know. Binary pixel data (P4-P6) must fill width x height samples of one
    byte, or two where the maximum value is over 255 (bits, for P4); plain pixel data
    (P1-P3, ASCII) must hold as many numbers. Nothing is decoded: Pillow's decoders of
    16-bit and plain files take seconds for a photo."""
    tile = image.tile[0]
    width, height = image.size
    magic = data[:2]
    if magic in (b"P1", b"P2", b"P3"):
        body = data[tile[2] :]
        samples = width * height * (3 if magic == b"P3" else 1)
        # P1 may run its digits together; a comment's words only count too many
        found = body.count(b"0") + body.count(b"1") if magic == b"P1" else len(body.split())
        if found >= samples:
            return None
        return f"truncated {image.format} ({found:,} of its {samples:,} values)"
    if magic == b"P4":
        needed = (width + 7) // 8 * height
    elif magic in (b"P5", b"P6"):
        args = tile[3]
        wide = "16" in args if isinstance(args, str) else args[1] > 255
        needed = width * height * (3 if magic == b"P6" else 1) * (2 if wide else 1)
    else:
        return "unknown"
    end = tile[2] + needed
    if len(data) >= end:
        return None
    return f"truncated {image.format} (file is {len(data):,} bytes, its header needs {end:,})"


def _cut_short(image: Image.Image, data: bytes, source: io.BytesIO) -> str | None:
    """Why an image whose format has no end marker is cut short, or None if it is whole.

    Called once the header is read (and a PNG verified). JPEG has its own check
    (:func:`_jpeg_truncated`); WebP's RIFF size is checked by Pillow when it opens one.
    BMP, TIFF and PBM/PGM/PPM are checked by the sizes their headers give (no decoding);
    an RLE-compressed BMP and a TIFF without byte counts give none, so Pillow decodes them
    (they are rare, and compressed little if at all).
    """
    size = len(data)
    if image.format == "PNG":
        # verify() stops after the IEND chunk's type: its 4-byte CRC must follow
        return None if source.tell() + 4 <= size else "truncated PNG (its end chunk is cut short)"
    if image.format not in ("BMP", "TIFF", "PPM"):
        return None
    if image.format == "PPM" and (problem := _netpbm_cut_short(image, data)) != "unknown":
        return problem
    end = _pixel_data_end(image)
    if end is not None:
        if end <= size:
            return None
        return f"truncated {image.format} (file is {size:,} bytes, its header needs {end:,})"
    try:
        image.load()
    except Exception as exc:  # noqa: BLE001 - any failure means OpenCV would fail too
        reason = _OBJECT_REPR.sub("", str(exc).splitlines()[0]) if str(exc) else ""
        return f"truncated {image.format} ({reason.strip() or type(exc).__name__})"
    return None


def read_header(data: bytes, path: Path, max_pixels: int = MAX_PIXELS) -> ImageHeader:
    """Format and size of an encoded image, without decoding its pixels.

    Refuses, as a one-line :class:`PreprocessError` naming ``path``, what cannot be
    decoded safely: an empty or unrecognisable file, a format OpenCV does not read, a
    PNG whose chunk checksums fail, more than ``max_pixels`` pixels, and a file cut
    short: a JPEG without its end marker, a PNG without its end chunk, a BMP or TIFF
    shorter than its header says (see :func:`_cut_short`).
    """
    if not data:
        raise PreprocessError(f"{path}: empty file (0 bytes)")
    cut_short = None
    try:
        source = io.BytesIO(data)
        with _pillow_pixel_limit(max_pixels), Image.open(source) as image:
            header = ImageHeader(str(image.format), *image.size)
            if 0 < header.width * header.height <= max_pixels:
                if header.format == "PNG":
                    image.verify()  # CRCs of every chunk: catches a truncated or altered file
                cut_short = _cut_short(image, data, source)
    except Image.DecompressionBombError:
        raise PreprocessError(
            f"{path}: more than the pixel limit of {max_pixels:,} (decompression bomb?)"
        ) from None
    except Exception as exc:  # Pillow raises many types on malformed bytes; all mean the same
        reason = _OBJECT_REPR.sub("", str(exc).splitlines()[0]) if str(exc) else ""
        reason = reason.strip() or type(exc).__name__
        raise PreprocessError(f"{path}: not a decodable image ({reason})") from None
    pixels = header.width * header.height
    if pixels > max_pixels:
        raise PreprocessError(
            f"{path}: {header.width}x{header.height} is more than the pixel limit of "
            f"{max_pixels:,} (decompression bomb?)"
        )
    if pixels == 0:
        raise PreprocessError(f"{path}: not a decodable image (size {header.width}x0)")
    if header.format not in DECODABLE_FORMATS:
        raise PreprocessError(f"{path}: unsupported image format {header.format}")
    if header.format in JPEG_FORMATS and _jpeg_truncated(data):
        raise PreprocessError(f"{path}: truncated JPEG (no end-of-image marker)")
    if cut_short is not None:
        raise PreprocessError(f"{path}: {cut_short}")
    return header


#: What an image file within the pixel limit may hold besides its pixels (metadata,
#: ICC profiles, thumbnails), beyond :data:`BYTES_PER_PIXEL` a pixel.
IMAGE_SLACK_BYTES = 16 << 20
#: The most an uncompressed pixel takes in a format OpenCV reads (RGBA of 32-bit floats).
BYTES_PER_PIXEL = 16


def max_image_bytes(max_pixels: int) -> int:
    """The largest file an image within ``max_pixels`` can be: a larger one is not an
    image (a sparse file of gigabytes costs no disk, but every reader its RAM)."""
    return max_pixels * BYTES_PER_PIXEL + IMAGE_SLACK_BYTES


def read_file(
    path: Path, missing: str = "image file is missing", max_pixels: int = MAX_PIXELS
) -> bytes:
    """The bytes of the image file at ``path``, refused from its size before they are
    read when they are more than any image within ``max_pixels`` needs."""
    most = max_image_bytes(max_pixels)
    try:
        data = read_bounded(path, most)
    except TooLargeError as exc:
        raise PreprocessError(
            f"{path}: {exc.size:,} bytes{'' if exc.whole else ' or more'}, more than an image "
            f"within the pixel limit of {max_pixels:,} can be ({most:,}): not an image"
        ) from None
    except NotRegularFileError as exc:
        raise PreprocessError(f"{path}: {exc.kind}, not an image file") from None
    except FileNotFoundError:
        raise PreprocessError(f"{path}: {missing}") from None
    except OSError as exc:
        raise UnreadableFileError(f"{path}: cannot read image ({exc.strerror})") from None
    return data


def read_submitted(path: Path, sha256: str | None = None, max_pixels: int = MAX_PIXELS) -> bytes:
    """The bytes of the image at ``path``, refused unless they are the ``sha256`` the
    manifest recorded at submit: the cache is keyed by those bytes, so an image edited
    (or a symlink swapped) since then must not put other pixels under that key."""
    data = (
        read_file(
            path,
            "image file is missing (removed or moved since the campaign was submitted): put "
            "it back and `orchard resume` the campaign, or submit the campaign again",
            max_pixels,
        )
        if sha256
        else read_file(path, max_pixels=max_pixels)
    )
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise PreprocessError(
            f"{path}: changed since the campaign was submitted (its sha256 is not the "
            "one recorded then); submit the campaign again to use the new file"
        )
    return data


def check_image(path: Path, max_pixels: int = MAX_PIXELS) -> tuple[ImageHeader, str]:
    """The header of the image at ``path`` and the sha256 of its bytes (read once)."""
    data = read_file(path, max_pixels=max_pixels)
    return read_header(data, path, max_pixels), hashlib.sha256(data).hexdigest()


def decode_flag(header: ImageHeader, size: int) -> int:
    """The OpenCV read mode for a ``size`` x ``size`` output: reduced when a JPEG allows it.

    A reduction of k (4 or 2) is used only when the smaller side is at least
    ``REDUCED_MARGIN`` * k * ``size``, so the decoded image is still at least 1.5 times
    the output and INTER_AREA does the last part of the shrinking. Other formats have no
    scaled decoding and are read whole.
    """
    if header.format in JPEG_FORMATS:
        smaller = min(header.width, header.height)
        for factor, flag in _REDUCED_FLAGS:
            if smaller >= REDUCED_MARGIN * factor * size:
                return flag
    return cv2.IMREAD_COLOR


def decode_resize(
    path: Path, size: int, max_pixels: int = MAX_PIXELS, sha256: str | None = None
) -> np.ndarray:
    """Decode an image file once and resize it to ``size`` x ``size`` RGB uint8; with
    ``sha256``, only the bytes submitted (:func:`read_submitted`).

    Grey, palette and RGBA images become RGB (alpha is dropped); 16-bit images are
    scaled to 8 bits by OpenCV (the high byte).
    """
    data = read_submitted(path, sha256, max_pixels)
    return decode_resize_data(data, read_header(data, path, max_pixels), path, size)


def decode_resize_data(data: bytes, header: ImageHeader, path: Path, size: int) -> np.ndarray:
    """:func:`decode_resize` of bytes already read and header-checked (``path`` names them)."""
    flag = decode_flag(header, size)
    # OpenCV applies the EXIF orientation in both modes, as cv2.imread does.
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if image is None:
        raise PreprocessError(f"{path}: not a decodable image (OpenCV could not decode it)")
    # INTER_AREA averages away aliasing; after a reduced decode it always shrinks by at
    # least REDUCED_MARGIN. A full decode under 2x the output (a small image) keeps
    # bilinear, the right choice for enlarging.
    reduced = flag != cv2.IMREAD_COLOR
    shrink_by_two = min(image.shape[:2]) >= 2 * size
    interpolation = cv2.INTER_AREA if reduced or shrink_by_two else cv2.INTER_LINEAR
    image = cv2.resize(image, (size, size), interpolation=interpolation)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def preprocess_images(
    paths: Sequence[Path],
    size: int,
    max_pixels: int = MAX_PIXELS,
    digests: Sequence[str | None] | None = None,
) -> np.ndarray:
    """Every image decoded and resized; ``digests``: each one's sha256 at submit."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = decode_resize(Path(path), size, max_pixels, digests[i] if digests else None)
    return out


def write_shard(path: Path, images: np.ndarray) -> WrittenFile:
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"shards hold (n, S, S, 3) uint8, got {images.dtype} {images.shape}")
    return atomic_write(Path(path), lambda fh: np.save(_Writes(fh), images, allow_pickle=False))


class _Writes:
    """A file as numpy sees an object with a ``write`` method only: it writes the array
    through it, chunk by chunk, where into a real file it calls ``tofile``, whose
    failure loses its errno ("N requested and M written" for a full disk)."""

    def __init__(self, fh: BinaryIO) -> None:
        self.write = fh.write


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
    return fingerprint_digests(
        [(split, image_id, sha256_file(Path(path))) for split, image_id, path in items]
    )


def fingerprint_digests(items: Sequence[tuple[str, str, str]]) -> str:
    """:func:`dataset_fingerprint` from (split, image id, sha256 of the file) already known."""
    digest = hashlib.sha256()
    for split, image_id, file_sha256 in items:
        digest.update(f"{split}\0{image_id}\0{file_sha256}\n".encode())
    return digest.hexdigest()


def cache_key(fingerprint: str, size: int, shard_size: int, decoder: str = "opencv") -> str:
    # v3: reduced decoding only at 1/2 and 1/4, with at least 1.5x left to INTER_AREA.
    # nvJPEG's pixels differ from libjpeg's by a grey level or two, so its shards are
    # cached apart; the OpenCV key is the one earlier versions wrote.
    method = "cv2-reduced-area-rgb-v3" if decoder == "opencv" else f"{decoder}-area-rgb-v1"
    blob = f"{fingerprint}|size={size}|shard_size={shard_size}|decoder={method}"
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.npy"
