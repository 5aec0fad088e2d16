"""The study's CNN, its variants, and the training loop for one cross-validation fold.

Architecture (the study's table, section 1.3), per block twice
``Conv2d(3x3, stride 1, pad 1) -> PReLU(c) -> BatchNorm2d(c)`` then ``MaxPool2d(2)``,
blocks of 32, 64, 128, 256, 512 channels; then dense 512*7*7 -> 512 -> 256 -> 64 with
``Linear -> PReLU() -> BatchNorm1d -> Dropout`` and a final ``Linear(64, classes)``.

The variants the study compared (section 1.3.1) are data, not classes: one builder
reads ``norm_order``, ``activation``, ``pool``, ``stride`` and ``dense`` from the
params, as timm builds its model variants from configs. ``width`` scales every
channel and hidden size, ``image_size`` the input, so a CPU demo can train the same
design small. The architecture's defaults are the study's at 224x224; the study gives no
epochs, batch size, learning rate, momentum or weight decay, so those defaults
(``shared.spec.CnnParams``) are orchard's own (README: Where the runs differ).

Training data arrive as the uint8 ``crop224`` cache (centre crop of a 256 resize, as
in the study). The whole set is moved to the device once; batches are gathered,
augmented (``shared.augment``) and normalised there. On CUDA the step runs in bf16
autocast with channels-last tensors, cuDNN autotuning, a fused optimiser and
optionally ``torch.compile``; loss and accuracy stay on the device until the end of
an epoch, so no step waits for the host. On the CPU everything is fp32 and eager, and
a fixed seed gives the same weights every time, also across a checkpoint and resume.

This module imports neither pydantic nor OpenCV at import time, so the throughput
benchmark can load it on a bare GPU image.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.augment import AugmentParams, augment_batch, constant, sample_params
from shared.cnn_shape import (
    BLOCK_CHANNELS,
    CUDA_INPUT_CHANNELS,
    DENSE_FEATURES,
    KNOB_DEFAULTS,
    PREDICT_BATCH_CPU,
    PREDICT_BATCH_CUDA,
    Network,
    feature_side,
    image_bytes,
    predict_batch,
)
from shared.cnn_shape import scaled as _scaled
from shared.errors import OrchardError

STUDY_MEAN = (0.485, 0.456, 0.406)
STUDY_STD = (0.229, 0.256, 0.225)  # sic: the study's value for green

NORM_ORDERS = ("act_bn", "bn_act")
ACTIVATIONS = ("prelu", "relu", "leakyrelu")
POOLS = ("max", "conv")
OPTIMIZERS = ("sgd", "adam")
CHECKPOINT_FORMAT = 1


def knob(params: dict[str, Any], name: str) -> Any:
    return params.get(name, KNOB_DEFAULTS[name])


def parse_dense(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"512,256,64"`` -> (512, 256, 64); the hidden widths of the dense head."""
    if isinstance(text, str):
        try:
            widths = tuple(int(part) for part in text.split(","))
        except ValueError:
            raise ValueError(f"dense must be comma-separated integers, got {text!r}") from None
    else:
        widths = tuple(int(w) for w in text)
    if not widths or any(w < 1 for w in widths):
        raise ValueError(f"dense must list at least one positive width, got {text!r}")
    return widths


def _choice(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def activation_layer(kind: str, channels: int | None) -> nn.Module:
    """``channels`` None: one shared PReLU slope, as the study's dense layers have."""
    if kind == "prelu":
        return nn.PReLU(channels) if channels is not None else nn.PReLU()
    if kind == "relu":
        return nn.ReLU()
    return nn.LeakyReLU(0.01)


def _act_norm(kind: str, order: str, act_channels: int | None, norm: nn.Module) -> list:
    act = activation_layer(kind, act_channels)
    return [act, norm] if order == "act_bn" else [norm, act]


class StudyConv2d(nn.Conv2d):
    """``nn.Conv2d``, with the option of adding its bias by a separate op.

    With ``bias_apart`` set (``prepare_model(bias_apart=True)``, an alternative for the
    compiled CUDA path that ``bench/train_throughput.py --bias-apart`` measures) the
    convolution runs without its bias and the bias is added after it. The values and
    gradients are the same; compiled, the add and the bias's gradient (a sum over the
    output's gradient) can join the neighbouring generated kernels instead of costing
    cuDNN its own pass over the map. The state dict is a plain conv's.
    """

    bias_apart: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._with_bias(x, self.weight)

    def _with_bias(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.bias is None or not self.bias_apart:
            return self._conv_forward(x, weight, self.bias)
        out = self._conv_forward(x, weight, None)
        return out + self.bias.view(1, -1, 1, 1).to(out.dtype)


class RgbConv2d(StudyConv2d):
    """The first conv, over 3 colour channels; the same parameters as ``nn.Conv2d``.

    With ``pad_channels`` set (``prepare_model`` does on CUDA) the input and the
    weight get zero channels up to that count before the convolution, which gives
    the same result (a zero channel adds nothing and its weight gets no gradient)
    but lets cuDNN use its channels-last tensor-core kernels, which want 4 or 8
    input channels, as NVIDIA's ResNet pads its RGB input to 4. The state dict is a
    plain conv's.
    """

    pad_channels: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.pad_channels - self.in_channels
        if extra <= 0:
            return self._with_bias(x, self.weight)
        x = F.pad(x, (0, 0, 0, 0, 0, extra))
        if x.dim() == 4 and x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._with_bias(x, F.pad(self.weight, (0, 0, 0, 0, 0, extra)))


def conv_block(
    in_channels: int,
    out_channels: int,
    *,
    stride: int = 1,
    norm_order: str = "act_bn",
    activation: str = "prelu",
    pool: str = "max",
) -> nn.Sequential:
    """Two ``Conv2d(3x3, pad 1)`` with activation and BatchNorm, then a 2x downsampling.

    Only the first conv takes ``stride``. ``MaxPool2d(2, ceil_mode=True)`` is the
    table's ``MaxPool2d(2)`` on every even map (all of them at stride 1), and keeps
    an odd map's last row instead of dropping it, so strided variants (the study
    tried 3, 5, 7) still end on at least 1x1; ``pool = "conv"`` is the study's
    alternative, a 3x3 stride-2 conv, which halves a map the same way.
    """
    layers: list[nn.Module] = []
    for cin, conv_stride in ((in_channels, stride), (out_channels, 1)):
        conv = RgbConv2d if cin == 3 else StudyConv2d
        layers.append(conv(cin, out_channels, 3, conv_stride, 1))
        layers += _act_norm(activation, norm_order, out_channels, nn.BatchNorm2d(out_channels))
    if pool == "max":
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
    else:
        layers.append(nn.Conv2d(out_channels, out_channels, 3, 2, 1))
    return nn.Sequential(*layers)


# ------------------------------------------- BatchNorm folded into the next layer


#: a BatchNorm's batch statistics as a per-channel map ``a * x + b`` (a, b)
Affine = tuple[torch.Tensor, torch.Tensor]


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when it is in a narrower float (bf16 under autocast)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _batch_affine(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> Affine:
    """Training-mode ``bn(x)`` as the per-channel map ``a * x + b``, not applied; the
    running estimates and the batch count are updated as ``bn`` itself does."""
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(_wide(x), dim=dims, correction=0)
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1 / bn.num_batches_tracked
            n = x.numel() // x.size(1)
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
            unbiased = var * (n / max(n - 1, 1))
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), momentum)
    a = torch.rsqrt(var + bn.eps)
    if bn.affine:
        a = a * bn.weight
        return a, bn.bias - mean * a
    return a, -mean * a


def _apply(x: torch.Tensor, affine: Affine) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    a, b = (t.view(shape) for t in affine)
    return (_wide(x) * a + b).to(x.dtype)


def _conv_of_affine(conv: nn.Conv2d, x: torch.Tensor, affine: Affine) -> torch.Tensor:
    """``conv(a * x + b)`` without writing ``a * x + b``: ``a`` scales the weight's
    input channels, and ``b``, convolved alone, is a bias that differs at the border
    (where the conv's zero padding meets it) from the middle."""
    a, b = affine
    out = conv._conv_forward(x, conv.weight * a.view(1, -1, 1, 1).to(conv.weight.dtype), None)
    with torch.autocast(x.device.type, enabled=False):  # the shift in float32
        shift = _wide(b).view(1, -1, 1, 1).expand(1, -1, *x.shape[2:]).contiguous()
        bias = None if conv.bias is None else _wide(conv.bias)
        weight = _wide(conv.weight)
        bias_map = F.conv2d(shift, weight, bias, conv.stride, conv.padding, conv.dilation)
    return (_wide(out) + bias_map).to(out.dtype)


def _foldable_conv(layer: nn.Module) -> bool:
    return (
        isinstance(layer, nn.Conv2d)
        and layer.groups == 1
        and layer.padding_mode == "zeros"
        and isinstance(layer.padding, tuple)
        and not (isinstance(layer, RgbConv2d) and layer.pad_channels > layer.in_channels)
    )


def folded_forward(layers: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``layers`` applied in turn, each training-mode BatchNorm folded into the layer
    after it where that layer can take it (:attr:`MangoCNN.fold_norm`).

    A BatchNorm becomes the per-channel map ``a * x + b`` of its batch statistics,
    carried instead of applied: the next conv or linear layer takes ``a`` into its
    weight and ``b`` into its bias (:func:`_conv_of_affine`); a max-pool passes it
    on (pooling ``sign(a) * x`` and carrying ``|a|``), and a flatten spreads it over
    the features. Any other layer gets the map applied first. The values and
    gradients are the modules' own; what it saves, on a GPU, is the pass that writes
    each normalised map and, in the backward pass, the pass that sums its gradient
    for BatchNorm (the statistics' gradients come from the small weights instead).
    """
    pending: Affine | None = None
    for layer in layers:
        if pending is not None:
            a, b = pending
            if _foldable_conv(layer):
                x, pending = _conv_of_affine(layer, x, pending), None
                continue
            if isinstance(layer, nn.MaxPool2d) and x.dim() == 4:
                sign = torch.where(a < 0, -1.0, 1.0)
                x, pending = layer(x * sign.view(1, -1, 1, 1).to(x.dtype)), (a * sign, b)
                continue
            if isinstance(layer, nn.Flatten) and x.dim() == 4 and layer.start_dim == 1:
                area = x.shape[2] * x.shape[3]
                x = layer(x)
                pending = (a.repeat_interleave(area), b.repeat_interleave(area))
                continue
            if isinstance(layer, nn.Linear) and x.dim() == 2:
                weight = layer.weight * a.to(layer.weight.dtype)
                shift = (_wide(layer.weight) * b).sum(1)
                bias = shift if layer.bias is None else shift + layer.bias
                x, pending = F.linear(x, weight, bias.to(layer.weight.dtype)), None
                continue
            x, pending = _apply(x, pending), None
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.training:
            pending = _batch_affine(layer, x)
        else:
            x = layer(x)
    return x if pending is None else _apply(x, pending)


class MangoCNN(nn.Module):
    """The study's CNN. With ``fold_norm`` set (``prepare_model(fold_norm=True)``, an
    alternative for the compiled CUDA path that ``bench/train_throughput.py
    --fold-norm`` measures), training runs through :func:`folded_forward`; evaluation,
    the state dict and checkpoints are the same either way."""

    fold_norm: bool = False

    def __init__(
        self,
        num_classes: int = 3,
        *,
        image_size: int = 224,
        width: float = 1.0,
        dropout: float = 0.5,
        norm_order: str = "act_bn",
        activation: str = "prelu",
        pool: str = "max",
        stride: int = 1,
        dense: str | Sequence[int] = DENSE_FEATURES,
    ) -> None:
        super().__init__()
        if image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {image_size}")
        if stride < 1:
            raise ValueError(f"stride must be at least 1, got {stride}")
        _choice("norm_order", norm_order, NORM_ORDERS)
        _choice("activation", activation, ACTIVATIONS)
        _choice("pool", pool, POOLS)
        side = feature_side(image_size, stride)
        if side < 1:
            raise ValueError(
                f"stride {stride} shrinks a {image_size}x{image_size} image to nothing "
                f"in {len(BLOCK_CHANNELS)} blocks"
            )
        channels = [_scaled(c, width) for c in BLOCK_CHANNELS]
        self.features = nn.Sequential(
            *(
                conv_block(
                    cin,
                    cout,
                    stride=stride,
                    norm_order=norm_order,
                    activation=activation,
                    pool=pool,
                )
                for cin, cout in zip([3, *channels[:-1]], channels, strict=True)
            )
        )
        self.feature_side = side
        hidden = [_scaled(n, width) for n in parse_dense(dense)]
        layers: list[nn.Module] = [nn.Flatten()]
        for fin, fout in zip([channels[-1] * side * side, *hidden[:-1]], hidden, strict=True):
            layers.append(nn.Linear(fin, fout))
            layers += _act_norm(activation, norm_order, None, nn.BatchNorm1d(fout))
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden[-1], num_classes))
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fold_norm and self.training:
            layers = [layer for block in self.features for layer in block]
            return folded_forward([*layers, *self.classifier], x)
        return self.classifier(self.features(x))  # (B, classes) logits


def build_model(params: dict[str, Any], num_classes: int) -> MangoCNN:
    return MangoCNN(
        num_classes,
        image_size=params["image_size"],
        width=params["width"],
        dropout=params["dropout"],
        norm_order=knob(params, "norm_order"),
        activation=knob(params, "activation"),
        pool=knob(params, "pool"),
        stride=knob(params, "stride"),
        dense=knob(params, "dense"),
    )


def make_optimizer(
    model: nn.Module, params: dict[str, Any], device: torch.device
) -> torch.optim.Optimizer:
    """SGD with momentum (the study's) or Adam; one fused kernel per step on CUDA."""
    kind = _choice("optimizer", knob(params, "optimizer"), OPTIMIZERS)
    fused = {"fused": True} if device.type == "cuda" else {}
    if kind == "adam":
        return torch.optim.Adam(
            model.parameters(), lr=params["lr"], weight_decay=params["weight_decay"], **fused
        )
    return torch.optim.SGD(
        model.parameters(),
        lr=params["lr"],
        momentum=params["momentum"],
        weight_decay=params["weight_decay"],
        **fused,
    )


def compile_options(*, tune: bool = True, cudagraphs: bool = False) -> dict[str, Any]:
    """Inductor's options for orchard's compiled paths.

    ``tune``: coordinate-descent tuning of the generated kernels' launch configs,
    which speeds up the BatchNorm/PReLU reductions over channels-last maps (on an
    H200, 8.5k against 8.1k img/s for the study's CNN) for a longer first compile.
    ``cudagraphs``: replay each step as CUDA graphs (``mode="reduce-overhead"``).
    """
    return {"coordinate_descent_tuning": tune, "triton.cudagraphs": cudagraphs}


def prepare_model(
    model: nn.Module,
    device: torch.device,
    *,
    compile: bool = False,
    mode: str | None = None,
    pad_input: int | None = None,
    options: dict[str, Any] | None = None,
    bias_apart: bool = False,
    fold_norm: bool = False,
) -> nn.Module:
    """The module to train with: channels-last, RGB padded (and compiled, if asked) on CUDA.

    Returns ``model`` itself on the CPU. The compiled wrapper shares ``model``'s
    parameters, so the optimiser, checkpoints and evaluation use ``model``. ``mode``
    is ``torch.compile``'s (None: :func:`compile_options`, or ``options``);
    ``pad_input`` the first conv's padded channel count (None:
    :data:`CUDA_INPUT_CHANNELS`; 0: no padding); ``bias_apart`` each conv's bias
    added by its own op (:class:`StudyConv2d`; off by default: not yet measured faster);
    ``fold_norm`` each BatchNorm folded into the next layer in training
    (:func:`folded_forward`; off by default, likewise).
    """
    if device.type != "cuda":
        return model
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest conv
    model.to(memory_format=torch.channels_last)
    if isinstance(model, MangoCNN):
        model.fold_norm = fold_norm
    for module in model.modules():
        if isinstance(module, StudyConv2d):
            module.bias_apart = bias_apart
        if isinstance(module, RgbConv2d):
            module.pad_channels = CUDA_INPUT_CHANNELS if pad_input is None else pad_input
    if not compile:
        return model
    if mode is not None:
        return torch.compile(model, mode=mode)
    return torch.compile(model, options=options or compile_options())


# ---------------------------------------------------------------- data on the device


def resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    """(n, H, W, 3) uint8 -> (n, size, size, 3) uint8; a no-op at the cached size."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    import cv2  # only when resizing: keeps the module importable without OpenCV

    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return out


#: Images moved to the device, and laid out channels-first, at a time by :func:`to_device`.
TO_DEVICE_CHUNK = 1024


@dataclass(frozen=True, slots=True)
class Rows:
    """The ``index`` rows of ``images``, gathered a slice at a time as they are read: a
    fold's split without a copy of it beside the images the worker holds."""

    images: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.images[self.index[rows]]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.images.shape[1:])


def to_device(
    images: np.ndarray | Rows, device: torch.device, size: int | None = None
) -> torch.Tensor:
    """uint8 NHWC images -> uint8 NCHW tensor on ``device`` (4x smaller than float),
    resized to ``size`` where given, :data:`TO_DEVICE_CHUNK` images at a time: a
    channels-first, resized or gathered (:class:`Rows`) copy of the whole split on the
    host would be one more beside the images the worker holds, and on the device one
    beside the split, where a large dataset fills the card."""
    n, height, width, channels = images.shape
    if size is not None:
        height = width = size
    out = torch.empty((n, channels, height, width), dtype=torch.uint8, device=device)
    for start in range(0, n, TO_DEVICE_CHUNK):
        chunk = np.ascontiguousarray(images[start : start + TO_DEVICE_CHUNK])
        if size is not None:
            chunk = resize_batch(chunk, size)
        moved = torch.from_numpy(chunk).to(device)
        out[start : start + TO_DEVICE_CHUNK] = moved.permute(0, 3, 1, 2)
    return out


def normalise(batch: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] or float in [0, 1] -> the study's Normalize, float32."""
    mean = constant(STUDY_MEAN, batch.device).view(1, 3, 1, 1)
    std = constant(STUDY_STD, batch.device).view(1, 3, 1, 1)
    x = batch.float() if batch.is_floating_point() else batch.float() / 255.0
    return (x - mean) / std


def _fast(device: torch.device) -> bool:
    return device.type == "cuda"


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if _fast(device):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _network_input(batch: torch.Tensor) -> torch.Tensor:
    x = normalise(batch)
    if _fast(x.device):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _augmented_input(batch: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    return _network_input(augment_batch(batch, params))


def model_inputs(
    batch: torch.Tensor,
    *,
    augment: bool,
    generator: torch.Generator | None = None,
    transform: Callable[[torch.Tensor, AugmentParams], torch.Tensor] = _augmented_input,
) -> torch.Tensor:
    """uint8 batch -> what the network sees: augmented (training only), normalised.

    The random choices are drawn here, eagerly, from ``generator``; ``transform``
    applies them (a compiled one, see :func:`prepare_inputs`)."""
    if not augment:
        return _network_input(batch)
    if generator is None:
        raise ValueError("augmentation needs a generator")
    n, _, h, w = batch.shape
    return transform(batch, sample_params(n, h, w, generator, batch.device))


def prepare_inputs(
    device: torch.device, *, compile: bool = False, options: dict[str, Any] | None = None
) -> Callable[[torch.Tensor, AugmentParams], torch.Tensor]:
    """The training batches' transform: augmentation, normalisation, channels-last.

    Compiled on CUDA when asked, so the warp, the colour jitter and the
    normalisation run as a few fused kernels instead of dozens; the random draws
    stay outside the graph (a ``torch.Generator`` cannot be traced).
    """
    if compile and device.type == "cuda":
        return torch.compile(_augmented_input, options=options or compile_options())
    return _augmented_input


# ---------------------------------------------------------------- one epoch each way


@dataclass(frozen=True, slots=True)
class EpochStats:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    seconds: float


def train_one_epoch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    batch_size: int,
    augment: bool,
    generator: torch.Generator,
    transform: Callable[[torch.Tensor, AugmentParams], torch.Tensor] = _augmented_input,
) -> tuple[float, float]:
    """One pass in a random order; returns (mean loss, accuracy) over the pass.

    ``images`` are uint8 NCHW on the training device. The only host sync is at the end.
    ``transform`` augments and normalises a batch (:func:`prepare_inputs`).
    """
    model.train()
    device = images.device
    order = torch.randperm(len(images), generator=generator, device=generator.device)
    order = order.to(device)
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if len(idx) < 2:  # BatchNorm cannot train on a batch of one
            continue
        x = model_inputs(images[idx], augment=augment, generator=generator, transform=transform)
        y = labels[idx]
        with _autocast(device):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach() * len(idx)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(idx)
    seen = max(seen, 1)
    return total_loss.item() / seen, correct.item() / seen


@torch.no_grad()
def predict_proba(
    model: nn.Module, images: torch.Tensor, batch_size: int | None = None
) -> torch.Tensor:
    """Softmax over ``images`` (uint8 NCHW) in eval mode, no augmentation, on their device."""
    model.eval()
    device = images.device
    batch_size = batch_size or (PREDICT_BATCH_CUDA if _fast(device) else PREDICT_BATCH_CPU)
    chunks = []
    for s in range(0, len(images), batch_size):
        with _autocast(device):
            logits = model(model_inputs(images[s : s + batch_size], augment=False))
        chunks.append(F.softmax(logits.float(), dim=1))
    if not chunks:
        out_features = next(m for m in reversed(list(model.modules())) if isinstance(m, nn.Linear))
        return torch.empty(0, out_features.out_features, device=device)
    return torch.cat(chunks)


def fold_predict_batch(params: dict[str, Any], num_classes: int, device: torch.device) -> int:
    """Images a fold scores at a time on ``device``: as many as fit in a training
    batch's memory (``shared.cnn_shape.predict_batch``)."""
    cuda = _fast(device)
    per_image = image_bytes(Network.of(params, num_classes), cuda=cuda)
    return predict_batch(per_image, params["batch_size"], cuda=cuda)


def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int | None = None
) -> tuple[float, float, torch.Tensor]:
    """(loss, accuracy, probabilities) with no augmentation and no dropout."""
    probs = predict_proba(model, images, batch_size)
    if len(labels) == 0:
        return float("nan"), float("nan"), probs
    loss = F.nll_loss(torch.log(probs.clamp_min(1e-12)), labels)
    acc = (probs.argmax(1) == labels).float().mean()
    return loss.item(), acc.item(), probs


# ---------------------------------------------------------------- checkpoints


def _snapshot(value: Any) -> Any:
    """A deep copy with every tensor detached onto the CPU: later steps cannot change it."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_snapshot(v) for v in value)
    return value


def _rng_states(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    states: dict[str, Any] = {
        "generator": generator.get_state(),  # batch order and augmentation
        "generator_device": generator.device.type,
        "torch": torch.get_rng_state(),  # dropout on the CPU
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)  # dropout on the GPU
    return states


def _restore_rng(
    states: dict[str, Any], generator: torch.Generator, device: torch.device, reseed: int
) -> None:
    """Exact on the device type that wrote the checkpoint; a fresh seeded stream elsewhere
    (a CPU and a CUDA generator have different states)."""
    if states.get("generator_device") == generator.device.type:
        generator.set_state(states["generator"])
    else:
        generator.manual_seed(reseed)
    torch.set_rng_state(states["torch"])
    if device.type == "cuda":
        if "cuda" in states:
            torch.cuda.set_rng_state(states["cuda"], device)
        else:
            torch.cuda.manual_seed(reseed)


def checkpoint_problem(
    checkpoint: dict[str, Any], params: dict[str, Any], num_classes: int
) -> str | None:
    """Why ``checkpoint`` cannot continue this training run, or None if it can."""
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        return "not an orchard CNN checkpoint of a known format"
    if checkpoint.get("num_classes") != num_classes:
        return f"checkpoint has {checkpoint.get('num_classes')} classes, not {num_classes}"
    saved = checkpoint.get("params")
    if saved != dict(params):
        changed = sorted(
            k for k in set(saved or {}) | set(params) if (saved or {}).get(k) != params.get(k)
        )
        return f"checkpoint was trained with other params ({', '.join(changed)})"
    done = checkpoint.get("epochs_done")
    if not isinstance(done, int) or not 1 <= done <= params["epochs"]:
        return f"checkpoint says {done!r} epochs done, of {params['epochs']}"
    return None


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    optimizer.load_state_dict(state)
    # buffers saved from a contiguous model must match a channels-last one's strides
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if (
                    isinstance(value, torch.Tensor)
                    and value.shape == param.shape
                    and value.stride() != param.stride()
                ):
                    optimizer.state[param][name] = torch.empty_like(param).copy_(value)


# ---------------------------------------------------------------- one fold


@dataclass
class FoldOutcome:
    history: list[EpochStats]
    train_acc: float
    val_acc: float
    val_probs: np.ndarray
    test_probs: np.ndarray
    # this call's time, and the epochs' of the deliveries it resumed from (a fold's
    # training time, however many times its worker stopped)
    seconds: float
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    resumed_from_epoch: int = 0  # epochs already done when this call started


def pick_device(preferred: str | None = None) -> torch.device:
    if preferred:
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_device(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H200)``, or ``cpu (no CUDA device)``: for the worker's log, so
    that a fold silently trained on the CPU of a GPU host shows."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu" and not torch.cuda.is_available():
        return "cpu (no CUDA device)"
    return str(device)


class TrainingDivergedError(OrchardError, ArithmeticError):
    """A fold's training loss became NaN or infinite: its weights with it."""


def train_fold(
    train_images: np.ndarray | Rows,
    train_labels: np.ndarray,
    val_images: np.ndarray | Rows,
    val_labels: np.ndarray,
    test_images: np.ndarray | Rows,
    params: dict[str, Any],
    *,
    num_classes: int,
    seed: int,
    device: torch.device | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    resume: dict[str, Any] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    unit_key: str | None = None,
) -> FoldOutcome:
    """Train the CNN on one fold; images are (n, H, W, 3) uint8 crops, or the
    :class:`Rows` of them that a split takes from the images of every split.

    ``on_checkpoint`` gets, after every epoch, a self-describing dict (model,
    optimiser and RNG states, history, params) that ``torch.load(weights_only=True)``
    can read back; passing it as ``resume`` continues with the next epoch, and on the
    CPU ends with exactly the weights an uninterrupted run ends with.
    """
    started = time.perf_counter()
    device = device or pick_device()
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    size = params["image_size"]

    def tensors(images: np.ndarray | Rows) -> torch.Tensor:
        return to_device(images, device, size)

    x_train, x_val, x_test = tensors(train_images), tensors(val_images), tensors(test_images)
    y_train = torch.as_tensor(train_labels, dtype=torch.long, device=device)
    y_val = torch.as_tensor(val_labels, dtype=torch.long, device=device)

    model = build_model(params, num_classes).to(device)
    compile_ = bool(knob(params, "compile"))
    trained = prepare_model(model, device, compile=compile_)
    scored = fold_predict_batch(params, num_classes, device)
    transform = prepare_inputs(device, compile=compile_)
    optimizer = make_optimizer(model, params, device)
    history: list[EpochStats] = []
    if resume is not None:
        problem = checkpoint_problem(resume, params, num_classes)
        if problem is not None:
            raise ValueError(f"cannot resume: {problem}")
        model.load_state_dict(resume["model"])
        _load_optimizer_state(optimizer, resume["optimizer"])
        history = [EpochStats(**h) for h in resume["history"]][: resume["epochs_done"]]
        _restore_rng(resume["rng"], generator, device, reseed=seed + 1_000_003 * len(history))
    resumed_from = len(history)

    for epoch in range(resumed_from, params["epochs"]):
        epoch_start = time.perf_counter()
        train_loss, train_acc = train_one_epoch(
            trained,
            x_train,
            y_train,
            optimizer,
            batch_size=params["batch_size"],
            augment=params["augment"],
            generator=generator,
            transform=transform,
        )
        if not math.isfinite(train_loss):
            # its weights are NaN from here on: every epoch left would be spent for nothing
            raise TrainingDivergedError(
                f"the training diverged in epoch {epoch + 1}: its loss is {train_loss} "
                f"(lr = {params['lr']}: a smaller one may train)"
            )
        val_loss, val_acc, _ = evaluate(model, x_val, y_val, scored)
        stats = EpochStats(
            epoch, train_loss, train_acc, val_loss, val_acc, time.perf_counter() - epoch_start
        )
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
        if on_checkpoint is not None:
            on_checkpoint(
                {
                    "format": CHECKPOINT_FORMAT,
                    "epoch": epoch,  # 0-based, like EpochStats.epoch and metric steps
                    "epochs_done": epoch + 1,
                    "model": _snapshot(model.state_dict()),
                    "optimizer": _snapshot(optimizer.state_dict()),
                    "scaler": None,  # bf16 autocast needs no loss scaling
                    "rng": _snapshot(_rng_states(generator, device)),
                    "history": [asdict(h) for h in history],
                    "params": dict(params),
                    "num_classes": num_classes,
                    "seed": seed,
                    "unit_key": unit_key,
                    "device": device.type,
                }
            )

    _, final_train_acc, _ = evaluate(model, x_train, y_train, scored)
    _, final_val_acc, val_probs = evaluate(model, x_val, y_val, scored)
    test_probs = predict_proba(model, x_test, scored)
    return FoldOutcome(
        history=history,
        train_acc=final_train_acc,
        val_acc=final_val_acc,
        val_probs=val_probs.cpu().numpy(),
        test_probs=test_probs.cpu().numpy(),
        seconds=time.perf_counter() - started + sum(h.seconds for h in history[:resumed_from]),
        state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
        resumed_from_epoch=resumed_from,
    )
