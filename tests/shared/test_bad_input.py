"""Issue 5's bad-input list, case by case, as the README's "Bad input" table promises.

A problem with one image is skipped and listed in ``Manifest.skipped`` (unless too many
are bad); a problem with the dataset's description stops with one line naming it.
The campaign-file and unreachable-service cases are at the end of this file and in
``tests/scheduler/test_bad_input_cli.py``.
"""

from __future__ import annotations

import codecs
import os
import struct
import zlib
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from shared.datasets import DatasetError
from shared.errors import OrchardError
from shared.manifest import NO_FOLD, Manifest, ManifestError, build_manifest
from shared.preprocess import PreprocessError, decode_resize, preprocess_images
from shared.spec import CampaignError, load_campaign, parse_campaign
from shared.synthetic import synthetic_photo
from tests.aicup import CLASSES, make_aicup, one_line, write_jpeg

# ---------------------------------------------------------------- helpers


def campaign_for(root: Path, folds: int = 2, dataset: dict | None = None, **preprocessing):
    raw = {
        "name": "bad",
        "folds": folds,
        "dataset": {"kind": "aicup", "root": str(root), **(dataset or {})},
        "preprocessing": {"size": 32, **preprocessing},
    }
    return parse_campaign(raw, source="<test>")


def manifest_of(tmp_path: Path, root: Path, **options) -> Manifest:
    return build_manifest(campaign_for(root, **options), tmp_path / "artifacts")


def png_bomb(path: Path, side: int = 20_000) -> Path:
    """A 1-bit grey PNG of side x side pixels whose file is tiny: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" * (1 + side // 8)
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    pixels = zlib.compress(row * side, 9)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )
    return path


# ---------------------------------------------------------------- one bad image: skipped


def _corrupt(path: Path) -> None:
    path.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(64) + b"not a JPEG at all" * 8)


def _truncate(path: Path) -> None:
    # cut in the middle of the pixel data, so that the header is still whole
    data = path.read_bytes()
    scan = data.index(b"\xff\xda")
    path.write_bytes(data[: (scan + len(data)) // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _remove(path: Path) -> None:
    path.unlink()


def _bomb(path: Path) -> None:
    png_bomb(path)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_corrupt, "not a decodable image"),
        (_truncate, "truncated JPEG"),
        (_empty, "empty file"),
        (_remove, "listed in"),
        (_bomb, "pixel limit"),
    ],
    ids=["corrupt-jpeg", "truncated-jpeg", "zero-byte", "listed-but-missing", "decompression-bomb"],
)
def test_one_bad_image_is_skipped_and_listed(tmp_path, damage, reason):
    root = make_aicup(tmp_path / "data", test=2)
    bad = root / "train" / "004.jpg"
    damage(bad)
    manifest = manifest_of(tmp_path, root)
    assert [s.image_id for s in manifest.skipped] == ["004.jpg"]
    [skipped] = manifest.skipped
    assert skipped.split == "train" and skipped.path == str(bad)
    assert reason in skipped.reason
    if damage is _remove:
        assert f"{root / 'train.csv'}:6" in skipped.reason  # the CSV line that lists it
    assert "004.jpg" not in {e.image_id for e in manifest.entries}
    assert len(manifest.entries) == 14 + 2
    # folds are drawn over the good images only, and the skip survives the JSON round trip
    assert Counter(e.fold for e in manifest.entries if e.split == "train") == {0: 7, 1: 7}
    assert Manifest.from_json(manifest.to_json()) == manifest


def test_pixel_limit_is_configurable(tmp_path):
    root = make_aicup(tmp_path / "data")
    write_jpeg(root / "train" / "007.jpg", seed=7, size=(64, 48))  # 3072 pixels, others 480
    manifest = manifest_of(tmp_path, root, max_pixels=1000)
    [skipped] = manifest.skipped
    assert skipped.image_id == "007.jpg"
    assert "64x48 is more than the pixel limit of 1,000" in skipped.reason
    assert manifest.max_pixels == 1000


def test_bomb_is_refused_before_decoding(tmp_path):
    with pytest.raises(PreprocessError) as info:
        decode_resize(png_bomb(tmp_path / "bomb.png"), 32)
    one_line(info.value, str(tmp_path / "bomb.png"), "pixel limit of 100,000,000")


def test_image_present_but_not_listed_is_left_out_and_listed(tmp_path):
    root = make_aicup(tmp_path / "data")
    for name in ("extra1.jpg", "extra2.png", "extra3.jpg"):  # 3 of 18 files: not a stop
        write_jpeg(root / "train" / name, seed=99)
    (root / "train" / "notes.txt").write_text("not an image, not reported")
    manifest = manifest_of(tmp_path, root)
    assert len(manifest.entries) == 15
    assert [(s.image_id, s.reason) for s in manifest.skipped] == [
        (name, "not listed in train.csv") for name in ("extra1.jpg", "extra2.png", "extra3.jpg")
    ]


def test_an_unrecognisable_image_has_the_same_reason_every_time(tmp_path):
    # Pillow's message names the BytesIO it read, with its memory address
    root = make_aicup(tmp_path / "data")
    (root / "train" / "003.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    reasons = {s.reason for _ in range(3) for s in manifest_of(tmp_path, root).skipped}
    assert reasons == {"not a decodable image (cannot identify image file)"}


def test_macos_dot_files_in_an_imagefolder_are_not_images(tmp_path):
    root = tmp_path / "flowers"
    for name in ("apple", "kiwi"):
        for j in range(4):
            write_jpeg(root / name / f"{j}.jpg", seed=j)
        # what Finder leaves on a non-Mac volume and zip keeps: 2 of 10 files
        (root / name / "._0.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
        write_jpeg(root / name / ".ipynb_checkpoints" / "0-checkpoint.jpg")
    manifest = manifest_of(tmp_path, root, dataset={"kind": "imagefolder"})
    assert len(manifest.entries) == 8 and manifest.skipped == ()
    assert all("/." not in e.image_id and "/." not in e.path for e in manifest.entries)


def test_image_changed_after_submit_fails_its_shard_with_one_line(tmp_path):
    root = make_aicup(tmp_path / "data")
    manifest = manifest_of(tmp_path, root)
    paths = manifest.image_paths(manifest.entries, tmp_path / "artifacts")
    victim = Path(paths[3])
    victim.write_bytes(b"")
    with pytest.raises(PreprocessError) as info:
        preprocess_images(paths, manifest.size)
    one_line(info.value, str(victim), "empty file")


# ---------------------------------------------------------------- too many bad: stop


def test_more_than_a_tenth_unusable_stops_naming_them(tmp_path):
    root = make_aicup(tmp_path / "data")
    _corrupt(root / "train" / "001.jpg")
    _remove(root / "train" / "002.jpg")
    with pytest.raises(ManifestError) as info:
        manifest_of(tmp_path, root)
    one_line(
        info.value,
        "2 of 15 images are unusable",
        "max_bad_fraction = 0.1",
        str(root / "train" / "001.jpg"),
        str(root / "train" / "002.jpg"),
    )


def test_bad_fraction_is_configurable(tmp_path):
    root = make_aicup(tmp_path / "data")
    _corrupt(root / "train" / "001.jpg")
    _remove(root / "train" / "002.jpg")
    manifest = manifest_of(tmp_path, root, max_bad_fraction=0.2)
    assert [s.image_id for s in manifest.skipped] == ["001.jpg", "002.jpg"]


def test_a_class_left_without_images_stops(tmp_path):
    root = make_aicup(tmp_path / "data")
    for i in range(2, 15, 3):  # every C image
        _empty(root / "train" / f"{i:03d}.jpg")
    with pytest.raises(ManifestError) as info:
        manifest_of(tmp_path, root, max_bad_fraction=0.5)
    one_line(info.value, "class 'C' has 0 labelled training images", "after skipping 5")


def test_every_image_missing_stops(tmp_path):
    root = make_aicup(tmp_path / "data", per_class=1)
    for path in (root / "train").iterdir():
        path.unlink()
    with pytest.raises(ManifestError) as info:
        manifest_of(tmp_path, root)
    one_line(info.value, "3 of 3 images are unusable", "train.csv:2")


# ---------------------------------------------------------------- odd but fine images


def _gray_jpeg(path: Path) -> np.ndarray:
    cv2.imwrite(str(path), np.full((20, 24), 90, np.uint8))
    return np.array([90, 90, 90])


def _rgba_png(path: Path) -> np.ndarray:
    bgra = np.zeros((20, 24, 4), np.uint8)
    bgra[..., 1], bgra[..., 3] = 200, 100  # green, half transparent
    cv2.imwrite(str(path), bgra)
    return np.array([0, 200, 0])


def _palette_png(path: Path) -> np.ndarray:
    Image.new("RGB", (24, 20), (10, 20, 200)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        path
    )
    return np.array([10, 20, 200])


def _rgb_png(path: Path) -> np.ndarray:
    cv2.imwrite(str(path), np.full((20, 24, 3), (30, 60, 90), np.uint8))  # BGR
    return np.array([90, 60, 30])


def _other_format(path: Path) -> np.ndarray:
    params = [cv2.IMWRITE_WEBP_QUALITY, 101] if path.suffix == ".webp" else []  # lossless
    cv2.imwrite(str(path), np.full((20, 24, 3), (30, 60, 90), np.uint8), params)
    return np.array([90, 60, 30])


def _tiny_jpeg(path: Path) -> np.ndarray:
    cv2.imwrite(str(path), np.full((8, 8, 3), 128, np.uint8))
    return np.array([128, 128, 128])


def _png16(path: Path) -> np.ndarray:
    cv2.imwrite(str(path), np.full((20, 24, 3), (10, 20, 30), np.uint16) * 257)
    return np.array([30, 20, 10])


def _tiff16(path: Path) -> np.ndarray:
    cv2.imwrite(str(path), np.full((20, 24, 3), 40000, np.uint16))
    return np.array([40000 // 256] * 3)


ODD_IMAGES = {
    "gray.jpg": _gray_jpeg,
    "rgba.png": _rgba_png,
    "palette.png": _palette_png,
    "plain.png": _rgb_png,
    "plain.bmp": _other_format,
    "plain.webp": _other_format,
    "tiny8x8.jpg": _tiny_jpeg,
    "deep16.png": _png16,
    "deep16.tif": _tiff16,
}


@pytest.mark.parametrize("name", sorted(ODD_IMAGES))
def test_odd_images_decode_to_8_bit_rgb(tmp_path, name):
    path = tmp_path / name
    expected = ODD_IMAGES[name](path)
    out = decode_resize(path, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.abs(out.reshape(-1, 3).astype(int) - expected).max() <= 2, out[0, 0]


def test_odd_images_pass_the_submit_check(tmp_path):
    root = make_aicup(tmp_path / "data")
    rows = (root / "train.csv").read_text().splitlines()
    for i, (name, write) in enumerate(sorted(ODD_IMAGES.items())):
        write(root / "train" / name)
        rows.append(f"{name},{CLASSES[i % 3]}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    manifest = manifest_of(tmp_path, root)
    assert manifest.skipped == ()
    assert len(manifest.entries) == 15 + len(ODD_IMAGES)
    cache = preprocess_images(manifest.image_paths(manifest.entries, tmp_path), manifest.size)
    assert cache.shape == (len(manifest.entries), 32, 32, 3)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_image_decodes_like_its_8_bit_version(tmp_path, suffix):
    photo = synthetic_photo(seed=0, index=5, size=(96, 72))
    cv2.imwrite(str(tmp_path / f"eight{suffix}"), photo)
    cv2.imwrite(str(tmp_path / f"sixteen{suffix}"), photo.astype(np.uint16) * 257)
    eight = decode_resize(tmp_path / f"eight{suffix}", 64).astype(int)
    sixteen = decode_resize(tmp_path / f"sixteen{suffix}", 64).astype(int)
    assert np.abs(eight - sixteen).max() <= 1


def test_16_bit_grey_png_decodes_like_its_8_bit_version(tmp_path):
    grey = synthetic_photo(seed=0, index=6, size=(96, 72))[..., 1]
    cv2.imwrite(str(tmp_path / "eight.png"), grey)
    cv2.imwrite(str(tmp_path / "sixteen.png"), grey.astype(np.uint16) * 257)
    eight = decode_resize(tmp_path / "eight.png", 64).astype(int)
    assert np.abs(eight - decode_resize(tmp_path / "sixteen.png", 64)).max() <= 1


# ---------------------------------------------------------------- the CSV


def _ids_and_labels(manifest: Manifest) -> list[tuple[str, str | None]]:
    return [(e.image_id, e.label) for e in manifest.entries]


def _rewrite_csv(root: Path, header: str | None, extra: str = "", encoding="utf-8") -> None:
    rows = (root / "train.csv").read_text().splitlines()[1:]
    lines = ([header] if header else []) + [row + extra for row in rows]
    (root / "train.csv").write_text("\n".join(lines) + "\n", encoding=encoding)


@pytest.mark.parametrize(
    ("header", "extra", "encoding"),
    [
        (None, "", "utf-8"),
        ("filename,grade", "", "utf-8"),
        ("image_id,label,weight,note", ",0.5,from the field", "utf-8"),
        ("image_id,label", "", "utf-8-sig"),
        ("image_id,label", "", "utf-16"),
    ],
    ids=["no-header", "other-header", "extra-columns", "utf-8-bom", "utf-16-bom"],
)
def test_csv_variants_read_the_same(tmp_path, header, extra, encoding):
    reference = _ids_and_labels(manifest_of(tmp_path / "a", make_aicup(tmp_path / "ref")))
    root = make_aicup(tmp_path / "data")
    _rewrite_csv(root, header, extra, encoding)
    if encoding != "utf-8":
        assert (
            (root / "train.csv")
            .read_bytes()
            .startswith((codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
        )
    assert _ids_and_labels(manifest_of(tmp_path / "b", root)) == reference


def test_csv_in_another_encoding_stops(tmp_path):
    root = make_aicup(tmp_path / "data")
    write_jpeg(root / "train" / "mangó.jpg")
    with open(root / "train.csv", "a", encoding="latin-1") as fh:
        fh.write("mangó.jpg,A\n")
    with pytest.raises(DatasetError) as info:
        manifest_of(tmp_path, root)
    one_line(info.value, str(root / "train.csv"), "not UTF-8", "0xf3")


def test_csv_that_is_not_text_stops(tmp_path):
    root = make_aicup(tmp_path / "data")
    (root / "train.csv").write_bytes(b"image_id,label\n001.jpg\x00\x00,A\n")
    with pytest.raises(DatasetError) as info:
        manifest_of(tmp_path, root)
    one_line(info.value, str(root / "train.csv"))


@pytest.mark.parametrize(
    ("row", "fragments"),
    [
        ("003.jpg,D", ["train.csv:17", "unknown label 'D'"]),
        ("003.jpg,A", ["train.csv:17", "duplicate image id '003.jpg'", "train.csv:5"]),
        ("../outside.jpg,A", ["train.csv:17", "invalid image id '../outside.jpg'"]),
        ("/etc/passwd,A", ["train.csv:17", "invalid image id '/etc/passwd'"]),
        ("sub\\x.jpg,A", ["train.csv:17", "invalid image id"]),
    ],
    ids=["unknown-label", "duplicate-id", "dotdot-path", "absolute-path", "backslash-path"],
)
def test_bad_csv_row_stops_naming_the_line(tmp_path, row, fragments):
    root = make_aicup(tmp_path / "data")
    with open(root / "train.csv", "a") as fh:
        fh.write(row + "\n")
    with pytest.raises(DatasetError) as info:
        manifest_of(tmp_path, root)
    one_line(info.value, *fragments)


def test_empty_test_labels_mean_unlabelled(tmp_path):
    manifest = manifest_of(tmp_path, make_aicup(tmp_path / "data", test=3))
    test = [e for e in manifest.entries if e.split == "test"]
    assert len(test) == 3
    assert all(e.label is None and e.fold == NO_FOLD for e in test)


# ---------------------------------------------------------------- dataset layout and paths


def test_empty_class_folder_stops(tmp_path):
    root = tmp_path / "flowers"
    for name in ("apple", "kiwi"):
        for j in range(3):
            write_jpeg(root / name / f"{j}.jpg", seed=j)
    (root / "pear").mkdir()
    raw = {"name": "f", "folds": 2, "dataset": {"kind": "imagefolder", "root": str(root)}}
    with pytest.raises(DatasetError) as info:
        build_manifest(parse_campaign(raw, source="<t>"), tmp_path / "artifacts")
    one_line(info.value, str(root / "pear"), "empty class folder")


def test_more_folds_than_the_smallest_class_stops(tmp_path):
    root = make_aicup(tmp_path / "data", per_class=3)
    with pytest.raises(ManifestError) as info:
        manifest_of(tmp_path, root, folds=5)
    one_line(info.value, "class 'A' has 3 labelled training images, fewer than folds = 5")


@pytest.mark.parametrize(
    ("split_files", "fragment"),
    [
        ({"csv": "../elsewhere.csv", "images": "train"}, "the train CSV"),
        ({"csv": "train.csv", "images": "../elsewhere"}, "the train image folder"),
    ],
    ids=["csv", "image-folder"],
)
def test_split_paths_escaping_the_root_stop(tmp_path, split_files, fragment):
    root = make_aicup(tmp_path / "data")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere.csv").write_text("image_id,label\n")
    campaign = campaign_for(root, dataset={"splits": {"train": split_files}})
    with pytest.raises(DatasetError) as info:
        build_manifest(campaign, tmp_path / "artifacts")
    one_line(info.value, fragment, "outside the dataset root")


def test_symlinked_image_pointing_outside_stops(tmp_path):
    root = make_aicup(tmp_path / "data")
    secret = write_jpeg(tmp_path / "private" / "secret.jpg")
    link = root / "train" / "004.jpg"
    link.unlink()
    link.symlink_to(secret)
    with pytest.raises(DatasetError) as info:
        manifest_of(tmp_path, root)
    one_line(info.value, str(link), "symlink", str(secret), "outside the dataset root")


def test_symlinked_class_folder_pointing_outside_stops(tmp_path):
    root = tmp_path / "flowers"
    for j in range(3):
        write_jpeg(root / "apple" / f"{j}.jpg", seed=j)
        write_jpeg(tmp_path / "elsewhere" / f"{j}.jpg", seed=j)
    (root / "kiwi").symlink_to(tmp_path / "elsewhere")
    raw = {"name": "f", "folds": 2, "dataset": {"kind": "imagefolder", "root": str(root)}}
    with pytest.raises(DatasetError) as info:
        build_manifest(parse_campaign(raw, source="<t>"), tmp_path / "artifacts")
    one_line(info.value, str(root / "kiwi"), "outside the dataset root")


def test_symlink_inside_the_root_is_fine(tmp_path):
    root = make_aicup(tmp_path / "data")
    link = root / "train" / "004.jpg"
    link.unlink()
    link.symlink_to(root / "train" / "001.jpg")
    manifest = manifest_of(tmp_path, root)
    assert len(manifest.entries) == 15 and manifest.skipped == ()


# ---------------------------------------------------------------- the campaign file

CAMPAIGN = """
name = "c"
folds = 2
[dataset]
kind = "synthetic"
train_per_class = 4
[preprocessing]
size = 64
[svm]
C = [1.0, 10.0]
[rf]
n_estimators = 10
"""


@pytest.mark.parametrize(
    ("old", "new", "fragments"),
    [
        ('name = "c"', 'name = "c"\ncolour = "red"', ["colour", "unknown key"]),
        ("train_per_class = 4", "train_per_class = 4\nbogus = 1", ["[dataset] bogus"]),
        ("size = 64", "size = 64\nresize = true", ["[preprocessing] resize", "unknown key"]),
        ("folds = 2", 'folds = "five"', ["folds", "'five'"]),
        ("size = 64", 'size = "big"', ["[preprocessing] size", "'big'"]),
        ("n_estimators = 10", "n_estimators = -5", ["[rf] n_estimators", "-5"]),
        ("train_per_class = 4", "train_per_class = -1", ["[dataset] train_per_class", "-1"]),
        ("train_per_class = 4", "train_per_class = 0", ["[dataset] train_per_class", "0"]),
        ("size = 64", "size = 64\nshard_size = 0", ["[preprocessing] shard_size", "0"]),
        ("folds = 2", "folds = 0", ["folds", "greater than or equal to 2"]),
        ("C = [1.0, 10.0]", "C = []", ["[svm] C: an empty list: give at least one value"]),
        ("size = 64", "size = 64\nmax_bad_fraction = 1.5", ["max_bad_fraction", "1.5"]),
        ("size = 64", "size = 64\nmax_pixels = 0", ["[preprocessing] max_pixels", "0"]),
    ],
    ids=[
        "unknown-top-level-key",
        "unknown-dataset-key",
        "unknown-preprocessing-key",
        "wrong-type-folds",
        "wrong-type-size",
        "negative-count",
        "negative-dataset-count",
        "zero-dataset-count",
        "zero-shard-size",
        "zero-folds",
        "empty-sweep-list",
        "bad-fraction",
        "zero-pixel-limit",
    ],
)
def test_campaign_file_mistakes_are_one_line(tmp_path, old, new, fragments):
    assert old in CAMPAIGN
    path = tmp_path / "c.toml"
    path.write_text(CAMPAIGN.replace(old, new, 1))
    with pytest.raises(CampaignError) as info:
        load_campaign(path)
    one_line(info.value, str(path), *fragments)


def test_the_base_campaign_file_is_valid(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(CAMPAIGN)
    assert load_campaign(path).preprocessing.max_bad_fraction == 0.1


def test_an_error_line_shows_control_characters_instead_of_sending_them():
    """A file name or TOML key with ESC sequences, put into a one-line error, must not
    drive the terminal it is printed to."""

    error = OrchardError("dataset /d/\x1b]0;owned\x07.jpg:\nbad\ttab")
    assert str(error) == "dataset /d/\\x1b]0;owned\\x07.jpg: bad\ttab"
