"""Random forests at one sweep point (the study's section 3), whole or as tree shards.

A forest is sklearn's ``RandomForestClassifier`` on the raw pixel rows of a feature
variant (``resize128``, ``polar192``, ...). Options, all from :class:`shared.spec.RfParams`:

- ``augment``: add flipped and/or rotated copies of every *training* image (never of
  validation or test images): ``flip`` 2x, ``rotate`` 4x, ``rotate_flip`` 8x rows;
- ``select_scaling``: keep the pixels whose impurity importance in a helper forest is at
  least ``scaling * median`` (``SelectFromModel``, the study's 3.5.1);
- ``pca_components``: PCA before the forest (the study's 3.5.2);
- ``tree_shards``: train the trees as several independent forests (different seeds,
  possibly on different workers) and merge them into one (:func:`merge_models`). Each
  shard also scores its own trees (:class:`ShardScores`: sums over its trees, per row),
  so the merge adds arrays instead of scoring the merged forest again.

Besides sklearn's out-of-bag score every fit reports ``oob_grouped``, an OOB score that
does not count votes from trees trained on an augmented sibling of the row; see
:data:`OOB_NOTE` for why the plain score is inflated on augmented sets. A forest after
feature selection reports neither (None): the selection's forest was fitted on every
training row with its label, the out-of-bag ones included, so the features kept fit
those rows too (on random labels its OOB score read 0.46 where chance is 0.33).

Memory: sklearn's tree builder works on float32 and converts any other input to a
float32 copy, so the training matrix is built once as float32, with augmented copies
written straight into it from the uint8 images (no uint8 or float64 copy of the
augmented set); sklearn then uses it without copying. That float32 matrix (4 bytes per
pixel per row) is the unavoidable peak; validation and test images are converted and
predicted in chunks of rows, and OOB predictions read the training matrix in place (no
copy of the out-of-bag rows). A merge that adds its shards' scores builds no training
matrix at all.
"""

from __future__ import annotations

import copy
import hashlib
import io
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import joblib
import numpy as np

from shared.artifacts import WrittenFile, atomic_write, read_if_intact
from shared.classic import FitOutcome, accuracy_of, flatten
from shared.errors import OrchardError

# scikit-learn is imported where a model is built, so that importing this module stays
# cheap for the processes that never fit a forest
if TYPE_CHECKING:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import Pipeline

OOB_NOTE = """\
**Why the OOB score of an augmented training set is inflated.** A random forest's
out-of-bag (OOB) score judges each training row only by the trees whose bootstrap
sample left that row out, which is an honest estimate when rows are independent.
Augmentation breaks that: with `rotate_flip` every photo becomes 8 rows (4 rotations
x 2 flips), and a tree that never saw a row has almost surely seen some of its 7
siblings (a row misses a bootstrap sample with probability about 1/e = 0.37, all 8
copies of a photo only with about e^-8 = 0.0003). Its "out-of-bag" vote is then a vote
on a photo it was trained on, which is why the study's `oob_score_` jumped to 0.81 on
the 8x set while test accuracy stayed at 0.61: test photos have no siblings in the
training set. `oob_grouped` lets a row be judged only by trees that saw none of the
copies of its photo. Such trees are rare under sklearn's row bootstrap, so
`oob_grouped` is computed over the rows that got at least one such vote
(`oob_grouped_coverage` is their share) and needs many trees to cover most photos;
without augmentation it equals the plain OOB score."""

#: augment -> rows per training image
AUGMENT_COPIES = {"none": 1, "flip": 2, "rotate": 4, "rotate_flip": 8}

#: rows per prediction chunk are chosen so one float32 chunk stays under this size
CHUNK_BYTES = 64 << 20


class ForestError(OrchardError):
    """A forest shard that cannot be used (missing, altered, inconsistent)."""


# ---------------------------------------------------------------- training rows


def _hflip(images: np.ndarray) -> np.ndarray:
    return images[:, :, ::-1]


def _rotation(k: int) -> Callable[[np.ndarray], np.ndarray]:
    def rotate(images: np.ndarray) -> np.ndarray:
        return np.rot90(images, k=k, axes=(1, 2))

    return rotate


def _views(augment: str) -> list[Callable[[np.ndarray], np.ndarray]]:
    """The image transforms of one augmentation, identity first (each returns a view)."""
    rotations = [_rotation(k) for k in range(4)]
    if augment == "none":
        return rotations[:1]
    if augment == "flip":
        return [rotations[0], _hflip]
    if augment == "rotate":
        return rotations
    if augment == "rotate_flip":
        return rotations + [lambda x, r=r: r(_hflip(x)) for r in rotations]
    raise ValueError(f"unknown augment {augment!r} (expected one of {', '.join(AUGMENT_COPIES)})")


def augmented_rows(
    images: np.ndarray, augment: str, dtype: type = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, source): ``images`` and their augmented copies as feature rows of ``dtype``.

    Copy ``j`` of image ``i`` is row ``j * n + i`` (copy 0 is the image itself), and
    ``source[row]`` is ``i``. Each copy is written straight from a view of the uint8
    images into the output, so no intermediate of the augmented set is made.
    """
    views = _views(augment)
    n, *shape = images.shape
    if augment in ("rotate", "rotate_flip") and shape[0] != shape[1]:
        raise ValueError(
            f"augment {augment!r} needs square images, the variant gives {shape[0]}x{shape[1]}"
        )
    rows = np.empty((n * len(views), int(np.prod(shape))), dtype=dtype)
    for j, view in enumerate(views):
        rows[j * n : (j + 1) * n].reshape(images.shape)[...] = view(images)
    return rows, np.tile(np.arange(n), len(views))


@dataclass
class TrainingRows:
    """The rows a forest is trained on, and which training image each came from."""

    x: np.ndarray  # (rows, pixel features) float32
    y: np.ndarray  # (rows,)
    source: np.ndarray  # (rows,) index of the training image the row was made from
    n_images: int


def training_rows(train_x: np.ndarray, train_y: np.ndarray, augment: str) -> TrainingRows:
    x, source = augmented_rows(train_x, augment)
    return TrainingRows(x, np.asarray(train_y)[source], source, len(train_x))


# ---------------------------------------------------------------- fitting


@dataclass
class ShardScores:
    """A tree shard's share of the merged forest's scores: sums over its trees.

    Per training row, the class probabilities of the trees whose sample left the row
    out and how many did (``oob_*``, sklearn's OOB), the same for the trees whose sample
    holds no copy of the row's image (``grouped_*``, see :data:`OOB_NOTE`); per training
    image (copy 0), validation and test image, the trees' summed class probabilities.
    The shards' sums add up to the merged forest's (:func:`merge_rf_point`). ``data`` is
    :func:`data_digest` of the images and labels they were computed on.
    """

    trees: int
    data: str
    oob_sum: np.ndarray  # (rows, classes) float64
    oob_votes: np.ndarray  # (rows,) int64
    grouped_sum: np.ndarray  # (rows, classes) float64
    grouped_votes: np.ndarray  # (rows,) int64
    train_sum: np.ndarray  # (training images, classes) float64
    val_sum: np.ndarray | None  # (validation images, classes); None without images
    test_sum: np.ndarray | None


@dataclass
class ForestModel:
    """A fitted forest with its feature transform and each tree's bootstrap sample.

    ``in_bag[t]`` is ``np.packbits`` of tree ``t``'s in-bag mask over the training rows,
    kept so that the OOB score of a merged forest can be computed from the shards.
    ``scores`` are a shard's own scores (:func:`fit_scored_shard`), or None: a merged
    forest, a shard fitted without them, or one pickled by older code (which then has no
    such attribute and reads the class default).
    """

    forest: RandomForestClassifier
    transform: Pipeline | None
    in_bag: np.ndarray  # (trees, ceil(n_rows / 8)) uint8
    n_rows: int
    pixel_features: int
    kept_features: int
    scores: ShardScores | None = None

    @property
    def trees(self) -> int:
        return len(self.forest.estimators_)


def selects_features(model: ForestModel) -> bool:
    """Whether the forest was fitted on the features a selection kept: one fitted on
    every training row with its label, so that no row is out of its sample."""
    return model.transform is not None and "select" in model.transform.named_steps


def _transform(params: dict[str, Any], train: TrainingRows, seed: int) -> Pipeline | None:
    from sklearn.decomposition import PCA
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.feature_selection import SelectFromModel
    from sklearn.pipeline import Pipeline

    steps: list[tuple[str, Any]] = []
    scaling = params.get("select_scaling")
    if scaling is not None:
        helper = RandomForestClassifier(
            n_estimators=params.get("select_estimators", 400),
            max_depth=64,
            n_jobs=1,
            random_state=seed,
        )
        steps.append(("select", SelectFromModel(helper, threshold=f"{scaling}*median")))
    components = params.get("pca_components")
    if components is not None:
        limit = min(train.x.shape)
        if components > limit:
            raise ValueError(
                f"pca_components={components} exceeds what {len(train.x)} training rows of "
                f"{train.x.shape[1]} features allow (at most {limit})"
            )
        # centres the rows it fits in place (their float32 copy was the unit's largest
        # allocation); :func:`fit_model` sets ``copy`` back for predicting
        pca = PCA(n_components=components, svd_solver="randomized", random_state=seed, copy=False)
        steps.append(("pca", pca))
    return Pipeline(steps) if steps else None


def fit_model(
    train: TrainingRows,
    params: dict[str, Any],
    *,
    seed: int,
    n_estimators: int,
    forest_seed: int | None = None,
) -> tuple[ForestModel, np.ndarray]:
    """Fit the transform (if any, seeded by ``seed``) and a forest (by ``forest_seed``,
    default ``seed``); returns the model and the rows the forest was fitted on.

    Tree shards of one unit share ``seed``, so they fit the same transform. Nothing in
    the model depends on the clock, so the same fit pickles to the same bytes (a shard
    task run twice writes the same file). A PCA fitted on ``train.x`` itself (no feature
    selection before it) centres it in place: ``train.x`` is not to be read after.
    """
    transform = _transform(params, train, seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "No features were selected", UserWarning)
        x = train.x if transform is None else transform.fit_transform(train.x, train.y)
    if transform is not None and "pca" in transform.named_steps:
        # predicting must never change the caller's images
        transform.named_steps["pca"].copy = True
    if x.shape[1] == 0:
        raise ValueError(
            f"select_scaling={params.get('select_scaling')} keeps no features: lower it"
        )
    from sklearn.ensemble import RandomForestClassifier

    forest = RandomForestClassifier(
        n_estimators=n_estimators,
        max_depth=params["max_depth"],
        min_samples_leaf=params["min_samples_leaf"],
        min_samples_split=params["min_samples_split"],
        max_features=params["max_features"],
        bootstrap=True,
        oob_score=False,  # computed by score_model / score_from_shards, merged forests too
        n_jobs=1,  # parallelism comes from running many units at once
        random_state=seed if forest_seed is None else forest_seed,
    )
    forest.fit(x, train.y)
    in_bag = np.zeros((n_estimators, len(x)), dtype=bool)
    for t, samples in enumerate(forest.estimators_samples_):
        in_bag[t, samples] = True
    model = ForestModel(
        forest=forest,
        transform=transform,
        in_bag=np.packbits(in_bag, axis=1),
        n_rows=len(x),
        pixel_features=train.x.shape[1],
        kept_features=x.shape[1],
    )
    return model, x


def shard_trees(n_estimators: int, shards: int) -> list[int]:
    """How many of ``n_estimators`` trees each of ``shards`` shards trains."""
    if not 1 <= shards <= n_estimators:
        raise ValueError(f"tree_shards={shards} must be between 1 and n_estimators={n_estimators}")
    return [n_estimators // shards + (k < n_estimators % shards) for k in range(shards)]


def shard_seed(seed: int, shard: int, shards: int) -> int:
    """Shard ``shard``'s random_state; one shard keeps ``seed`` (the unsharded forest)."""
    if shards == 1:
        return seed
    return int(np.random.SeedSequence([seed, shard]).generate_state(1)[0])


def _fit_shard_rows(
    train: TrainingRows, params: dict[str, Any], *, seed: int, shard: int
) -> tuple[ForestModel, np.ndarray]:
    shards = params.get("tree_shards", 1)
    return fit_model(
        train,
        params,
        seed=seed,
        n_estimators=shard_trees(params["n_estimators"], shards)[shard],
        forest_seed=shard_seed(seed, shard, shards),
    )


def fit_shard(
    train_x: np.ndarray, train_y: np.ndarray, params: dict[str, Any], *, seed: int, shard: int
) -> ForestModel:
    """Shard ``shard`` of ``params["tree_shards"]``: its share of the trees, its own seed."""
    train = training_rows(train_x, train_y, params.get("augment", "none"))
    return _fit_shard_rows(train, params, seed=seed, shard=shard)[0]


def fit_scored_shard(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    test_x: np.ndarray,
    params: dict[str, Any],
    *,
    seed: int,
    shard: int,
) -> tuple[ForestModel, float]:
    """:func:`fit_shard`, then the shard's :class:`ShardScores` (in ``model.scores``);
    returns the model and the seconds spent fitting (transform and trees, not scoring).

    Scoring here, on every shard's worker at once, leaves the merge only sums to add.
    The scores are as deterministic as the trees: the model still pickles to the same
    bytes every time.
    """
    augment = params.get("augment", "none")
    train = training_rows(train_x, train_y, augment)
    started = time.perf_counter()
    model, x = _fit_shard_rows(train, params, seed=seed, shard=shard)
    train_seconds = time.perf_counter() - started
    model.scores = shard_scores(
        model, train, x, val_x, test_x, data=data_digest(train_x, train_y, val_x, test_x, augment)
    )
    return model, train_seconds


def _transform_arrays(transform: Pipeline | None) -> list[np.ndarray]:
    if transform is None:
        return []
    from sklearn.decomposition import PCA
    from sklearn.feature_selection import SelectFromModel

    arrays = []
    for _, step in transform.steps:
        if isinstance(step, SelectFromModel):
            arrays.append(step.get_support())
        elif isinstance(step, PCA):
            arrays += [step.mean_, step.components_]
    return arrays


def merge_models(models: Sequence[ForestModel]) -> ForestModel:
    """One forest holding every shard's trees, in shard order.

    The shards must have been trained on the same rows with the same transform (they
    are: the transform's fit is seeded by the unit, not the shard), or the merged trees
    would vote on different features.
    """
    if not models:
        raise ForestError("no forest shards to merge")
    first = models[0]
    for k, model in enumerate(models[1:], start=1):
        if model.n_rows != first.n_rows or not np.array_equal(
            model.forest.classes_, first.forest.classes_
        ):
            raise ForestError(f"tree shard {k} was trained on other rows than shard 0")
        mine, theirs = _transform_arrays(model.transform), _transform_arrays(first.transform)
        if len(mine) != len(theirs) or not all(
            a.shape == b.shape and np.allclose(a, b, rtol=1e-4, atol=1e-5)
            for a, b in zip(mine, theirs, strict=True)
        ):
            raise ForestError(f"tree shard {k} used another feature transform than shard 0")
    forest = copy.copy(first.forest)  # fitted attributes (classes_, n_features_in_, ...)
    forest.estimators_ = [tree for model in models for tree in model.forest.estimators_]
    forest.n_estimators = len(forest.estimators_)
    return ForestModel(
        forest=forest,
        transform=first.transform,
        in_bag=np.concatenate([model.in_bag for model in models]),
        n_rows=first.n_rows,
        pixel_features=first.pixel_features,
        kept_features=first.kept_features,
    )


def save_model(model: ForestModel, path: Path) -> WrittenFile:
    """Write ``model`` atomically; the same fit always gives the same bytes."""
    return atomic_write(path, lambda fh: joblib.dump(model, fh))


def load_model(path: Path, sha256: str) -> ForestModel:
    """The forest shard at ``path``, unpickled only if its bytes are ``sha256``: the file
    is read once and those bytes are both checked and loaded, so one replaced on the share
    after the check is never unpickled (a pickle runs code as it loads)."""
    try:
        blob = read_if_intact(path, sha256)
    except FileNotFoundError:
        raise ForestError(f"{path}: forest shard missing") from None
    if blob is None:
        raise ForestError(f"{path}: forest shard checksum mismatch (truncated or altered)")
    model = joblib.load(io.BytesIO(blob))
    if not isinstance(model, ForestModel):
        raise ForestError(f"{path}: not a forest shard")
    return model


# ---------------------------------------------------------------- scoring


def _chunk_rows(features: int) -> int:
    return max(1, CHUNK_BYTES // (4 * max(features, 1)))


def _forest_rows(model: ForestModel, images: np.ndarray) -> np.ndarray:
    """uint8 images -> the float32 feature rows the model's trees split on."""
    rows = flatten(images).astype(np.float32)
    if model.transform is not None:
        rows = model.transform.transform(rows)
    return rows


def predict_proba(model: ForestModel, images: np.ndarray) -> np.ndarray | None:
    """Class probabilities for uint8 images, converted to float32 a chunk at a time."""
    if len(images) == 0:
        return None
    step = _chunk_rows(model.pixel_features)
    parts = []
    for start in range(0, len(images), step):
        parts.append(model.forest.predict_proba(_forest_rows(model, images[start : start + step])))
    return np.concatenate(parts)


def _add_tree_probas(forest: RandomForestClassifier, rows: np.ndarray, out: np.ndarray) -> None:
    """``out += `` each tree's class probabilities, tree by tree as sklearn sums them."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)  # what sklearn gives its trees
    for tree in forest.estimators_:
        out += tree.predict_proba(rows, check_input=False)


def _images_proba_sum(model: ForestModel, images: np.ndarray) -> np.ndarray | None:
    """The trees' summed class probabilities for uint8 images (None without images)."""
    if len(images) == 0:
        return None
    total = np.zeros((len(images), len(model.forest.classes_)))
    step = _chunk_rows(model.pixel_features)
    for start in range(0, len(images), step):
        rows = _forest_rows(model, images[start : start + step])
        _add_tree_probas(model.forest, rows, total[start : start + step])
    return total


def _rows_proba_sum(model: ForestModel, x: np.ndarray) -> np.ndarray:
    """The trees' summed class probabilities for rows already transformed."""
    total = np.zeros((len(x), len(model.forest.classes_)))
    step = _chunk_rows(x.shape[1])
    for start in range(0, len(x), step):
        _add_tree_probas(model.forest, x[start : start + step], total[start : start + step])
    return total


def data_digest(
    train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, test_x: np.ndarray, augment: str
) -> str:
    """sha256 of what a shard's scores depend on besides its trees: the fold's images,
    training labels and augmentation (a merge uses the scores only on the same data)."""
    digest = hashlib.sha256(augment.encode())
    for array in (train_x, train_y, val_x, test_x):
        array = np.ascontiguousarray(array)
        digest.update(f"|{array.dtype.str}{array.shape}|".encode())
        if array.size:  # an empty split (no test images) has no bytes to cast
            digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def oob_scores(
    model: ForestModel, x: np.ndarray, y: np.ndarray, source: np.ndarray, n_images: int
) -> dict[str, float | None]:
    """sklearn's OOB score and the grouped one (see :data:`OOB_NOTE`), from ``in_bag``.

    ``oob_score`` follows sklearn exactly (a row no tree left out counts as a vote for
    the first class); ``oob_grouped`` only scores rows that got a vote.
    """
    y_index = np.searchsorted(model.forest.classes_, y)
    return _oob_figures(y_index, *_oob_sums(model, x, source, n_images))


def _oob_sums(
    model: ForestModel, x: np.ndarray, source: np.ndarray, n_images: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the summed class probabilities and the number of the OOB votes, plain
    and grouped; the sums of several forests add up to their merged forest's. After
    feature selection they stay zero, the trees not walked: such a forest reports no
    OOB figures (:func:`_outcome`), and ``validation = "oob"`` refuses it."""
    forest = model.forest
    n, n_classes = len(source), len(forest.classes_)
    plain, plain_votes = np.zeros((n, n_classes)), np.zeros(n, np.int64)
    grouped, grouped_votes = np.zeros((n, n_classes)), np.zeros(n, np.int64)
    if selects_features(model):
        return plain, plain_votes, grouped, grouped_votes
    x = np.ascontiguousarray(x, dtype=np.float32)  # what sklearn gives its trees
    for tree, packed in zip(forest.estimators_, model.in_bag, strict=True):
        in_bag = np.unpackbits(packed, count=n).astype(bool)
        touched = np.zeros(n_images, dtype=bool)  # images with any copy in this tree's sample
        touched[source[in_bag]] = True
        # Every row goes through the tree, read in place: a tree reads a few dozen of a
        # row's features, so that is several times cheaper than gathering the
        # out-of-bag third of the training matrix into a copy for each tree.
        probs = tree.predict_proba(x, check_input=False)
        out_of_bag = ~in_bag
        plain[out_of_bag] += probs[out_of_bag]
        plain_votes += out_of_bag
        alone = out_of_bag & ~touched[source]
        grouped[alone] += probs[alone]
        grouped_votes += alone
    return plain, plain_votes, grouped, grouped_votes


def image_oob_probs(
    plain: np.ndarray, plain_votes: np.ndarray, source: np.ndarray, n_images: int
) -> np.ndarray:
    """Per training image, the mean class probability of the trees that left a copy of it
    out of their sample, the OOB votes of all its copies pooled (``validation = "oob"``:
    the image's validation prediction; without augmented copies it is sklearn's
    ``oob_decision_function_``). An image that no tree left out gets zeros, which
    sklearn's OOB score counts as a vote for the first class."""
    sums = np.zeros((n_images, plain.shape[1]))
    np.add.at(sums, source, plain)
    votes = np.zeros(n_images)
    np.add.at(votes, source, plain_votes)
    return sums / np.maximum(votes, 1)[:, None]


def _oob_figures(
    y_index: np.ndarray,
    plain: np.ndarray,
    plain_votes: np.ndarray,
    grouped: np.ndarray,
    grouped_votes: np.ndarray,
) -> dict[str, float | None]:
    n = len(y_index)
    plain = plain / np.maximum(plain_votes, 1)[:, None]
    covered = grouped_votes > 0
    return {
        "oob_score": accuracy_of(y_index, plain.argmax(1)) if n else None,
        "oob_grouped": (
            accuracy_of(y_index[covered], grouped[covered].argmax(1)) if covered.any() else None
        ),
        "oob_grouped_coverage": float(covered.mean()) if n else None,
    }


def score_model(
    model: ForestModel,
    train: TrainingRows,
    x: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    test_x: np.ndarray,
    *,
    started: float,
    train_seconds: float,
    out_of_bag: bool = False,
) -> FitOutcome:
    """Accuracy on the training images (copy 0 of each), validation and test, and OOB.

    ``x`` is ``train.x`` after the model's transform; ``train_seconds`` is the time spent
    fitting the transform and the trees (the study's "training time"). With
    ``out_of_bag`` the validation images are the training images, each predicted by the
    trees that did not draw it (:func:`image_oob_probs`; ``val_x`` is not read).
    """
    forest = model.forest
    originals = x[: train.n_images]
    step = _chunk_rows(x.shape[1])
    train_pred = np.concatenate(
        [forest.predict(originals[s : s + step]) for s in range(0, len(originals), step)]
        or [np.empty(0, dtype=train.y.dtype)]
    )
    sums = _oob_sums(model, x, train.source, train.n_images)
    if out_of_bag:
        val_probs = image_oob_probs(sums[0], sums[1], train.source, train.n_images)
    else:
        val_probs = predict_proba(model, val_x)
    return _outcome(
        model,
        train_acc=accuracy_of(train.y[: train.n_images], train_pred),
        val_y=val_y,
        val_probs=val_probs,
        test_probs=predict_proba(model, test_x),
        oob=_oob_figures(np.searchsorted(forest.classes_, train.y), *sums),
        started=started,
        train_seconds=train_seconds,
        train_rows=len(x),
    )


def _outcome(
    model: ForestModel,
    *,
    train_acc: float,
    val_y: np.ndarray,
    val_probs: np.ndarray | None,
    test_probs: np.ndarray | None,
    oob: dict[str, float | None],
    started: float,
    train_seconds: float,
    train_rows: int,
) -> FitOutcome:
    """The one shape of a scored forest, however its figures were found. Its OOB
    figures are None after feature selection (:func:`selects_features`)."""
    classes = model.forest.classes_
    if selects_features(model):
        oob = dict.fromkeys(oob)

    def labels(probs: np.ndarray | None) -> np.ndarray:
        if probs is None:
            return np.empty(0, dtype=np.int64)
        return classes[probs.argmax(1)]

    return FitOutcome(
        train_acc=train_acc,
        val_acc=accuracy_of(val_y, labels(val_probs)),
        val_pred=labels(val_probs),
        test_pred=labels(test_probs),
        seconds=time.perf_counter() - started,
        val_probs=val_probs,
        test_probs=test_probs,
        extra={
            **oob,
            "train_seconds": train_seconds,
            "train_rows": train_rows,
            "pixel_features": model.pixel_features,
            "kept_features": model.kept_features,
            "trees": model.trees,
        },
    )


def shard_scores(
    model: ForestModel,
    train: TrainingRows,
    x: np.ndarray,
    val_x: np.ndarray,
    test_x: np.ndarray,
    *,
    data: str,
) -> ShardScores:
    """A shard's :class:`ShardScores`; ``x`` is ``train.x`` after the model's transform."""
    oob_sum, oob_votes, grouped_sum, grouped_votes = _oob_sums(
        model, x, train.source, train.n_images
    )
    return ShardScores(
        trees=model.trees,
        data=data,
        oob_sum=oob_sum,
        oob_votes=oob_votes,
        grouped_sum=grouped_sum,
        grouped_votes=grouped_votes,
        train_sum=_rows_proba_sum(model, x[: train.n_images]),
        val_sum=_images_proba_sum(model, val_x),
        test_sum=_images_proba_sum(model, test_x),
    )


#: the :class:`ShardScores` fields that :func:`_oob_figures` takes, in its order
_OOB_SUMS = ("oob_sum", "oob_votes", "grouped_sum", "grouped_votes")


def _added(arrays: Sequence[np.ndarray | None]) -> np.ndarray | None:
    if arrays[0] is None:
        return None
    total = arrays[0].copy()  # one shard: exactly its sums, as a whole forest's
    for array in arrays[1:]:
        total += array
    return total


def score_from_shards(
    model: ForestModel,
    scores: Sequence[ShardScores],
    train_y: np.ndarray,
    val_y: np.ndarray,
    *,
    started: float,
    train_seconds: float,
    out_of_bag: bool = False,
) -> FitOutcome:
    """What :func:`score_model` finds for the merged forest ``model``, from its shards'
    ``scores`` (their sums added, then divided as sklearn divides): no tree runs here."""
    classes = model.forest.classes_
    trees = sum(s.trees for s in scores)
    if trees != model.trees:
        raise ForestError(f"the shards' scores count {trees} trees, the forest has {model.trees}")

    def probs_of(name: str) -> np.ndarray | None:
        total = _added([getattr(s, name) for s in scores])
        return None if total is None else total / trees

    train_y = np.asarray(train_y)
    copies = model.n_rows // max(len(train_y), 1)
    y_index = np.searchsorted(classes, np.tile(train_y, copies))  # row j*n+i is image i
    oob = [_added([getattr(s, name) for s in scores]) for name in _OOB_SUMS]
    train_probs = probs_of("train_sum")
    train_pred = classes[train_probs.argmax(1)] if train_probs is not None else train_y[:0]
    if out_of_bag:
        source = np.tile(np.arange(len(train_y)), copies)
        val_probs = image_oob_probs(oob[0], oob[1], source, len(train_y))
    else:
        val_probs = probs_of("val_sum")
    return _outcome(
        model,
        train_acc=accuracy_of(train_y, train_pred),
        val_y=val_y,
        val_probs=val_probs,
        test_probs=probs_of("test_sum"),
        oob=_oob_figures(y_index, *oob),
        started=started,
        train_seconds=train_seconds,
        train_rows=model.n_rows,
    )


def fit_rf_point(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    test_x: np.ndarray,
    params: dict[str, Any],
    *,
    seed: int,
    out_of_bag: bool = False,
) -> FitOutcome:
    """One whole forest at one sweep point: fit, then OOB, validation and test scores
    (with ``out_of_bag``, validated out of bag: see :func:`score_model`)."""
    started = time.perf_counter()
    train = training_rows(train_x, train_y, params.get("augment", "none"))
    fitting = time.perf_counter()
    model, x = fit_model(train, params, seed=seed, n_estimators=params["n_estimators"])
    train_seconds = time.perf_counter() - fitting
    return score_model(
        model,
        train,
        x,
        val_x,
        val_y,
        test_x,
        started=started,
        train_seconds=train_seconds,
        out_of_bag=out_of_bag,
    )


def merge_rf_point(
    models: Sequence[ForestModel],
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    test_x: np.ndarray,
    params: dict[str, Any],
    *,
    shard_seconds: Sequence[float] = (),
    out_of_bag: bool = False,
) -> FitOutcome:
    """Merge tree shards of one sweep point and score the merged forest like a whole one.

    When every shard carries its :class:`ShardScores` for this fold's data, the scores
    are their sums added (:func:`score_from_shards`); otherwise (a shard from older code,
    or fitted by :func:`fit_shard`) the merged forest is scored (:func:`score_model`).
    Both give the same figures. ``shard_seconds`` are the shards' training times:
    ``train_seconds`` is their sum (the work done), ``train_wall_seconds`` their maximum
    (the time with one worker each).
    """
    started = time.perf_counter()
    model = merge_models(models)
    augment = params.get("augment", "none")
    rows = len(train_x) * len(_views(augment))
    if rows != model.n_rows:
        raise ForestError(
            f"the tree shards were trained on {model.n_rows} rows, this fold has {rows}"
        )
    scores = [m.scores for m in models]
    if all(s is not None for s in scores) and {s.data for s in scores} == {
        data_digest(train_x, train_y, val_x, test_x, augment)
    }:
        outcome = score_from_shards(
            model,
            scores,
            train_y,
            val_y,
            started=started,
            train_seconds=sum(shard_seconds),
            out_of_bag=out_of_bag,
        )
    else:
        train = training_rows(train_x, train_y, augment)
        x = train.x if model.transform is None else model.transform.transform(train.x)
        outcome = score_model(
            model,
            train,
            x,
            val_x,
            val_y,
            test_x,
            started=started,
            train_seconds=sum(shard_seconds),
            out_of_bag=out_of_bag,
        )
    outcome.extra["shards"] = len(models)
    outcome.extra["train_wall_seconds"] = max(shard_seconds, default=0.0)
    return outcome
