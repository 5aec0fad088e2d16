"""``shared.memory``'s arithmetic: what each parameter adds, and the README's examples.
What real units measure against it is ``tests/workers/test_memory_estimate.py``."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

import shared.memory
from shared.cnn_shape import Network, image_bytes, predict_batch
from shared.memory import (
    Sizes,
    about,
    cnn_device_bytes,
    cnn_device_images,
    cnn_on_the_cpu,
    gigabytes,
    unit_bytes,
)
from shared.plan import MERGE, REPORT, TRAIN, UnitPlan
from shared.spec import parse_campaign, sweep_points

REPO = Path(__file__).resolve().parents[2]


def _sizes(images: int, spec: dict[str, Any] | None = None) -> Sizes:
    """Five folds over four fifths of ``images``, the last fifth test."""
    test = images // 5
    train = (images - test) * 4 // 5
    return Sizes(
        images=images,
        cache_size=256,
        shard_size=256,
        classes=3,
        folds={0: (train, images - test - train, test)},
        test_images=test,
        spec=spec or {},
    )


def _unit(family: str, params: dict[str, Any], stage: int = TRAIN) -> UnitPlan:
    return UnitPlan("c-1/x/h/f0", family, stage, 0, params, "h")


def test_gigabytes():
    assert gigabytes(0) == gigabytes(49_000_000) == "< 0.1 GB"
    assert about(49_000_000) == "under 0.1 GB" and about(4_249_000_000) == "about 4.2 GB"
    assert gigabytes(51_000_000) == "0.1 GB"
    assert gigabytes(4_249_000_000) == "4.2 GB"
    assert gigabytes(9_960_000_000) == "10 GB"
    assert gigabytes(1_234_000_000_000) == "1,234 GB"


def test_the_chunk_is_the_one_the_cnn_moves():
    from shared.cnn import TO_DEVICE_CHUNK  # torch: here, not where shared.memory is

    assert shared.memory.TO_DEVICE_CHUNK == TO_DEVICE_CHUNK


def test_a_forest_grows_with_its_copies_and_trees_and_shrinks_with_its_limits():
    sizes = _sizes(10_000)
    base = {"variant": "resize64", "n_estimators": 100}

    def forest(**changes: Any) -> int:
        return unit_bytes(_unit("rf", {**base, **changes}), sizes)

    rows = 6_400 * 64 * 64 * 3 * 4  # n_train x d x 4 bytes, one copy
    assert forest(augment="flip") - forest() == pytest.approx(rows, rel=0.1)
    assert forest(augment="rotate_flip") - forest() == pytest.approx(7 * rows, rel=0.1)
    assert forest(n_estimators=1000) > forest() + 100 * 6_400 * 0.3 * 88 * 9
    assert forest(min_samples_leaf=5) < forest()
    assert forest(max_depth=4) < forest(max_depth=30) <= forest()
    assert forest(pca_components=50) > forest()  # its output beside the rows it centres
    # a tree shard fits its share of the trees; the merge holds them all, twice
    sharded = {**base, "n_estimators": 1000, "tree_shards": 4, "shard": 0}
    shard = unit_bytes(_unit("rf_shard", sharded), sizes)
    merge = unit_bytes(_unit("rf", sharded, MERGE), sizes)
    assert shard < forest(n_estimators=1000)
    assert merge < forest(n_estimators=1000)  # no training rows
    assert merge - sizes.loading("resize64") > 2 * 1000 * 6_400 * 0.3 * 88


def test_an_svm_fold_is_sized_by_the_grids_widest_pca():
    narrow = _sizes(8_800, {"svm": {"n_components": [100]}})
    wide = _sizes(8_800, {"svm": {"n_components": [100, 1000]}})
    point = _unit("svm", {"variant": "polar192", "n_components": 100})
    assert unit_bytes(point, wide) > unit_bytes(point, narrow)
    # the training images (uint8) and their float32 features, at least
    assert unit_bytes(point, narrow) > 5 * 5_632 * 192 * 192 * 3


def test_a_cnn_fold_holds_its_checkpoint_and_its_device_its_images():
    sizes = _sizes(1_000)
    study = {"image_size": 224, "width": 1.0, "dense": "512,256,64"}
    sgd, adam = _unit("cnn", study), _unit("cnn", {**study, "optimizer": "adam"})
    assert unit_bytes(adam, sizes) > unit_bytes(sgd, sizes) > sizes.loading("crop224")
    assert cnn_device_images(study, sizes, 0) == 1_000 * 224 * 224 * 3
    small = {**study, "image_size": 128}
    assert cnn_device_images(small, sizes, 0) == 1_000 * 128 * 128 * 3


def test_a_cnn_fold_on_its_gpu_holds_its_images_network_and_a_batch_s_activations():
    sizes = _sizes(1_000)
    study = {"image_size": 224, "width": 1.0, "dense": "512,256,64", "batch_size": 256}
    images = cnn_device_images(study, sizes, 0)
    gpu = cnn_device_bytes(study, sizes, 0)
    # the study's CNN keeps tens of MB an image for its backward pass (bf16)
    assert images + 256 * 30e6 < gpu < images + 256 * 60e6
    half = cnn_device_bytes({**study, "batch_size": 128}, sizes, 0)
    assert gpu - half == pytest.approx((gpu - images) / 2, rel=0.05)  # the network is small
    assert cnn_device_bytes({**study, "optimizer": "adam"}, sizes, 0) > gpu  # two moments
    assert cnn_device_bytes({**study, "norm_order": "bn_act", "activation": "relu"}, sizes, 0) < gpu
    # float32 on the CPU: about twice the activations, beside the host's own arrays
    cpu = cnn_on_the_cpu(_unit("cnn", study).params, sizes, 0)
    assert cpu > images + 1.8 * (gpu - images) and cpu > unit_bytes(_unit("cnn", study), sizes)
    # predictions score as many images at a time as fit in a training batch's memory:
    # about five an image for the study's CNN, and never more than 1,024
    study_network = Network.of(study, num_classes=3)
    per_image = image_bytes(study_network, cuda=True)
    assert 4 * 32 < predict_batch(per_image, 32, cuda=True) < 6 * 32
    assert predict_batch(per_image, 256, cuda=True) == 1024
    assert predict_batch(image_bytes(study_network, cuda=False), 256, cuda=False) == 256
    for batch in (2, 8, 32):
        assert predict_batch(per_image, batch, cuda=True) * per_image.predicting <= (
            batch * per_image.training
        )


def test_the_report_and_a_preprocessing_shard():
    sizes = _sizes(50_000, {"svm": {"n_components": [200]}})
    report = unit_bytes(_unit("report", {}, REPORT), sizes)
    lime = (2_000 + 3 * 100) * 224 * 224 * 3  # its candidates, however many tests
    assert lime < report <= lime + 50_000 * 200 * 8
    # with a CNN to explain, the network scoring 32 images at a time (float32, on the
    # CPU): about 19 MB an image for the study's at 224 px, and its weights
    explained = _sizes(50_000, {"svm": {"n_components": [200]}, "cnn": {"image_size": 224}})
    scoring = unit_bytes(_unit("report", {}, REPORT), explained) - report
    assert 32 * 19e6 < scoring < 32 * 21e6 + 100e6
    quiet = {"svm": {"n_components": [200]}, "cnn": {"image_size": 224}, "report": {"lime": False}}
    assert unit_bytes(_unit("report", {}, REPORT), _sizes(50_000, quiet)) == report
    shard = _unit("preprocess", {"shard": 0, "start": 0, "stop": 256})
    assert unit_bytes(shard, sizes) == 256 * 256 * 256 * 3
    assert unit_bytes(_unit("nothing", {}), sizes) == 0


#: the study's images: AICUP's train, dev and test splits
STUDY_SPLITS = (5_600, 800, 1_600)


def _study_sizes(images: int, campaign: Any) -> Sizes:
    """The study's splits scaled to ``images``, as ``campaign``'s validation uses them."""
    train, dev, test = (n * images // sum(STUDY_SPLITS) for n in STUDY_SPLITS)
    if campaign.validation == "dev":
        fold = (train, dev, test)
    elif campaign.validation == "oob":  # every labelled image, judged out of bag
        fold = (train + dev, train + dev, test)
    else:
        fold = ((train + dev) * (campaign.folds - 1) // campaign.folds,
                (train + dev) // campaign.folds, test)  # fmt: skip
    spec = campaign.model_dump(mode="json")
    return Sizes(images, 256, 256, 3, {0: fold}, test, spec)


def _study_examples(images: int) -> list[str]:
    """The README's row for ``images``: the study's campaigns, their largest units."""
    out = []
    for name, family, stage in (
        ("svm-grid", "svm", TRAIN),
        ("rf-best", "rf_shard", TRAIN),
        ("rf-best", "rf", MERGE),
        ("cnn-final", "cnn", TRAIN),
    ):
        raw = tomllib.loads((REPO / "campaigns" / "study" / f"{name}.toml").read_text())
        raw["dataset"] = {"kind": "synthetic", "dev_per_class": 1}  # no AICUP images here
        campaign = parse_campaign(raw, source=name)
        sizes = _study_sizes(images, campaign)
        section = dict(campaign.families())["rf" if family == "rf_shard" else family]
        params = max(sweep_points(section), key=lambda p: p.get("n_components", 0))
        if family == "rf_shard":
            params = {**params, "shard": 0}
        out.append(gigabytes(unit_bytes(_unit(family, params, stage), sizes)))
        if family == "cnn":
            out.append(gigabytes(cnn_device_bytes(params, sizes, 0)))
    return out


@pytest.mark.parametrize("images", [8_000, 50_000])
def test_the_readmes_examples_are_what_the_module_says(images):
    readme = (REPO / "README.md").read_text()
    row = re.search(rf"^\| {images:,} \| (.*) \|$", readme, re.MULTILINE)
    assert row, f"README: no example row for {images:,} images"
    assert row[1].split(" | ") == _study_examples(images)


def test_the_memory_available_is_the_hosts_or_less_where_a_cgroup_limits_it(tmp_path):
    from shared.memory import available_bytes, process_bytes

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   20000000 kB\n")
    host = 20_000_000 * 1024
    cgroup, own = tmp_path / "cgroup", tmp_path / "own"
    cgroup.mkdir()
    own.write_text("0::/\n")
    assert available_bytes(meminfo, cgroup, own) == host  # no cgroup files
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("5000000000\n")
    (cgroup / "memory.stat").write_text("anon 4000000000\ninactive_file 1000000000\n")
    assert available_bytes(meminfo, cgroup, own) == host  # no limit
    (cgroup / "memory.max").write_text("8000000000\n")
    # its reclaimable page cache (the shards it read) counts as free
    assert available_bytes(meminfo, cgroup, own) == 4_000_000_000
    (cgroup / "memory.current").write_text("9500000000\n")
    (cgroup / "memory.stat").write_text("inactive_file 0\n")
    assert available_bytes(meminfo, cgroup, own) == 0
    # a group of its own below the root (a systemd service's MemoryMax): the least left
    service = cgroup / "system.slice" / "orchard.service"
    service.mkdir(parents=True)
    own.write_text("0::/system.slice/orchard.service\n")
    (cgroup / "memory.max").write_text("max\n")
    (service / "memory.max").write_text("3000\n")
    (service / "memory.current").write_text("1000\n")
    (service / "memory.stat").write_text("inactive_file 500\n")
    assert available_bytes(meminfo, cgroup, own) == 2500
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{2**63 - 4096}\n")  # none
    (v1 / "memory" / "memory.usage_in_bytes").write_text("1000\n")
    (v1 / "memory" / "memory.stat").write_text("inactive_file 7\ntotal_inactive_file 100\n")
    assert available_bytes(meminfo, v1, own) == host
    (v1 / "memory" / "memory.limit_in_bytes").write_text("4000\n")
    assert available_bytes(meminfo, v1, own) == 3100
    none = tmp_path / "none"
    assert available_bytes(none, none, none) is None  # not Linux
    assert process_bytes() > 0 and process_bytes(none) == 0


def test_the_estimate_loads_neither_torch_nor_scikit_learn():
    """`orchard status` and a dry run read it: it must stay cheap to import."""
    import subprocess
    import sys

    code = "import shared.memory, sys; print(sorted({'torch', 'sklearn'} & set(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
