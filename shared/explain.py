"""LIME explanations of an image classifier (the study's section 1.5).

The study ran ``lime`` on its CNN and coloured green the parts of each mango that
helped the model towards its answer. :func:`explain_images` does the same for any
``predict`` function over uint8 images: it perturbs superpixels (SLIC segments, sized
for the image), fits LIME's local linear model, and returns the image with the
positively weighted segments tinted green and their outline drawn with
``skimage.segmentation.mark_boundaries``.

Deterministic for a given ``seed``: the segmentation and LIME's sampling both take it.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from lime import lime_image
from lime.wrappers.scikit_image import SegmentationAlgorithm
from skimage.segmentation import mark_boundaries

__all__ = ["GREEN", "Explanation", "explain_images", "green_overlay"]

#: The tint of the segments that speak for the explained class (RGB in [0, 1]).
GREEN = (0.0, 0.85, 0.0)
#: The outline drawn around those segments.
OUTLINE = (1.0, 1.0, 0.0)
TINT_ALPHA = 0.45

Predict = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True, slots=True)
class Explanation:
    image: np.ndarray  # (H, W, 3) uint8, what the model saw
    overlay: np.ndarray  # (H, W, 3) uint8, the image with the helpful segments in green
    mask: np.ndarray  # (H, W) bool, the helpful segments
    label: int  # the class explained
    probabilities: np.ndarray  # (classes,) the model's output for the image


def green_overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` (uint8) with ``mask`` tinted green and outlined, as uint8."""
    base = image.astype(np.float64) / 255.0
    tinted = base.copy()
    tinted[mask] = (1 - TINT_ALPHA) * base[mask] + TINT_ALPHA * np.asarray(GREEN)
    if mask.any():
        tinted = mark_boundaries(tinted, mask.astype(np.int64), color=OUTLINE, mode="inner")
    return np.clip(np.rint(tinted * 255), 0, 255).astype(np.uint8)


def _segmenter(side: int, n_segments: int | None) -> SegmentationAlgorithm:
    # SLIC suits small images: quickshift (lime's default) finds a handful of blobs at
    # 32-64 px. About one segment per 8x8 patch, between 8 and 50 of them.
    if n_segments is None:
        n_segments = int(np.clip((side // 8) ** 2, 8, 50))
    return SegmentationAlgorithm(
        "slic",
        n_segments=n_segments,
        compactness=10,
        sigma=1,
        start_label=0,
    )  # SLIC is deterministic: no seed to give it


def explain_images(
    images: np.ndarray,
    predict: Predict,
    *,
    labels: Sequence[int] | None = None,
    num_samples: int = 1000,
    num_features: int = 5,
    n_segments: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> list[Explanation]:
    """Explain ``predict`` on each image of ``images`` ((n, H, W, 3) uint8).

    ``predict`` takes (m, H, W, 3) uint8 images and returns (m, classes) probabilities.
    ``labels`` names the class to explain per image (default: the predicted one).
    ``num_features`` caps how many positively weighted segments are tinted.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected (n, H, W, 3) uint8 images, got {images.shape} {images.dtype}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")

    def classifier(batch: np.ndarray) -> np.ndarray:
        return np.asarray(predict(np.asarray(batch, dtype=np.uint8)), dtype=np.float64)

    segmenter = _segmenter(min(images.shape[1:3]), n_segments)
    out = []
    for i, image in enumerate(images):
        probabilities = classifier(image[None])[0]
        label = int(probabilities.argmax()) if labels is None else int(labels[i])
        explainer = lime_image.LimeImageExplainer(random_state=seed)
        # lime draws a tqdm bar on stderr for every image: noise in a worker's log
        with contextlib.redirect_stderr(io.StringIO()):
            explanation = explainer.explain_instance(
                image,
                classifier,
                labels=(label,),
                top_labels=None,
                num_samples=num_samples,
                batch_size=batch_size,
                segmentation_fn=segmenter,
                random_seed=seed,
            )
        _, mask = explanation.get_image_and_mask(
            label, positive_only=True, num_features=num_features, hide_rest=False
        )
        mask = mask.astype(bool)
        out.append(
            Explanation(
                image=image.copy(),
                overlay=green_overlay(image, mask),
                mask=mask,
                label=label,
                probabilities=probabilities,
            )
        )
    return out
