"""The campaign manifest: every image once, with its split, label and CV fold.

Written by the scheduler at submit time as one JSON artifact; every task reads it,
so workers agree on image order, folds and shard boundaries without talking.

Bad images are found here, at submit, from each file's header (no pixel is decoded):
a minority is skipped and listed in ``Manifest.skipped`` (the report shows them), so
folds are drawn over good images only and every later stage agrees on the same set;
more than ``[preprocessing] max_bad_fraction`` of them stops the campaign.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from shared.datasets import (
    SPLITS,
    AicupDataset,
    Dataset,
    DatasetError,
    ImageFolderDataset,
    Sample,
    Skipped,
)
from shared.errors import OrchardError
from shared.preprocess import (
    MAX_PIXELS,
    PreprocessError,
    UnreadableFileError,
    cache_key,
    check_image,
    fingerprint_digests,
)
from shared.spec import Campaign, DatasetSpec, params_hash
from shared.synthetic import generate_synthetic

TEST_SPLIT = "test"
NO_FOLD = -1
#: ``validation = "oob"``: trained on and validated out of bag, in fold 0
OUT_OF_BAG = -2


class ManifestError(OrchardError, ValueError):
    """The dataset cannot be split as the campaign asks."""


@dataclass(frozen=True, slots=True)
class Entry:
    image_id: str
    label: str | None
    split: str
    path: str
    # the CV fold that validates on it; NO_FOLD for the test split and unlabelled images
    # (both predicted); OUT_OF_BAG with ``validation = "oob"`` (trained on, scored out of bag)
    fold: int
    # of the file's bytes at submit; preprocessing decodes only those bytes ("": a
    # manifest written before it was recorded)
    sha256: str = ""


@dataclass(frozen=True, slots=True)
class Manifest:
    classes: tuple[str, ...]
    entries: tuple[Entry, ...]
    fingerprint: str
    cache_key: str
    size: int
    shard_size: int
    max_pixels: int = MAX_PIXELS
    decoder: str = "opencv"  # [preprocessing] decoder
    skipped: tuple[Skipped, ...] = ()  # left out, with the reason, in (split, id) order
    # The dataset's root, which the entries' paths are relative to: absolute as the
    # campaign wrote it (symlinks kept: each host follows its own), or, with
    # ``root_in_artifacts``, relative to ORCHARD_ARTIFACTS (a generated dataset), so that
    # each host finds it under its own mount. "": a manifest written before 2026-12-06,
    # whose entries hold absolute paths as the submitter's host resolved them.
    root: str = ""
    root_in_artifacts: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    def dataset_root(self, artifacts: Path) -> Path | None:
        """Where this host finds the images (None: an older manifest's absolute paths)."""
        if not self.root:
            return None
        return artifacts / self.root if self.root_in_artifacts else Path(self.root)

    def image_paths(self, entries: Sequence[Entry], artifacts: Path) -> list[str]:
        """The paths of ``entries``' images on this host."""
        root = self.dataset_root(artifacts)
        return [e.path if root is None else os.path.join(root, e.path) for e in entries]

    def earlier_digests(self, artifacts: Path) -> list[str]:
        """The sha256s this manifest's file would have had as earlier orchards wrote it:
        with absolute image paths, resolved on this host (before 2026-12-06), and also
        without the images' sha256 (before 2026-12-05). ``submit --reuse`` takes the
        campaigns recorded then as twins too."""
        root = self.dataset_root(artifacts)
        if root is None:
            return []
        real = root.resolve()
        # a skipped image's path, and a reason naming its CSV, held the resolved root
        data = self._without_root(root, f"{real}/")
        for entry in data["entries"]:
            entry["path"] = str(real / entry["path"])
        digests = [_digest(data)]
        for entry in data["entries"]:
            del entry["sha256"]
        return [*digests, _digest(data)]

    def data_digest(self, artifacts: Path) -> str | None:
        """The sha256 of this manifest without where its dataset lies: the same images
        (their bytes' sha256), labels, splits, folds and preprocessing give the same
        digest whatever path names their root, so ``submit --reuse`` finds a campaign
        over the same data mounted elsewhere. None for a manifest written before it
        recorded the root and every image's sha256 (only its file then tells it apart)."""
        root = self.dataset_root(artifacts)
        if root is None or not all(e.sha256 for e in self.entries):
            return None
        return _digest(self._without_root(root, ""))

    def _without_root(self, root: Path, prefix: str) -> dict:
        """This manifest's fields but the root's, with ``prefix`` for ``root/`` in each
        skipped image's path and reason (which names its CSV)."""
        data = asdict(self)
        del data["root"], data["root_in_artifacts"]
        for skipped in data["skipped"]:
            for field in ("path", "reason"):
                skipped[field] = skipped[field].replace(f"{root}/", prefix)
        return data

    @classmethod
    def from_json(cls, text: str, source: str = "manifest") -> Manifest:
        data = json.loads(text)
        # a newer orchard's (on a host updated first): its fields would be ignored
        unknown = set(data) - set(cls.__dataclass_fields__)
        for kind, name in ((Entry, "entries"), (Skipped, "skipped")):
            for item in data.get(name, ()):
                unknown |= {f"{name}.{k}" for k in set(item) - set(kind.__dataclass_fields__)}
        if unknown:
            raise ManifestError(
                f"{source}: written by a newer orchard (fields this one does not know: "
                f"{', '.join(sorted(unknown))}); update orchard on this host"
            )
        data["classes"] = tuple(data["classes"])
        data["entries"] = tuple(Entry(**e) for e in data["entries"])
        data["skipped"] = tuple(Skipped(**s) for s in data.get("skipped", ()))
        return cls(**data)

    def label_index(self, indices: np.ndarray) -> np.ndarray:
        """Class indices for ``indices`` (-1 where unlabelled)."""
        lookup = {c: i for i, c in enumerate(self.classes)}
        return np.array([lookup.get(self.entries[i].label, -1) for i in indices], dtype=np.int64)

    def test_indices(self) -> np.ndarray:
        """Manifest indices of the images every model predicts (its "test" predictions):
        the test split, and every unlabelled image whatever its split, since an image
        without a label can be neither trained nor validated on."""
        test = [e.split == TEST_SPLIT or e.label is None for e in self.entries]
        return np.flatnonzero(np.array(test, dtype=bool))

    def fold_indices(self, fold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(train, validation, test) manifest indices for one cross-validation fold.

        Under ``validation = "oob"`` fold 0 trains on its validation images: a forest
        judges each by the trees that did not draw it."""
        folds = np.array([e.fold for e in self.entries])
        if fold == 0 and (folds == OUT_OF_BAG).any():
            both = np.flatnonzero(folds == OUT_OF_BAG)
            return both, both, self.test_indices()
        if not (folds == fold).any():
            raise ManifestError(f"fold {fold} has no images")
        train = np.flatnonzero((folds != NO_FOLD) & (folds != fold))
        val = np.flatnonzero(folds == fold)
        return train, val, self.test_indices()


def _digest(data: dict) -> str:
    """The sha256 of a manifest's file holding ``data`` (:meth:`Manifest.to_json`)."""
    return hashlib.sha256(json.dumps(data, indent=1, sort_keys=True).encode("utf-8")).hexdigest()


def assign_folds(
    labels: list[str | None],
    splits: list[str],
    k: int,
    seed: int,
    classes: Sequence[str] = (),
) -> list[int]:
    """Stratified k folds over the labelled, non-test images; deterministic in ``seed``.

    Every class in ``classes`` (and every label seen) needs at least ``k`` such images.
    """
    pool = [
        i
        for i, (lab, sp) in enumerate(zip(labels, splits, strict=True))
        if lab is not None and sp != TEST_SPLIT
    ]
    if not pool:
        raise ManifestError("dataset: no labelled training images")
    counts = Counter({c: 0 for c in classes})
    counts.update(labels[i] for i in pool)
    smallest, n = min(counts.items(), key=lambda kv: (kv[1], kv[0]))
    if n < k:
        raise ManifestError(
            f"dataset: class {smallest!r} has {n} labelled training images, fewer than folds = {k}"
        )
    # Imported here: scikit-learn takes over a second to import, and every `orchard`
    # command (status, cancel, workers) imports this module without assigning folds.
    from sklearn.model_selection import StratifiedKFold

    folds = [NO_FOLD] * len(labels)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    pool_labels = [labels[i] for i in pool]
    for fold, (_, val) in enumerate(splitter.split(np.zeros(len(pool)), pool_labels)):
        for j in val:
            folds[pool[j]] = fold
    return folds


def dev_folds(
    labels: list[str | None], splits: list[str], classes: Sequence[str] = ()
) -> list[int]:
    """One fold for ``validation = "dev"``: the labelled dev images are fold 0 (its
    validation set), the labelled train images fold 1 (so fold 0 trains on them)."""
    folds = [
        NO_FOLD if label is None else {"dev": 0, "train": 1}.get(split, NO_FOLD)
        for label, split in zip(labels, splits, strict=True)
    ]
    if 0 not in folds:
        raise ManifestError(
            'dataset: validation = "dev" needs labelled images in the dev split, and it '
            "has none (aicup: dev.csv with labels; imagefolder: a val/ or dev/ folder; "
            "synthetic: dev_per_class)"
        )
    trained = Counter(label for label, fold in zip(labels, folds, strict=True) if fold == 1)
    if missing := [c for c in (*classes, *trained) if not trained[c]]:
        raise ManifestError(f"dataset: class {missing[0]!r} has no labelled training images")
    return folds


def out_of_bag_folds(
    labels: list[str | None], splits: list[str], classes: Sequence[str] = ()
) -> list[int]:
    """``validation = "oob"``: every labelled train and dev image trains fold 0 and is
    validated out of bag (:data:`OUT_OF_BAG`); the test split and unlabelled images are
    predicted."""
    folds = [
        NO_FOLD if label is None or split == TEST_SPLIT else OUT_OF_BAG
        for label, split in zip(labels, splits, strict=True)
    ]
    trained = Counter(label for label, fold in zip(labels, folds, strict=True) if fold != NO_FOLD)
    if not trained:
        raise ManifestError("dataset: no labelled training images")
    if missing := [c for c in classes if not trained[c]]:
        raise ManifestError(f"dataset: class {missing[0]!r} has no labelled training images")
    return folds


def manifest_path(campaign_dir: Path) -> Path:
    return campaign_dir / "manifest.json"


def synthetic_root(spec: DatasetSpec, artifacts: Path) -> Path:
    """Where a synthetic dataset is generated: its ``root``, or a folder under
    ``artifacts/datasets`` named by its parameters."""
    # dev_per_class = 0 (the default) leaves the folder name of earlier datasets
    unnamed = {"kind", "root"} | ({"dev_per_class"} if not spec.dev_per_class else set())
    options = spec.model_dump(exclude=unnamed)
    return spec.root or artifacts / "datasets" / f"synthetic-{params_hash(options)}"


def open_campaign_dataset(spec: DatasetSpec, artifacts: Path) -> Dataset:
    """The dataset a campaign names; a synthetic one is generated first if needed.
    A path the system refuses (a name too long, a folder we may not read, a symlink
    loop, no room to generate) stops it in one line naming the path."""
    if spec.kind == "synthetic":
        root = synthetic_root(spec, artifacts)
        try:
            generate_synthetic(
                root,
                seed=spec.seed,
                train_per_class=spec.train_per_class,
                test_per_class=spec.test_per_class,
                dev_per_class=spec.dev_per_class,
                size=(spec.width, spec.height),
                label_noise=spec.label_noise,
                test_labels=spec.test_labels,
            )
        except OSError as exc:
            raise DatasetError(
                f"{exc.filename or root}: cannot generate the synthetic dataset "
                f"([dataset] root {root}): {exc.strerror or exc}"
            ) from None
    try:
        if spec.kind == "synthetic":
            return AicupDataset(root)
        if spec.kind == "aicup":
            splits = None
            if spec.splits is not None:
                splits = {name: (files.csv, files.images) for name, files in spec.splits.items()}
            return AicupDataset(spec.root, splits=splits, classes=spec.classes)
        return ImageFolderDataset(spec.root)
    except OSError as exc:
        reason = exc.strerror or exc
        raise DatasetError(f"{exc.filename or spec.root}: cannot read ({reason})") from None
    except RuntimeError as exc:  # Path.resolve() on a symlink loop (Python 3.11, 3.12)
        if "Symlink loop" not in str(exc):
            raise
        looped = str(exc).removeprefix("Symlink loop from ").strip("'")
        raise DatasetError(f"{looped}: a symlink loop (links leading back to themselves)") from None


def _check_images(
    samples: list[Sample], max_pixels: int
) -> tuple[list[tuple[Sample, str]], list[Skipped]]:
    """(sample, sha256) of every usable image, and the unusable ones with the reason."""
    good, bad = [], []
    unreadable: list[str] = []
    for sample in samples:
        try:
            _, sha256 = check_image(sample.path, max_pixels)
        except UnreadableFileError as exc:
            # not the image's fault but this host's or user's (permissions, a failing
            # disk): skipping such files would drop data silently, up to max_bad_fraction
            unreadable.append(str(exc))
        except PreprocessError as exc:
            # the message names the file as an OrchardError shows it (controls escaped)
            reason = str(exc).removeprefix(str(PreprocessError(f"{sample.path}: ")))
            bad.append(Skipped(sample.image_id, sample.split, str(sample.path), reason))
        else:
            good.append((sample, sha256))
    if unreadable:
        more = f" (and {len(unreadable) - 1} more image(s))" if len(unreadable) > 1 else ""
        raise DatasetError(
            f"{unreadable[0]}{more}: this user may not read the dataset, or its disk "
            "failed; mend it (the workers must read it too) and submit again"
        )
    return good, bad


def _order(skipped: Skipped) -> tuple[int, str]:
    return SPLITS.index(skipped.split), skipped.image_id


def _under(root: Path, path: Path) -> str:
    """An image's path relative to its dataset's root: as the dataset names it, or, for
    an image folder named by another path to the same place (`[dataset.splits]` images
    as an absolute path through the root's symlink), by where its folder leads."""
    if path.is_relative_to(root):
        return path.relative_to(root).as_posix()
    folder = Path(os.path.realpath(path.parent))
    return (folder.relative_to(os.path.realpath(root)) / path.name).as_posix()


def recorded_root(root: Path, artifacts: Path) -> tuple[str, bool]:
    """(root, root_in_artifacts) as a manifest records a dataset's root: relative to the
    artifact folder where it is inside it (each host mounts that folder its own way),
    else absolute, as the campaign names it."""
    for base, path in ((artifacts, root), (artifacts.resolve(), root.resolve())):
        if path.is_relative_to(base):
            return path.relative_to(base).as_posix(), True
    return str(root), False


def build_manifest(campaign: Campaign, artifacts: Path) -> Manifest:
    """Open the campaign's dataset, leave out bad images, assign folds, key the cache."""
    dataset = open_campaign_dataset(campaign.dataset, artifacts)
    where = f"dataset {getattr(dataset, 'root', '')}"
    spec = campaign.preprocessing
    good, bad = _check_images(dataset.samples(), spec.max_pixels)
    bad = sorted(bad + dataset.missing(), key=_order)
    listed = len(good) + len(bad)
    if not listed:
        raise ManifestError(f"{where}: no images")
    if len(bad) > spec.max_bad_fraction * listed:
        shown = "; ".join(f"{s.path}: {s.reason}" for s in bad[:3])
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ManifestError(
            f"{where}: {len(bad)} of {listed} images are unusable, more than "
            f"[preprocessing] max_bad_fraction = {spec.max_bad_fraction}: {shown}{more}"
        )
    samples = [sample for sample, _ in good]
    labels, splits = [s.label for s in samples], [s.split for s in samples]
    try:
        if campaign.validation == "dev":
            folds = dev_folds(labels, splits, classes=dataset.classes)
        elif campaign.validation == "oob":
            folds = out_of_bag_folds(labels, splits, classes=dataset.classes)
        else:
            folds = assign_folds(labels, splits, campaign.folds, campaign.seed, dataset.classes)
    except ManifestError as exc:
        note = f" (after skipping {len(bad)} unusable images)" if bad else ""
        raise ManifestError(f"{where}: {str(exc).removeprefix('dataset: ')}{note}") from None
    fingerprint = fingerprint_digests([(s.split, s.image_id, sha) for s, sha in good])
    root, in_artifacts = recorded_root(dataset.root, artifacts)
    return Manifest(
        classes=tuple(dataset.classes),
        entries=tuple(
            Entry(s.image_id, s.label, s.split, _under(dataset.root, s.path), fold, sha)
            for (s, sha), fold in zip(good, folds, strict=True)
        ),
        root=root,
        root_in_artifacts=in_artifacts,
        fingerprint=fingerprint,
        cache_key=cache_key(fingerprint, spec.size, spec.shard_size, spec.decoder),
        size=spec.size,
        shard_size=spec.shard_size,
        max_pixels=spec.max_pixels,
        decoder=spec.decoder,
        skipped=tuple(sorted(bad + dataset.unlisted(), key=_order)),
    )
