"""The study CNN's shape as arithmetic: what :class:`shared.cnn.MangoCNN` builds, without
torch, so that a campaign file's checks (``shared.spec``) can size a network before any
worker builds it, and ``shared.memory`` can say what a fold holds on its device."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

BLOCK_CHANNELS = (32, 64, 128, 256, 512)
DENSE_FEATURES = (512, 256, 64)

#: The knobs of section 1.3.1 and their study defaults; ``shared.spec.CnnParams``
#: declares the same (a test checks they agree). Params dicts may omit any of them.
KNOB_DEFAULTS: dict[str, Any] = {
    "norm_order": "act_bn",  # the study's R -> B: activation, then BatchNorm
    "activation": "prelu",
    "pool": "max",
    "optimizer": "sgd",
    "stride": 1,
    "dense": ",".join(map(str, DENSE_FEATURES)),
    "compile": False,
}


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


@dataclass(frozen=True, slots=True)
class Network:
    """The knobs that shape a fold's network (``dense`` unscaled, as in the campaign
    file), each defaulting to the study's (:data:`KNOB_DEFAULTS`)."""

    image_size: int
    width: float = 1.0
    stride: int = KNOB_DEFAULTS["stride"]
    dense: tuple[int, ...] = DENSE_FEATURES
    activation: str = KNOB_DEFAULTS["activation"]
    pool: str = KNOB_DEFAULTS["pool"]
    norm_order: str = KNOB_DEFAULTS["norm_order"]
    num_classes: int = 3

    @classmethod
    def of(cls, params: Mapping[str, Any], num_classes: int) -> Network:
        """A unit's network: its ``params`` as stored (``dense`` a string), missing
        knobs at the study's values."""
        knobs = {**KNOB_DEFAULTS, **params}
        dense = knobs["dense"]
        if isinstance(dense, str):
            dense = dense.split(",")
        return cls(
            image_size=int(knobs["image_size"]),
            width=float(knobs.get("width", 1.0)),
            stride=int(knobs["stride"]),
            dense=tuple(int(w) for w in dense),
            activation=knobs["activation"],
            pool=knobs["pool"],
            norm_order=knobs["norm_order"],
            num_classes=num_classes,
        )

    def parameters(self) -> int:
        """Its trainable parameters: weights and biases, PReLU slopes, BatchNorm scales
        and shifts."""
        prelu = self.activation == "prelu"
        channels = [scaled(c, self.width) for c in BLOCK_CHANNELS]
        total = 0
        for cin, cout in zip([3, *channels[:-1]], channels, strict=True):
            for conv_in in (cin, cout):  # two 3x3 convs, each with its activation and norm
                total += conv_in * cout * 9 + cout + (cout if prelu else 0) + 2 * cout
            if self.pool == "conv":
                total += cout * cout * 9 + cout
        hidden = [scaled(n, self.width) for n in self.dense]
        side = feature_side(self.image_size, self.stride)
        for fin, fout in zip([channels[-1] * side * side, *hidden[:-1]], hidden, strict=True):
            total += fin * fout + fout + (1 if prelu else 0) + 2 * fout
        return total + hidden[-1] * self.num_classes + self.num_classes


# ------------------------------------------------- what a training step holds

#: input channels the first conv is padded to on CUDA (``shared.cnn.RgbConv2d``)
CUDA_INPUT_CHANNELS = 8
#: the most images a fold's predictions score at a time, on a GPU and on the CPU
#: (:func:`predict_batch`)
PREDICT_BATCH_CUDA, PREDICT_BATCH_CPU = 1024, 256
#: bytes a max pool keeps per output value for its backward pass: the argmax, int64
INDEX_BYTES = 8


@dataclass(frozen=True, slots=True)
class StepBytes:
    """Per image, in bytes: what a training step's forward pass keeps for its backward
    pass (``saved``: each tensor once, however many layers keep it) and the largest
    tensor a layer outputs (``largest``)."""

    saved: int
    largest: int


def step_bytes(
    network: Network,
    *,
    value_bytes: int = 4,
    input_channels: int = 3,
    mask_bytes: int | None = None,
) -> StepBytes:
    """What autograd keeps of one image in a training step of ``network``, layer by
    layer as ``shared.cnn.MangoCNN`` runs it eagerly: a convolution and a linear layer
    keep their input, BatchNorm its input, PReLU and LeakyReLU their input, ReLU its
    output, a max pool its input and the argmax of each output value, dropout its mask,
    and the loss the log-softmax of the logits (float32) and the targets (int64).

    ``value_bytes``: 4 in float32 (the CPU), 2 under bf16 autocast (CUDA);
    ``input_channels``: the first conv's input as it keeps it (padded to
    :data:`CUDA_INPUT_CHANNELS` on CUDA); ``mask_bytes``: a dropout mask's bytes a value
    (None: ``value_bytes``, as the CPU's dropout multiplies by a mask of the input's
    type; CUDA's keeps a byte). ``torch.compile`` keeps at most as much: it may
    recompute an activation in the backward pass instead of keeping it.
    ``tests/shared/test_cnn_memory.py`` counts what torch keeps against it."""
    kept: dict[int, int] = {}  # tensor -> its bytes
    largest = 0
    ids = itertools.count()

    def new(values: int, size: int = value_bytes) -> tuple[int, int]:
        """A tensor a layer outputs (``values`` of ``size`` bytes): (its id, its bytes)."""
        nonlocal largest
        if size == value_bytes:
            largest = max(largest, values * size)
        return next(ids), values * size

    def keep(tensor: tuple[int, int]) -> None:
        kept[tensor[0]] = tensor[1]

    def act(x: tuple[int, int]) -> tuple[int, int]:
        out = new(x[1] // value_bytes)
        keep(out if network.activation == "relu" else x)
        return out

    def norm(x: tuple[int, int]) -> tuple[int, int]:
        keep(x)
        return new(x[1] // value_bytes)

    def act_norm(x: tuple[int, int]) -> tuple[int, int]:
        if network.norm_order == "act_bn":
            return norm(act(x))
        return act(norm(x))

    side = network.image_size
    x = new(input_channels * side * side)
    for channels in BLOCK_CHANNELS:
        cout = scaled(channels, network.width)
        for conv_stride in (network.stride, 1):
            keep(x)  # the conv's input
            side = (side - 1) // conv_stride + 1
            x = act_norm(new(cout * side * side))
        keep(x)  # the pool's input
        side = (side + 1) // 2
        if network.pool == "max":
            keep(new(cout * side * side, INDEX_BYTES))
        x = new(cout * side * side)
    for fout in (scaled(n, network.width) for n in network.dense):
        keep(x)  # the linear layer's input
        x = act_norm(new(fout))
        keep(new(fout, mask_bytes or value_bytes))  # dropout's mask
        x = new(fout)
    keep(x)  # the last linear layer's input
    keep(new(network.num_classes, 4))  # the loss's log-softmax, in float32
    keep(new(1, 8))  # the loss's target
    return StepBytes(saved=sum(kept.values()), largest=largest)


@dataclass(frozen=True, slots=True)
class ImageBytes:
    """About the most memory one image of a batch takes on the device: in a training
    step (``training``) and in a prediction, with no gradients (``predicting``)."""

    training: int
    predicting: int


def image_bytes(network: Network, *, cuda: bool) -> ImageBytes:
    """An image's share of a training step and of a prediction, on a GPU (``cuda``:
    bf16 autocast) or the CPU (float32).

    A training step holds what autograd keeps for the backward pass
    (:func:`step_bytes`) and, as the backward pass starts, the gradient it passes on; it
    frees what it kept of each layer as it passes the layer, so the larger gradients of
    the first layers come when the last layers' have gone: one largest layer output is
    counted for them. The image's uint8 pixels and its float32 input come beside it
    (on the CPU the first conv keeps that input itself). A prediction holds its float32
    input and three of the largest layer output (a layer's input, its output and one
    more as it computes them: three on the CPU, to within a tenth of a percent, at each
    width and image size measured)."""
    step = step_bytes(
        network,
        value_bytes=2 if cuda else 4,
        input_channels=CUDA_INPUT_CHANNELS if cuda else 3,
        mask_bytes=1 if cuda else None,
    )
    pixels = 3 * network.image_size**2
    return ImageBytes(
        training=step.saved + step.largest + pixels * (5 if cuda else 1),
        predicting=4 * pixels + 3 * step.largest,
    )


def predict_batch(per_image: ImageBytes, batch_size: int, *, cuda: bool) -> int:
    """Images a fold's predictions score at a time: as many as fit in what a training
    batch of ``batch_size`` takes (a prediction keeps nothing for a backward pass: the
    study's CNN scores about five images in a training image's memory), at most
    :data:`PREDICT_BATCH_CUDA` (the CPU: :data:`PREDICT_BATCH_CPU`). So a fold that
    trains in a GPU's memory predicts in it too, and a smaller ``batch_size`` is the
    one knob for both."""
    most = PREDICT_BATCH_CUDA if cuda else PREDICT_BATCH_CPU
    return max(1, min(most, batch_size * per_image.training // per_image.predicting))
