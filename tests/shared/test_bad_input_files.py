"""More of the README's "Bad input" table: images cut short in formats with no end marker
(BMP, TIFF, PPM), CSVs that are not what they seem (a runaway quote, UTF-16 without its
byte-order mark, an image id too long for a file name) and file names that are not UTF-8.

As in ``test_bad_input.py``: a bad image is skipped at submit from its header with a
one-line reason; a bad dataset description stops with one line naming file:line.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from shared.datasets import AicupDataset, DatasetError, ImageFolderDataset
from shared.manifest import Manifest, build_manifest
from shared.preprocess import PreprocessError, check_image, read_header
from shared.spec import parse_campaign
from tests.aicup import CLASSES, make_aicup, one_line, write_jpeg


def manifest_of(tmp_path: Path, root: Path, kind: str = "aicup") -> Manifest:
    raw = {
        "name": "bad",
        "folds": 2,
        "dataset": {"kind": kind, "root": str(root)},
        "preprocessing": {"size": 32},
    }
    return build_manifest(parse_campaign(raw, source="<test>"), tmp_path / "artifacts")


def encoded(fmt: str, side: int = 64, **options) -> bytes:
    pixels = np.random.default_rng(7).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt, **options)
    return out.getvalue()


# ------------------------------------------------- images cut short (no end marker)

CUT_SHORT = {
    "bmp": ("BMP", {}),
    "bmp-grey": ("BMP", {"mode": "L"}),
    "tiff": ("TIFF", {}),
    "tiff-lzw": ("TIFF", {"compression": "tiff_lzw"}),
    "tiff-deflate": ("TIFF", {"compression": "tiff_deflate"}),
    "ppm": ("PPM", {}),
    "png": ("PNG", {}),
    "jpeg": ("JPEG", {}),
    "webp": ("WEBP", {}),
}


def _variant(name: str) -> bytes:
    fmt, options = CUT_SHORT[name]
    options = dict(options)
    if options.pop("mode", None) == "L":
        pixels = np.random.default_rng(3).integers(0, 256, (64, 64), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, fmt, **options)
        return out.getvalue()
    return encoded(fmt, **options)


@pytest.mark.parametrize("name", sorted(CUT_SHORT))
@pytest.mark.parametrize("keep", ["half", "all-but-one-byte"])
def test_an_image_cut_short_is_refused_from_its_header(name, keep):
    """Whatever the format, a file that lacks the end of its pixel data is refused at
    submit, as OpenCV would refuse it in the worker, rather than failing a shard there."""
    data = _variant(name)
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None
    assert read_header(data, Path(f"x.{name}")).width == 64
    cut = data[: len(data) // 2] if keep == "half" else data[:-1]
    assert cv2.imdecode(np.frombuffer(cut, np.uint8), cv2.IMREAD_COLOR) is None
    with pytest.raises(PreprocessError) as info:
        read_header(cut, Path(f"x.{name}"))
    one_line(info.value, f"x.{name}: ")


@pytest.mark.parametrize(
    ("fmt", "fragments"),
    [
        ("BMP", ["truncated BMP", "file is 6,171 bytes", "needs 12,342"]),
        ("TIFF", ["truncated TIFF"]),
        ("PPM", ["truncated PPM"]),
    ],
)
def test_the_reason_for_a_cut_short_image_says_so(fmt, fragments):
    data = encoded(fmt)
    with pytest.raises(PreprocessError) as info:
        read_header(data[: len(data) // 2], Path("x.img"))
    one_line(info.value, "x.img: ", *fragments)


def test_a_bmp_with_data_after_its_pixels_is_accepted():
    data = encoded("BMP") + b"\0" * 100
    assert read_header(data, Path("x.bmp")).format == "BMP"


def test_a_truncated_bmp_is_skipped_at_submit(tmp_path):
    """The issue's case: the first half of a valid 64x64 BMP passed the submit check and
    failed its whole preprocessing shard in the worker."""
    root = make_aicup(tmp_path / "data", per_class=7)  # 2 of 21 bad: under a tenth
    data = encoded("BMP")
    (root / "train" / "000.jpg").unlink()
    (root / "train" / "000.bmp").write_bytes(data[: len(data) // 2])
    (root / "train" / "001.jpg").unlink()
    (root / "train" / "001.tif").write_bytes(encoded("TIFF")[:5000])
    csv = (root / "train.csv").read_text()
    (root / "train.csv").write_text(csv.replace("000.jpg", "000.bmp").replace("001.jpg", "001.tif"))
    manifest = manifest_of(tmp_path, root, kind="aicup")
    reasons = {s.image_id: s.reason for s in manifest.skipped}
    assert reasons["000.bmp"].startswith("truncated BMP"), reasons
    assert reasons["001.tif"].startswith("truncated TIFF"), reasons
    assert len(manifest.entries) == 19


def test_the_check_does_not_decode_a_bmp_or_tiff(tmp_path, monkeypatch):
    """BMP and TIFF are checked by sizes in their headers, not by decoding the pixels."""
    paths = []
    for fmt in ("BMP", "TIFF"):
        paths.append(tmp_path / f"x.{fmt.lower()}")
        paths[-1].write_bytes(encoded(fmt))

    def no_load(self):  # noqa: ANN001
        raise AssertionError("decoded")

    monkeypatch.setattr(Image.Image, "load", no_load)
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    for path in paths:
        check_image(path)


# ------------------------------------------------------------------ CSV text

RUNAWAY = "009.jpg,A"  # the opening quote is added on line 11


def _csv_with_runaway_quote(root: Path, later_quote: bool) -> Path:
    lines = (root / "train.csv").read_text().splitlines()
    assert lines[10] == "009.jpg,A"
    lines[10] = '"' + lines[10]
    if later_quote:
        lines[13] = '"012.jpg",A'
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root / "train.csv"


@pytest.mark.parametrize("later_quote", [False, True], ids=["to-the-end", "closed-later"])
def test_an_unterminated_quote_stops_naming_its_line(tmp_path, later_quote):
    root = make_aicup(tmp_path / "data")
    csv = _csv_with_runaway_quote(root, later_quote)
    with pytest.raises(DatasetError) as info:
        manifest_of(tmp_path, root)
    one_line(info.value, f"{csv}:11: unterminated quote")


def test_an_unterminated_quote_on_the_last_line_stops_naming_it(tmp_path):
    root = make_aicup(tmp_path / "data")
    with open(root / "train.csv", "a") as fh:
        fh.write('"015.jpg,A\n')
    with pytest.raises(DatasetError) as info:
        manifest_of(tmp_path, root)
    one_line(info.value, f"{root / 'train.csv'}:17: unterminated quote")


@pytest.mark.parametrize(
    "image_id",
    ['"a\nb.jpg"', '"a\rb.jpg"', "a\x00b.jpg", "a\x1bb.jpg", "a\x7fb.jpg", "a\x85b.jpg"],
    ids=["newline", "cr", "nul", "escape", "del", "c1-next-line"],
)
def test_an_image_id_with_a_control_character_stops(tmp_path, image_id):
    root = make_aicup(tmp_path / "data")
    text = (root / "train.csv").read_text() + f"{image_id},A\n"
    # a NUL byte stops a UTF-8 CSV before any row is read (see the UTF-16 tests below);
    # UTF-16 with its BOM holds a NUL character as any other
    encoding = "utf-16" if "\x00" in image_id else "utf-8"
    (root / "train.csv").write_bytes(text.encode(encoding))
    with pytest.raises(DatasetError) as info:
        AicupDataset(root)
    one_line(info.value, f"{root / 'train.csv'}:17: invalid image id", "control character")


def test_a_quoted_row_keeps_counting_lines_from_where_it_starts(tmp_path):
    """A legal quoted cell that spans two lines (a comment, say) does not shift the line
    numbers of what comes after."""
    root = make_aicup(tmp_path / "data")
    with open(root / "train.csv", "a") as fh:
        fh.write('015.jpg,A,"a note\nover two lines"\n016.jpg,D\n')
    with pytest.raises(DatasetError) as info:
        AicupDataset(root)
    one_line(info.value, f"{root / 'train.csv'}:19: unknown label 'D'")


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_a_utf16_csv_without_its_bom_stops(tmp_path, encoding):
    root = make_aicup(tmp_path / "data")
    text = (root / "train.csv").read_text()
    (root / "train.csv").write_bytes(text.encode(encoding))
    with pytest.raises(DatasetError) as info:
        AicupDataset(root)
    message = one_line(info.value, f"{root / 'train.csv'}: not UTF-8 text", "NUL", "UTF-16")
    assert "invalid image id" not in message


def test_a_utf16_csv_with_its_bom_is_still_read(tmp_path):
    root = make_aicup(tmp_path / "data")
    text = (root / "train.csv").read_text()
    (root / "train.csv").write_bytes(text.encode("utf-16"))
    assert len(AicupDataset(root).samples()) == 15


def test_a_csv_too_large_for_a_listing_stops_before_it_is_read(tmp_path):
    """A sparse file of gigabytes costs no disk, but reading it whole cost the submit
    its RAM (a MemoryError traceback under a memory limit)."""
    from shared.datasets import MAX_CSV_BYTES

    root = make_aicup(tmp_path / "data")
    os.truncate(root / "train.csv", MAX_CSV_BYTES + 1)  # sparse: its head still the CSV
    with pytest.raises(DatasetError) as info:
        AicupDataset(root)
    one_line(
        info.value,
        f"{root / 'train.csv'}: {MAX_CSV_BYTES + 1:,} bytes, more than a split's CSV may be "
        f"({MAX_CSV_BYTES:,}): not a listing of images",
    )


def test_an_image_file_too_large_for_the_pixel_limit_is_refused_before_it_is_read(tmp_path):
    """At submit (check_image) and on the worker (read_submitted, where a file swapped
    after the submit was read whole before its checksum refused it): no image within
    the pixel limit is that large."""
    from shared.preprocess import max_image_bytes, read_submitted

    path = tmp_path / "big.jpg"
    write_jpeg(path, size=(32, 32))
    most = max_image_bytes(32 * 32)
    os.truncate(path, most + 1)
    line = (
        f"{path}: {most + 1:,} bytes, more than an image within the pixel limit of 1,024 "
        f"can be ({most:,}): not an image"
    )
    for read in (lambda: check_image(path, 32 * 32), lambda: read_submitted(path, "0" * 64, 1024)):
        with pytest.raises(PreprocessError) as info:
            read()
        one_line(info.value, line)
    os.truncate(path, most)  # as large as one can be: read (and then found not an image)
    with pytest.raises(PreprocessError) as info:
        read_submitted(path, "0" * 64, 1024)
    assert "changed since the campaign was submitted" in str(info.value)


def test_a_fifo_or_device_in_place_of_an_image_or_csv_is_refused_without_reading(tmp_path):
    """fstat's size is 0 for them: /dev/zero was read without end (a MemoryError), and a
    FIFO swapped in after the submit held its worker for ever (its open waits for a
    writer, while the heartbeat kept the lease alive)."""
    from shared.datasets import _read_text
    from shared.preprocess import read_submitted

    fifo = tmp_path / "img.jpg"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.jpg"
    zero.symlink_to("/dev/zero")
    for path, kind in ((fifo, "a FIFO"), (zero, "a device")):
        with pytest.raises(PreprocessError) as info:
            read_submitted(path, "0" * 64, 1024)
        one_line(info.value, f"{path}: {kind}, not an image file")
    with pytest.raises(DatasetError) as info:
        _read_text(zero)
    one_line(info.value, f"{zero}: a device, not a CSV file")


def test_a_file_that_grows_as_it_is_read_stops_at_the_limit(tmp_path, monkeypatch):
    """Its size at the look was within the limit, its content is not: read no further
    than one byte past the limit."""
    import shared.artifacts
    from shared.artifacts import TooLargeError, read_bounded

    path = tmp_path / "grows.jpg"
    path.write_bytes(b"x" * 100)
    real_fstat = os.fstat

    def small(fd: int) -> os.stat_result:
        info = real_fstat(fd)
        return os.stat_result((info.st_mode, *info[1:6], 10, *info[7:]))

    monkeypatch.setattr(shared.artifacts.os, "fstat", small)
    with pytest.raises(TooLargeError) as info:
        read_bounded(path, 50)
    assert (info.value.size, info.value.whole) == (51, False)


# ------------------------------------------------------------- long file names


def test_an_image_id_too_long_for_a_file_name_is_a_missing_image(tmp_path):
    root = make_aicup(tmp_path / "data", per_class=4)
    long_id = "x" * 300 + ".jpg"
    with open(root / "train.csv", "a") as fh:
        fh.write(f"{long_id},A\n")
    dataset = AicupDataset(root)
    [missing] = dataset.missing()
    assert missing.image_id == long_id
    assert f"listed in {root / 'train.csv'}:14 but not found" in missing.reason
    assert "too long" in missing.reason
    manifest = manifest_of(tmp_path, root)  # 1 of 13 unusable: skipped
    assert [s.image_id for s in manifest.skipped] == [long_id]


# ------------------------------------------------------------ non-UTF-8 file names

needs_bytes_names = pytest.mark.skipif(
    sys.platform == "darwin" or os.name == "nt", reason="the filesystem refuses non-UTF-8 names"
)


def make_imagefolder(root: Path, per_class: int = 4) -> Path:
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            write_jpeg(root / name / f"{i:03d}.jpg", seed=10 * c + i)
    return root


def _bytes_name(folder: Path, name: bytes) -> Path:
    path = Path(os.fsdecode(os.fsencode(folder) + b"/" + name))
    with open(os.fsencode(path), "wb") as fh:
        fh.write(cv2.imencode(".jpg", np.full((16, 16, 3), 90, np.uint8))[1].tobytes())
    return path


@needs_bytes_names
def test_an_image_whose_name_is_not_utf8_is_skipped_naming_it(tmp_path):
    root = make_imagefolder(tmp_path / "data")
    _bytes_name(root / "A", b"caf\xe9.jpg")
    dataset = ImageFolderDataset(root)
    assert len(dataset.samples()) == 12
    [skipped] = dataset.missing()
    assert skipped.image_id == "A/caf\\xe9.jpg"
    assert skipped.path == str(root / "A" / "caf\\xe9.jpg")
    assert "not valid UTF-8" in skipped.reason
    manifest = manifest_of(tmp_path, root, kind="imagefolder")
    assert [s.image_id for s in manifest.skipped] == ["A/caf\\xe9.jpg"]
    json.dumps(manifest.to_json() if hasattr(manifest, "to_json") else str(manifest))
    for s in manifest.skipped:
        (s.path + s.reason + s.image_id).encode("utf-8")  # printable, storable


@needs_bytes_names
def test_a_class_folder_whose_name_is_not_utf8_stops(tmp_path):
    root = make_imagefolder(tmp_path / "data")
    os.mkdir(os.fsencode(root) + b"/p\xe9ar")
    _bytes_name(Path(os.fsdecode(os.fsencode(root) + b"/p\xe9ar")), b"1.jpg")
    with pytest.raises(DatasetError) as info:
        ImageFolderDataset(root)
    message = one_line(info.value, "p\\xe9ar", "not valid UTF-8")
    message.encode("utf-8")


@needs_bytes_names
def test_an_unlisted_aicup_image_whose_name_is_not_utf8_is_printable(tmp_path):
    root = make_aicup(tmp_path / "data")
    _bytes_name(root / "train", b"caf\xe9.jpg")
    [unlisted] = AicupDataset(root).unlisted()
    assert unlisted.image_id == "caf\\xe9.jpg"
    assert unlisted.unlisted
    (unlisted.path + unlisted.image_id).encode("utf-8")


@pytest.mark.parametrize("row", ['"{id}" ,A', '{id},"A" ', '"{id}"   ,   "A"'])
def test_a_space_after_a_closing_quote_is_fine(tmp_path, row):
    """As csv reads it outside strict mode: hand-aligned files have such spaces."""
    root = make_aicup(tmp_path / "data")
    lines = (root / "train.csv").read_text().splitlines()
    image_id = lines[10].split(",")[0]
    lines[10] = row.format(id=image_id)
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    manifest = manifest_of(tmp_path, root)
    assert image_id in {e.image_id for e in manifest.entries}


def _netpbm(kind: str) -> bytes:
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    if kind in ("ppm-16", "pgm-16"):
        wide = rgb.astype(np.uint16) * 257
        ok, buf = cv2.imencode(
            ".ppm" if kind == "ppm-16" else ".pgm",
            wide[..., : 3 if kind == "ppm-16" else 1].squeeze(),
        )
        assert ok
        return buf.tobytes()
    if kind == "pbm":
        out = io.BytesIO()
        Image.fromarray(rgb[..., 0] > 127).save(out, "PPM")
        return out.getvalue()
    values = {
        "plain-pbm": (rgb[..., 0] > 127).astype(int),
        "plain-pgm": rgb[..., 0],
        "plain-ppm": rgb,
    }[kind]
    magic = {"plain-pbm": "P1", "plain-pgm": "P2", "plain-ppm": "P3"}[kind]
    maxval = "" if magic == "P1" else "255\n"
    body = "\n".join(" ".join(str(v) for v in row.ravel()) for row in values)
    return f"{magic}\n64 48\n{maxval}{body}\n".encode()


@pytest.mark.parametrize("kind", ["ppm-16", "pgm-16", "pbm", "plain-pbm", "plain-pgm", "plain-ppm"])
def test_netpbm_files_are_checked_by_their_header_sizes_without_decoding(kind, monkeypatch):
    """Pillow's decoders of 16-bit and plain Netpbm files take seconds for a photo."""
    data = _netpbm(kind)

    def no_load(self):  # noqa: ANN001
        raise AssertionError("decoded")

    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    assert read_header(data, Path("x.pnm")).width == 64
    with pytest.raises(PreprocessError) as info:
        read_header(data[: len(data) // 2], Path("x.pnm"))
    one_line(info.value, "x.pnm: truncated PPM")


# ------------------------------------------------------------ images this user may not read


@pytest.mark.parametrize(("errno_", "why"), [(13, "Permission denied"), (5, "Input/output error")])
def test_images_the_submitter_cannot_read_stop_the_submit(tmp_path, monkeypatch, errno_, why):
    """Not the images' fault but the host's or the user's (a chmod, a failing disk):
    they were skipped as unusable, silently dropping up to max_bad_fraction of the
    data, though a worker could well read them. The submit stops instead, naming one."""
    root = make_aicup(tmp_path / "data", per_class=4)
    import shared.preprocess

    denied = {root / "train" / "001.jpg", root / "train" / "005.jpg"}

    read_bounded = shared.preprocess.read_bounded

    def guarded(path: Path, most: int) -> bytes:
        if Path(path) in denied:
            raise OSError(errno_, why, str(path))
        return read_bounded(path, most)

    monkeypatch.setattr(shared.preprocess, "read_bounded", guarded)
    with pytest.raises(DatasetError) as info:
        manifest_of(tmp_path, root)
    assert one_line(info.value) == (
        f"{root / 'train' / '001.jpg'}: cannot read image ({why}) (and 1 more image(s)): "
        "this user may not read the dataset, or its disk failed; mend it (the workers must "
        "read it too) and submit again"
    )
    assert not (tmp_path / "artifacts").exists()
