"""How much memory a unit needs in its worker process: ``orchard submit --dry-run`` shows
it per family, beside the plan (README, "How much memory a worker needs").

An estimate, in bytes, of the arrays a unit holds at once at its peak, from the images
of each split and the unit's parameters. Each term below is an array the unit's code
allocates (``workers.data``, ``shared.svm``, ``shared.forest``, ``shared.cnn``), and
``tests/workers/test_memory_estimate.py`` holds the sums against what real units
measure. A CNN fold's GPU memory is estimated apart (:func:`cnn_device_bytes`,
``orchard submit --dry-run``'s GPU figure). Not counted: the interpreter and its
libraries (a CPU worker process starts at about 0.2 GB, one that has loaded torch and
CUDA at about 1-2 GB), and the report's Python objects.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from shared.cnn_shape import Network, image_bytes, predict_batch
from shared.embedding import LIME_CANDIDATES, LIME_CLASS_FLOOR, LIME_SCORE_BATCH
from shared.forest import AUGMENT_COPIES, CHUNK_BYTES
from shared.manifest import Manifest
from shared.plan import MERGE, largest_n_components, pca_width
from shared.svm import CHUNK_ROWS
from shared.variants import cnn_variant, variant_shape

#: the images ``shared.cnn.to_device`` gathers and moves at a time (it imports torch)
TO_DEVICE_CHUNK = 1024

#: libsvm's kernel cache, scikit-learn's default ``cache_size`` (200 MB)
SVC_CACHE_BYTES = 200 << 20
#: a fitted tree's node (its split, impurity and counts) and, per class, its float64 value
TREE_NODE_BYTES, TREE_VALUE_BYTES = 64, 8
#: a fully grown tree's nodes per training row: measured on noise with random labels,
#: the most any data gives (0.30-0.37 under sklearn's bootstrap); classes that separate
#: give fewer
NODES_PER_ROW = 0.4
#: the randomized SVD's extra columns (scikit-learn's ``n_oversamples``)
SVD_OVERSAMPLES = 10


@dataclass(frozen=True, slots=True)
class Sizes:
    """What a unit's memory depends on beside its parameters: the campaign's images."""

    images: int  # every image of the manifest, all splits
    cache_size: int  # the preprocessing cache's side (256)
    shard_size: int  # images per cache shard
    classes: int
    #: per fold, its (train, validation, test) image counts
    folds: Mapping[int, tuple[int, int, int]]
    test_images: int  # the test split, which every fold predicts
    spec: Mapping[str, Any]  # the campaign as stored (for the SVM grid's widest PCA)

    @classmethod
    def of(cls, manifest: Manifest, spec: Mapping[str, Any], folds: Iterable[int]) -> Sizes:
        """The sizes of a campaign's ``manifest``, for the units of ``folds``."""
        counts = {}
        for fold in set(folds):
            train, val, test = manifest.fold_indices(fold)
            counts[fold] = (len(train), len(val), len(test))
        return cls(
            images=len(manifest.entries),
            cache_size=manifest.size,
            shard_size=manifest.shard_size,
            classes=len(manifest.classes),
            folds=counts,
            test_images=len(manifest.test_indices()),
            spec=spec,
        )

    def variant_bytes(self, variant: str) -> int:
        """Bytes per image of ``variant``: side x side x 3 (uint8)."""
        return math.prod(variant_shape(variant, self.cache_size))

    def loading(self, variant: str) -> int:
        """A variant's images, held by the worker for the next unit over it
        (``workers.data.load_variant``), and the shard being read into them."""
        shard = self.shard_size * self.cache_size**2 * 3
        return self.images * self.variant_bytes(variant) + shard


class Unit(Protocol):
    """A unit as planned (:class:`shared.plan.UnitPlan`) or as recorded (``db.store.Unit``)."""

    family: str
    stage: int
    fold: int | None
    params: dict[str, Any]


def unit_bytes(unit: Unit, sizes: Sizes) -> int:
    """About the most bytes ``unit`` holds at once in its worker process (0: no estimate,
    for a family this module does not know)."""
    family = unit.family
    if family == "preprocess":
        # the shard as decoded (cache side, uint8); the photo being decoded comes on top
        return (unit.params["stop"] - unit.params["start"]) * sizes.cache_size**2 * 3
    if family == "svm":
        return _svm(unit.params, sizes, unit.fold)
    if family in ("rf", "rf_shard"):
        return _forest(unit, sizes)
    if family == "cnn":
        return _cnn(unit.params, sizes, unit.fold)
    if family == "report":
        return _report(sizes)
    return 0


def _svm(params: Mapping[str, Any], sizes: Sizes, fold: int) -> int:
    """The point that fits its fold's PCA (the others load the projection alone): a
    uint8 copy of the training images and their float32 features, centred in place, with
    the randomized SVD's working set; then every image projected a chunk at a time, and
    the projection's file; then the SVC on the fold's projection."""
    variant = params["variant"]
    d = sizes.variant_bytes(variant)
    n_train, n_val, n_test = sizes.folds[fold]
    k = min(largest_n_components(sizes.spec, pca_width(params, "n_components") or 0), n_train, d)
    basis = k * d * 4
    fit = n_train * d * (1 + 4) + (n_train + 3 * d) * (k + SVD_OVERSAMPLES) * 4
    project = basis + CHUNK_ROWS * d * 4 + sizes.images * k * 4 * 2  # z and its file's bytes
    # the SVC: its float64 rows (a search's folds are smaller) and the kernel cache it fills
    svc = (
        (n_train + n_val + n_test) * k * 4 + n_train * k * 8 + min(SVC_CACHE_BYTES, n_train**2 * 4)
    )
    return sizes.loading(variant) + max(fit, project, svc)


def _trees_bytes(trees: int, rows: int, params: Mapping[str, Any], classes: int) -> int:
    """Fitted trees, grown until their leaves hold ``min_samples_leaf`` rows or
    ``max_depth`` stops them."""
    nodes = NODES_PER_ROW * rows / max(1, int(params.get("min_samples_leaf") or 1))
    depth = params.get("max_depth")
    if depth is not None:
        nodes = min(nodes, 2 ** (min(int(depth), 62) + 1))
    return int(trees * nodes * (TREE_NODE_BYTES + TREE_VALUE_BYTES * classes))


def _forest(unit: Unit, sizes: Sizes) -> int:
    """A forest, a tree shard or a merge: the fold's splits as uint8 copies, the float32
    training rows of every augmented copy (a PCA centres them in place and adds its
    own output), the trees, and a prediction chunk; a shard then pickles its trees into
    its file, a copy of each at a time. A merge loads its shards' trees one shard after
    another (a file's bytes, then its trees) and builds no training rows when the shards
    bring their scores."""
    params = unit.params
    variant = params["variant"]
    d = sizes.variant_bytes(variant)
    n_train, n_val, n_test = sizes.folds[unit.fold]
    copies = AUGMENT_COPIES.get(params.get("augment", "none"), 1)
    rows = n_train * copies
    splits = (n_train + n_val + n_test) * d
    chunk = min(CHUNK_BYTES, max(n_val, n_test) * d * 4)
    trees_all = int(params.get("n_estimators", 100))
    if unit.stage == MERGE:
        # the shards loaded one after the other: every tree, and, as the last one loads,
        # its file's bytes and the arrays its trees are unpickled from
        forest = _trees_bytes(trees_all, rows, params, sizes.classes)
        shards = max(1, int(params.get("tree_shards", 1)))
        return sizes.loading(variant) + splits + forest + 2 * forest // shards + chunk
    shards = int(params.get("tree_shards", 1)) if unit.family == "rf_shard" else 1
    trees = math.ceil(trees_all / shards)
    features = d
    work = rows * d * 4  # the training rows, float32
    scaling = params.get("select_scaling")
    if scaling is not None:
        # the selecting forest's trees, which the pipeline keeps, and the rows of the
        # features it keeps (a median threshold keeps about half at scaling 1, more
        # below it, and all where most features were never split on)
        helper = int(params.get("select_estimators", 400))
        features = d if float(scaling) < 1 else d // 2
        work += _trees_bytes(helper, rows, {}, sizes.classes) + rows * features * 4
    components = params.get("pca_components")
    if components is not None:
        k = min(int(components), rows, features)
        work += rows * k * 4 + (rows + 3 * features) * (k + SVD_OVERSAMPLES) * 4 * 2
        features = k
    fitted = _trees_bytes(trees, rows, params, sizes.classes)
    # scoring: the out-of-bag sums (float64, per row and class, plain and grouped) and
    # one tree's probabilities at a time
    oob = rows * (5 * sizes.classes * 8 + 2 * 8)
    peak = work + fitted + oob + chunk
    if unit.family == "rf_shard":  # its file written: the trees pickled as a copy of each
        peak = max(peak, 2 * fitted)
    return sizes.loading(variant) + splits + peak


def _optimizer_states(params: Mapping[str, Any]) -> int:
    """Copies of the weights the optimiser keeps: SGD's momentum, or Adam's two moments."""
    return 2 if params.get("optimizer") == "adam" else 1


def _cnn(params: Mapping[str, Any], sizes: Sizes, fold: int) -> int:
    """A CNN fold on a GPU worker, on the host: its variant's images, each split
    gathered (and resized to ``image_size``) as it goes to the device, a chunk at a time
    (``shared.cnn.to_device``), and the checkpoint taken after each epoch: the model and
    its optimiser's state copied off the device, serialised, and those bytes copied out
    to be written."""
    variant = cnn_variant(sizes.cache_size, params.get("input", "crop"))
    return sizes.loading(variant) + max(_to_device(params, sizes, fold), _checkpoint(params, sizes))


def _to_device(params: Mapping[str, Any], sizes: Sizes, fold: int) -> int:
    """A chunk of a split's images gathered, and resized to ``image_size``, on the host."""
    variant = cnn_variant(sizes.cache_size, params.get("input", "crop"))
    size = int(params["image_size"])
    chunk = min(TO_DEVICE_CHUNK, max(sizes.folds[fold]))
    return chunk * (sizes.variant_bytes(variant) + size * size * 3)


def _checkpoint(params: Mapping[str, Any], sizes: Sizes) -> int:
    """The weights and the optimiser's state, copied off the device, serialised, and
    those bytes copied out to be written."""
    return (1 + _optimizer_states(params)) * 4 * Network.of(params, sizes.classes).parameters() * 3


def cnn_device_images(params: Mapping[str, Any], sizes: Sizes, fold: int) -> int:
    """A CNN fold's images on its device (uint8, channels first): every split at
    ``image_size``. On a worker without a GPU these are in the host's memory too."""
    size = int(params["image_size"])
    return sum(sizes.folds[fold]) * size * size * 3


def cnn_device_bytes(
    params: Mapping[str, Any], sizes: Sizes, fold: int, *, cuda: bool = True
) -> int:
    """About the most a CNN fold holds on its device (``cuda``: a GPU; otherwise the
    CPU): what it keeps there for the whole fold (:func:`_resident`) and the larger of
    a training step and a prediction (:func:`_step`). Not counted: cuDNN's workspace
    and the CUDA context (a few hundred MB, outside PyTorch's allocator)."""
    return _resident(params, sizes, fold, cuda=cuda) + _step(params, sizes, fold, cuda=cuda)


def cnn_on_the_cpu(params: Mapping[str, Any], sizes: Sizes, fold: int) -> int:
    """A CNN fold that trains on the CPU (a GPU worker without CUDA, or
    ``ORCHARD_DEVICE=cpu``), whose device is the host: the variant's images and what
    the device keeps, and the most of a chunk going to the device, a checkpoint, a
    training step and a prediction, which come one after another."""
    variant = cnn_variant(sizes.cache_size, params.get("input", "crop"))
    return (
        sizes.loading(variant)
        + _resident(params, sizes, fold, cuda=False)
        + max(
            _to_device(params, sizes, fold),
            _checkpoint(params, sizes),
            _step(params, sizes, fold, cuda=False),
        )
    )


def _resident(params: Mapping[str, Any], sizes: Sizes, fold: int, *, cuda: bool) -> int:
    """What a fold keeps on its device throughout: its images and the network (float32
    weights, their gradients and the optimiser's state; under a GPU's autocast, the
    weights' bf16 copies too)."""
    weights = Network.of(params, sizes.classes).parameters()
    network = weights * 4 * (2 + _optimizer_states(params)) + (weights * 2 if cuda else 0)
    return cnn_device_images(params, sizes, fold) + network


def _step(params: Mapping[str, Any], sizes: Sizes, fold: int, *, cuda: bool) -> int:
    """The larger of a training step (``batch_size`` images) and a prediction (as many
    as ``shared.cnn_shape.predict_batch`` scores at a time), on a GPU (``cuda``) or the
    CPU: ``shared.cnn_shape.image_bytes`` an image.
    ``tests/workers/test_memory_estimate.py`` holds the CPU's sums against what folds
    measure there; ``bench/gpu_checks.py --only cnn_memory_estimate`` measures a GPU's."""
    per_image = image_bytes(Network.of(params, sizes.classes), cuda=cuda)
    train, val, test = sizes.folds[fold]
    batch = int(params["batch_size"])
    predicted = min(predict_batch(per_image, batch, cuda=cuda), max(val, test, train))
    return max(min(batch, train) * per_image.training, predicted * per_image.predicting)


def _report(sizes: Sizes) -> int:
    """The report: the test images its LIME section scores (at most
    ``shared.embedding.LIME_CANDIDATES`` and a floor per class, read from the shards
    that hold them) and the CNN scoring them (:func:`_report_scoring`), and the SVM's
    projection that its t-SNE reads. Its Python objects (every model's predictions,
    read from the store) are not counted."""
    d = sizes.variant_bytes(cnn_variant(sizes.cache_size))
    lime = min(LIME_CANDIDATES + LIME_CLASS_FLOOR * sizes.classes, sizes.test_images) * d
    k = largest_n_components(sizes.spec)
    return lime + _report_scoring(sizes) + sizes.images * k * 4 * 2


def _report_scoring(sizes: Sizes) -> int:
    """The CNN the report explains, on the CPU: its weights and a prediction over
    ``shared.embedding.LIME_SCORE_BATCH`` images, for the largest network the campaign's
    CNN sweep builds (0 without a CNN or with ``[report] lime = false``)."""
    cnn = sizes.spec.get("cnn")
    if (
        not cnn
        or not cnn.get("enabled", True)
        or not sizes.spec.get("report", {}).get("lime", True)
    ):
        return 0
    knobs = ("image_size", "width", "stride", "dense", "activation", "pool", "norm_order")
    sweeps = [
        [(name, value) for value in (cnn[name] if isinstance(cnn[name], list) else [cnn[name]])]
        for name in knobs
        if name in cnn
    ]
    most = 0
    for point in itertools.product(*sweeps):
        network = Network.of(dict(point), sizes.classes)
        scoring = LIME_SCORE_BATCH * image_bytes(network, cuda=False).predicting
        most = max(most, 4 * network.parameters() + scoring)
    return most


def gigabytes(size: int) -> str:
    """``size`` bytes for a person: "0.4 GB", "12 GB", "< 0.1 GB"."""
    if size < 0.05e9:
        return "< 0.1 GB"
    if size < 9.95e9:
        return f"{size / 1e9:.1f} GB"
    return f"{size / 1e9:,.0f} GB"


def available_bytes(
    meminfo: Path = Path("/proc/meminfo"),
    cgroup: Path = Path("/sys/fs/cgroup"),
    own_cgroup: Path = Path("/proc/self/cgroup"),
) -> int | None:
    """The memory this process may still take: the host's ``MemAvailable``, or less where
    a cgroup's limit (a container's, a systemd service's ``MemoryMax``) leaves less,
    counting its reclaimable page cache as free as ``MemAvailable`` does; None where
    neither can be read (not Linux)."""
    found = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    for folder, limit_file, used_file, cache_key in _cgroup_levels(cgroup, own_cgroup):
        with contextlib.suppress(OSError, ValueError):
            limit = (folder / limit_file).read_text().strip()
            if not limit.isdigit() or int(limit) >= 1 << 60:  # "max", or v1's "no limit"
                continue
            used = int((folder / used_file).read_text())
            stat = (folder / "memory.stat").read_text().split()
            cache = int(stat[stat.index(cache_key) + 1]) if cache_key in stat else 0
            found.append(max(0, int(limit) - used + cache))
    return min(found) if found else None


def _cgroup_levels(cgroup: Path, own_cgroup: Path) -> list[tuple[Path, str, str, str]]:
    """(folder, limit file, usage file, reclaimable cache's key in memory.stat) for each
    cgroup that may limit this process: under v2 its own group and every one above it,
    under v1 the memory controller's folder as a container sees it."""
    levels = [(cgroup / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
               "total_inactive_file")]  # fmt: skip
    own = ""
    with contextlib.suppress(OSError):
        own = next(
            (line[3:] for line in own_cgroup.read_text().splitlines() if line.startswith("0::")),
            "",
        )
    folder = cgroup / own.strip().lstrip("/")
    while True:
        levels.append((folder, "memory.max", "memory.current", "inactive_file"))
        if folder == cgroup or cgroup not in folder.parents:
            break
        folder = folder.parent
    return levels


def process_bytes(status: Path = Path("/proc/self/status")) -> int:
    """What this process holds now (its resident set), 0 where that cannot be read."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def about(size: int) -> str:
    """``about 4.2 GB``, or ``under 0.1 GB``."""
    said = gigabytes(size)
    return "under 0.1 GB" if said.startswith("<") else f"about {said}"
