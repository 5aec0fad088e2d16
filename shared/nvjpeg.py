"""Preprocessing on a GPU: JPEGs decoded by nvJPEG, resized on the device.

With ``[preprocessing] decoder = "nvjpeg"`` a campaign's preprocessing shards go to
queue ``gpu``, whose workers would otherwise wait for them: no fold can start before
every shard is written. torchvision's nvJPEG binding decodes a batch of baseline JPEGs
on the GPU's hardware JPEG engines (A100, H100, H200; other GPUs decode on their CUDA
cores), so entropy decoding, the part of libjpeg that no reduced decode skips and most
of :func:`shared.preprocess.decode_resize`'s time on camera-sized files, leaves the CPU.

The output follows ``decode_resize``: RGB uint8, the EXIF orientation applied as
``cv2.imread`` does, shrunk with INTER_AREA's weights (each output pixel the
area-weighted mean of the source pixels it covers, as two matrix products) when the
short side is at least twice the output, else bilinear as INTER_LINEAR. Other formats,
JPEGs that are not 8-bit grey or YCbCr (CMYK, RGB-coded) and any JPEG nvJPEG refuses
are decoded by OpenCV exactly as before. nvJPEG always decodes at full size (it has no
scaled decoding) and its inverse DCT and chroma upsampling round differently from
libjpeg's, so its shards are cached apart (``shared.preprocess.cache_key``).

torchvision deprecates its image decoders from 0.29 in favour of TorchCodec; they are
what the GPU hosts' torchvision releases all have, so orchard uses them.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from shared.preprocess import (
    JPEG_FORMATS,
    MAX_PIXELS,
    ImageHeader,
    decode_resize_data,
    read_header,
    read_submitted,
)

#: Decoded pixels held on the device at once, summed over a batch: 64 MP (192 MB of RGB,
#: about 1 GB while they are resized in float32).
BATCH_PIXELS = 64_000_000
_ORIENTATION_TAG = 0x0112


def jpeg_facts(data: bytes) -> tuple[int, bool]:
    """A JPEG's EXIF Orientation (1-8; 1 when absent or out of range), and whether it is
    one nvJPEG decodes as libjpeg does: 8-bit grey or YCbCr.

    CMYK and YCCK JPEGs, and RGB-coded ones (an Adobe marker with transform 0, or the
    components named R, G, B), go to OpenCV: nvJPEG might not refuse them, but it is
    not known to convert them as libjpeg does.
    """
    with Image.open(io.BytesIO(data)) as image:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
        components = [layer[0] for layer in getattr(image, "layer", ())]
        ycbcr = image.info.get("adobe_transform") != 0 and components != [82, 71, 66]
        suits = getattr(image, "bits", 8) == 8 and (
            image.mode == "L" or (image.mode == "RGB" and ycbcr)
        )
    return (value if isinstance(value, int) and 1 <= value <= 8 else 1), suits


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) image turned upright, as Pillow's ``exif_transpose`` and OpenCV do."""
    match orientation:
        case 2:
            return image.flip(2)
        case 3:
            return image.flip(1, 2)
        case 4:
            return image.flip(1)
        case 5:
            return image.transpose(1, 2)
        case 6:
            return image.rot90(-1, (1, 2))
        case 7:
            return image.transpose(1, 2).flip(1, 2)
        case 8:
            return image.rot90(1, (1, 2))
    return image


@lru_cache(maxsize=64)
def area_weights(source: int, output: int) -> np.ndarray:
    """(output, source) weights of OpenCV's INTER_AREA shrinking ``source`` to ``output``.

    Output pixel ``i`` covers source positions ``[i * s, (i + 1) * s)`` with
    ``s = source / output``; each source pixel weighs the length it shares with that
    interval, divided by ``s``, so every row sums to 1.
    """
    if output > source:
        raise ValueError(f"area weights shrink: {source} -> {output} enlarges")
    scale = source / output
    starts = np.arange(output) * scale
    ends = starts + scale
    pixels = np.arange(source)
    overlap = np.minimum(ends[:, None], pixels[None, :] + 1) - np.maximum(
        starts[:, None], pixels[None, :]
    )
    return np.clip(overlap, 0, None) / scale


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) or (3, H, W) uint8 images, each as size x size, by ``decode_resize``'s rule."""
    height, width = images.shape[-2:]
    pixels = images.to(torch.float32)
    if min(height, width) >= 2 * size:
        rows = torch.from_numpy(area_weights(height, size)).to(pixels)
        cols = torch.from_numpy(area_weights(width, size)).to(pixels)
        out = rows @ pixels @ cols.T
    else:
        batch = pixels if pixels.dim() == 4 else pixels[None]
        out = F.interpolate(batch, (size, size), mode="bilinear", align_corners=False)
        out = out.view(*images.shape[:-2], size, size)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def decode_jpegs(datas: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEG bytes to (3, H, W) uint8 RGB on ``device``; None where it refuses one.

    The whole batch goes to the decoder at once (on CUDA, one batched nvJPEG call). The
    decoder gives no partial results, so when a batch fails each image is tried alone.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]

    def decode(batch: list[torch.Tensor]) -> list[torch.Tensor]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # see the module's docstring
            return decode_jpeg(batch, mode=ImageReadMode.RGB, device=device)

    try:
        return list(decode(tensors))
    except RuntimeError:
        if len(tensors) == 1:
            return [None]
    decoded: list[torch.Tensor | None] = []
    for tensor in tensors:
        try:
            decoded.extend(decode([tensor]))
        except RuntimeError:
            decoded.append(None)
    return decoded


class Decoded(NamedTuple):
    images: np.ndarray  # (n, size, size, 3) uint8 RGB, in the order of the paths
    on_device: int  # how many the device's decoder decoded; OpenCV decoded the others


def decode_shard(
    paths: Sequence[str | Path],
    size: int,
    device: torch.device,
    max_pixels: int = MAX_PIXELS,
    digests: Sequence[str | None] | None = None,
) -> Decoded:
    """:func:`shared.preprocess.preprocess_images` with the JPEGs decoded on ``device``."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    batch: list[tuple[int, Path, bytes, ImageHeader, int]] = []

    def flush() -> int:
        """Decode and resize ``batch`` into ``out``; how many the device decoded."""
        decoded = decode_jpegs([data for _, _, data, _, _ in batch], device)
        # upright images of one shape are resized together (a camera's photos: all)
        shapes: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
        for (i, path, data, header, orientation), image in zip(batch, decoded, strict=True):
            if image is None:  # refused: libjpeg may read what nvJPEG does not
                out[i] = decode_resize_data(data, header, path, size)
                continue
            image = orient(image, orientation)
            shapes.setdefault(tuple(image.shape), []).append((i, image))
        done: list[int] = []
        resized: list[torch.Tensor] = []
        for group in shapes.values():
            done.extend(i for i, _ in group)
            resized.append(resize(torch.stack([image for _, image in group]), size))
        if resized:  # one copy back to the host for the batch
            out[done] = torch.cat(resized).permute(0, 2, 3, 1).cpu().numpy()
        batch.clear()
        return len(done)

    pixels = on_device = 0
    for i, name in enumerate(paths):
        path = Path(name)
        data = read_submitted(path, digests[i] if digests else None, max_pixels)
        header = read_header(data, path, max_pixels)
        orientation, suits = jpeg_facts(data) if header.format in JPEG_FORMATS else (1, False)
        if not suits:  # other formats, CMYK, RGB-coded JPEGs: OpenCV as before
            out[i] = decode_resize_data(data, header, path, size)
            continue
        batch.append((i, path, data, header, orientation))
        pixels += header.width * header.height
        if pixels >= BATCH_PIXELS:
            on_device += flush()
            pixels = 0
    if batch:
        on_device += flush()
    return Decoded(out, on_device)
