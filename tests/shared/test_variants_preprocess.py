"""Feature variants of the cache, decoding, shards and cache keys."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from shared.preprocess import (
    PreprocessError,
    cache_key,
    dataset_fingerprint,
    decode_resize,
    load_shard,
    preprocess_images,
    shard_ranges,
    write_shard,
)
from shared.variants import ALIASES, check_variant, derive, polar_warp, variant_shape

CACHE = 64


def _random_cache(n: int = 2, size: int = CACHE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------- variants


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("full", (256, 256, 3)),
        ("crop224", (224, 224, 3)),
        ("resize128", (128, 128, 3)),
        ("polar192", (192, 192, 3)),
        ("polarcrop192", (96, 192, 3)),
    ],
)
def test_variant_shape_at_study_cache(name, shape):
    assert variant_shape(name, 256) == shape


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("full", (CACHE, CACHE, 3)),
        ("crop48", (48, 48, 3)),
        ("resize32", (32, 32, 3)),
        ("polar48", (48, 48, 3)),
        ("polarcrop48", (24, 48, 3)),
    ],
)
def test_derive_matches_variant_shape(name, shape):
    out = derive(_random_cache(3), name)
    assert out.shape == (3, *shape)
    assert out.dtype == np.uint8


@pytest.mark.parametrize("name", ["polar", "crop", "blur64", "Full", "crop224 ", "resize4"])
def test_check_variant_rejects_bad_names(name):
    with pytest.raises(ValueError, match="variant"):
        check_variant(name)


def test_check_variant_rejects_crop_bigger_than_cache():
    check_variant("crop224", 256)
    with pytest.raises(ValueError, match="cannot crop 300 from a 256 cache"):
        check_variant("crop300", 256)
    with pytest.raises(ValueError):
        variant_shape("crop300", 256)


def test_derive_rejects_non_square_input():
    with pytest.raises(ValueError, match="expected"):
        derive(np.zeros((1, 32, 48, 3), np.uint8), "full")


def test_crop_is_exactly_the_centre():
    images = _random_cache(2)
    out = derive(images, "crop48")
    np.testing.assert_array_equal(out, images[:, 8:56, 8:56])


def test_crop224_of_256_is_centre():
    images = _random_cache(1, 256)
    np.testing.assert_array_equal(derive(images, "crop224")[0], images[0, 16:240, 16:240])


def test_full_is_the_cache_itself():
    images = _random_cache(2)
    np.testing.assert_array_equal(derive(images, "full"), images)


def _disc(size: int, radius: int) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    cv2.circle(image, (size // 2, size // 2), radius, (255, 255, 255), -1)
    return image


def test_polar_warp_puts_centre_in_top_rows():
    warped = polar_warp(_disc(96, 20))
    assert warped.shape == (96, 96, 3)
    assert warped[:8].mean() > 240  # radius near 0: inside the disc
    assert warped[-16:].mean() < 15  # radius near the border: dark


def test_polar192_variant_centre_is_bright_top_dark_bottom():
    images = _disc(256, 50)[None]
    polar = derive(images, "polar192")[0]
    assert polar[:20].mean() > 240
    assert polar[-40:].mean() < 15
    crop = derive(images, "polarcrop192")[0]
    np.testing.assert_array_equal(crop, polar[:96])


@pytest.mark.parametrize(
    ("alias", "name", "shape"),
    [
        ("original", "resize192", (192, 192, 3)),
        ("polarized", "polar192", (192, 192, 3)),
        ("cropped", "polarcrop192", (96, 192, 3)),  # the study's 96 x 192 x 3
    ],
)
def test_study_names_are_aliases(alias, name, shape):
    assert ALIASES[alias] == name
    check_variant(alias, 64)
    assert variant_shape(alias, 256) == shape
    images = _random_cache(2)
    np.testing.assert_array_equal(derive(images, alias), derive(images, name))


def test_aliases_are_valid_in_a_campaign():
    from shared.spec import parse_campaign

    campaign = parse_campaign(
        {
            "name": "v",
            "dataset": {"kind": "synthetic"},
            "svm": {"variant": ["original", "polarized", "cropped", "polarcrop64"]},
        },
        source="v.toml",
    )
    assert campaign.svm.variant == ("original", "polarized", "cropped", "polarcrop64")


def test_cropped_keeps_the_fruit_not_the_corners():
    # a centred fruit on a background whose corners are different (hands, baskets)
    image = np.full((256, 256, 3), 60, np.uint8)
    image[:40, :40] = image[-40:, -40:] = image[:40, -40:] = image[-40:, :40] = 250
    cv2.circle(image, (128, 128), 60, (200, 150, 30), -1)
    cropped = derive(image[None], "cropped")[0]
    assert cropped.shape == (96, 192, 3)
    fruit = np.array([200, 150, 30])
    share = (np.abs(cropped.astype(int) - fruit).sum(-1) < 30).mean()
    assert share > 0.6  # mostly fruit
    assert (cropped == 250).all(-1).mean() < 0.01  # none of the corners


def test_polar_warp_keeps_the_corners_and_fills_outside_black():
    image = np.full((64, 64, 3), 200, np.uint8)
    image[0, 0] = image[-1, -1] = 255
    warped = polar_warp(image)
    # the radius reaches the corners: nothing of the photo is lost
    assert (warped == 255).all(-1).any()
    # beyond the edges (large radius, angles towards the sides) samples are black,
    # not uninitialised memory: the same input always gives the same output
    assert (warped[-1] == 0).all(-1).any()
    np.testing.assert_array_equal(polar_warp(image), warped)


# ---------------------------------------------------------------- decode_resize


def _write_image(path: Path, image: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), image)
    return path


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_decode_returns_rgb(tmp_path, suffix):
    red_bgr = np.zeros((40, 60, 3), np.uint8)
    red_bgr[..., 2] = 255  # cv2 writes BGR: this is pure red
    out = decode_resize(_write_image(tmp_path / f"red{suffix}", red_bgr), 32)
    assert out.shape == (32, 32, 3)
    assert out.dtype == np.uint8
    assert out[..., 0].min() > 240
    assert out[..., 1].max() < 15
    assert out[..., 2].max() < 15


def test_decode_upscales_small_images(tmp_path):
    out = decode_resize(_write_image(tmp_path / "s.png", np.full((8, 8, 3), 77, np.uint8)), 32)
    assert out.shape == (32, 32, 3)
    assert (out == 77).all()


def test_grayscale_png_becomes_three_channels(tmp_path):
    gray = np.full((20, 20), 100, np.uint8)
    out = decode_resize(_write_image(tmp_path / "g.png", gray), 16)
    assert out.shape == (16, 16, 3)
    assert (out == 100).all()


def test_rgba_png_becomes_three_channels(tmp_path):
    bgra = np.zeros((20, 20, 4), np.uint8)
    bgra[..., 0] = 255  # blue
    bgra[..., 3] = 128
    out = decode_resize(_write_image(tmp_path / "a.png", bgra), 16)
    assert out.shape == (16, 16, 3)
    assert out[..., 2].min() > 240  # blue lands in RGB channel 2
    assert out[..., 0].max() < 15


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(b"", "empty file"), (b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, "not a decodable image")],
    ids=["zero-bytes", "corrupt"],
)
def test_bad_image_file_raises_one_line_naming_path(tmp_path, content, fragment):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(PreprocessError) as info:
        decode_resize(path, 32)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert fragment in message


def test_missing_image_raises_preprocess_error(tmp_path):
    path = tmp_path / "missing.png"
    with pytest.raises(PreprocessError, match="missing.png"):
        decode_resize(path, 32)


def test_preprocess_images_stacks_in_order(tmp_path):
    paths = [
        _write_image(tmp_path / f"{v}.png", np.full((10, 10, 3), v, np.uint8)) for v in (10, 200)
    ]
    out = preprocess_images(paths, 16)
    assert out.shape == (2, 16, 16, 3)
    assert out[0].max() == 10 and out[1].min() == 200


# ---------------------------------------------------------------- shards


def test_shard_round_trip_with_checksum(tmp_path):
    images = _random_cache(3, 16)
    written = write_shard(tmp_path / "sub" / "shard-00000.npy", images)
    assert written.size == written.path.stat().st_size
    loaded = load_shard(written.path, sha256=written.sha256)
    np.testing.assert_array_equal(loaded, images)
    assert loaded.dtype == np.uint8


def test_write_shard_rejects_non_uint8(tmp_path):
    with pytest.raises(ValueError):
        write_shard(tmp_path / "s.npy", np.zeros((1, 4, 4, 3), np.float32))
    assert not (tmp_path / "s.npy").exists()


def test_load_shard_wrong_checksum(tmp_path):
    written = write_shard(tmp_path / "s.npy", _random_cache(1, 8))
    with pytest.raises(PreprocessError, match="checksum"):
        load_shard(written.path, sha256="0" * 64)


def test_load_shard_truncated_with_checksum(tmp_path):
    written = write_shard(tmp_path / "s.npy", _random_cache(2, 8))
    written.path.write_bytes(written.path.read_bytes()[:-10])
    with pytest.raises(PreprocessError, match="checksum"):
        load_shard(written.path, sha256=written.sha256)


@pytest.mark.parametrize("keep", [-10, 60, 3], ids=["data", "header", "magic"])
def test_load_shard_truncated_without_checksum(tmp_path, keep):
    written = write_shard(tmp_path / "s.npy", _random_cache(2, 8))
    blob = written.path.read_bytes()
    written.path.write_bytes(blob[:keep])
    with pytest.raises(PreprocessError) as info:
        load_shard(written.path)
    assert str(info.value).startswith(f"{written.path}: ")


def test_load_shard_zero_bytes_without_checksum(tmp_path):
    path = tmp_path / "s.npy"
    path.write_bytes(b"")
    with pytest.raises(PreprocessError):
        load_shard(path)


def test_load_shard_missing(tmp_path):
    with pytest.raises(PreprocessError, match="missing"):
        load_shard(tmp_path / "nope.npy")


# ---------------------------------------------------------------- fingerprints and keys


def _items(tmp_path: Path) -> list[tuple[str, str, Path]]:
    items = []
    for i in range(3):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(bytes([i]) * 100)
        items.append(("train", f"{i}.jpg", path))
    return items


def test_fingerprint_changes_with_one_image_bytes(tmp_path):
    items = _items(tmp_path)
    before = dataset_fingerprint(items)
    assert dataset_fingerprint(items) == before
    items[1][2].write_bytes(b"\x01" * 99 + b"\x02")
    assert dataset_fingerprint(items) != before


def test_fingerprint_depends_on_split_and_id_not_path(tmp_path):
    items = _items(tmp_path)
    before = dataset_fingerprint(items)
    moved = tmp_path / "moved.jpg"
    moved.write_bytes(items[0][2].read_bytes())
    assert dataset_fingerprint([("train", "0.jpg", moved), *items[1:]]) == before
    assert dataset_fingerprint([("test", "0.jpg", items[0][2]), *items[1:]]) != before
    assert dataset_fingerprint([("train", "x.jpg", items[0][2]), *items[1:]]) != before


def test_cache_key_depends_on_size_and_shard_size():
    fp = "f" * 64
    assert cache_key(fp, 256, 64) == cache_key(fp, 256, 64)
    assert cache_key(fp, 256, 64) != cache_key(fp, 128, 64)
    assert cache_key(fp, 256, 64) != cache_key(fp, 256, 32)
    assert cache_key(fp, 256, 64) != cache_key("e" * 64, 256, 64)


def test_cache_key_keeps_opencv_shards_and_sets_nvjpeg_apart():
    fp = "f" * 64
    # the key earlier versions wrote for OpenCV's shards, so that their caches stay valid
    assert cache_key(fp, 256, 64, "opencv") == "8c40ca877d75bca8c482"
    assert cache_key(fp, 256, 64) == cache_key(fp, 256, 64, "opencv")
    assert cache_key(fp, 256, 64, "nvjpeg") != cache_key(fp, 256, 64)


@pytest.mark.parametrize(("count", "size"), [(0, 4), (1, 4), (8, 4), (10, 4), (10, 64), (7, 1)])
def test_shard_ranges_cover_everything_once(count, size):
    ranges = shard_ranges(count, size)
    covered = [i for start, stop in ranges for i in range(start, stop)]
    assert covered == list(range(count))
    assert all(0 < stop - start <= size for start, stop in ranges)
