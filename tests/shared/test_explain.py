"""LIME on a tiny classifier: shapes, the green overlay, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from shared.explain import explain_images, green_overlay


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(64, 3),
    ).eval()


def predictor(model: nn.Module):
    @torch.no_grad()
    def predict(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        return torch.softmax(model(x), dim=1).numpy()

    return predict


@pytest.fixture
def images() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)


def test_explanations_are_green_over_the_image(images: np.ndarray) -> None:
    predict = predictor(tiny_model())
    explanations = explain_images(images, predict, num_samples=30, seed=0)
    assert len(explanations) == 3
    for image, e in zip(images, explanations, strict=True):
        assert e.overlay.shape == e.image.shape == (32, 32, 3)
        assert e.overlay.dtype == np.uint8 and e.mask.shape == (32, 32)
        assert (e.image == image).all()
        assert e.label == int(predict(image[None])[0].argmax())
        assert e.probabilities.shape == (3,)
        assert e.mask.any(), "some segment must speak for the predicted class"
        # inside the helpful segments green dominates; outside the image is unchanged
        inside = e.overlay[e.mask].astype(int)
        assert (inside[:, 1] - np.maximum(inside[:, 0], inside[:, 2])).mean() > 30
        assert (e.overlay[~e.mask] == image[~e.mask]).all()


def test_explain_a_given_label_deterministically(images: np.ndarray) -> None:
    predict = predictor(tiny_model())
    a = explain_images(images[:2], predict, labels=[2, 0], num_samples=25, seed=3)
    b = explain_images(images[:2], predict, labels=[2, 0], num_samples=25, seed=3)
    assert [e.label for e in a] == [2, 0]
    for x, y in zip(a, b, strict=True):
        assert (x.overlay == y.overlay).all() and (x.mask == y.mask).all()


def test_green_overlay_leaves_an_empty_mask_alone(images: np.ndarray) -> None:
    mask = np.zeros((32, 32), dtype=bool)
    assert (green_overlay(images[0], mask) == images[0]).all()


def test_bad_input_is_refused(images: np.ndarray) -> None:
    predict = predictor(tiny_model())
    with pytest.raises(ValueError, match="uint8"):
        explain_images(images.astype(np.float32), predict)
    with pytest.raises(ValueError, match="labels"):
        explain_images(images, predict, labels=[0])
