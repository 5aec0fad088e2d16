"""The study's CNN: architecture against the table, its knobs, one tiny fold, checkpoints."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from shared.cnn import (
    KNOB_DEFAULTS,
    STUDY_MEAN,
    STUDY_STD,
    EpochStats,
    MangoCNN,
    TrainingDivergedError,
    build_model,
    feature_side,
    make_optimizer,
    normalise,
    parse_dense,
    resize_batch,
    to_device,
    train_fold,
)
from shared.spec import CnnParams
from tests.conftest import load_bench

CPU = torch.device("cpu")


def _study_parameter_count(num_classes: int = 3) -> int:
    """Learnable parameters of the study's table, computed from first principles."""
    total = 0
    cin = 3
    for cout in (32, 64, 128, 256, 512):
        for conv_in in (cin, cout):  # two convs per block
            total += 3 * 3 * conv_in * cout + cout  # Conv2d weights + bias
            total += cout  # PReLU(c): one slope per channel
            total += 2 * cout  # BatchNorm2d(c): weight and bias
        cin = cout
    fin = 512 * 7 * 7
    for fout in (512, 256, 64):
        total += fin * fout + fout  # Linear
        total += 1  # PReLU(): a single shared slope
        total += 2 * fout  # BatchNorm1d
        fin = fout
    total += 64 * num_classes + num_classes  # final Linear
    return total


@pytest.fixture(scope="module")
def study_model() -> MangoCNN:
    torch.manual_seed(0)
    return MangoCNN(3, image_size=224, width=1.0)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_parameter_count_matches_study_table(study_model):
    assert _study_parameter_count() == 17_713_382  # sanity of the hand computation
    assert _count(study_model) == _study_parameter_count()


def test_parameter_count_other_class_count():
    assert _count(MangoCNN(5, image_size=224)) == _study_parameter_count(5)


def test_block_layer_order_and_conv_geometry(study_model):
    blocks = list(study_model.features)
    assert len(blocks) == 5
    expected = [
        nn.Conv2d,
        nn.PReLU,
        nn.BatchNorm2d,
        nn.Conv2d,
        nn.PReLU,
        nn.BatchNorm2d,
        nn.MaxPool2d,
    ]
    cin = 3
    for block, channels in zip(blocks, (32, 64, 128, 256, 512), strict=True):
        assert len(block) == len(expected)
        for layer, kind in zip(block, expected, strict=True):
            assert isinstance(layer, kind), (layer, kind)  # the first conv: RgbConv2d
        convs = [layer for layer in block if isinstance(layer, nn.Conv2d)]
        assert [(c.in_channels, c.out_channels) for c in convs] == [
            (cin, channels),
            (channels, channels),
        ]
        for conv in convs:
            assert conv.kernel_size == (3, 3)
            assert conv.stride == (1, 1)
            assert conv.padding == (1, 1)
        prelus = [layer for layer in block if isinstance(layer, nn.PReLU)]
        assert all(p.num_parameters == channels for p in prelus)
        norms = [layer for layer in block if isinstance(layer, nn.BatchNorm2d)]
        assert all(n.num_features == channels for n in norms)
        pool = block[-1]
        assert pool.kernel_size == 2
        cin = channels


def test_classifier_layout(study_model):
    layers = list(study_model.classifier)
    linears = [layer for layer in layers if isinstance(layer, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [
        (25088, 512),
        (512, 256),
        (256, 64),
        (64, 3),
    ]
    assert linears[0].in_features == 512 * 7 * 7
    dropouts = [layer for layer in layers if isinstance(layer, nn.Dropout)]
    assert len(dropouts) == 3
    assert all(d.p == 0.5 for d in dropouts)
    prelus = [layer for layer in layers if isinstance(layer, nn.PReLU)]
    assert len(prelus) == 3
    assert all(p.num_parameters == 1 for p in prelus)
    hidden = [type(layer) for layer in layers[1:5]]
    assert hidden == [nn.Linear, nn.PReLU, nn.BatchNorm1d, nn.Dropout]
    assert isinstance(layers[-1], nn.Linear)


def test_forward_at_224_batch_two(study_model):
    study_model.eval()
    with torch.no_grad():
        out = study_model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 3)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- tiny configurations


@pytest.mark.parametrize(("image_size", "batch"), [(32, 4), (64, 3)])
def test_tiny_forward_backward(image_size, batch):
    torch.manual_seed(0)
    model = MangoCNN(3, image_size=image_size, width=0.125)
    model.train()
    x = torch.randn(batch, 3, image_size, image_size)
    out = model(x)
    assert out.shape == (batch, 3)
    assert not torch.isnan(out).any()
    loss = nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 0][:batch]))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


def test_width_scales_channels():
    model = MangoCNN(3, image_size=32, width=0.125)
    convs = [m for m in model.features.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs[::2]] == [4, 8, 16, 32, 64]
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [lin.out_features for lin in linears] == [64, 32, 8, 3]
    assert linears[0].in_features == 64 * 1 * 1
    wider = MangoCNN(3, image_size=32, width=0.25)
    assert _count(wider) > _count(model)


@pytest.mark.parametrize("image_size", [48, 100, 225])
def test_image_size_must_be_multiple_of_32(image_size):
    with pytest.raises(ValueError, match="multiple of 32"):
        MangoCNN(3, image_size=image_size, width=0.125)


def test_build_model_from_params():
    params = CnnParams(width=0.125, image_size=64, dropout=0.25).model_dump()
    model = build_model(params, num_classes=4)
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert linears[0].in_features == 64 * 2 * 2
    assert linears[-1].out_features == 4
    assert all(d.p == 0.25 for d in model.classifier if isinstance(d, nn.Dropout))


# ---------------------------------------------------------------- data helpers


def test_normalise_uses_study_mean_and_std():
    assert STUDY_MEAN == (0.485, 0.456, 0.406)
    assert STUDY_STD == (0.229, 0.256, 0.225)
    batch = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    out = normalise(batch)
    assert out.dtype == torch.float32
    for c in range(3):
        assert out[0, c].flatten()[0].item() == pytest.approx(-STUDY_MEAN[c] / STUDY_STD[c])
        assert out[1, c].flatten()[0].item() == pytest.approx((1 - STUDY_MEAN[c]) / STUDY_STD[c])


def test_to_device_is_nchw_uint8_and_resize_batch(monkeypatch: pytest.MonkeyPatch):
    import shared.cnn

    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    monkeypatch.setattr(shared.cnn, "TO_DEVICE_CHUNK", 2)  # in chunks, the last short
    tensor = to_device(images, CPU)
    assert tensor.shape == (5, 3, 16, 16) and tensor.is_contiguous()
    assert tensor.dtype == torch.uint8
    assert torch.equal(tensor, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert to_device(images[:0], CPU).shape == (0, 3, 16, 16)
    assert resize_batch(images, 16) is images
    assert resize_batch(images, 8).shape == (5, 8, 8, 3)


def test_to_device_gathers_rows_and_resizes_a_chunk_at_a_time(monkeypatch: pytest.MonkeyPatch):
    """A split as the rows of the images of every split, resized as it goes: the same
    tensor as moving a copy of the split resized beforehand."""
    import shared.cnn

    images = np.random.default_rng(0).integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    rows = np.array([6, 0, 3, 4, 1])
    monkeypatch.setattr(shared.cnn, "TO_DEVICE_CHUNK", 2)
    gathered = shared.cnn.Rows(images, rows)
    assert len(gathered) == 5 and gathered.shape == (5, 16, 16, 3)
    want = torch.from_numpy(resize_batch(images[rows], 8)).permute(0, 3, 1, 2)
    assert torch.equal(to_device(gathered, CPU, 8), want)
    assert torch.equal(
        to_device(gathered, CPU, 16), torch.from_numpy(images[rows]).permute(0, 3, 1, 2)
    )
    assert to_device(shared.cnn.Rows(images, rows[:0]), CPU, 8).shape == (0, 3, 8, 8)


# ---------------------------------------------------------------- one tiny fold

COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])


def _colour_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    noise = rng.normal(0, 20, (n, 64, 64, 3))
    return np.clip(COLOURS[y][:, None, None, :] + noise, 0, 255).astype(np.uint8), y


TINY = CnnParams(epochs=3, width=0.125, image_size=32, batch_size=8).model_dump()


def _train(seed: int = 0):
    x, y = _colour_images(24, seed=0)
    return train_fold(
        x[:18], y[:18], x[18:], y[18:], x[:5], TINY, num_classes=3, seed=seed, device=CPU
    )


@pytest.fixture(scope="module")
def fold():
    return _train(), _train()


def test_train_fold_history_and_shapes(fold):
    outcome, _ = fold
    assert len(outcome.history) == 3
    assert all(isinstance(s, EpochStats) for s in outcome.history)
    assert [s.epoch for s in outcome.history] == [0, 1, 2]
    for stats in outcome.history:
        for value in (stats.train_loss, stats.train_acc, stats.val_loss, stats.val_acc):
            assert math.isfinite(value)
        assert 0 <= stats.train_acc <= 1 and 0 <= stats.val_acc <= 1
    assert outcome.val_probs.shape == (6, 3)
    assert outcome.test_probs.shape == (5, 3)
    np.testing.assert_allclose(outcome.val_probs.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(outcome.test_probs.sum(1), 1.0, rtol=1e-5)
    assert 0 <= outcome.train_acc <= 1 and 0 <= outcome.val_acc <= 1
    assert set(outcome.state_dict) == set(MangoCNN(3, image_size=32, width=0.125).state_dict())


def test_train_fold_is_deterministic(fold):
    first, second = fold
    np.testing.assert_array_equal(first.val_probs, second.val_probs)
    np.testing.assert_array_equal(first.test_probs, second.test_probs)
    assert [s.train_loss for s in first.history] == [s.train_loss for s in second.history]


def test_train_fold_reports_each_epoch():
    seen: list[EpochStats] = []
    x, y = _colour_images(12, seed=1)
    params = {**TINY, "epochs": 2, "augment": False}
    outcome = train_fold(
        x[:9],
        y[:9],
        x[9:],
        y[9:],
        x[:0],
        params,
        num_classes=3,
        seed=0,
        device=CPU,
        on_epoch=seen.append,
    )
    assert seen == outcome.history
    assert outcome.test_probs.shape == (0, 3)


def test_a_fold_whose_training_diverges_stops_at_that_epoch_saying_so():
    """A loss gone NaN takes the weights with it: the fold stops at once (not after
    its remaining epochs, hours on a GPU), in a line the unit's error shows."""
    x, y = _colour_images(24, seed=0)
    seen: list[EpochStats] = []
    with pytest.raises(TrainingDivergedError) as info:
        train_fold(
            x[:18],
            y[:18],
            x[18:],
            y[18:],
            x[:0],
            {**TINY, "lr": 1e6},
            num_classes=3,
            seed=0,
            device=CPU,
            on_epoch=seen.append,
        )
    assert str(info.value) == (
        "the training diverged in epoch 1: its loss is nan (lr = 1000000.0: a smaller one "
        "may train)"
    )
    assert seen == []


# ---------------------------------------------------------------- it learns

#: 12 epochs: every training seed tried (0 to 11) ends at >= 0.96 validation accuracy
LEARNS = CnnParams(epochs=12, width=0.125, image_size=32, batch_size=8).model_dump()


def _learn(train_labels: np.ndarray | None = None):
    """Train on 64 red, green and blue images (augmented, with dropout); validate on 32."""
    x, y = _colour_images(96, seed=0)
    labels = y[:64] if train_labels is None else train_labels
    outcome = train_fold(
        x[:64], labels, x[64:], y[64:], x[:0], LEARNS, num_classes=3, seed=0, device=CPU
    )
    return outcome, y[64:]


def test_the_cnn_learns_which_colour_is_which_class():
    outcome, val_y = _learn()
    # chance is 1/3: the held-out images are told apart, not guessed
    assert outcome.val_acc >= 0.9
    assert np.mean(outcome.val_probs.argmax(1) == val_y) >= 0.9
    assert outcome.train_acc >= 0.9
    assert outcome.history[-1].train_loss < outcome.history[0].train_loss


def test_the_cnn_cannot_fit_labels_its_images_do_not_carry():
    """The control: the same training, with each colour labelled 0, 1 and 2 equally often,
    fits its own training images no better than chance (its validation accuracy says
    nothing: whatever it predicts for a colour is right for all or none of that colour)."""
    blind = (np.arange(64) // 3) % 3
    assert all(np.ptp(np.bincount(blind[c::3], minlength=3)) <= 1 for c in range(3))
    outcome, _ = _learn(blind)
    assert outcome.train_acc <= 0.5


# ---------------------------------------------------------------- knobs (section 1.3.1)


def _describe(layer: nn.Module) -> tuple:
    """A layer as the study's table writes it."""
    if isinstance(layer, nn.Conv2d):
        return ("Conv2d", layer.in_channels, layer.out_channels, *layer.kernel_size[:1],
                *layer.stride[:1], *layer.padding[:1])  # fmt: skip
    if isinstance(layer, nn.Linear):
        return ("Linear", layer.in_features, layer.out_features)
    if isinstance(layer, nn.PReLU):
        return ("PReLU", layer.num_parameters)
    if isinstance(layer, nn.BatchNorm2d | nn.BatchNorm1d):
        return (type(layer).__name__, layer.num_features)
    if isinstance(layer, nn.MaxPool2d):
        return ("MaxPool2d", layer.kernel_size, layer.stride)
    if isinstance(layer, nn.Dropout):
        return ("Dropout", layer.p)
    return (type(layer).__name__,)


def test_knob_defaults_agree_with_campaign_params():
    defaults = CnnParams().model_dump()
    assert {name: defaults[name] for name in KNOB_DEFAULTS} == KNOB_DEFAULTS


def test_default_params_give_the_study_table_at_224():
    model = build_model(CnnParams().model_dump(), num_classes=3)
    assert _count(model) == 17_713_382
    first_block = [_describe(layer) for layer in model.features[0]]
    assert first_block == [
        ("Conv2d", 3, 32, 3, 1, 1),
        ("PReLU", 32),
        ("BatchNorm2d", 32),
        ("Conv2d", 32, 32, 3, 1, 1),
        ("PReLU", 32),
        ("BatchNorm2d", 32),
        ("MaxPool2d", 2, 2),
    ]
    last_block = [_describe(layer) for layer in model.features[-1]]
    assert last_block[0] == ("Conv2d", 256, 512, 3, 1, 1) and last_block[3][:3] == (
        "Conv2d",
        512,
        512,
    )
    head = [_describe(layer) for layer in model.classifier]
    assert head == [
        ("Flatten",),
        ("Linear", 512 * 7 * 7, 512),
        ("PReLU", 1),
        ("BatchNorm1d", 512),
        ("Dropout", 0.5),
        ("Linear", 512, 256),
        ("PReLU", 1),
        ("BatchNorm1d", 256),
        ("Dropout", 0.5),
        ("Linear", 256, 64),
        ("PReLU", 1),
        ("BatchNorm1d", 64),
        ("Dropout", 0.5),
        ("Linear", 64, 3),
    ]


def test_norm_order_bn_act_puts_batchnorm_first():
    params = CnnParams(width=0.125, image_size=32, norm_order="bn_act").model_dump()
    model = build_model(params, 3)
    assert [type(layer) for layer in model.features[0]][1:3] == [nn.BatchNorm2d, nn.PReLU]
    assert isinstance(model.features[0][0], nn.Conv2d)
    assert [type(layer) for layer in model.classifier][1:5] == [
        nn.Linear,
        nn.BatchNorm1d,
        nn.PReLU,
        nn.Dropout,
    ]


def test_pool_conv_replaces_maxpool_with_a_strided_conv():
    params = CnnParams(width=0.125, image_size=32, pool="conv").model_dump()
    model = build_model(params, 3)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    for block, channels in zip(model.features, (4, 8, 16, 32, 64), strict=True):
        assert _describe(block[-1]) == ("Conv2d", channels, channels, 3, 2, 1)


@pytest.mark.parametrize(
    ("dense", "widths"), [("512", [64]), ("64,64,32,16", [8, 8, 4, 2]), ("512,256,64", [64, 32, 8])]
)
def test_dense_head_from_a_string_scaled_by_width(dense, widths):
    model = build_model(CnnParams(width=0.125, image_size=32, dense=dense).model_dump(), 3)
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [lin.out_features for lin in linears] == [*widths, 3]
    assert len([m for m in model.classifier if isinstance(m, nn.Dropout)]) == len(widths)


@pytest.mark.parametrize(
    ("image_size", "stride", "side"),
    [(224, 1, 7), (224, 2, 1), (224, 3, 1), (64, 1, 2), (64, 7, 1)],
)
def test_stride_sets_the_flatten_size_from_the_real_map(image_size, stride, side):
    assert feature_side(image_size, stride) == side
    model = MangoCNN(3, image_size=image_size, width=0.125, stride=stride)
    model.eval()
    with torch.no_grad():
        maps = model.features(torch.zeros(1, 3, image_size, image_size))
    assert maps.shape[-2:] == (side, side)
    first = [m for m in model.classifier if isinstance(m, nn.Linear)][0]
    assert first.in_features == 64 * side * side
    convs = [m for m in model.features.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [stride, 1] * 5


@pytest.mark.parametrize(
    "bad",
    [
        {"activation": "gelu"},
        {"norm_order": "bn_bn"},
        {"pool": "avg"},
        {"stride": 0},
        {"dense": ""},
        {"dense": "512,,64"},
        {"dense": "512,-1"},
    ],
)
def test_bad_knobs_are_one_line_value_errors(bad):
    with pytest.raises(ValueError) as info:
        MangoCNN(3, image_size=32, width=0.125, **bad)
    assert "\n" not in str(info.value)


def test_parse_dense():
    assert parse_dense("512,256,64") == (512, 256, 64)
    assert parse_dense(" 512 ") == (512,)
    assert parse_dense([8, 4]) == (8, 4)


KNOBS = [
    {},
    {"norm_order": "bn_act"},
    {"activation": "relu"},
    {"activation": "leakyrelu"},
    {"pool": "conv"},
    {"optimizer": "adam"},
    {"dropout": 0.0},
    {"dropout": 0.9},
    {"stride": 2},
    {"stride": 3},
    {"stride": 5},
    {"stride": 7},
    {"dense": "512"},
    {"dense": "64,32,16,8"},
    {"compile": True},  # a CUDA-only switch: the CPU trains eager
    {"norm_order": "bn_act", "activation": "relu", "pool": "conv", "stride": 3, "dense": "128"},
]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_every_knob_builds_and_trains_one_step(knobs):
    params = CnnParams(width=0.125, image_size=64, **knobs).model_dump()
    torch.manual_seed(0)
    model = build_model(params, num_classes=3)
    optimizer = make_optimizer(model, params, CPU)
    assert isinstance(
        optimizer, torch.optim.Adam if params["optimizer"] == "adam" else torch.optim.SGD
    )
    model.train()
    x = torch.randn(3, 3, 64, 64)
    out = model(x)
    assert out.shape == (3, 3)
    assert torch.isfinite(out).all()
    loss = nn.functional.cross_entropy(out, torch.tensor([0, 1, 2]))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------- checkpoint and resume

RESUMABLE = {**TINY, "epochs": 3, "dropout": 0.3}  # augmented, with dropout: every RNG counts


class _Killed(Exception):
    pass


def _resumable_fold(**kwargs):
    x, y = _colour_images(24, seed=2)
    params = kwargs.pop("params", RESUMABLE)
    return train_fold(
        x[:18], y[:18], x[18:], y[18:], x[:5], params, num_classes=3, seed=4, device=CPU, **kwargs
    )


def _without_seconds(history):
    return [replace(h, seconds=0.0) for h in history]


def test_resume_after_one_epoch_ends_exactly_where_an_uninterrupted_run_ends(tmp_path):
    checkpoints: list[dict] = []
    straight = _resumable_fold(on_checkpoint=checkpoints.append, unit_key="c/cnn/h/f0")
    assert [c["epochs_done"] for c in checkpoints] == [1, 2, 3]
    assert [c["epoch"] for c in checkpoints] == [0, 1, 2]
    assert straight.resumed_from_epoch == 0

    def killed_after_first_epoch(checkpoint: dict) -> None:
        torch.save(checkpoint, tmp_path / "ckpt.pt")  # as the worker does, then dies
        raise _Killed

    with pytest.raises(_Killed):
        _resumable_fold(on_checkpoint=killed_after_first_epoch, unit_key="c/cnn/h/f0")
    saved = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)
    assert saved["epochs_done"] == 1 and saved["unit_key"] == "c/cnn/h/f0"
    assert saved["params"] == RESUMABLE and saved["num_classes"] == 3

    later: list[dict] = []
    epochs_seen: list[EpochStats] = []
    resumed = _resumable_fold(resume=saved, on_checkpoint=later.append, on_epoch=epochs_seen.append)
    assert resumed.resumed_from_epoch == 1
    assert [c["epochs_done"] for c in later] == [2, 3]
    assert [s.epoch for s in epochs_seen] == [1, 2]  # only the epochs this run trained
    assert set(resumed.state_dict) == set(straight.state_dict)
    for name, tensor in straight.state_dict.items():
        assert torch.equal(resumed.state_dict[name], tensor), name
    np.testing.assert_array_equal(resumed.val_probs, straight.val_probs)
    np.testing.assert_array_equal(resumed.test_probs, straight.test_probs)
    assert _without_seconds(resumed.history) == _without_seconds(straight.history)
    assert resumed.val_acc == straight.val_acc and resumed.train_acc == straight.train_acc


def test_checkpoints_are_snapshots_not_live_references():
    checkpoints: list[dict] = []
    outcome = _resumable_fold(on_checkpoint=checkpoints.append)
    first, last = checkpoints[0]["model"], checkpoints[-1]["model"]
    name = next(k for k in first if k.endswith("weight"))
    assert not torch.equal(first[name], last[name])
    assert torch.equal(last[name], outcome.state_dict[name])
    momentum = checkpoints[0]["optimizer"]["state"][0]["momentum_buffer"]
    assert not torch.equal(momentum, checkpoints[-1]["optimizer"]["state"][0]["momentum_buffer"])


def test_resume_refuses_a_checkpoint_of_other_params():
    checkpoints: list[dict] = []
    _resumable_fold(params={**RESUMABLE, "epochs": 1}, on_checkpoint=checkpoints.append)
    with pytest.raises(ValueError, match="cannot resume.*other params \\(epochs\\)"):
        _resumable_fold(resume=checkpoints[0], params={**RESUMABLE, "epochs": 2})


def test_resume_of_a_finished_run_trains_nothing():
    checkpoints: list[dict] = []
    straight = _resumable_fold(params={**RESUMABLE, "epochs": 1}, on_checkpoint=checkpoints.append)
    again = _resumable_fold(params={**RESUMABLE, "epochs": 1}, resume=checkpoints[-1])
    assert again.resumed_from_epoch == 1
    for name, tensor in straight.state_dict.items():
        assert torch.equal(again.state_dict[name], tensor), name


# ---------------------------------------------------------------- the throughput benchmark


def _bench_module():
    return load_bench("train_throughput")


def test_train_throughput_bench_runs_tiny_on_cpu(tmp_path, capsys):
    out_json = tmp_path / "train_throughput.json"
    result = _bench_module().main(
        [
            "--device", "cpu", "--image-size", "32", "--width", "0.125", "--batch-size", "8",
            "--images", "16", "--warmup", "1", "--steps", "1", "--loader-workers", "0",
            "--json", str(out_json),
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "baseline: DataLoader" in printed and "orchard, eager" in printed
    assert "ratio orchard / baseline" in printed
    assert result["baseline_img_s"] > 0 and result["orchard_img_s"] > 0
    written = json.loads(out_json.read_text())
    assert written["ratio"] == pytest.approx(written["orchard_img_s"] / written["baseline_img_s"])
    assert written["device"] == "cpu" and written["torch"] == torch.__version__
    assert written["args"]["batch_size"] == 8


class _NoWaiting:
    """The ``time`` module, except that ``sleep`` (the barrier's wait) fails the test."""

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        raise AssertionError(f"waited {seconds} s at the barrier")


def test_train_throughput_barrier_times_each_run_under_the_lock(tmp_path, capsys, monkeypatch):
    """--barrier: a run marks itself ready after its warm-up and times under the lock;
    with the other party already ready it does not wait at all, let alone time out."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    (barrier / "ready-other").touch()
    bench = _bench_module()
    monkeypatch.setattr(bench, "time", _NoWaiting())
    result = bench.main(
        [
            "--device", "cpu", "--image-size", "32", "--width", "0.125", "--batch-size", "8",
            "--images", "16", "--warmup", "1", "--steps", "1", "--skip-baseline",
            "--barrier", str(barrier), "--parties", "2", "--barrier-timeout", "60",
            "--label", "solo", "--json", str(tmp_path / "t.json"),
        ]
    )  # fmt: skip
    assert len(list(barrier.glob("ready-*"))) == 2 and (barrier / "lock").exists()
    assert "baseline_img_s" not in result and "ratio" not in result
    assert result["orchard_img_s"] > 0 and result["label"] == "solo"
    printed = capsys.readouterr().out
    assert "ratio" not in printed and "timed out" not in printed


# ---------------------------------------------------------------- CUDA fast paths, on the CPU


def test_padded_first_conv_gives_the_plain_convs_output_and_gradients():
    from shared.cnn import RgbConv2d

    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    plain = RgbConv2d(3, 8, 3, 1, 1)
    results = []
    for pad in (0, 4, 8):
        conv = RgbConv2d(3, 8, 3, 1, 1)
        conv.load_state_dict(plain.state_dict())
        conv.pad_channels = pad
        out = conv(x)
        out.square().mean().backward()
        assert conv.weight.grad.shape == (8, 3, 3, 3)  # the parameter keeps its shape
        results.append((out.detach(), conv.weight.grad, conv.bias.grad))
    for out, wgrad, bgrad in results[1:]:
        torch.testing.assert_close(out, results[0][0])
        torch.testing.assert_close(wgrad, results[0][1])
        torch.testing.assert_close(bgrad, results[0][2])


def test_a_bias_added_apart_gives_the_same_values_gradients_and_state_dict():
    """StudyConv2d.bias_apart (an alternative for the compiled CUDA path): the whole
    network's output and every gradient equal the plain one's, in float64."""
    from shared.cnn import RgbConv2d, StudyConv2d

    torch.manual_seed(0)
    plain = MangoCNN(image_size=32, width=0.125).double()
    apart = MangoCNN(image_size=32, width=0.125).double()
    apart.load_state_dict(plain.state_dict())
    convs = [m for m in apart.modules() if isinstance(m, StudyConv2d)]
    assert len(convs) == 10  # both convs of every block, the RGB one included
    for conv in convs:
        conv.bias_apart = True
        if isinstance(conv, RgbConv2d):
            conv.pad_channels = 4  # padded and apart at once
    assert list(apart.state_dict()) == list(plain.state_dict())
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    outs = []
    for model in (plain, apart):
        torch.manual_seed(1)  # the same dropout masks
        out = model(x)  # training mode: batch statistics, running estimates updated
        out.square().mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0])
    for (name, p1), (_, p2) in zip(plain.named_parameters(), apart.named_parameters(), strict=True):
        torch.testing.assert_close(p2.grad, p1.grad, msg=name)
    for name, buffer in plain.named_buffers():
        torch.testing.assert_close(apart.get_buffer(name), buffer, msg=name)


@pytest.mark.parametrize(
    "knobs",
    [
        {},  # the study's: PReLU then BatchNorm, max-pool
        {"norm_order": "bn_act"},  # BatchNorm before the activation: applied, not folded
        {"pool": "conv", "activation": "relu"},
        {"stride": 2, "activation": "leakyrelu"},
    ],
    ids=["study", "bn_act", "conv_pool", "stride2"],
)
def test_batchnorm_folded_into_the_next_layer_gives_the_same_values_gradients_and_estimates(
    knobs, monkeypatch: pytest.MonkeyPatch
):
    """MangoCNN.fold_norm (an alternative for the compiled CUDA path): in training, the
    output, every gradient (the input's too) and every running estimate equal the
    modules' own, in float64, with BatchNorm scales of both signs; evaluation and the
    state dict are untouched."""
    from shared import cnn

    torch.manual_seed(0)
    plain = MangoCNN(image_size=64, width=0.125, **knobs).double()
    with torch.no_grad():  # scales of both signs: the max-pool carries |a| and pools sign(a)x
        for module in plain.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(-1.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    folded = MangoCNN(image_size=64, width=0.125, **knobs).double()
    folded.load_state_dict(plain.state_dict())
    folded.fold_norm = True
    applied = []
    real_apply = cnn._apply
    monkeypatch.setattr(
        cnn, "_apply", lambda x, affine: applied.append(x.dim()) or real_apply(x, affine)
    )
    x = torch.randn(6, 3, 64, 64, dtype=torch.float64)
    outs, input_grads = [], []
    for model in (plain, folded):
        inp = x.clone().requires_grad_()
        for _ in range(2):  # a second step sees the first one's running estimates
            model.zero_grad()
            torch.manual_seed(1)  # the same dropout masks
            out = model(inp)
            out.square().mean().backward()
        outs.append(out)
        input_grads.append(inp.grad)
    torch.testing.assert_close(outs[1], outs[0])
    torch.testing.assert_close(input_grads[1], input_grads[0])
    for (name, p1), (_, p2) in zip(
        plain.named_parameters(), folded.named_parameters(), strict=True
    ):
        torch.testing.assert_close(p2.grad, p1.grad, msg=name)
    for name, buffer in plain.named_buffers():
        torch.testing.assert_close(folded.get_buffer(name), buffer, msg=name)
    if knobs.get("norm_order") == "bn_act":
        assert 4 in applied  # nothing to fold into: each map is normalised as before
    else:
        assert set(applied) == {2}  # only the dense layers' (a dropout follows each)
    plain.eval()
    folded.eval()
    torch.testing.assert_close(folded(x), plain(x))


def test_the_folded_network_traces_as_one_graph_with_its_backward():
    """What torch.compile sees on CUDA: the folded training step as one graph (no
    breaks) whose values and gradients match eager; aot_eager traces the backward too."""
    torch.manual_seed(0)
    eager = MangoCNN(image_size=32, width=0.125)
    traced = MangoCNN(image_size=32, width=0.125)
    traced.load_state_dict(eager.state_dict())
    for model in (eager, traced):
        model.fold_norm = True
    compiled = torch.compile(traced, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 3, 32, 32)
    outs = []
    for model in (eager, compiled):
        torch.manual_seed(1)
        out = model(x)
        out.square().mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0])
    for (name, p1), (_, p2) in zip(
        eager.named_parameters(), traced.named_parameters(), strict=True
    ):
        torch.testing.assert_close(p2.grad, p1.grad, msg=name)
    torch.testing.assert_close(traced.features[0][2].running_var, eager.features[0][2].running_var)


def _as_if_on_cuda(monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """A CUDA device for ``prepare_model``, which decides by the device's type and moves
    nothing, so its CUDA choices can be checked on the CPU; it turns on cuDNN's
    autotuning, a process-wide flag, which the test puts back."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    return torch.device("cuda")


def test_prepare_model_folds_batchnorm_on_cuda_only_when_asked(monkeypatch):
    from shared.cnn import prepare_model

    model = MangoCNN(image_size=32, width=0.125)
    assert prepare_model(model, CPU, fold_norm=True) is model and not model.fold_norm
    cuda = _as_if_on_cuda(monkeypatch)
    assert prepare_model(model, cuda) is model and not model.fold_norm  # off by default
    assert prepare_model(model, cuda, fold_norm=True) is model and model.fold_norm
    assert prepare_model(model, cuda) is model and not model.fold_norm  # and back off
    assert all(p.device == CPU for p in model.parameters())  # nothing was moved


def test_the_first_conv_is_padded_on_cuda_only_and_checkpoints_keep_their_shape(monkeypatch):
    from shared.cnn import CUDA_INPUT_CHANNELS, RgbConv2d, prepare_model

    torch.manual_seed(0)
    model = MangoCNN(image_size=32, width=0.125)
    plain = MangoCNN(image_size=32, width=0.125)
    plain.load_state_dict(model.state_dict())
    first = model.features[0][0]
    assert isinstance(first, RgbConv2d) and first.in_channels == 3
    assert sum(isinstance(m, RgbConv2d) for m in model.modules()) == 1
    assert prepare_model(model, CPU) is model and first.pad_channels == 0
    cuda = _as_if_on_cuda(monkeypatch)
    assert prepare_model(model, cuda, pad_input=0) is model and first.pad_channels == 0
    assert prepare_model(model, cuda) is model and first.pad_channels == CUDA_INPUT_CHANNELS
    assert CUDA_INPUT_CHANNELS > first.in_channels == 3  # padded in the forward pass only
    assert model.state_dict()["features.0.0.weight"].shape == (4, 3, 3, 3)
    assert list(model.state_dict()) == list(plain.state_dict())
    model.eval()
    plain.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x))


def test_the_compiled_input_transform_traces_as_one_graph_and_matches_eager():
    """What prepare_inputs compiles on CUDA: one graph, no breaks (fullgraph), the same
    values; checked here with the aot_eager backend, which traces without codegen."""
    from shared.augment import sample_params
    from shared.cnn import _augmented_input, model_inputs, prepare_inputs

    assert prepare_inputs(CPU, compile=True) is _augmented_input  # the CPU stays eager
    batch = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    params = sample_params(6, 32, 32, torch.Generator().manual_seed(4))
    compiled = torch.compile(_augmented_input, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(batch, params), _augmented_input(batch, params))
    seen = []

    def spy(b, p):
        seen.append(p)
        return _augmented_input(b, p)

    generator = torch.Generator().manual_seed(4)
    out = model_inputs(batch, augment=True, generator=generator, transform=spy)
    assert len(seen) == 1 and torch.equal(seen[0].angle, params.angle)
    torch.testing.assert_close(out, _augmented_input(batch, params))


def test_the_device_a_fold_trains_on_is_described_for_the_log() -> None:
    from shared.cnn import describe_device

    cpu = describe_device(torch.device("cpu"))
    if torch.cuda.is_available():
        assert cpu == "cpu"
        assert describe_device(torch.device("cuda")).startswith("cuda:0 (")
    else:
        assert cpu == "cpu (no CUDA device)"
