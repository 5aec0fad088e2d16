"""The batched study augmentations: their random draws, torchvision agreement, eval purity."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from shared.augment import (
    BRIGHTNESS,
    CONTRAST,
    SATURATION,
    AugmentParams,
    augment_batch,
    random_augment,
    sample_params,
)
from shared.cnn import MangoCNN, normalise, predict_proba, train_one_epoch

H, W = 48, 64  # not square: catches swapped axes


def _image(seed: int = 0) -> torch.Tensor:
    """A smooth, asymmetric uint8 (3, H, W) picture: gradients, a wave and a red patch."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    shift = 0.1 * seed
    img = torch.stack(
        (xx, 0.7 * yy + 0.1, (torch.sin(6 * xx + shift) * 0.3 + 0.5) * (yy < 0.6)), dim=0
    )
    img[:, 8 : 16 + seed, 10:30] = torch.tensor([0.9, 0.1, 0.2]).view(3, 1, 1)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def _params(**overrides: object) -> AugmentParams:
    """One image's parameters, the identity unless overridden."""
    values: dict[str, object] = {
        "hflip": torch.tensor([False]),
        "vflip": torch.tensor([False]),
        "angle": torch.tensor([0.0]),
        "perspective": torch.tensor([False]),
        "endpoints": torch.tensor(
            [[[0, 0], [W - 1, 0], [W - 1, H - 1], [0, H - 1]]], dtype=torch.float64
        ),
        "jitter": torch.ones(1, 3),
        "jitter_order": torch.tensor([[0, 1, 2]]),
    }
    values.update(overrides)
    return AugmentParams(H, W, **values)  # type: ignore[arg-type]


def _one(params: AugmentParams, i: int) -> AugmentParams:
    fields = ("hflip", "vflip", "angle", "perspective", "endpoints", "jitter", "jitter_order")
    return AugmentParams(H, W, **{f: getattr(params, f)[i : i + 1] for f in fields})


def torchvision_reference(image: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """The study's pipeline, step by step, with torchvision's own functional kernels."""
    x = image.float() / 255
    if p.vflip[0]:
        x = TF.vertical_flip(x)
    if p.hflip[0]:
        x = TF.horizontal_flip(x)
    x = TF.rotate(x, float(p.angle[0]), interpolation=InterpolationMode.BILINEAR)
    if p.perspective[0]:
        x = TF.perspective(
            x,
            p.startpoints.long().tolist(),
            p.endpoints[0].long().tolist(),
            interpolation=InterpolationMode.BILINEAR,
        )
    adjust = {
        BRIGHTNESS: TF.adjust_brightness,
        CONTRAST: TF.adjust_contrast,
        SATURATION: TF.adjust_saturation,
    }
    for op in p.jitter_order[0].tolist():
        x = adjust[op](x, float(p.jitter[0, op]))
    return x


def _mae(a: torch.Tensor, b: torch.Tensor, border: int = 2) -> float:
    """Mean absolute difference away from a thin border (where resampling differs most)."""
    return (a - b).abs()[..., border:-border, border:-border].mean().item()


# ---------------------------------------------------------------- (1) the random draws

N = 4000


@pytest.fixture(scope="module")
def drawn() -> AugmentParams:
    return sample_params(N, H, W, torch.Generator().manual_seed(0))


def test_flip_rates_are_one_half(drawn):
    for flags in (drawn.hflip, drawn.vflip):
        assert flags.dtype == torch.bool
        assert 0.46 < flags.float().mean().item() < 0.54
    # independent of each other
    both = (drawn.hflip & drawn.vflip).float().mean().item()
    assert 0.21 < both < 0.29


def test_angles_uniform_within_30_degrees(drawn):
    angle = drawn.angle
    assert angle.min() >= -30 and angle.max() <= 30
    assert abs(angle.mean().item()) < 1.5
    assert 16.0 < angle.std().item() < 18.6  # 60 / sqrt(12) = 17.3 for a uniform
    counts = torch.histc(angle, bins=6, min=-30, max=30)
    assert (counts > N / 6 * 0.85).all() and (counts < N / 6 * 1.15).all()


def test_perspective_fires_half_the_time_with_torchvision_corners(drawn):
    assert 0.46 < drawn.perspective.float().mean().item() < 0.54
    bound_w = int(0.5 * (W // 2)) + 1  # RandomPerspective.make_params
    bound_h = int(0.5 * (H // 2)) + 1
    ends = drawn.endpoints
    assert torch.equal(ends, ends.round())  # integer corners, as torchvision draws them
    dx = (ends[..., 0] - torch.tensor([0, W - 1, W - 1, 0])).abs()
    dy = (ends[..., 1] - torch.tensor([0, 0, H - 1, H - 1])).abs()
    # every corner moves inwards by 0 .. bound - 1, uniformly
    inward_x = torch.sign(torch.tensor([W / 2, -W / 2, -W / 2, W / 2]))
    assert (((ends[..., 0] - torch.tensor([0, W - 1, W - 1, 0])) * inward_x) >= 0).all()
    assert dx.max() == bound_w - 1 and dy.max() == bound_h - 1 and dx.min() == 0
    assert abs(dx.float().mean().item() - (bound_w - 1) / 2) < 0.5
    assert abs(dy.float().mean().item() - (bound_h - 1) / 2) < 0.5


def test_jitter_factors_and_random_order(drawn):
    assert drawn.jitter.shape == (N, 3)
    assert drawn.jitter.min() >= 0.8 and drawn.jitter.max() <= 1.2
    assert (drawn.jitter.mean(0) - 1.0).abs().max() < 0.01
    order = drawn.jitter_order
    assert torch.equal(order.sort(dim=1).values, torch.arange(3).expand(N, 3))
    counts = {perm: 0 for perm in itertools.permutations(range(3))}
    for row in order.tolist():
        counts[tuple(row)] += 1
    assert all(N / 6 * 0.8 < c < N / 6 * 1.2 for c in counts.values()), counts


def test_draws_are_seeded_and_per_sample():
    a = sample_params(8, H, W, torch.Generator().manual_seed(3))
    b = sample_params(8, H, W, torch.Generator().manual_seed(3))
    c = sample_params(8, H, W, torch.Generator().manual_seed(4))
    assert torch.equal(a.angle, b.angle) and torch.equal(a.endpoints, b.endpoints)
    assert not torch.equal(a.angle, c.angle)
    assert len(set(a.angle.tolist())) == 8


# ---------------------------------------------------------------- (2) agreement with torchvision

ENDPOINTS = torch.tensor([[[5, 3], [W - 13, 7], [W - 3, H - 10], [10, H - 2]]], dtype=torch.float64)
CASES = {
    "identity": {},
    "hflip": {"hflip": torch.tensor([True])},
    "vflip": {"vflip": torch.tensor([True])},
    "rotate +20": {"angle": torch.tensor([20.0])},
    "rotate -25": {"angle": torch.tensor([-25.0])},
    "perspective": {"perspective": torch.tensor([True]), "endpoints": ENDPOINTS},
    "jitter": {
        "jitter": torch.tensor([[1.15, 0.85, 1.2]]),
        "jitter_order": torch.tensor([[2, 0, 1]]),
    },
    "everything": {
        "hflip": torch.tensor([True]),
        "vflip": torch.tensor([True]),
        "angle": torch.tensor([27.0]),
        "perspective": torch.tensor([True]),
        "endpoints": ENDPOINTS,
        "jitter": torch.tensor([[0.83, 1.18, 0.9]]),
        "jitter_order": torch.tensor([[1, 2, 0]]),
    },
}
# flips, a rotation and colour alone sample exactly at pixel centres; perspective and
# the composition resample once where torchvision resamples twice
EXACT = {"identity", "hflip", "vflip", "rotate +20", "rotate -25", "jitter"}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_torchvision(case):
    image = _image()
    params = _params(**CASES[case])
    ours = augment_batch(image.unsqueeze(0), params)[0]
    assert ours.dtype == torch.float32 and ours.min() >= 0 and ours.max() <= 1
    reference = torchvision_reference(image, params)
    assert _mae(ours, reference) < (1e-4 if case in EXACT else 0.01)


RIGHT = {
    **CASES["everything"],
    "hflip": torch.tensor([True]),
    "vflip": torch.tensor([False]),
    "jitter": torch.tensor([[1.2, 0.8, 1.2]]),
    "jitter_order": torch.tensor([[2, 0, 1]]),
}
# colour only: the three jitter steps commute except where a step clamps, so the
# order shows only at saturated pixels, which the exact tolerance sees
RIGHT_COLOUR = {
    "jitter": torch.tensor([[1.2, 0.8, 1.2]]),
    "jitter_order": torch.tensor([[0, 2, 1]]),
}


@pytest.mark.parametrize(
    ("right", "wrong", "tolerance"),
    [
        (RIGHT, {"angle": torch.tensor([-27.0])}, 0.01),  # rotation sign
        (RIGHT, {"hflip": torch.tensor([False]), "vflip": torch.tensor([True])}, 0.01),  # axis
        (RIGHT, {"perspective": torch.tensor([False])}, 0.01),  # a step left out
        (RIGHT, {"angle": torch.tensor([0.0])}, 0.01),
        (RIGHT, {"jitter": torch.tensor([[0.8, 1.2, 1.2]])}, 0.01),  # factors swapped
        (RIGHT_COLOUR, {"jitter_order": torch.tensor([[1, 2, 0]])}, 1e-4),  # jitter order
    ],
    ids=["rotation sign", "flip axis", "no perspective", "no rotation", "jitter factors", "order"],
)
def test_the_comparison_catches_mistakes(right, wrong, tolerance):
    """The tolerances above see a wrong sign, axis, step, factor or order."""
    image = _image()
    # brightness 1.2 first saturates the bright pixels that later steps would move
    reference = torchvision_reference(image, _params(**right))
    ours = augment_batch(image.unsqueeze(0), _params(**right))[0]
    assert _mae(ours, reference) < tolerance
    mistaken = augment_batch(image.unsqueeze(0), _params(**{**right, **wrong}))[0]
    assert _mae(mistaken, reference) > 2 * tolerance


def test_batch_of_random_draws_matches_torchvision_image_by_image():
    images = torch.stack([_image(seed) for seed in range(8)])
    params = sample_params(8, H, W, torch.Generator().manual_seed(11))
    ours = augment_batch(images, params)
    for i in range(8):
        reference = torchvision_reference(images[i], _one(params, i))
        assert _mae(ours[i], reference) < 0.01, i


def test_random_augment_is_seeded_and_keeps_shape():
    batch = torch.stack([_image(s) for s in range(4)])
    a = random_augment(batch, torch.Generator().manual_seed(1))
    b = random_augment(batch, torch.Generator().manual_seed(1))
    assert a.shape == (4, 3, H, W) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, random_augment(batch, torch.Generator().manual_seed(2)))


# ---------------------------------------------------------------- (3) training only


@pytest.fixture
def tiny_model() -> MangoCNN:
    torch.manual_seed(0)
    return MangoCNN(3, image_size=32, width=0.125)


def _uint8_images(n: int) -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8))


def test_evaluation_sees_the_plain_normalised_images(tiny_model):
    images = _uint8_images(6)
    first = predict_proba(tiny_model, images)
    second = predict_proba(tiny_model, images)
    assert torch.equal(first, second)
    tiny_model.eval()
    with torch.no_grad():
        direct = torch.softmax(tiny_model(normalise(images)), dim=1)
    torch.testing.assert_close(first, direct)


def _inputs_seen_in_training(model: MangoCNN, images: torch.Tensor, augment: bool) -> list:
    seen: list[torch.Tensor] = []
    hook = model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    labels = torch.arange(len(images)) % 3
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    try:
        train_one_epoch(
            model,
            images,
            labels,
            optimizer,
            batch_size=4,
            augment=augment,
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        hook.remove()
    return [row for batch in seen for row in batch]


@pytest.mark.parametrize("augment", [False, True])
def test_training_sees_augmented_images_only_when_asked(tiny_model, augment):
    images = _uint8_images(8)
    plain = normalise(images)
    rows = _inputs_seen_in_training(tiny_model, images, augment)
    assert len(rows) == 8
    matches = [any(torch.equal(row, p) for p in plain) for row in rows]
    assert all(matches) if not augment else not any(matches)
