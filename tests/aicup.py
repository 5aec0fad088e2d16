"""Small competition-style datasets on disk for tests: ``<root>/train.csv`` and its
JPEGs, the layout of the study's data (``[dataset] kind = "aicup"``)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

CLASSES = ("A", "B", "C")


def write_jpeg(path: Path, seed: int = 0, size: tuple[int, int] = (24, 20)) -> Path:
    """A small, distinct JPEG (``size`` is width, height)."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(128, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def make_aicup(root: Path, per_class: int = 5, test: int = 0) -> Path:
    """``per_class`` labelled training images per class (ids 000.jpg, 001.jpg, ...,
    classes in turn) and ``test`` unlabelled test images."""
    rows = ["image_id,label"]
    for i in range(per_class * len(CLASSES)):
        image_id = f"{i:03d}.jpg"
        write_jpeg(root / "train" / image_id, seed=i)
        rows.append(f"{image_id},{CLASSES[i % len(CLASSES)]}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    if test:
        for i in range(test):
            write_jpeg(root / "test" / f"t{i:03d}.jpg", seed=1000 + i)
        lines = ["image_id,label"] + [f"t{i:03d}.jpg," for i in range(test)]
        (root / "test.csv").write_text("\n".join(lines) + "\n")
    return root


def one_line(exc: BaseException, *fragments: str) -> str:
    """``exc`` is orchard's own error, its message one line holding every fragment."""
    from shared.errors import OrchardError

    message = str(exc)
    assert isinstance(exc, OrchardError), repr(exc)
    assert "\n" not in message and "\r" not in message and "Traceback" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message
