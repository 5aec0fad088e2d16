"""The study CNN's shape as arithmetic: what :class:`shared.cnn.MangoCNN` builds, without
torch, so that a campaign file's checks (``shared.spec``) can size a network before any
worker builds it."""

from __future__ import annotations

from collections.abc import Sequence

BLOCK_CHANNELS = (32, 64, 128, 256, 512)
DENSE_FEATURES = (512, 256, 64)


def scaled(n: int, width: float) -> int:
    """A channel count or hidden width of the study's design, scaled by ``width``."""
    return max(1, round(n * width))


def feature_side(image_size: int, stride: int, blocks: int = len(BLOCK_CHANNELS)) -> int:
    """Side of the last feature map: the arithmetic of ``shared.cnn.conv_block``'s layers."""
    side = image_size
    for _ in range(blocks):
        side = (side - 1) // stride + 1  # Conv2d(3, stride, pad 1)
        side = (side + 1) // 2  # MaxPool2d(2, ceil_mode=True) or Conv2d(3, 2, pad 1)
    return side


def parameter_count(
    *,
    image_size: int,
    width: float,
    stride: int,
    dense: Sequence[int],
    activation: str,
    pool: str,
    num_classes: int,
) -> int:
    """The trainable parameters of the network these knobs build (``dense`` unscaled,
    as in the campaign file): weights and biases, PReLU slopes, BatchNorm scales and
    shifts."""
    prelu = activation == "prelu"
    channels = [scaled(c, width) for c in BLOCK_CHANNELS]
    total = 0
    for cin, cout in zip([3, *channels[:-1]], channels, strict=True):
        for conv_in in (cin, cout):  # two 3x3 convs, each with its activation and norm
            total += conv_in * cout * 9 + cout + (cout if prelu else 0) + 2 * cout
        if pool == "conv":
            total += cout * cout * 9 + cout
    hidden = [scaled(n, width) for n in dense]
    side = feature_side(image_size, stride)
    for fin, fout in zip([channels[-1] * side * side, *hidden[:-1]], hidden, strict=True):
        total += fin * fout + fout + (1 if prelu else 0) + 2 * fout
    return total + hidden[-1] * num_classes + num_classes
