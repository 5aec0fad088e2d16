"""Dataset adapters: the AI CUP 2020 mango layout and torchvision's ImageFolder layout.

Both yield the same ``Sample`` records in a deterministic order (split, then image id), so
everything downstream is independent of where the photos came from.

What is wrong with the dataset's *description* (a CSV that cannot be read, an unknown
label, a duplicate id, a path that leaves the dataset root, an empty class folder) stops
with one :class:`DatasetError` line. What is wrong with a single image is not the
adapter's call: an image listed but absent is reported by :meth:`missing`, one present
but not listed by :meth:`unlisted`, and the manifest decides (see ``shared.manifest``).
"""

from __future__ import annotations

import codecs
import csv
import errno
import io
import os
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from shared.artifacts import NotRegularFileError, TooLargeError, read_bounded
from shared.errors import OrchardError, printable

SPLITS = ("train", "dev", "test")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
DEFAULT_AICUP_SPLITS: Mapping[str, tuple[str, str]] = {
    "train": ("train.csv", "train"),
    "dev": ("dev.csv", "dev"),
    "test": ("test.csv", "test"),
}
# A first row whose first cell is one of these is a header, not an image.
HEADER_NAMES = frozenset({"image_id", "image", "image_name", "id", "file", "filename", "name"})
#: How the reason of every image :meth:`AicupDataset.unlisted` reports begins.
UNLISTED = "not listed in "


class DatasetError(OrchardError, ValueError):
    """Bad dataset input. str(err) is ONE line naming the file/folder and what is wrong."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


@dataclass(frozen=True, slots=True)
class Sample:
    image_id: str
    label: str | None
    split: str
    path: Path


@dataclass(frozen=True, slots=True)
class Skipped:
    """An image left out of a campaign, and why; listed in the manifest and the report."""

    image_id: str
    split: str
    path: str
    reason: str

    @property
    def unlisted(self) -> bool:
        """In a split's folder but in none of its CSVs: not part of the dataset, as
        opposed to listed but unusable. Told by the reason, so manifests keep their form."""
        return self.reason.startswith(UNLISTED)


class Dataset(Protocol):
    root: Path  # as written, made absolute: images are recorded under it
    classes: tuple[str, ...]

    def samples(self) -> list[Sample]: ...

    def missing(self) -> list[Skipped]: ...

    def unlisted(self) -> list[Skipped]: ...


def _sorted(samples: list[Sample]) -> list[Sample]:
    return sorted(samples, key=lambda s: (SPLITS.index(s.split), s.image_id))


def _roots(root: Path | str) -> tuple[Path, Path]:
    """A dataset's root as written, made absolute (the path every host mounts the data
    at: image paths are recorded under it), and where it leads on this host, symlinks
    followed (what the images must be inside)."""
    written = Path(os.path.abspath(root))
    return written, written.resolve()


def _inside(root: Path, path: Path, what: str) -> None:
    """Stop unless ``path``, symlinks followed, is inside ``root`` (already resolved)."""
    target = path.resolve()
    if not target.is_relative_to(root):
        link = " (a symlink)" if path.is_symlink() else ""
        raise DatasetError(
            f"{path}{link}: {what} resolves to {target}, outside the dataset root {root}"
        )


#: The largest split CSV read: ten million rows of 50 bytes. A larger file is not a
#: listing (a sparse file of gigabytes costs no disk, but the submit its RAM).
MAX_CSV_BYTES = 512 << 20


def _read_text(path: Path) -> str:
    """A CSV's text: UTF-8 with or without a BOM, or UTF-16 with its BOM (Excel's
    "Unicode text"); anything else stops rather than guessing at file names."""
    try:
        raw = read_bounded(path, MAX_CSV_BYTES)
    except TooLargeError as exc:
        raise DatasetError(
            f"{path}: {exc.size:,} bytes{'' if exc.whole else ' or more'}, more than a "
            f"split's CSV may be ({MAX_CSV_BYTES:,}): not a listing of images"
        ) from None
    except NotRegularFileError as exc:
        raise DatasetError(f"{path}: {exc.kind}, not a CSV file") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror})") from None
    encoding = "utf-8-sig"
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    elif (nul := raw.find(b"\0")) >= 0:
        # valid UTF-8 that no one writes in a CSV; every other byte NUL is UTF-16 text
        # saved without its byte-order mark, which would read as ids like 'i\x00m\x00…'
        raise DatasetError(
            f"{path}: not UTF-8 text (a NUL byte at offset {nul}: UTF-16 without its "
            "byte-order mark?); save the CSV as UTF-8"
        )
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"{path}: not {encoding.removesuffix('-sig').upper()} text (byte "
            f"0x{raw[exc.start]:02x} at offset {exc.start}); save the CSV as UTF-8"
        ) from None


def _control_character(text: str) -> str | None:
    """The first control character in ``text`` (newline, CR, NUL, ESC, DEL, C1), or None."""
    return next((c for c in text if unicodedata.category(c) == "Cc"), None)


def _is_utf8(name: str) -> bool:
    """Whether a name from the filesystem was valid UTF-8: Python holds the bytes of one
    that is not as lone surrogates, which cannot be printed, stored or hashed as text."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


NOT_UTF8 = "file name is not valid UTF-8 (rename it)"

#: The longest image id the store keeps (a column of that width on PostgreSQL): an
#: image folder's id is the image's path under the dataset's root.
MAX_IMAGE_ID_CHARS = 255


def _escaped_controls(name: str) -> str:
    """``name`` with every control character, newline and tab too, written ``\\x0a``: a
    skipped image's id and path as one line of a warning, a manifest or a report."""
    return "".join(f"\\x{ord(c):02x}" if unicodedata.category(c) == "Cc" else c for c in name)


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


class AicupDataset:
    """AI CUP 2020 mango layout: per split, a CSV ``image_id,label`` and a folder of images."""

    def __init__(
        self,
        root: Path,
        splits: Mapping[str, tuple[str, str]] | None = None,
        classes: Sequence[str] = ("A", "B", "C"),
    ) -> None:
        self.root, self._real_root = _roots(root)
        self.classes = tuple(classes)
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise DatasetError(f"{self.root}: classes must be non-empty and unique: {classes!r}")
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: not a directory ([dataset] root)")
        required = splits is not None
        if splits is None:
            splits = DEFAULT_AICUP_SPLITS
        self._samples: list[Sample] = []
        self._missing: list[Skipped] = []
        seen: dict[str, str] = {}  # image_id -> "csv:line" where first listed
        listed: dict[Path, tuple[str, set[str], list[str]]] = {}  # folder -> split, ids, csvs
        for split, (csv_rel, images_rel) in splits.items():
            if split not in SPLITS:
                raise DatasetError(f"{self.root}: unknown split {split!r} (expected {SPLITS})")
            csv_path, images = self.root / csv_rel, self.root / images_rel
            _inside(self._real_root, csv_path, f"the {split} CSV")
            _inside(self._real_root, images, f"the {split} image folder")
            if not csv_path.is_file():
                if required or split == "train":
                    raise DatasetError(f"{csv_path}: CSV file for split {split!r} not found")
                continue
            if not images.is_dir():
                raise DatasetError(f"{images}: image folder for split {split!r} not found")
            _, ids, csvs = listed.setdefault(images, (split, set(), []))
            csvs.append(csv_path.name)
            self._read_csv(csv_path, images, split, seen, ids)
        self._samples = _sorted(self._samples)
        self._unlisted = [
            Skipped(printable(p.name), split, printable(p), f"{UNLISTED}{' or '.join(csvs)}")
            for folder, (split, ids, csvs) in listed.items()
            for p in _image_files(folder)
            if p.name not in ids
        ]

    def _read_csv(
        self, csv_path: Path, images: Path, split: str, seen: dict[str, str], ids: set[str]
    ) -> None:
        # not strict: csv's strict mode also refuses a space after a closing quote
        # ('"a.jpg" ,A'), which hand-aligned files have, as they have spaces before an
        # opening one ('a.jpg,  "A"')
        reader = csv.reader(io.StringIO(_read_text(csv_path), newline=""), skipinitialspace=True)
        rows, header_possible = iter(reader), True
        while True:
            start = reader.line_num + 1
            try:
                row = next(rows)
            except StopIteration:
                break
            except csv.Error as exc:
                raise DatasetError(f"{csv_path}:{start}: not a CSV row ({exc})") from None
            # a quote left open swallows the lines after it, rows and their commas, up to
            # the next quote or the end of the file (a line break alone in a quoted id is
            # refused below as a control character)
            if any(("\n" in c or "\r" in c) and "," in c for c in row):
                end = f"line {reader.line_num}" if reader.line_num > start else "its end"
                raise DatasetError(
                    f"{csv_path}:{start}: unterminated quote (the quoted cell runs on to {end})"
                )
            where = f"{csv_path}:{start}"
            cells = [cell.strip() for cell in row]
            if not any(cells):
                continue
            if header_possible:
                header_possible = False
                if cells[0].lower() in HEADER_NAMES:
                    continue
            image_id = cells[0]
            label = cells[1] if len(cells) > 1 and cells[1] else None
            if (control := _control_character(image_id)) is not None:
                raise DatasetError(
                    f"{where}: invalid image id {image_id!r} (a control character, "
                    f"{control!r}; a file name in {images})"
                )
            # a name in the folder, not a path: no separator, and not "." or ".." (which
            # name folders); "photo..v2.jpg" is a file name like any other
            if image_id in ("", ".", "..") or any(c in image_id for c in "/\\"):
                raise DatasetError(
                    f"{where}: invalid image id {image_id!r} (a file name in {images}, no folders)"
                )
            if label is not None and label not in self.classes:
                raise DatasetError(
                    f"{where}: unknown label {label!r} (expected one of {self.classes})"
                )
            if image_id in seen:
                raise DatasetError(
                    f"{where}: duplicate image id {image_id!r} (first at {seen[image_id]})"
                )
            seen[image_id] = where
            ids.add(image_id)
            path = images / image_id
            try:
                found = path.is_file()
            except OSError as exc:
                if exc.errno != errno.ENAMETOOLONG:
                    raise DatasetError(
                        f"{where}: cannot look for image {image_id!r} in {images} ({exc.strerror})"
                    ) from None
                # no file can have that name: as absent as any other missing image
                reason = f"listed in {where} but not found (file name too long)"
                self._missing.append(Skipped(image_id, split, str(path), reason))
                continue
            if not found:
                self._missing.append(
                    Skipped(image_id, split, str(path), f"listed in {where} but not found")
                )
                continue
            _inside(self._real_root, path, f"image {image_id!r} ({where})")
            self._samples.append(Sample(image_id, label, split, path))

    def samples(self) -> list[Sample]:
        """All samples whose file exists, ordered by split (train, dev, test) then image id."""
        return list(self._samples)

    def missing(self) -> list[Skipped]:
        """Images a CSV lists that are not in their folder."""
        return list(self._missing)

    def unlisted(self) -> list[Skipped]:
        """Image files in a split's folder that its CSV does not list (left out)."""
        return list(self._unlisted)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_images(class_dir: Path) -> list[Path]:
    """Image files under ``class_dir`` at any depth, leaving out dot-files and anything in
    a dot-folder (macOS ``._x.jpg`` AppleDouble files, ``.ipynb_checkpoints/``), as
    ``_image_files`` does for a split folder."""
    return sorted(
        p
        for p in class_dir.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
        and (p.is_file() or p.is_symlink())  # a link to nothing: skipped, saying so
    )


class ImageFolderDataset:
    """torchvision layout: ``root/<class>/<img>`` or ``root/{train,val|dev,test}/<class>/<img>``.

    An image's id is its path relative to the root: ``<class>/<img>`` in the flat layout,
    ``<split folder>/<class>/<img>`` with split folders, so that ``train/A/0001.jpg`` and
    ``val/A/0001.jpg`` (exports number each split from 1) stay two images downstream,
    where everything is keyed by image id.
    """

    def __init__(self, root: Path) -> None:
        self.root, self._real_root = _roots(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: not a directory ([dataset] root)")
        train = self.root / "train"
        if train.is_dir() and _subdirs(train):
            if (self.root / "val").is_dir() and (self.root / "dev").is_dir():
                raise DatasetError(f"{self.root}: has both 'val' and 'dev' folders; keep one")
            folders = {"train": train, "dev": self.root / "val", "test": self.root / "test"}
            if not folders["dev"].is_dir():
                folders["dev"] = self.root / "dev"
            folders = {split: f for split, f in folders.items() if f.is_dir()}
        else:
            folders = {"train": self.root}
        class_dirs = {split: _subdirs(folder) for split, folder in folders.items()}
        for dirs in class_dirs.values():
            for class_dir in dirs:
                if not _is_utf8(class_dir.name):  # a class name is printed and stored
                    raise DatasetError(
                        f"{printable(class_dir)}: class folder name is not valid UTF-8; rename it"
                    )
                # a label, as in a CSV: one with a newline or ESC cannot be shown or stored
                if (control := _control_character(class_dir.name)) is not None:
                    raise DatasetError(
                        f"{class_dir}: class folder name holds a control character "
                        f"({control!r}); rename it"
                    )
        self.classes = tuple(sorted({d.name for dirs in class_dirs.values() for d in dirs}))
        if not self.classes:
            raise DatasetError(f"{self.root}: no class folders found")
        samples, self._missing = [], []
        for split, dirs in class_dirs.items():
            for class_dir in dirs:
                _inside(self._real_root, class_dir, f"class folder {class_dir.name!r}")
                images = _class_images(class_dir)
                for path in images:
                    image_id = path.relative_to(self.root).as_posix()
                    if not _is_utf8(image_id):
                        # skipped, as an image that cannot be read: named with \\xe9 escapes
                        self._missing.append(
                            Skipped(printable(image_id), split, printable(path), NOT_UTF8)
                        )
                        continue
                    if (control := _control_character(image_id)) is not None:
                        # in its name or a subfolder's: a CSV row naming it stops an aicup
                        # dataset; here the file is the listing, so it is skipped
                        reason = f"file name holds a control character ({control!r}; rename it)"
                        shown = Skipped(
                            _escaped_controls(image_id), split, _escaped_controls(str(path)), reason
                        )
                        self._missing.append(shown)
                        continue
                    if len(image_id) > MAX_IMAGE_ID_CHARS:
                        reason = (
                            f"its path under the dataset's root is {len(image_id)} characters, "
                            f"more than the {MAX_IMAGE_ID_CHARS} an image id may have "
                            "(shorten its folders' or its own name)"
                        )
                        self._missing.append(Skipped(image_id, split, str(path), reason))
                        continue
                    if not path.is_file():  # a symlink to nothing, or to a folder
                        reason = f"a symlink to {printable(os.readlink(path))}, which is not a file"
                        self._missing.append(Skipped(image_id, split, str(path), reason))
                        continue
                    _inside(self._real_root, path, "image")
                    samples.append(Sample(image_id, class_dir.name, split, path))
                if not images:
                    # a class with no example is a failed copy, not a class to learn
                    raise DatasetError(f"{class_dir}: empty class folder (no image files)")
        self._samples = _sorted(samples)

    def samples(self) -> list[Sample]:
        """All samples, ordered by split (train, dev, test) then image id."""
        return list(self._samples)

    def missing(self) -> list[Skipped]:
        """Image files whose names are not valid UTF-8 or hold a control character
        (skipped: a name that cannot be printed or stored as text cannot be an image id),
        whose ids are too long, and symlinks to nothing."""
        return list(self._missing)

    def unlisted(self) -> list[Skipped]:
        return []  # every image file in a class folder is listed by being there


def open_dataset(kind: str, root: Path, **options: Any) -> Dataset:
    """Open a dataset of ``kind`` ("aicup" or "imagefolder") at ``root``."""
    if kind == "aicup":
        return AicupDataset(Path(root), **options)
    if kind == "imagefolder":
        if options:
            raise DatasetError(f"{root}: imagefolder takes no options, got {sorted(options)}")
        return ImageFolderDataset(Path(root))
    raise DatasetError(f"{root}: unknown dataset kind {kind!r} (expected 'aicup' or 'imagefolder')")
