"""The GPU decode path (``[preprocessing] decoder = "nvjpeg"``), run here on the CPU.

torchvision decodes with libjpeg on the CPU and with nvJPEG on CUDA behind one call, so
everything around the decoder (batching, falling back to OpenCV, EXIF orientation, the
area resize) is checked here; ``bench/gpu_checks.py`` checks nvJPEG's pixels on a GPU.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from shared import nvjpeg
from shared.preprocess import PreprocessError, decode_resize, preprocess_images
from shared.synthetic import synthetic_photo

CPU = torch.device("cpu")


def _jpeg(path: Path, bgr: np.ndarray, orientation: int = 1, quality: int = 90) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(bgr[..., ::-1]).save(buf, "JPEG", quality=quality, exif=exif.tobytes())
    path.write_bytes(buf.getvalue())
    return path


def _photo(index: int, width: int, height: int) -> np.ndarray:
    return synthetic_photo(seed=0, index=index, size=(width, height), grade="B")


def _reference(path: Path, size: int) -> np.ndarray:
    """Full decode + INTER_AREA, RGB: what the issue's quality check compares with."""
    image = cv2.resize(cv2.imread(str(path)), (size, size), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize(
    ("source", "output"), [(1024, 256), (960, 256), (1280, 256), (999, 256), (700, 300), (9, 4)]
)
def test_area_weights_are_inter_area(source, output):
    weights = nvjpeg.area_weights(source, output)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    rng = np.random.default_rng(source)
    image = rng.integers(0, 256, (source, source, 3), dtype=np.uint8)
    ours = nvjpeg.resize(torch.from_numpy(image).permute(2, 0, 1), output).permute(1, 2, 0)
    theirs = cv2.resize(image, (output, output), interpolation=cv2.INTER_AREA)
    # equal but for rounding (OpenCV's integer-ratio path rounds halves its own way)
    diff = np.abs(ours.numpy().astype(int) - theirs)
    assert diff.max() <= 1 and diff.mean() < 0.01


def test_area_weights_refuse_to_enlarge():
    with pytest.raises(ValueError, match="enlarges"):
        nvjpeg.area_weights(100, 200)


@pytest.mark.parametrize(("height", "width"), [(300, 400), (200, 150), (511, 900)])
def test_under_twice_the_output_is_bilinear_like_inter_linear(height, width):
    rng = np.random.default_rng(height)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    ours = nvjpeg.resize(torch.from_numpy(image).permute(2, 0, 1), 256).permute(1, 2, 0)
    theirs = cv2.resize(image, (256, 256), interpolation=cv2.INTER_LINEAR)
    assert np.abs(ours.numpy().astype(int) - theirs).max() <= 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_comes_out_as_opencv_shows_it(tmp_path, orientation):
    path = _jpeg(tmp_path / "o.jpg", _photo(2, 640, 360), orientation)
    assert nvjpeg.jpeg_facts(path.read_bytes()) == (orientation, True)
    ours = nvjpeg.decode_shard([path], 96, CPU).images[0]
    assert cv2.PSNR(decode_resize(path, 96), ours) >= 40
    if orientation != 1:  # the check can fail: the picture as stored differs
        as_stored = decode_resize(_jpeg(tmp_path / "u.jpg", _photo(2, 640, 360)), 96)
        assert cv2.PSNR(as_stored, ours) < 30


@pytest.mark.parametrize(("width", "height"), [(1280, 1024), (1280, 960), (640, 480)])
def test_quality_against_the_full_decode(tmp_path, width, height):
    """The issue's check: at least 35 dB against full decode + INTER_AREA."""
    path = _jpeg(tmp_path / "p.jpg", _photo(1, width, height))
    assert cv2.PSNR(_reference(path, 256), nvjpeg.decode_shard([path], 256, CPU).images[0]) >= 40


def test_detailed_real_photo(tmp_path):
    path = _jpeg(tmp_path / "china.jpg", load_sample_image("china.jpg")[..., ::-1])
    assert cv2.PSNR(_reference(path, 128), nvjpeg.decode_shard([path], 128, CPU).images[0]) >= 40


def test_mixed_formats_batches_and_fallbacks(tmp_path, monkeypatch):
    """PNGs and grey JPEGs among colour JPEGs, split over several batches, and a JPEG
    the decoder refuses: each image lands at its own index, as the OpenCV path has it."""
    paths = [
        _jpeg(tmp_path / "a.jpg", _photo(3, 320, 240)),
        tmp_path / "b.png",
        _jpeg(tmp_path / "c.jpg", _photo(4, 600, 800), orientation=6),
        tmp_path / "d.jpg",
        _jpeg(tmp_path / "e.jpg", _photo(5, 1024, 768)),
        _jpeg(tmp_path / "f.jpg", _photo(10, 1024, 768)),  # resized with e.jpg, in one batch
        _jpeg(tmp_path / "g.jpg", _photo(11, 320, 240)),
    ]
    assert cv2.imwrite(str(paths[1]), _photo(6, 200, 100))
    Image.fromarray(_photo(7, 300, 300)[..., 0]).save(paths[3], "JPEG", quality=90)
    expected = preprocess_images(paths, 64)
    whole, on_device = nvjpeg.decode_shard(paths, 64, CPU)
    assert on_device == len(paths) - 1  # all but the PNG
    monkeypatch.setattr(nvjpeg, "BATCH_PIXELS", 300_000)  # a batch every image or two
    assert len({image.tobytes() for image in whole}) == len(paths)
    batched = nvjpeg.decode_shard(paths, 64, CPU).images
    np.testing.assert_array_equal(batched, whole)
    for i, (want, got) in enumerate(zip(expected, whole, strict=True)):
        assert cv2.PSNR(want, got) >= 40, paths[i]
    np.testing.assert_array_equal(whole[1], expected[1])  # the PNG: OpenCV's own output

    refuse = nvjpeg.decode_jpegs

    def refusing_c(datas, device):  # as nvJPEG refuses a CMYK or 12-bit JPEG
        out = refuse(datas, device)
        return [None if d == paths[2].read_bytes() else o for d, o in zip(datas, out, strict=True)]

    monkeypatch.setattr(nvjpeg, "decode_jpegs", refusing_c)
    refused = nvjpeg.decode_shard(paths, 64, CPU)
    assert refused.on_device == len(paths) - 2
    np.testing.assert_array_equal(refused.images[2], expected[2])


def test_cmyk_and_rgb_coded_jpegs_go_to_opencv(tmp_path, monkeypatch):
    """nvJPEG gets 8-bit grey and YCbCr JPEGs only: it is not known to convert CMYK or
    RGB-coded ones as libjpeg does, and might not refuse them."""
    colour = Image.fromarray(_photo(12, 320, 240)[..., ::-1])
    paths = {
        "cmyk": tmp_path / "cmyk.jpg",
        "rgb": tmp_path / "rgb.jpg",
        "ycbcr": tmp_path / "ycbcr.jpg",
        "grey": tmp_path / "grey.jpg",
        "progressive": tmp_path / "progressive.jpg",
    }
    colour.convert("CMYK").save(paths["cmyk"], "JPEG", quality=90)
    colour.save(paths["rgb"], "JPEG", quality=90, keep_rgb=True)  # Adobe transform 0
    colour.save(paths["ycbcr"], "JPEG", quality=90)
    colour.convert("L").save(paths["grey"], "JPEG", quality=90)
    colour.save(paths["progressive"], "JPEG", quality=90, progressive=True)
    suits = {name: nvjpeg.jpeg_facts(path.read_bytes())[1] for name, path in paths.items()}
    assert suits == {"cmyk": False, "rgb": False, "ycbcr": True, "grey": True, "progressive": True}

    sent: list[bytes] = []
    decode = nvjpeg.decode_jpegs

    def recording(datas, device):
        sent.extend(datas)
        return decode(datas, device)

    monkeypatch.setattr(nvjpeg, "decode_jpegs", recording)
    out, on_device = nvjpeg.decode_shard(list(paths.values()), 64, CPU)
    assert on_device == 3
    assert sorted(sent) == sorted(paths[n].read_bytes() for n, ok in suits.items() if ok)
    np.testing.assert_array_equal(out[0], decode_resize(paths["cmyk"], 64))
    np.testing.assert_array_equal(out[1], decode_resize(paths["rgb"], 64))


def test_a_batch_with_an_undecodable_image_decodes_the_rest(tmp_path):
    good = _jpeg(tmp_path / "g.jpg", _photo(8, 160, 120)).read_bytes()
    not_jpeg = cv2.imencode(".png", _photo(9, 16, 16))[1].tobytes()
    out = nvjpeg.decode_jpegs([good, not_jpeg, good], CPU)
    assert out[1] is None
    assert out[0] is not None and out[2] is not None and out[0].shape == (3, 120, 160)
    assert torch.equal(out[0], out[2])


def test_bad_input_is_one_line_naming_the_file(tmp_path):
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(_jpeg(tmp_path / "whole.jpg", _photo(1, 320, 240)).read_bytes()[:5000])
    with pytest.raises(PreprocessError, match=r"cut\.jpg: truncated JPEG"):
        nvjpeg.decode_shard([tmp_path / "whole.jpg", cut], 64, CPU)
    with pytest.raises(PreprocessError, match=r"gone\.jpg: image file is missing"):
        nvjpeg.decode_shard([tmp_path / "gone.jpg"], 64, CPU)


def test_only_the_bytes_hashed_at_submit_are_decoded(tmp_path):
    import hashlib

    path = _jpeg(tmp_path / "a.jpg", _photo(2, 160, 120))
    submitted = hashlib.sha256(path.read_bytes()).hexdigest()
    assert nvjpeg.decode_shard([path], 64, CPU, digests=[submitted]).images.shape == (1, 64, 64, 3)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(PreprocessError, match=r"a\.jpg: changed since the campaign was submitted"):
        nvjpeg.decode_shard([path], 64, CPU, digests=[submitted])
