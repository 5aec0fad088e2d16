"""Stratified folds, the manifest's JSON form and its index helpers."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from shared.manifest import (
    NO_FOLD,
    TEST_SPLIT,
    Entry,
    Manifest,
    ManifestError,
    assign_folds,
    build_manifest,
    dev_folds,
    out_of_bag_folds,
)
from shared.spec import parse_campaign


def _labels(per_class: dict[str, int]) -> list[str]:
    # interleaved, so stratification has to do the work
    out: list[str] = []
    remaining = dict(per_class)
    while any(remaining.values()):
        for cls in sorted(remaining):
            if remaining[cls]:
                out.append(cls)
                remaining[cls] -= 1
    return out


# ---------------------------------------------------------------- assign_folds


def test_folds_are_stratified():
    labels = _labels({"A": 13, "B": 10, "C": 7})
    folds = assign_folds(labels, ["train"] * len(labels), k=5, seed=0)
    assert set(folds) == set(range(5))
    for cls in "ABC":
        sizes = Counter(f for f, lab in zip(folds, labels, strict=True) if lab == cls)
        assert set(sizes) == set(range(5)), cls  # every fold has every class
        assert max(sizes.values()) - min(sizes.values()) <= 1, (cls, sizes)


def test_folds_are_deterministic_in_seed():
    labels = _labels({"A": 10, "B": 10, "C": 10})
    splits = ["train"] * len(labels)
    assert assign_folds(labels, splits, 5, seed=3) == assign_folds(labels, splits, 5, seed=3)
    assert assign_folds(labels, splits, 5, seed=3) != assign_folds(labels, splits, 5, seed=4)


def test_test_split_and_unlabelled_get_no_fold():
    labels: list[str | None] = _labels({"A": 4, "B": 4}) + ["A", "B", None, None]
    splits = ["train"] * 8 + [TEST_SPLIT, TEST_SPLIT, "train", "dev"]
    folds = assign_folds(labels, splits, k=2, seed=0)
    assert folds[8:] == [NO_FOLD] * 4
    assert all(f in (0, 1) for f in folds[:8])


def test_dev_split_images_join_the_pool():
    labels = _labels({"A": 4, "B": 4})
    splits = ["train"] * 4 + ["dev"] * 4
    folds = assign_folds(labels, splits, k=2, seed=0)
    assert NO_FOLD not in folds


def test_too_few_images_in_a_class_names_it():
    labels = _labels({"A": 5, "B": 5, "C": 2})
    with pytest.raises(ManifestError, match="'C'") as info:
        assign_folds(labels, ["train"] * len(labels), k=3, seed=0)
    assert "\n" not in str(info.value)
    assert "folds = 3" in str(info.value)


def test_test_images_do_not_count_towards_class_minimum():
    labels = ["A", "A", "B", "B", "B", "B"]
    splits = ["train", TEST_SPLIT, "train", "train", "train", "train"]
    with pytest.raises(ManifestError, match="'A'"):
        assign_folds(labels, splits, k=2, seed=0)


def test_a_declared_class_without_training_images_is_named():
    labels = _labels({"A": 4, "B": 4})
    assign_folds(labels, ["train"] * 8, k=2, seed=0)  # C is not declared: fine
    with pytest.raises(ManifestError, match="class 'C' has 0 labelled training images"):
        assign_folds(labels, ["train"] * 8, k=2, seed=0, classes=("A", "B", "C"))


def test_no_labelled_training_images():
    with pytest.raises(ManifestError):
        assign_folds([None, "A"], ["train", TEST_SPLIT], k=2, seed=0)


# ---------------------------------------------------------------- Manifest


def _manifest() -> Manifest:
    labels: list[str | None] = _labels({"A": 4, "B": 4})
    entries = [(f"{i:03d}.jpg", lab, "train") for i, lab in enumerate(labels)]
    entries += [("100.jpg", None, "train"), ("101.jpg", "A", TEST_SPLIT)]
    entries += [("102.jpg", None, TEST_SPLIT)]
    folds = assign_folds([e[1] for e in entries], [e[2] for e in entries], k=2, seed=0)
    return Manifest(
        classes=("A", "B"),
        entries=tuple(
            Entry(image_id, label, split, f"/data/{image_id}", fold)
            for (image_id, label, split), fold in zip(entries, folds, strict=True)
        ),
        fingerprint="f" * 64,
        cache_key="c" * 20,
        size=64,
        shard_size=4,
    )


def test_manifest_json_round_trip():
    manifest = _manifest()
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest
    assert isinstance(again.classes, tuple)
    assert isinstance(again.entries[0], Entry)


def test_a_manifest_written_before_the_decoder_field_reads_as_opencv():
    nvjpeg = dataclasses.replace(_manifest(), decoder="nvjpeg")
    assert Manifest.from_json(nvjpeg.to_json()).decoder == "nvjpeg"
    older = json.loads(_manifest().to_json())
    del older["decoder"]
    assert Manifest.from_json(json.dumps(older)).decoder == "opencv"


def test_a_manifest_of_a_newer_orchard_is_one_line_naming_what_it_does_not_know():
    """Written by a newer orchard (a host updated first): not a TypeError from the
    dataclass, nor its fields ignored."""
    newer = json.loads(_manifest().to_json())
    newer["tiling"], newer["format"] = 2, 3
    with pytest.raises(ManifestError) as err:
        Manifest.from_json(json.dumps(newer), "/a/campaigns/c-1/manifest.json")
    assert str(err.value) == (
        "/a/campaigns/c-1/manifest.json: written by a newer orchard (fields this one does "
        "not know: format, tiling); update orchard on this host"
    )
    entry = json.loads(_manifest().to_json())
    entry["entries"][0]["crop"] = [0, 0, 10, 10]
    with pytest.raises(ManifestError) as err:
        Manifest.from_json(json.dumps(entry))
    assert "(fields this one does not know: entries.crop)" in str(err.value)


def test_fold_indices_partition_the_labelled_pool():
    manifest = _manifest()
    pool = {i for i, e in enumerate(manifest.entries) if e.fold != NO_FOLD}
    assert pool == set(range(8))
    # the test split and the unlabelled training image: everything predicted, not fitted
    test_idx = {i for i, e in enumerate(manifest.entries) if e.fold == NO_FOLD}
    assert {manifest.entries[i].image_id for i in test_idx} == {"100.jpg", "101.jpg", "102.jpg"}
    vals = []
    for fold in (0, 1):
        train, val, test = manifest.fold_indices(fold)
        assert not set(train) & set(val)
        assert set(train) | set(val) == pool
        assert set(test) == test_idx
        assert not set(test) & (set(train) | set(val))
        assert all(manifest.entries[i].fold == fold for i in val)
        vals.append(set(val))
    assert vals[0] | vals[1] == pool
    assert not vals[0] & vals[1]


def test_unlabelled_images_of_every_split_are_predicted():
    labels: list[str | None] = _labels({"A": 4, "B": 4}) + [None, None, None, "A"]
    splits = ["train"] * 8 + ["train", "dev", TEST_SPLIT, TEST_SPLIT]
    folds = assign_folds(labels, splits, k=2, seed=0)
    manifest = dataclasses.replace(
        _manifest(),
        entries=tuple(
            Entry(f"{i:03d}.jpg", lab, sp, f"/data/{i:03d}.jpg", fold)
            for i, (lab, sp, fold) in enumerate(zip(labels, splits, folds, strict=True))
        ),
    )
    assert manifest.test_indices().tolist() == [8, 9, 10, 11]
    for fold in (0, 1):
        train, val, test = manifest.fold_indices(fold)
        assert test.tolist() == [8, 9, 10, 11]
        # every image is in exactly one of the fold's sets: fitted, validated or predicted
        assert sorted([*train, *val, *test]) == list(range(12))


def test_fold_indices_unknown_fold():
    with pytest.raises(ManifestError, match="fold 7"):
        _manifest().fold_indices(7)


def test_label_index_maps_none_to_minus_one():
    manifest = _manifest()
    indices = np.arange(len(manifest.entries))
    labels = manifest.label_index(indices)
    assert labels.dtype == np.int64
    expected = [{"A": 0, "B": 1, None: -1}[e.label] for e in manifest.entries]
    assert labels.tolist() == expected
    assert -1 in labels.tolist()


# ---------------------------------------------------------------- build_manifest


def _synthetic_campaign(root: Path, **dataset):
    spec = {
        "kind": "synthetic",
        "root": str(root),
        "train_per_class": 4,
        "test_per_class": 2,
        "width": 64,
        "height": 48,
        **dataset,
    }
    return parse_campaign({"name": "tiny", "folds": 2, "dataset": spec}, source="<test>")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("manifest")
    campaign = _synthetic_campaign(tmp / "data", label_noise=0.0)
    return build_manifest(campaign, tmp / "artifacts"), tmp


def test_build_manifest_on_synthetic(built):
    manifest, tmp = built
    assert manifest.classes == ("A", "B", "C")
    assert len(manifest.entries) == 3 * 4 + 3 * 2
    train = [e for e in manifest.entries if e.split == "train"]
    test = [e for e in manifest.entries if e.split == TEST_SPLIT]
    assert len(train) == 12 and len(test) == 6
    assert all(e.fold == NO_FOLD for e in test)
    assert Counter(e.fold for e in train) == {0: 6, 1: 6}
    for fold in (0, 1):
        assert {e.label for e in train if e.fold == fold} == {"A", "B", "C"}
    assert all(Path(p).is_file() for p in manifest.image_paths(manifest.entries, tmp / "artifacts"))
    assert manifest.size == 256 and manifest.shard_size == 256


def test_each_entry_records_the_sha256_of_its_bytes_at_submit(built):
    import hashlib

    manifest, tmp = built
    paths = manifest.image_paths(manifest.entries, tmp / "artifacts")
    for entry, path in zip(manifest.entries, paths, strict=True):
        assert entry.sha256 == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    older = json.loads(manifest.to_json())  # a manifest written before it was recorded
    for entry in older["entries"]:
        del entry["sha256"]
    assert {e.sha256 for e in Manifest.from_json(json.dumps(older)).entries} == {""}


def test_a_manifest_names_its_images_under_the_root_the_campaign_wrote(tmp_path):
    """A symlink on the submitter's host may lead elsewhere than on a worker's, which
    mounts the same share: the root is kept as the campaign wrote it, made absolute, and
    the images are recorded under it. Files written by earlier orchards (absolute paths,
    the root's symlinks followed; before that, without the images' sha256) are named as
    twins for ``--reuse``."""
    import hashlib

    from tests.aicup import make_aicup

    real = make_aicup(tmp_path / "mnt-a" / "mango", per_class=4)
    # listed and missing: skipped, its path and its reason (naming the CSV) under the root
    (real / "train.csv").write_text((real / "train.csv").read_text() + "999.jpg,A\n")
    (tmp_path / "data").symlink_to(tmp_path / "mnt-a")
    campaign = parse_campaign(
        {"name": "c", "folds": 2, "dataset": {"kind": "aicup", "root": "data/mango"}},
        source="<test>",
        base_dir=tmp_path,
    )
    manifest = build_manifest(campaign, tmp_path / "artifacts")
    assert (manifest.root, manifest.root_in_artifacts) == (str(tmp_path / "data/mango"), False)
    assert manifest.entries[0].path == "train/000.jpg"
    assert manifest.image_paths(manifest.entries[:1], tmp_path / "nowhere") == [
        str(tmp_path / "data/mango/train/000.jpg")
    ]

    def digest(data):  # noqa: ANN001, ANN202
        text = json.dumps(data, indent=1, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    # as d4721b4 wrote it (checked once against that code's own file for this dataset)
    earlier = json.loads(manifest.to_json())
    del earlier["root"], earlier["root_in_artifacts"]
    for entry in earlier["entries"]:
        entry["path"] = str(real / entry["path"])
    [skipped] = earlier["skipped"]
    assert skipped["path"] == str(tmp_path / "data/mango/train/999.jpg")
    assert str(tmp_path / "data/mango/train.csv") in skipped["reason"]
    skipped["path"] = str(real / "train/999.jpg")
    skipped["reason"] = skipped["reason"].replace(str(tmp_path / "data/mango"), str(real))
    before = [digest(earlier)]
    for entry in earlier["entries"]:
        del entry["sha256"]
    assert manifest.earlier_digests(tmp_path / "artifacts") == [*before, digest(earlier)]


def test_the_data_digest_is_the_same_data_wherever_its_root_lies(tmp_path):
    """``submit --reuse`` finds a campaign over the same images named by another path
    (another mount, a symlink): their manifests differ in the root alone."""
    import shutil
    from dataclasses import replace

    from tests.aicup import make_aicup, write_jpeg

    real = make_aicup(tmp_path / "mnt-a" / "mango", per_class=4)
    (real / "train.csv").write_text((real / "train.csv").read_text() + "999.jpg,A\n")
    (tmp_path / "data").symlink_to(tmp_path / "mnt-a")
    shutil.copytree(real, tmp_path / "mnt-b" / "mango")

    def manifest_of(root):  # noqa: ANN001, ANN202
        campaign = parse_campaign(
            {"name": "c", "folds": 2, "dataset": {"kind": "aicup", "root": str(root)}},
            source="<test>",
        )
        return build_manifest(campaign, tmp_path / "artifacts")

    manifests = [manifest_of(r) for r in (real, tmp_path / "data/mango", tmp_path / "mnt-b/mango")]
    assert len({m.to_json() for m in manifests}) == 3  # three files, three sha256s
    assert manifests[0].skipped and manifests[0].skipped[0].path.startswith(f"{real}/")
    digests = {m.data_digest(tmp_path / "artifacts") for m in manifests}
    assert len(digests) == 1 and None not in digests
    # another image's bytes, or another label, is other data
    write_jpeg(tmp_path / "mnt-b/mango/train/000.jpg", seed=99)
    assert manifest_of(tmp_path / "mnt-b/mango").data_digest(tmp_path / "artifacts") not in digests
    first = manifests[0]
    relabelled = replace(first, entries=(replace(first.entries[0], label="C"), *first.entries[1:]))
    assert relabelled.data_digest(tmp_path / "artifacts") not in digests
    # written before the root or the images' sha256 were recorded: no digest
    assert replace(first, root="").data_digest(tmp_path / "artifacts") is None
    unchecked = (replace(first.entries[0], sha256=""), *first.entries[1:])
    assert replace(first, entries=unchecked).data_digest(tmp_path / "artifacts") is None


def test_a_generated_dataset_is_found_under_each_host_s_artifact_folder(tmp_path):
    """The share holding ORCHARD_ARTIFACTS mounted at another place on a worker: the
    generated dataset's images are found under that worker's mount, and a submit from
    there records the same manifest (the same twin for ``--reuse``)."""
    campaign = parse_campaign(
        {"name": "c", "folds": 2, "dataset": {"kind": "synthetic", "train_per_class": 2}},
        source="<test>",
    )
    manifest = build_manifest(campaign, tmp_path / "mnt-a" / "artifacts")
    assert manifest.root_in_artifacts and manifest.root.startswith("datasets/synthetic-")
    (tmp_path / "mnt-a").rename(tmp_path / "mnt-b")
    elsewhere = tmp_path / "mnt-b" / "artifacts"
    paths = manifest.image_paths(manifest.entries, elsewhere)
    assert all(Path(p).is_file() and p.startswith(f"{elsewhere}/") for p in paths)
    assert build_manifest(campaign, elsewhere).to_json() == manifest.to_json()


def test_build_manifest_is_deterministic(built):
    manifest, tmp = built
    again = build_manifest(_synthetic_campaign(tmp / "data", label_noise=0.0), tmp / "artifacts")
    assert again == manifest


def test_relabelling_keeps_fingerprint_and_cache_key(built, tmp_path):
    manifest, tmp = built
    copy = tmp_path / "data"
    copy.mkdir()
    for path in (tmp / "data").rglob("*"):
        target = copy / path.relative_to(tmp / "data")
        if path.is_dir():
            target.mkdir(exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    csv = copy / "train.csv"
    lines = csv.read_text().splitlines()
    swap = {"A": "B", "B": "C", "C": "A"}
    lines = [lines[0]] + [f"{line.split(',')[0]},{swap[line.split(',')[1]]}" for line in lines[1:]]
    csv.write_text("\n".join(lines) + "\n")
    campaign = parse_campaign(
        {"name": "tiny", "folds": 2, "dataset": {"kind": "aicup", "root": str(copy)}},
        source="<test>",
    )
    relabelled = build_manifest(campaign, tmp_path / "artifacts")
    assert [e.label for e in relabelled.entries] != [e.label for e in manifest.entries]
    assert relabelled.fingerprint == manifest.fingerprint
    assert relabelled.cache_key == manifest.cache_key


def test_build_manifest_on_imagefolder_with_four_classes(tmp_path):
    import cv2
    import numpy as np

    for split, count in (("train", 3), ("test", 1)):
        for i, name in enumerate(["apple", "kiwi", "mango", "pear"]):
            folder = tmp_path / "flowers" / split / name
            folder.mkdir(parents=True)
            for j in range(count):
                image = np.full((20, 24, 3), 40 * i + j, dtype=np.uint8)
                cv2.imwrite(str(folder / f"{j}.png"), image)
    campaign = parse_campaign(
        {"name": "fruit", "folds": 3, "dataset": {"kind": "imagefolder", "root": "flowers"}},
        source="<test>",
        base_dir=tmp_path,
    )
    manifest = build_manifest(campaign, tmp_path / "artifacts")
    assert manifest.classes == ("apple", "kiwi", "mango", "pear")
    assert Counter(e.split for e in manifest.entries) == {"train": 12, "test": 4}
    assert Counter(e.fold for e in manifest.entries if e.split == "train") == {0: 4, 1: 4, 2: 4}


def test_unlabelled_dev_images_are_predicted_from_build_manifest(tmp_path):
    import cv2

    root = tmp_path / "mango"
    rows = {
        "train": [f"t{i}.jpg,{'AB'[i % 2]}" for i in range(6)] + ["t6.jpg,"],
        "dev": ["d0.jpg,", "d1.jpg,A"],
        "test": ["x0.jpg,"],
    }
    for split, lines in rows.items():
        (root / split).mkdir(parents=True)
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
        for i, line in enumerate(lines):
            image = np.full((20, 24, 3), 30 * i, dtype=np.uint8)
            assert cv2.imwrite(str(root / split / line.split(",")[0]), image)
    campaign = parse_campaign(
        {
            "name": "m",
            "folds": 2,
            "dataset": {"kind": "aicup", "root": str(root), "classes": ["A", "B"]},
        },
        source="<test>",
    )
    manifest = build_manifest(campaign, tmp_path / "artifacts")
    _, _, test = manifest.fold_indices(0)
    assert sorted(manifest.entries[i].image_id for i in test) == ["d0.jpg", "t6.jpg", "x0.jpg"]
    covered = set(test)
    for fold in (0, 1):
        train, val, _ = manifest.fold_indices(fold)
        covered |= set(train) | set(val)
    assert covered == set(range(len(manifest.entries)))


def test_imagefolder_splits_reusing_file_names_keep_every_image(tmp_path):
    import cv2

    for s, split in enumerate(("train", "val", "test")):
        for c, name in enumerate("AB"):
            folder = tmp_path / "exported" / split / name
            folder.mkdir(parents=True)
            for j in range(4):  # each split numbers its files from 0
                image = np.full((20, 24, 3), 60 * s + 20 * c + j, dtype=np.uint8)
                assert cv2.imwrite(str(folder / f"{j:04d}.jpg"), image)
    campaign = parse_campaign(
        {"name": "x", "folds": 2, "dataset": {"kind": "imagefolder", "root": "exported"}},
        source="<test>",
        base_dir=tmp_path,
    )
    manifest = build_manifest(campaign, tmp_path / "artifacts")
    ids = [e.image_id for e in manifest.entries]
    assert len(set(ids)) == len(ids) == 24
    assert {"train/A/0000.jpg", "val/A/0000.jpg", "test/A/0000.jpg"} <= set(ids)
    # what the report pools by image id: every out-of-fold validation image, once
    out_of_fold = [ids[i] for fold in (0, 1) for i in manifest.fold_indices(fold)[1]]
    assert len(set(out_of_fold)) == len(out_of_fold) == 16


def _split_manifest(tmp_path, validation: str, section: dict) -> Manifest:  # noqa: ANN001
    """A tiny synthetic dataset with train, dev and test splits under ``validation``."""
    campaign = parse_campaign(
        {
            "name": "tiny",
            "validation": validation,
            "dataset": {
                "kind": "synthetic",
                "root": str(tmp_path / "data"),
                "train_per_class": 4,
                "dev_per_class": 2,
                "test_per_class": 1,
                "width": 64,
                "height": 48,
            },
            **section,
        },
        source="<test>",
    )
    return build_manifest(campaign, tmp_path / "artifacts")


def test_dev_validation_trains_on_the_train_split_and_validates_on_dev(tmp_path):
    manifest = _split_manifest(tmp_path, "dev", {"svm": {"n_components": 2}})
    train, val, test = manifest.fold_indices(0)
    splits = [e.split for e in manifest.entries]
    assert {splits[i] for i in train} == {"train"} and len(train) == 12
    assert {splits[i] for i in val} == {"dev"} and len(val) == 6
    assert {splits[i] for i in test} == {"test"} and len(test) == 3


def test_dev_validation_without_labelled_dev_images_or_training_images_is_named():
    with pytest.raises(ManifestError, match='validation = "dev" needs labelled images in the dev'):
        dev_folds(["A", "B", None], ["train", "train", "dev"])
    with pytest.raises(ManifestError, match="class 'C' has no labelled training images"):
        dev_folds(["A", "B", "C"], ["train", "train", "dev"], classes=("A", "B", "C"))
    assert dev_folds(["A", "B", None, "B"], ["train", "dev", "test", "test"]) == [
        1,
        0,
        NO_FOLD,
        NO_FOLD,
    ]


def test_out_of_bag_validation_trains_on_every_labelled_image_and_validates_on_them(tmp_path):
    manifest = _split_manifest(tmp_path, "oob", {"rf": {"n_estimators": 2}})
    train, val, test = manifest.fold_indices(0)
    splits = [e.split for e in manifest.entries]
    assert {splits[i] for i in train} == {"train", "dev"} and len(train) == 18
    assert list(val) == list(train)  # each judged by the trees that did not draw it
    assert {splits[i] for i in test} == {"test"} and len(test) == 3
    with pytest.raises(ManifestError, match="fold 1 has no images"):
        manifest.fold_indices(1)


def test_out_of_bag_folds_name_a_class_without_training_images():
    with pytest.raises(ManifestError, match="class 'C' has no labelled training images"):
        out_of_bag_folds(["A", "B", "C"], ["train", "dev", "test"], classes=("A", "B", "C"))
    with pytest.raises(ManifestError, match="no labelled training images"):
        out_of_bag_folds([None, "A"], ["train", "test"])


def test_an_unusable_image_s_reason_does_not_repeat_its_path(tmp_path: Path) -> None:
    """The reason is the message less its file name, also where the name holds control
    characters, which the message shows escaped."""
    from shared.datasets import Sample
    from shared.manifest import _check_images

    folder = tmp_path / "A\x1b[31m"
    folder.mkdir()
    (folder / "x.jpg").write_bytes(b"")
    good, bad = _check_images([Sample("x.jpg", "A", "train", folder / "x.jpg")], 10**8)
    assert good == [] and [s.reason for s in bad] == ["empty file (0 bytes)"]


def test_a_split_folder_named_through_the_root_s_target_is_recorded_under_the_root(tmp_path):
    """`[dataset.splits.train] images` as an absolute path to where the root's symlink
    leads: the same folder, so its images are recorded under the root as written."""
    from tests.aicup import make_aicup

    real = make_aicup(tmp_path / "mnt-a" / "mango", per_class=2)
    (tmp_path / "data").symlink_to(tmp_path / "mnt-a")
    dataset = {
        "kind": "aicup",
        "root": str(tmp_path / "data" / "mango"),
        "splits": {"train": {"csv": "train.csv", "images": str(real / "train")}},
    }
    campaign = parse_campaign({"name": "c", "folds": 2, "dataset": dataset}, source="<test>")
    manifest = build_manifest(campaign, tmp_path / "artifacts")
    assert manifest.root == str(tmp_path / "data" / "mango")
    assert {e.path for e in manifest.entries} == {f"train/{i:03d}.jpg" for i in range(6)}
