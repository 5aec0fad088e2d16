"""``shared.cnn_shape.step_bytes`` against what autograd keeps of a real training step
(``torch.autograd.graph.saved_tensors_hooks``), for every layer order, activation and
pool, with strides, in float32 and under bf16 autocast."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
import torch.nn.functional as F

from shared.cnn import MangoCNN
from shared.cnn_shape import Network, step_bytes

DENSE = (64, 32, 16)


def _kept_bytes(model: MangoCNN, images: int, size: int, *, bf16: bool) -> int:
    """What the forward pass of a training step over ``images`` images keeps for the
    backward pass, each storage once."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.rand(images, 3, size, size)
    y = torch.randint(0, 3, (images,))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        F.cross_entropy(model(x), y)
    return sum(storages.values())


@pytest.mark.parametrize(
    ("norm_order", "activation", "pool", "stride", "bf16"),
    [
        *itertools.product(("act_bn", "bn_act"), ("prelu", "relu", "leakyrelu"), ("max", "conv"),
                           (1,), (False, True)),
        ("act_bn", "prelu", "max", 3, True),
        ("bn_act", "relu", "conv", 2, False),
    ],
)  # fmt: skip
def test_what_a_training_step_keeps_per_image(norm_order, activation, pool, stride, bf16):
    size, width = 64, 0.25
    torch.manual_seed(0)
    model = MangoCNN(
        3, image_size=size, width=width, norm_order=norm_order, activation=activation,
        pool=pool, stride=stride, dense=DENSE,
    ).train()  # fmt: skip
    # per image: the difference of two batch sizes (the weights and their bf16 copies,
    # kept once per step, cancel)
    six, four = (_kept_bytes(model, n, size, bf16=bf16) for n in (6, 4))
    per_image = (six - four) / 2
    network = Network(
        image_size=size, width=width, stride=stride, dense=DENSE, activation=activation,
        pool=pool, norm_order=norm_order, num_classes=3,
    )  # fmt: skip
    estimate = step_bytes(network, value_bytes=2 if bf16 else 4)
    assert estimate.saved == per_image


def test_the_study_network_keeps_tens_of_megabytes_an_image_in_bf16():
    """The study's CNN at 224 px on a GPU: its first block's maps are the largest (32
    channels at full size, a few of them kept per conv) and bf16 halves float32's."""
    study = Network(image_size=224)  # the study's knobs are the defaults
    bf16 = step_bytes(study, value_bytes=2, input_channels=8)
    fp32 = step_bytes(study)
    assert bf16.largest == 32 * 224 * 224 * 2 and fp32.largest == 2 * bf16.largest
    # the max pools' argmax stays int64 under autocast
    assert 30e6 < bf16.saved < 60e6 and 1.8 * bf16.saved < fp32.saved < 2 * bf16.saved


def test_a_unit_s_network_takes_the_study_s_knobs_where_its_params_omit_them():
    from shared.cnn import KNOB_DEFAULTS

    stored = {**KNOB_DEFAULTS, "image_size": 128, "width": 0.5}
    assert Network.of({"image_size": 128, "width": 0.5}, 3) == Network.of(stored, 3)
    network = Network.of({**stored, "dense": "64,32", "activation": "relu"}, 2)
    assert network.dense == (64, 32) and network.activation == "relu"
    assert network.num_classes == 2 and network.parameters() > 0
