"""Dataset adapters: the AI CUP 2020 mango layout and torchvision's ImageFolder layout.

Both yield the same ``Sample`` records in a deterministic order (split, then image id), so
everything downstream is independent of where the photos came from.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from shared.errors import OrchardError

SPLITS = ("train", "dev", "test")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
DEFAULT_AICUP_SPLITS: Mapping[str, tuple[str, str]] = {
    "train": ("train.csv", "train"),
    "dev": ("dev.csv", "dev"),
    "test": ("test.csv", "test"),
}


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


class Dataset(Protocol):
    classes: tuple[str, ...]

    def samples(self) -> list[Sample]: ...


def _sorted(samples: list[Sample]) -> list[Sample]:
    return sorted(samples, key=lambda s: (SPLITS.index(s.split), s.image_id))


class AicupDataset:
    """AI CUP 2020 mango layout: per split, a CSV ``image_id,label`` and a folder of images."""

    def __init__(
        self,
        root: Path,
        splits: Mapping[str, tuple[str, str]] | None = None,
        classes: Sequence[str] = ("A", "B", "C"),
    ) -> None:
        self.root = Path(root).resolve()
        self.classes = tuple(classes)
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise DatasetError(f"{self.root}: classes must be non-empty and unique: {classes!r}")
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: dataset root is not a directory")
        required = splits is not None
        if splits is None:
            splits = DEFAULT_AICUP_SPLITS
        self._samples: list[Sample] = []
        seen: dict[str, str] = {}  # image_id -> "csv:line" where first listed
        for split, (csv_rel, images_rel) in splits.items():
            if split not in SPLITS:
                raise DatasetError(f"{self.root}: unknown split {split!r} (expected {SPLITS})")
            csv_path = self.root / csv_rel
            if not csv_path.is_file():
                if required or split == "train":
                    raise DatasetError(f"{csv_path}: CSV file for split {split!r} not found")
                continue
            self._read_csv(csv_path, self.root / images_rel, split, seen)
        self._samples = _sorted(self._samples)

    def _read_csv(self, csv_path: Path, images: Path, split: str, seen: dict[str, str]) -> None:
        with open(csv_path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            for index, row in enumerate(reader):
                where = f"{csv_path}:{reader.line_num}"
                cells = [cell.strip() for cell in row]
                if not any(cells):
                    continue
                if index == 0 and cells[0].lower() == "image_id":
                    continue
                image_id = cells[0]
                label = cells[1] if len(cells) > 1 and cells[1] else None
                if not image_id or "/" in image_id or "\\" in image_id or ".." in image_id:
                    raise DatasetError(f"{where}: invalid image id {image_id!r}")
                if label is not None and label not in self.classes:
                    raise DatasetError(
                        f"{where}: unknown label {label!r} (expected one of {self.classes})"
                    )
                if image_id in seen:
                    raise DatasetError(
                        f"{where}: duplicate image id {image_id!r} (first at {seen[image_id]})"
                    )
                seen[image_id] = where
                path = images / image_id
                if not path.is_file():
                    raise DatasetError(f"{where}: image {image_id!r} not found at {path}")
                self._samples.append(Sample(image_id, label, split, path))

    def samples(self) -> list[Sample]:
        """All samples, ordered by split (train, dev, test) then image id."""
        return list(self._samples)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


class ImageFolderDataset:
    """torchvision layout: ``root/<class>/<img>`` or ``root/{train,val|dev,test}/<class>/<img>``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: dataset root is not a directory")
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
        self.classes = tuple(sorted({d.name for dirs in class_dirs.values() for d in dirs}))
        if not self.classes:
            raise DatasetError(f"{self.root}: no class folders found")
        samples = []
        for split, dirs in class_dirs.items():
            for class_dir in dirs:
                for path in class_dir.rglob("*"):
                    if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                        image_id = path.relative_to(folders[split]).as_posix()
                        samples.append(Sample(image_id, class_dir.name, split, path))
        if not samples:
            raise DatasetError(f"{self.root}: no image files found in class folders")
        self._samples = _sorted(samples)

    def samples(self) -> list[Sample]:
        """All samples, ordered by split (train, dev, test) then image id."""
        return list(self._samples)


def open_dataset(kind: str, root: Path, **options: Any) -> Dataset:
    """Open a dataset of ``kind`` ("aicup" or "imagefolder") at ``root``."""
    if kind == "aicup":
        return AicupDataset(Path(root), **options)
    if kind == "imagefolder":
        if options:
            raise DatasetError(f"{root}: imagefolder takes no options, got {sorted(options)}")
        return ImageFolderDataset(Path(root))
    raise DatasetError(f"{root}: unknown dataset kind {kind!r} (expected 'aicup' or 'imagefolder')")
