"""The study's CNN: architecture against the table, tiny forward/backward, one tiny fold."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from shared.cnn import (
    STUDY_MEAN,
    STUDY_STD,
    EpochStats,
    MangoCNN,
    build_model,
    normalise,
    random_flips,
    resize_batch,
    to_device,
    train_fold,
)
from shared.spec import CnnParams

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
        assert [type(layer) for layer in block] == expected
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
    started = time.perf_counter()
    with torch.no_grad():
        out = study_model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 3)
    assert torch.isfinite(out).all()
    assert time.perf_counter() - started < 10


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


def test_random_flips_keeps_shape_and_is_seeded():
    batch = torch.arange(8 * 3 * 4 * 5, dtype=torch.uint8).reshape(8, 3, 4, 5)
    a = random_flips(batch, torch.Generator().manual_seed(7))
    b = random_flips(batch, torch.Generator().manual_seed(7))
    assert a.shape == batch.shape
    assert a.dtype == batch.dtype
    assert torch.equal(a, b)
    for original, flipped in zip(batch, a, strict=True):
        candidates = [original, original.flip(2), original.flip(1), original.flip(1).flip(2)]
        assert any(torch.equal(flipped, c) for c in candidates)
    kinds = set()
    for seed in range(5):
        out = random_flips(batch, torch.Generator().manual_seed(seed))
        for original, flipped in zip(batch, out, strict=True):
            for h in (False, True):
                for v in (False, True):
                    candidate = original.flip(2) if h else original
                    candidate = candidate.flip(1) if v else candidate
                    if torch.equal(flipped, candidate):
                        kinds.add((h, v))
    assert kinds == {(False, False), (True, False), (False, True), (True, True)}


def test_normalise_uses_study_mean_and_std():
    assert STUDY_MEAN == (0.485, 0.456, 0.406)
    assert STUDY_STD == (0.229, 0.256, 0.225)
    batch = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    out = normalise(batch)
    assert out.dtype == torch.float32
    for c in range(3):
        assert out[0, c].flatten()[0].item() == pytest.approx(-STUDY_MEAN[c] / STUDY_STD[c])
        assert out[1, c].flatten()[0].item() == pytest.approx((1 - STUDY_MEAN[c]) / STUDY_STD[c])


def test_to_device_is_nchw_uint8_and_resize_batch():
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    tensor = to_device(images, CPU)
    assert tensor.shape == (2, 3, 16, 16)
    assert tensor.dtype == torch.uint8
    assert torch.equal(tensor[1, 2], torch.from_numpy(images[1, :, :, 2]))
    assert resize_batch(images, 16) is images
    assert resize_batch(images, 8).shape == (2, 8, 8, 3)


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
