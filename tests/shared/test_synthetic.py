import hashlib
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from shared.datasets import AicupDataset, DatasetError
from shared.synthetic import generate_synthetic

SMALL = {"train_per_class": 3, "test_per_class": 2, "size": (96, 72)}


def digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_csv(path: Path) -> list[list[str]]:
    return [line.split(",") for line in path.read_text().splitlines()]


def test_layout_and_counts(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "ds", seed=3, label_noise=0.0, **SMALL)
    assert root == tmp_path / "ds"
    train, test = read_csv(root / "train.csv"), read_csv(root / "test.csv")
    assert train[0] == ["image_id", "label"] and test[0] == ["image_id", "label"]
    assert Counter(label for _, label in train[1:]) == {"A": 3, "B": 3, "C": 3}
    assert Counter(label for _, label in test[1:]) == {"A": 2, "B": 2, "C": 2}
    ids = [image_id for image_id, _ in train[1:] + test[1:]]
    assert ids == [f"{i:05d}.jpg" for i in range(1, 16)]
    for image_id, _ in train[1:]:
        img = cv2.imread(str(root / "train" / image_id))
        assert img.shape == (72, 96, 3)
    assert sorted(p.name for p in (root / "test").iterdir()) == ids[9:]
    params = json.loads((root / "synthetic.json").read_text())
    assert params["seed"] == 3 and params["size"] == [96, 72]
    assert not [p for p in tmp_path.iterdir() if p.name != "ds"]  # no temporary leftovers


def test_deterministic(tmp_path: Path) -> None:
    first = digests(generate_synthetic(tmp_path / "a", seed=7, **SMALL))
    second = digests(generate_synthetic(tmp_path / "b", seed=7, **SMALL))
    assert first == second
    assert len(first) == 3 + 15  # two CSVs, the marker and the images
    other = digests(generate_synthetic(tmp_path / "c", seed=8, **SMALL))
    images = [name for name in first if name.endswith(".jpg")]
    assert all(first[name] != other[name] for name in images)


def test_label_noise_changes_labels_not_photos(tmp_path: Path) -> None:
    clean = generate_synthetic(tmp_path / "a", seed=1, label_noise=0.0, **SMALL)
    noisy = generate_synthetic(tmp_path / "b", seed=1, label_noise=1.0, **SMALL)
    clean_files, noisy_files = digests(clean), digests(noisy)
    assert all(clean_files[n] == noisy_files[n] for n in clean_files if n.endswith(".jpg"))
    neighbours = {"A": {"B"}, "B": {"A", "C"}, "C": {"B"}}
    for split in ("train.csv", "test.csv"):
        for (_, truth), (_, label) in zip(
            read_csv(clean / split)[1:], read_csv(noisy / split)[1:], strict=True
        ):
            assert label in neighbours[truth]


def test_idempotent(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "ds", seed=2, **SMALL)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    before[root] = root.stat().st_mtime_ns
    assert generate_synthetic(tmp_path / "ds", seed=2, **SMALL) == root
    after = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    after[root] = root.stat().st_mtime_ns
    assert after == before


def test_unlabelled_test_split(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "ds", test_labels=False, **SMALL)
    assert all(label == "" for _, label in read_csv(root / "test.csv")[1:])
    assert all(label in "ABC" and label for _, label in read_csv(root / "train.csv")[1:])


def test_opens_as_aicup(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "ds", seed=4, test_labels=False, **SMALL)
    ds = AicupDataset(root)
    samples = ds.samples()
    assert ds.classes == ("A", "B", "C")
    assert [s.split for s in samples] == ["train"] * 9 + ["test"] * 6
    assert [s.image_id for s in samples] == [f"{i:05d}.jpg" for i in range(1, 16)]
    assert all(s.label is None for s in samples if s.split == "test")
    assert all(s.path.is_file() for s in samples)


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    (root / "keep.txt").write_text("precious")
    with pytest.raises(DatasetError) as excinfo:
        generate_synthetic(root, **SMALL)
    assert str(root) in str(excinfo.value) and "\n" not in str(excinfo.value)
    assert [p.name for p in root.iterdir()] == ["keep.txt"]

    other = generate_synthetic(tmp_path / "ds", seed=0, **SMALL)
    with pytest.raises(DatasetError):  # a synthetic dataset, but with other parameters
        generate_synthetic(other, seed=1, **SMALL)


def test_fills_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    root = generate_synthetic(tmp_path / "ds", **SMALL)
    assert (root / "synthetic.json").is_file()


def test_learnable_but_not_trivial(tmp_path: Path) -> None:
    from sklearn.ensemble import RandomForestClassifier

    root = generate_synthetic(tmp_path / "ds", seed=0, train_per_class=40, test_per_class=20)
    features: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    labels: dict[str, list[str | None]] = {"train": [], "test": []}
    for sample in AicupDataset(root).samples():
        img = cv2.imread(str(sample.path))
        small = cv2.resize(img, (32, 32), interpolation=cv2.INTER_AREA)
        features[sample.split].append(small.ravel())
        labels[sample.split].append(sample.label)
    model = RandomForestClassifier(n_estimators=100, random_state=0)
    model.fit(features["train"], labels["train"])
    accuracy = model.score(features["test"], labels["test"])
    print(f"random forest on 32x32 pixels: test accuracy {accuracy:.3f}")
    assert 0.5 < accuracy < 1.0


def test_a_dev_split_on_request_leaves_the_other_splits_as_they_were(tmp_path: Path) -> None:
    plain = generate_synthetic(tmp_path / "plain", seed=5, **SMALL)
    with_dev = generate_synthetic(tmp_path / "dev", seed=5, dev_per_class=2, **SMALL)
    assert not (plain / "dev.csv").exists()
    dev = read_csv(with_dev / "dev.csv")[1:]  # after the header
    assert len(dev) == 3 * 2 and all(label in ("A", "B", "C") for _, label in dev)
    # train is the same; test images are numbered after the dev ones
    assert digests(plain)["train.csv"] == digests(with_dev)["train.csv"]
    ids = [image_id for image_id, _ in read_csv(with_dev / "test.csv")[1:]]
    assert ids == [f"{i:05d}.jpg" for i in range(16, 22)]
    samples = AicupDataset(with_dev).samples()
    assert Counter(s.split for s in samples) == {"train": 9, "dev": 6, "test": 6}
