"""The decode-once fast path: reduced JPEG decoding where it is safe, and its image quality."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import ExifTags, Image
from sklearn.datasets import load_sample_image

from shared.preprocess import (
    ImageHeader,
    PreprocessError,
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
        # a reduction of k needs the short side at least 1.5 * k * size
        (4096, 3072, 256, cv2.IMREAD_REDUCED_COLOR_4),  # 1/8 is never used
        (4000, 3000, 256, cv2.IMREAD_REDUCED_COLOR_4),
        (2048, 1536, 256, cv2.IMREAD_REDUCED_COLOR_4),  # 1536 = 1.5 * 4 * 256
        (2048, 1535, 256, cv2.IMREAD_REDUCED_COLOR_2),
        (1280, 1024, 256, cv2.IMREAD_REDUCED_COLOR_2),  # 4x, but 1/4 would leave only 1x
        (1280, 960, 256, cv2.IMREAD_REDUCED_COLOR_2),
        (768, 1024, 256, cv2.IMREAD_REDUCED_COLOR_2),  # 768 = 1.5 * 2 * 256
        (1280, 767, 256, cv2.IMREAD_COLOR),
        (600, 800, 256, cv2.IMREAD_COLOR),
        (320, 240, 256, cv2.IMREAD_COLOR),
        (8, 8, 256, cv2.IMREAD_COLOR),
    ],
)
def test_reduced_decoding_is_chosen_from_the_short_side(width, height, size, expected):
    assert decode_flag(ImageHeader("JPEG", width, height), size) == expected


def test_other_formats_are_always_decoded_whole():
    for fmt in ("PNG", "TIFF", "BMP", "WEBP"):
        assert decode_flag(ImageHeader(fmt, 4000, 3000), 256) == cv2.IMREAD_COLOR
    assert decode_flag(ImageHeader("MPO", 4000, 3000), 256) == cv2.IMREAD_REDUCED_COLOR_4


def test_header_is_read_without_decoding(tmp_path):
    path = _jpeg(tmp_path / "p.jpg", 1280, 1024)
    header, sha256 = check_image(path)
    assert header == ImageHeader("JPEG", 1280, 1024)
    assert len(sha256) == 64
    assert read_header(path.read_bytes(), path) == header


def test_fast_path_on_a_13_megapixel_jpeg_matches_full_decode(tmp_path):
    """The study's case: a ~1.3 MP photo to the 256 cache, decoded at 1/2 scale."""
    path = _jpeg(tmp_path / "photo.jpg", 1280, 1024)
    assert decode_flag(check_image(path)[0], 256) == cv2.IMREAD_REDUCED_COLOR_2
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
        (320, 256, 64, cv2.IMREAD_REDUCED_COLOR_2),
        (320, 256, 32, cv2.IMREAD_REDUCED_COLOR_4),
    ],
)
def test_every_reduction_keeps_the_picture(tmp_path, width, height, size, flag):
    path = _jpeg(tmp_path / "p.jpg", width, height, index=2)
    assert decode_flag(check_image(path)[0], size) == flag
    psnr = cv2.PSNR(_full_decode_reference(path, size), decode_resize(path, size))
    assert psnr >= 35, psnr


@pytest.mark.parametrize(
    ("size", "flag"), [(64, cv2.IMREAD_REDUCED_COLOR_4), (96, cv2.IMREAD_REDUCED_COLOR_2)]
)
def test_reduced_decoding_keeps_a_detailed_real_photo(tmp_path, size, flag):
    """A real, detailed photo (640x427): where the largest reduction that still covers the
    output, then a bilinear or short area resize, fell to about 33 dB, orchard stays >= 35."""
    path = tmp_path / "china.jpg"
    photo = load_sample_image("china.jpg")[..., ::-1]
    assert cv2.imwrite(str(path), photo, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert decode_flag(check_image(path)[0], size) == flag
    psnr = cv2.PSNR(_full_decode_reference(path, size), decode_resize(path, size))
    assert psnr >= 35, psnr


def _rotated_jpeg(path: Path, pixels_bgr: np.ndarray, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation  # EXIF Orientation
    buf = io.BytesIO()
    Image.fromarray(pixels_bgr[..., ::-1]).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize(
    ("size", "flag"), [(64, cv2.IMREAD_REDUCED_COLOR_2), (200, cv2.IMREAD_COLOR)]
)
def test_exif_orientation_is_applied_like_imread(tmp_path, size, flag):
    """A camera's portrait photo is stored sideways with Orientation 6 (turn 90 degrees
    clockwise): decoded reduced or whole, it comes out upright, as cv2.imread shows it."""
    photo = synthetic_photo(seed=0, index=4, size=(320, 240), grade="B")
    path = _rotated_jpeg(tmp_path / "portrait.jpg", photo, orientation=6)
    upright = _rotated_jpeg(tmp_path / "upright.jpg", np.rot90(photo, k=-1), orientation=1)
    assert decode_flag(check_image(path)[0], size) == flag
    out = decode_resize(path, size)
    assert cv2.PSNR(_full_decode_reference(path, size), out) >= 35
    assert cv2.PSNR(decode_resize(upright, size), out) >= 35
    # and the sideways picture really differs: the check above can fail
    assert cv2.PSNR(decode_resize(_rotated_jpeg(tmp_path / "x.jpg", photo, 1), size), out) < 30


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
        [
            sys.executable,
            str(REPO / "bench" / "preprocess.py"),
            "--tiny",
            "--nvjpeg",
            "cpu",  # the GPU workers' path, its decoder on the CPU
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for needle in ("baseline: cv2.imread", "orchard: decode_resize", "ratio orchard/baseline"):
        assert needle in done.stdout
    result = json.loads(out.read_text())
    assert result["machine"]["cpu"]
    rows = result["results"]
    shapes = {(r["image_set"], r["width"], r["height"]) for r in rows}
    assert shapes == {
        (name, 1280, height)
        for name in ("synthetic", "photo-mosaic", "synthetic-soft")
        for height in (1024, 960)
    }
    for row in rows:
        assert row["orchard_decode_modes"] == ["reduced/2"]
        assert row["jpeg_quality"] == 90 and row["jpeg_mean_kb"] > 0
        assert row["bits_per_pixel"] == pytest.approx(
            row["jpeg_mean_kb"] * 1024 * 8 / (row["width"] * row["height"]), rel=0.01
        )
        assert row["psnr_db"]["min"] >= 35
        rates = row["img_per_s_per_core"]
        assert set(rates) == {
            "baseline",
            "baseline-linear",
            "orchard",
            "previous-rule",
            "full-decode",
            "floor",
            "nvjpeg",
        }
        assert row["nvjpeg_device"] == "cpu" and row["nvjpeg_wall_img_per_s"] > 0
        assert row["psnr_db_nvjpeg"]["min"] >= 35
        assert row["ratio_orchard_over_baseline"] == pytest.approx(
            rates["orchard"] / rates["baseline"], rel=0.01
        )


# ---------------------------------------------------------------- JPEGs cut short or with more


def _encoded(progressive: bool = False, size: tuple[int, int] = (320, 240)) -> bytes:
    photo = synthetic_photo(seed=0, index=2, size=size, grade="B")
    ok, buf = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)])
    assert ok
    return buf.tobytes()


def _with_exif_thumbnail(jpeg: bytes, thumbnail: bytes) -> bytes:
    """``jpeg`` with an APP1 EXIF segment holding ``thumbnail`` (IFD1), as cameras write."""
    ifd0 = struct.pack("<HI", 0, 14)  # no entries; IFD1 at 14
    ifd1 = struct.pack("<H", 2)
    ifd1 += struct.pack("<HHII", 0x0201, 4, 1, 44)  # JPEGInterchangeFormat: the offset
    ifd1 += struct.pack("<HHII", 0x0202, 4, 1, len(thumbnail))  # and its length
    ifd1 += struct.pack("<I", 0)
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd0 + ifd1 + thumbnail
    body = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", 2 + len(body)) + body + jpeg[2:]


def _trailer(seed: int) -> bytes:
    """What may follow a whole JPEG (a Motion Photo's MP4, a maker's data): random bytes,
    here always with an end-of-image and then a start-of-scan marker in them."""
    noise = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    return b"\x00\x00\x00\x18ftypmp42" + noise + b"\xff\xd9" + noise[:99] + b"\xff\xda\x00\x0c"


def _scans(data: bytes) -> list[int]:
    starts, pos = [], data.find(b"\xff\xda")
    while pos >= 0:
        starts.append(pos)
        pos = data.find(b"\xff\xda", pos + 2)
    return starts


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_a_whole_jpeg_with_data_after_it_is_accepted(tmp_path, progressive):
    jpeg = _encoded(progressive)
    for seed in range(20):
        data = jpeg + _trailer(seed)
        assert read_header(data, tmp_path / f"{seed}.jpg") == ImageHeader("JPEG", 320, 240)
    # and OpenCV decodes it as the picture it is
    decoded = cv2.imdecode(np.frombuffer(jpeg + _trailer(0), np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(decoded, cv2.imdecode(np.frombuffer(jpeg, np.uint8), 1))


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_a_jpeg_cut_short_is_refused(tmp_path, progressive):
    jpeg = _encoded(progressive)
    scans = _scans(jpeg)
    assert len(scans) > 1 if progressive else len(scans) == 1
    cuts = [
        scans[0] + 64,  # early in the first scan
        (scans[0] + len(jpeg)) // 2,  # in the middle of the picture
        len(jpeg) - 2,  # just before the end-of-image marker
        len(jpeg) - 1,
    ]
    cuts += [start - 1 for start in scans[1:]]  # between two scans, tables and all
    for cut in cuts:
        with pytest.raises(PreprocessError, match="truncated JPEG"):
            read_header(jpeg[:cut], tmp_path / f"cut{cut}.jpg")


def test_a_jpeg_with_an_exif_thumbnail_is_read_past_it(tmp_path):
    thumbnail = _encoded(size=(160, 120))
    jpeg = _with_exif_thumbnail(_encoded(progressive=True), thumbnail)
    path = tmp_path / "camera.jpg"
    path.write_bytes(jpeg)
    with Image.open(path) as image:  # Pillow finds the thumbnail where a reader looks
        thumb = image.getexif().get_ifd(ExifTags.IFD.IFD1)
        assert thumb == {0x0201: 44, 0x0202: len(thumbnail)}
    assert read_header(jpeg, path) == ImageHeader("JPEG", 320, 240)
    assert read_header(jpeg + _trailer(1), path) == ImageHeader("JPEG", 320, 240)
    assert decode_resize(path, 64).shape == (64, 64, 3)
    # the thumbnail's own scan and end-of-image marker do not stand for the main picture's
    main_scan = _scans(jpeg)[-1]
    with pytest.raises(PreprocessError, match="truncated JPEG"):
        read_header(jpeg[: main_scan + 100], path)


def test_only_the_bytes_hashed_at_submit_are_decoded(tmp_path):
    """The cache is keyed by each image's sha256 at submit: a file changed since then
    (an edit, a symlink swapped) is refused, naming it, before it is decoded."""
    import hashlib

    from shared.preprocess import PreprocessError, decode_resize, preprocess_images

    path = _jpeg(tmp_path / "a.jpg", 640, 480)
    submitted = hashlib.sha256(path.read_bytes()).hexdigest()
    first = decode_resize(path, 64, sha256=submitted)
    assert np.array_equal(first, decode_resize(path, 64))
    path.write_bytes(path.read_bytes() + b"\0")  # still decodes, other bytes
    for decode in (
        lambda: decode_resize(path, 64, sha256=submitted),
        lambda: preprocess_images([path], 64, digests=[submitted]),
    ):
        with pytest.raises(PreprocessError) as info:
            decode()
        assert str(info.value) == (
            f"{path}: changed since the campaign was submitted (its sha256 is not the one "
            "recorded then); submit the campaign again to use the new file"
        )
    assert preprocess_images([path], 64, digests=[None]).shape == (1, 64, 64, 3)
    path.unlink()  # removed since the submit: what to do about it, too
    with pytest.raises(PreprocessError) as info:
        decode_resize(path, 64, sha256=submitted)
    assert str(info.value) == (
        f"{path}: image file is missing (removed or moved since the campaign was submitted): "
        "put it back and `orchard resume` the campaign, or submit the campaign again"
    )
