"""The decode-once fast path: reduced JPEG decoding where it is safe, and its image quality."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from shared.preprocess import (
    ImageHeader,
    check_image,
    decode_flag,
    decode_resize,
    read_header,
)
from shared.synthetic import synthetic_photo
from tests.conftest import REPO


def _jpeg(path: Path, width: int, height: int, index: int = 1) -> Path:
    photo = synthetic_photo(seed=0, index=index, size=(width, height), grade="C")
    ok, buf = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def _full_decode_reference(path: Path, size: int) -> np.ndarray:
    """The slow path the fast one must match: full decode, area resize, RGB."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize(
    ("width", "height", "size", "expected"),
    [
        (1280, 1024, 256, cv2.IMREAD_REDUCED_COLOR_4),  # 1024 >= 4 * 256
        (1280, 1023, 256, cv2.IMREAD_REDUCED_COLOR_2),  # just under 4x on the short side
        (600, 800, 256, cv2.IMREAD_REDUCED_COLOR_2),
        (4000, 3000, 256, cv2.IMREAD_REDUCED_COLOR_8),
        (511, 2000, 256, cv2.IMREAD_COLOR),  # the short side is under 2x
        (320, 240, 256, cv2.IMREAD_COLOR),
        (8, 8, 256, cv2.IMREAD_COLOR),
    ],
)
def test_reduced_decoding_is_chosen_from_the_short_side(width, height, size, expected):
    assert decode_flag(ImageHeader("JPEG", width, height), size) == expected


def test_other_formats_are_always_decoded_whole():
    for fmt in ("PNG", "TIFF", "BMP", "WEBP"):
        assert decode_flag(ImageHeader(fmt, 4000, 3000), 256) == cv2.IMREAD_COLOR
    assert decode_flag(ImageHeader("MPO", 4000, 3000), 256) == cv2.IMREAD_REDUCED_COLOR_8


def test_header_is_read_without_decoding(tmp_path):
    path = _jpeg(tmp_path / "p.jpg", 1280, 1024)
    header, sha256 = check_image(path)
    assert header == ImageHeader("JPEG", 1280, 1024)
    assert len(sha256) == 64
    assert read_header(path.read_bytes(), path) == header


def test_fast_path_on_a_13_megapixel_jpeg_matches_full_decode(tmp_path):
    """The study's case: a ~1.3 MP photo to the 256 cache, decoded at 1/4 scale."""
    path = _jpeg(tmp_path / "photo.jpg", 1280, 1024)
    assert decode_flag(check_image(path)[0], 256) == cv2.IMREAD_REDUCED_COLOR_4
    fast = decode_resize(path, 256)
    reference = _full_decode_reference(path, 256)
    assert fast.shape == reference.shape == (256, 256, 3)
    assert fast.dtype == np.uint8
    psnr = cv2.PSNR(reference, fast)
    assert psnr >= 35, psnr
    # and it really is a different (reduced) decode, not the full one under another name
    assert not np.array_equal(fast, reference)


@pytest.mark.parametrize(
    ("width", "height", "size", "flag"),
    [
        (320, 256, 128, cv2.IMREAD_REDUCED_COLOR_2),
        (320, 256, 32, cv2.IMREAD_REDUCED_COLOR_8),
    ],
)
def test_every_reduction_keeps_the_picture(tmp_path, width, height, size, flag):
    path = _jpeg(tmp_path / "p.jpg", width, height, index=2)
    assert decode_flag(check_image(path)[0], size) == flag
    psnr = cv2.PSNR(_full_decode_reference(path, size), decode_resize(path, size))
    assert psnr >= 35, psnr


def test_small_jpeg_takes_the_full_decode_unchanged(tmp_path):
    path = _jpeg(tmp_path / "small.jpg", 320, 240, index=3)
    expected = cv2.cvtColor(
        cv2.resize(cv2.imread(str(path)), (256, 256), interpolation=cv2.INTER_LINEAR),
        cv2.COLOR_BGR2RGB,
    )
    np.testing.assert_array_equal(decode_resize(path, 256), expected)


def test_bench_smoke_prints_baseline_orchard_ratio_and_quality(tmp_path):
    out = tmp_path / "preprocess.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "preprocess.py"), "--tiny", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for needle in ("baseline: cv2.imread", "orchard: decode_resize", "ratio orchard/baseline"):
        assert needle in done.stdout
    result = json.loads(out.read_text())
    assert result["orchard_decode_modes"] == ["reduced/4"]
    assert result["psnr_db"]["min"] >= 35
    rates = result["img_per_s_per_core"]
    assert set(rates) == {"baseline", "baseline-linear", "orchard"}
    assert result["ratio_orchard_over_baseline"] == pytest.approx(
        rates["orchard"] / rates["baseline"], rel=0.01
    )
    assert result["machine"]["cpu"]
