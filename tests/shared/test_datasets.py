from pathlib import Path

import cv2
import numpy as np
import pytest

from shared.datasets import (
    AicupDataset,
    DatasetError,
    ImageFolderDataset,
    Sample,
    open_dataset,
)


def write_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((8, 8, 3), 128, np.uint8))
    return path


def make_aicup(
    root: Path,
    split: str,
    rows: list[str],
    header: str | None = "image_id,label",
    encoding: str = "utf-8",
) -> Path:
    """Write ``root/<split>.csv`` and an image for every id it lists."""
    (root / split).mkdir(parents=True, exist_ok=True)
    for row in rows:
        image_id = row.split(",")[0]
        if image_id and "/" not in image_id and ".." not in image_id:
            write_image(root / split / image_id)
    lines = ([header] if header else []) + rows
    csv_path = root / f"{split}.csv"
    csv_path.write_text("\n".join(lines) + "\n", encoding=encoding)
    return csv_path


def assert_one_line_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# --- aicup ---------------------------------------------------------------------------------


def test_aicup_with_header(tmp_path: Path) -> None:
    make_aicup(tmp_path, "train", ["00002.jpg,B", "00001.jpg,A", "00003.jpg,C"])
    ds = AicupDataset(tmp_path)
    assert ds.classes == ("A", "B", "C")
    samples = ds.samples()
    assert [(s.image_id, s.label, s.split) for s in samples] == [
        ("00001.jpg", "A", "train"),
        ("00002.jpg", "B", "train"),
        ("00003.jpg", "C", "train"),
    ]
    assert samples[0].path == (tmp_path / "train" / "00001.jpg").resolve()
    assert all(s.path.is_absolute() for s in samples)


def test_aicup_without_header_and_with_bom(tmp_path: Path) -> None:
    make_aicup(tmp_path, "train", ["a.jpg,A", "b.jpg,B"], header=None)
    make_aicup(tmp_path, "dev", ["c.jpg,C"], header="IMAGE_ID,Label", encoding="utf-8-sig")
    assert (tmp_path / "dev.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    samples = AicupDataset(tmp_path).samples()
    assert [(s.image_id, s.label, s.split) for s in samples] == [
        ("a.jpg", "A", "train"),
        ("b.jpg", "B", "train"),
        ("c.jpg", "C", "dev"),
    ]


def test_aicup_empty_labels_and_extra_columns(tmp_path: Path) -> None:
    make_aicup(tmp_path, "train", ["1.jpg,A,0.9,extra", "2.jpg,B,"])
    make_aicup(tmp_path, "test", ["3.jpg,", "4.jpg"])
    samples = AicupDataset(tmp_path).samples()
    assert [(s.image_id, s.label, s.split) for s in samples] == [
        ("1.jpg", "A", "train"),
        ("2.jpg", "B", "train"),
        ("3.jpg", None, "test"),
        ("4.jpg", None, "test"),
    ]


def test_aicup_split_order_and_custom_mapping(tmp_path: Path) -> None:
    make_aicup(tmp_path, "test", ["t.jpg,A"])
    make_aicup(tmp_path, "train", ["z.jpg,A"])
    make_aicup(tmp_path, "dev", ["a.jpg,B"])
    ds = AicupDataset(tmp_path)
    assert [s.split for s in ds.samples()] == ["train", "dev", "test"]
    assert ds.samples() == AicupDataset(tmp_path).samples()

    only = AicupDataset(tmp_path, splits={"train": ("dev.csv", "dev")}, classes=("A", "B"))
    assert [(s.image_id, s.split) for s in only.samples()] == [("a.jpg", "train")]
    assert only.classes == ("A", "B")


def test_aicup_missing_csvs(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as excinfo:
        AicupDataset(tmp_path)
    assert_one_line_error(excinfo, "train.csv")
    make_aicup(tmp_path, "train", ["1.jpg,A"])
    with pytest.raises(DatasetError) as excinfo:
        AicupDataset(tmp_path, splits={"train": ("train.csv", "train"), "dev": ("dev.csv", "d")})
    assert_one_line_error(excinfo, "dev.csv")


@pytest.mark.parametrize(
    ("rows", "fragments"),
    [
        (["1.jpg,A", "2.jpg,D"], ["train.csv:3", "'D'"]),
        (["1.jpg,A", "1.jpg,B"], ["train.csv:3", "duplicate", "1.jpg"]),
        (["../x.jpg,A"], ["train.csv:2", "../x.jpg"]),
        (["sub/x.jpg,A"], ["train.csv:2", "sub/x.jpg"]),
    ],
)
def test_aicup_bad_rows(tmp_path: Path, rows: list[str], fragments: list[str]) -> None:
    make_aicup(tmp_path, "train", rows)
    with pytest.raises(DatasetError) as excinfo:
        AicupDataset(tmp_path)
    assert_one_line_error(excinfo, str(tmp_path), *fragments)


def test_aicup_duplicate_across_splits(tmp_path: Path) -> None:
    make_aicup(tmp_path, "train", ["1.jpg,A"])
    make_aicup(tmp_path, "test", ["1.jpg,"])
    with pytest.raises(DatasetError) as excinfo:
        AicupDataset(tmp_path)
    assert_one_line_error(excinfo, "test.csv:2", "duplicate")


def test_aicup_missing_image_is_reported_not_sampled(tmp_path: Path) -> None:
    # the manifest decides whether a missing image is skipped or stops the campaign
    make_aicup(tmp_path, "train", ["1.jpg,A", "2.jpg,B"])
    (tmp_path / "train" / "2.jpg").unlink()
    ds = AicupDataset(tmp_path)
    assert [s.image_id for s in ds.samples()] == ["1.jpg"]
    [missing] = ds.missing()
    assert (missing.image_id, missing.split) == ("2.jpg", "train")
    assert missing.path == str(tmp_path / "train" / "2.jpg")
    assert "train.csv:3" in missing.reason and "not found" in missing.reason
    assert ds.unlisted() == []


# --- imagefolder ---------------------------------------------------------------------------


def test_imagefolder_flat(tmp_path: Path) -> None:
    for name in ["B/x.png", "A/2.jpg", "A/1.JPEG", "A/sub/3.webp", "C/y.bmp"]:
        write_image(tmp_path / name)
    (tmp_path / "A" / "notes.txt").write_text("not an image")
    (tmp_path / "README.md").write_text("ignored")
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ("A", "B", "C")
    assert [(s.image_id, s.label, s.split) for s in ds.samples()] == [
        ("A/1.JPEG", "A", "train"),
        ("A/2.jpg", "A", "train"),
        ("A/sub/3.webp", "A", "train"),
        ("B/x.png", "B", "train"),
        ("C/y.bmp", "C", "train"),
    ]
    assert ds.samples()[0].path == (tmp_path / "A" / "1.JPEG").resolve()


def test_imagefolder_splits_with_four_classes(tmp_path: Path) -> None:
    for name in [
        "train/ripe/1.jpg",
        "train/unripe/1.jpg",
        "train/bruised/1.jpg",
        "test/rotten/1.jpg",
        "test/ripe/2.jpg",
        "val/ripe/3.jpg",
    ]:
        write_image(tmp_path / name)
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ("bruised", "ripe", "rotten", "unripe")
    assert [(s.split, s.image_id) for s in ds.samples()] == [
        ("train", "train/bruised/1.jpg"),
        ("train", "train/ripe/1.jpg"),
        ("train", "train/unripe/1.jpg"),
        ("dev", "val/ripe/3.jpg"),
        ("test", "test/ripe/2.jpg"),
        ("test", "test/rotten/1.jpg"),
    ]


def test_imagefolder_dev_folder_and_order_is_deterministic(tmp_path: Path) -> None:
    for name in ["train/A/b.jpg", "train/A/a.jpg", "dev/B/c.png"]:
        write_image(tmp_path / name)
    first = ImageFolderDataset(tmp_path).samples()
    assert [(s.split, s.image_id) for s in first] == [
        ("train", "train/A/a.jpg"),
        ("train", "train/A/b.jpg"),
        ("dev", "dev/B/c.png"),
    ]
    assert ImageFolderDataset(tmp_path).samples() == first
    assert isinstance(first[0], Sample)


def test_imagefolder_ids_are_unique_when_splits_reuse_file_names(tmp_path: Path) -> None:
    # exports number each split from 1: the same names in train/, val/ and test/
    for split in ("train", "val", "test"):
        for name in ("A/0001.jpg", "A/0002.jpg", "B/0001.jpg"):
            write_image(tmp_path / split / name)
    samples = ImageFolderDataset(tmp_path).samples()
    ids = [s.image_id for s in samples]
    assert len(set(ids)) == len(ids) == 9
    assert [(s.split, s.image_id) for s in samples if s.image_id.endswith("A/0001.jpg")] == [
        ("train", "train/A/0001.jpg"),
        ("dev", "val/A/0001.jpg"),
        ("test", "test/A/0001.jpg"),
    ]
    # the id names the file: its path relative to the dataset root
    assert all(s.path == tmp_path.resolve() / s.image_id for s in samples)


def test_imagefolder_leaves_out_dot_files_and_dot_folders(tmp_path: Path) -> None:
    for name in ["A/1.jpg", "A/sub/2.jpg", "B/3.jpg"]:
        write_image(tmp_path / name)
    # macOS AppleDouble companions, at every depth, and hidden folders at every depth
    for name in ["A/._1.jpg", "A/sub/._2.jpg", "B/._3.jpg"]:
        (tmp_path / name).write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    for name in ["A/.ipynb_checkpoints/1.jpg", "B/.cache/deep/4.jpg", ".Trashes/C/5.jpg"]:
        write_image(tmp_path / name)
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ("A", "B")
    assert [s.image_id for s in ds.samples()] == ["A/1.jpg", "A/sub/2.jpg", "B/3.jpg"]
    # a class folder holding only hidden files is as empty as one holding nothing
    (tmp_path / "C").mkdir()
    (tmp_path / "C" / "._9.jpg").write_bytes(b"\x00\x05\x16\x07")
    with pytest.raises(DatasetError) as excinfo:
        ImageFolderDataset(tmp_path)
    assert_one_line_error(excinfo, str(tmp_path / "C"), "empty class folder")


def test_imagefolder_empty(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as excinfo:
        ImageFolderDataset(tmp_path)
    assert_one_line_error(excinfo, str(tmp_path))
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "x.txt").write_text("no images")
    with pytest.raises(DatasetError):
        ImageFolderDataset(tmp_path)


# --- open_dataset --------------------------------------------------------------------------


def test_open_dataset_dispatch(tmp_path: Path) -> None:
    make_aicup(tmp_path / "cup", "train", ["1.jpg,A"])
    write_image(tmp_path / "folder" / "X" / "1.jpg")
    cup = open_dataset("aicup", tmp_path / "cup", classes=("A", "B"))
    assert isinstance(cup, AicupDataset)
    assert cup.classes == ("A", "B")
    folder = open_dataset("imagefolder", tmp_path / "folder")
    assert isinstance(folder, ImageFolderDataset)
    assert folder.classes == ("X",)


def test_open_dataset_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as excinfo:
        open_dataset("coco", tmp_path)
    assert_one_line_error(excinfo, "coco")
    assert isinstance(excinfo.value, ValueError)


def test_aicup_unlisted_files_consider_every_csv_sharing_the_folder(tmp_path: Path) -> None:
    make_aicup(tmp_path, "all", ["1.jpg,A", "2.jpg,B"])
    write_image(tmp_path / "all" / "3.jpg")
    (tmp_path / "train.csv").write_text("1.jpg,A\n")
    (tmp_path / "dev.csv").write_text("2.jpg,B\n")
    ds = AicupDataset(tmp_path, splits={"train": ("train.csv", "all"), "dev": ("dev.csv", "all")})
    assert [(s.image_id, s.split) for s in ds.samples()] == [("1.jpg", "train"), ("2.jpg", "dev")]
    assert [(s.image_id, s.reason) for s in ds.unlisted()] == [
        ("3.jpg", "not listed in train.csv or dev.csv")
    ]


# --- names: what a CSV may list, what a folder may hold ----------------------------------


@pytest.mark.parametrize("image_id", ["photo..v2.jpg", "x..jpg", "..x.jpg", "a...b.jpg"])
def test_aicup_an_id_with_dots_inside_a_name_is_an_image(tmp_path: Path, image_id: str) -> None:
    """Only "." and ".." name folders; a file name may hold two dots anywhere."""
    write_image(tmp_path / "train" / image_id)
    (tmp_path / "train.csv").write_text(f"image_id,label\n{image_id},A\n")
    ds = AicupDataset(tmp_path)
    assert [(s.image_id, s.path.name) for s in ds.samples()] == [(image_id, image_id)]


@pytest.mark.parametrize(
    "image_id", [".", "..", '""', "../x.jpg", "a/../b.jpg", "..\\x.jpg", "a\\b.jpg", "/x.jpg"]
)
def test_aicup_an_id_that_names_a_folder_or_a_path_stops(tmp_path: Path, image_id: str) -> None:
    (tmp_path / "train").mkdir()
    write_image(tmp_path / "x.jpg")  # what "../x.jpg" would reach
    (tmp_path / "train.csv").write_text(f"image_id,label\n1.jpg,A\n{image_id},A\n")
    with pytest.raises(DatasetError) as excinfo:
        AicupDataset(tmp_path)
    assert_one_line_error(excinfo, "train.csv:3: invalid image id", "no folders")


def _write_named(path: Path) -> None:
    """An image at ``path``, whatever characters its name holds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cv2.imencode(".png", np.full((8, 8, 3), 128, np.uint8))[1].tobytes())


@pytest.mark.parametrize("name", ["A\nB", "A\x1b[2J", "A\x7f", "A\tB"])
def test_imagefolder_a_class_name_with_a_control_character_stops(tmp_path: Path, name: str) -> None:
    """A class name is a label, as a CSV's: one with a control character stops, as a CSV
    row whose image id holds one does."""
    write_image(tmp_path / "A" / "1.jpg")
    _write_named(tmp_path / name / "1.png")
    with pytest.raises(DatasetError) as excinfo:
        ImageFolderDataset(tmp_path)
    assert_one_line_error(excinfo, "class folder name holds a control character")


@pytest.mark.parametrize(
    ("relative", "shown", "control"),
    [
        ("A/x\ny.png", "A/x\\x0ay.png", "'\\n'"),
        ("A/x\x1b]0;t\x07.png", "A/x\\x1b]0;t\\x07.png", "'\\x1b'"),
        ("A/s\rub/1.png", "A/s\\x0dub/1.png", "'\\r'"),
    ],
    ids=["newline", "escape", "cr-in-subfolder"],
)
def test_imagefolder_an_image_name_with_a_control_character_is_skipped(
    tmp_path: Path, relative: str, shown: str, control: str
) -> None:
    """An image file is the listing itself: skipped, as one whose name is not UTF-8,
    with its name shown escaped, on one line."""
    for name in ["A/1.jpg", "B/1.jpg"]:
        write_image(tmp_path / name)
    _write_named(tmp_path / relative)
    ds = ImageFolderDataset(tmp_path)
    assert [s.image_id for s in ds.samples()] == ["A/1.jpg", "B/1.jpg"]
    [skipped] = ds.missing()
    assert skipped.image_id == shown and skipped.split == "train"
    assert skipped.path == f"{tmp_path.resolve()}/{shown}"
    assert skipped.reason == f"file name holds a control character ({control}; rename it)"
    assert not any(c in skipped.image_id + skipped.path for c in "\n\r\x1b\x07")


def test_imagefolder_an_image_whose_id_is_longer_than_the_store_keeps_is_skipped(
    tmp_path: Path,
) -> None:
    """An image's id is its path under the root, which nested folders can make longer
    than the store's image ids (255 characters: PostgreSQL would refuse the predictions
    of every unit after it trained): skipped at submit, saying why."""
    from shared.datasets import MAX_IMAGE_ID_CHARS

    for name in ["A/1.jpg", "B/1.jpg"]:
        write_image(tmp_path / name)
    longest = "A/" + "d" * 200 + "/" + "x" * (MAX_IMAGE_ID_CHARS - 207) + ".jpg"
    too_long = "B/" + "d" * 200 + "/" + "x" * (MAX_IMAGE_ID_CHARS - 206) + ".jpg"
    for name in (longest, too_long):
        write_image(tmp_path / name)
    ds = ImageFolderDataset(tmp_path)
    assert len(longest) == MAX_IMAGE_ID_CHARS and len(too_long) == MAX_IMAGE_ID_CHARS + 1
    assert [s.image_id for s in ds.samples()] == ["A/1.jpg", longest, "B/1.jpg"]
    [skipped] = ds.missing()
    assert skipped.image_id == too_long and skipped.reason == (
        "its path under the dataset's root is 256 characters, more than the 255 an image "
        "id may have (shorten its folders' or its own name)"
    )


def test_imagefolder_a_symlink_to_nothing_is_skipped_saying_so(tmp_path: Path) -> None:
    """A link whose image was moved away is an image that cannot be read: listed as
    skipped with the reason, not dropped without a word."""
    for name in ["A/1.jpg", "B/1.jpg"]:
        write_image(tmp_path / name)
    (tmp_path / "B" / "2.jpg").symlink_to(tmp_path / "moved" / "2.jpg")
    ds = ImageFolderDataset(tmp_path)
    assert [s.image_id for s in ds.samples()] == ["A/1.jpg", "B/1.jpg"]
    [skipped] = ds.missing()
    assert skipped.image_id == "B/2.jpg"
    assert skipped.reason == f"a symlink to {tmp_path}/moved/2.jpg, which is not a file"


@pytest.mark.parametrize("where", ["root", "a split's CSV"])
def test_paths_the_system_refuses_stop_in_one_line_naming_them(tmp_path: Path, where: str) -> None:
    """A name longer than the filesystem takes, a symlink loop inside the root: the
    campaign stops in one line naming the path, not with Python's OSError or
    RuntimeError."""
    from shared.manifest import open_campaign_dataset
    from shared.spec import load_campaign

    root = tmp_path / "data"
    if where == "root":
        root = tmp_path / ("a" * 300)
        expected = f"{root}: cannot read (File name too long)"
    else:
        make_aicup(root, "train", ["1.jpg,A"])
        (root / "train.csv").unlink()
        (root / "loop1").symlink_to(root / "loop2")
        (root / "loop2").symlink_to(root / "loop1")
        (root / "train.csv").symlink_to(root / "loop1")
        expected = f"{root}/loop1: a symlink loop (links leading back to themselves)"
    campaign = tmp_path / "c.toml"
    campaign.write_text(
        f'name = "c"\n[dataset]\nkind = "aicup"\nroot = "{root}"\n[rf]\nvariant = "resize8"\n'
    )
    with pytest.raises(DatasetError) as stopped:
        open_campaign_dataset(load_campaign(campaign).dataset, tmp_path / "artifacts")
    assert_one_line_error(stopped, expected)
