"""PCA + SVM, RBF or linear (the study's section 2): the PCA basis, one grid point, the best point.

A grid sweeps ``n_components x whiten x C x gamma``. Principal components are nested:
the first k components of a PCA fitted with K >= k components are the components of
PCA(k) (exactly so for a full SVD; a randomized SVD with more components is, if anything,
closer to it). So a campaign fits one basis per (variant, fold, whiten, standardize) with
the largest k of its grid, projects every image once onto it (:class:`PcaProjection`), and
each grid point only slices columns and fits its SVC. Plain functions; no queue, no
database.
"""

from __future__ import annotations

import io
import json
import math
import time
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.classic import FitOutcome, accuracy_of, flatten
from shared.metrics import mean_of_finite

#: uint8 pixels become float32 features in [0, 1]
PIXEL_SCALE = np.float32(1 / 255)
#: rows projected at a time: the float copy of a chunk, not of the whole set
CHUNK_ROWS = 512


def pixel_features(x: np.ndarray) -> np.ndarray:
    """(n, ...) images or features -> (n, d) float32; uint8 pixels are scaled to [0, 1]."""
    flat = flatten(np.asarray(x))
    if flat.dtype == np.uint8:
        features = flat.astype(np.float32)
        features *= PIXEL_SCALE  # in place: not a second float32 array of every pixel
        return features
    return flat.astype(np.float32, copy=False)


def component_limit(n_train: int, n_features: int) -> int:
    """The most principal components ``n_train`` samples of ``n_features`` allow."""
    return min(n_train, n_features)


def check_n_components(n_components: int, n_train: int, n_features: int) -> None:
    """One clear line instead of sklearn's traceback when the data cannot give ``k``."""
    limit = component_limit(n_train, n_features)
    if not 1 <= n_components <= limit:
        raise ValueError(
            f"n_components={n_components} exceeds what {n_train} training images allow "
            f"(at most {limit})"
            if n_components > limit
            else f"n_components={n_components} must be at least 1"
        )


def check_gamma(gamma: Any) -> float | str:
    """SVC's gamma: ``"scale"``, ``"auto"`` or a number > 0 (a numeric string is read)."""
    if gamma in ("scale", "auto"):
        return gamma
    try:
        value = float(gamma)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"gamma={gamma!r}: expected 'scale', 'auto' or a number > 0")
    return value


# ---------------------------------------------------------------- the PCA basis


@dataclass(frozen=True, eq=False)
class PcaBasis:
    """A fitted PCA: ``project(x, k)`` equals sklearn's ``PCA(k, whiten).transform(x)``.

    A ``standardized`` basis was fitted on standardized features, and ``project`` equals
    ``Pipeline([StandardScaler(), PCA(k, whiten)]).transform``: the scaler's mean is in
    ``mean`` and its per-feature scale is divided into the ``components`` columns.
    """

    mean: np.ndarray  # (d,) float32
    components: np.ndarray  # (K, d) float32, rows ordered by explained variance
    explained_variance: np.ndarray  # (K,)
    explained_variance_ratio: np.ndarray  # (K,)
    whiten: bool
    n_train: int
    standardized: bool = False

    @property
    def n_components(self) -> int:
        return len(self.components)

    @property
    def n_features(self) -> int:
        return len(self.mean)

    def project(self, x: np.ndarray, k: int | None = None) -> np.ndarray:
        """(n, ...) images -> (n, k) float32 on the first ``k`` components (default all)."""
        k = self.n_components if k is None else k
        if not 1 <= k <= self.n_components:
            check_n_components(k, self.n_train, self.n_features)
            raise ValueError(f"n_components={k}: this basis has {self.n_components}")
        components = self.components[:k]
        scale = whitening_scale(self.explained_variance[:k]) if self.whiten else None
        out = np.empty((len(x), k), dtype=np.float32)
        for start in range(0, len(x), CHUNK_ROWS):
            chunk = pixel_features(x[start : start + CHUNK_ROWS])
            if np.shares_memory(chunk, x):  # float input: never change the caller's array
                chunk = chunk - self.mean
            else:  # centred in place: one float32 chunk at a time, not three
                chunk -= self.mean
            out[start : start + len(chunk)] = chunk @ components.T
            del chunk  # before the next chunk is made
        if scale is not None:
            out /= scale
        return out

    def to_bytes(self) -> bytes:
        return _npz_bytes(
            mean=self.mean,
            components=self.components,
            explained_variance=self.explained_variance,
            explained_variance_ratio=self.explained_variance_ratio,
            whiten=np.array(self.whiten),
            n_train=np.array(self.n_train),
            standardized=np.array(self.standardized),
        )

    @classmethod
    def from_bytes(cls, blob: bytes) -> PcaBasis:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            return cls(
                mean=npz["mean"],
                components=npz["components"],
                explained_variance=npz["explained_variance"],
                explained_variance_ratio=npz["explained_variance_ratio"],
                whiten=bool(npz["whiten"]),
                n_train=int(npz["n_train"]),
                standardized="standardized" in npz and bool(npz["standardized"]),
            )


def whitening_scale(explained_variance: np.ndarray) -> np.ndarray:
    """sqrt(variance) per component, clipped as sklearn does so null components stay finite."""
    scale = np.sqrt(explained_variance).astype(np.float32)
    return np.maximum(scale, np.finfo(np.float32).eps)


def fit_pca_basis(
    x: np.ndarray,
    k: int,
    whiten: bool,
    seed: int,
    *,
    standardize: bool = False,
    svd_solver: str = "randomized",
) -> PcaBasis:
    """Fit PCA(k) on the training images ``x`` (uint8 pixels or float features).

    With ``standardize``, on the features standardized by a ``StandardScaler`` fitted
    on ``x``, chunk by chunk, in place: no float64 or second float32 copy of ``x``.
    """
    features = pixel_features(x)
    check_n_components(k, *features.shape)
    from sklearn.decomposition import PCA  # here, as in fit_svc: importing svm stays cheap

    offset = scale = None
    if standardize:
        from sklearn.preprocessing import StandardScaler

        if np.shares_memory(features, x):  # float input: never change the caller's array
            features = features.copy()
        scaler = StandardScaler()
        for start in range(0, len(features), CHUNK_ROWS):
            scaler.partial_fit(features[start : start + CHUNK_ROWS])
        offset, scale = scaler.mean_.astype(np.float32), scaler.scale_.astype(np.float32)
        for start in range(0, len(features), CHUNK_ROWS):
            chunk = features[start : start + CHUNK_ROWS]
            chunk -= offset
            chunk /= scale
    # features made here (from uint8 pixels, or copied to standardize) are centred in
    # place: sklearn's own copy of them was the fit's largest allocation
    ours = not np.shares_memory(features, x)
    pca = PCA(
        n_components=k, whiten=whiten, svd_solver=svd_solver, random_state=seed, copy=not ours
    )
    pca.fit(features)
    n_train = len(features)
    del features
    mean, components = pca.mean_, pca.components_
    if standardize:
        # ((x - offset) / scale - mean) @ C.T == (x - (offset + scale * mean)) @ (C / scale).T
        mean = offset + scale * mean
        components = components / scale
    return PcaBasis(
        mean=mean.astype(np.float32),
        components=components.astype(np.float32),
        explained_variance=pca.explained_variance_.astype(np.float64),
        explained_variance_ratio=pca.explained_variance_ratio_.astype(np.float64),
        whiten=bool(whiten),
        n_train=n_train,
        standardized=bool(standardize),
    )


@dataclass(frozen=True, eq=False)
class PcaProjection:
    """Every image of a campaign projected once on a K-component basis (float32).

    ``features(k)`` is the first k columns: the projection on PCA(k), whitened when the
    basis was (whitening divides each column by its own sqrt(variance), so slicing
    commutes with it). This, not the basis, is the stored artifact: n x K floats are
    small where K x d components of a 192 x 192 x 3 image are not.
    """

    z: np.ndarray  # (n_images, K) float32
    explained_variance_ratio: np.ndarray  # (K,)
    whiten: bool
    n_train: int
    n_features: int

    @property
    def n_components(self) -> int:
        return self.z.shape[1]

    def features(self, k: int) -> np.ndarray:
        if not 1 <= k <= self.n_components:
            check_n_components(k, self.n_train, self.n_features)
            raise ValueError(f"n_components={k}: this projection has {self.n_components}")
        return self.z[:, :k]

    def explained(self, k: int) -> float:
        """The fraction of the training variance the first ``k`` components explain."""
        return float(self.explained_variance_ratio[:k].sum())

    def to_bytes(self) -> bytes:
        return _npz_bytes(
            z=self.z.astype(np.float32, copy=False),
            explained_variance_ratio=self.explained_variance_ratio,
            whiten=np.array(self.whiten),
            n_train=np.array(self.n_train),
            n_features=np.array(self.n_features),
        )

    @classmethod
    def from_bytes(cls, blob: bytes) -> PcaProjection:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            return cls(
                z=npz["z"],
                explained_variance_ratio=npz["explained_variance_ratio"],
                whiten=bool(npz["whiten"]),
                n_train=int(npz["n_train"]),
                n_features=int(npz["n_features"]),
            )


def project_all(basis: PcaBasis, images: np.ndarray) -> PcaProjection:
    return PcaProjection(
        z=basis.project(images),
        explained_variance_ratio=basis.explained_variance_ratio,
        whiten=basis.whiten,
        n_train=basis.n_train,
        n_features=basis.n_features,
    )


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    """An ``.npz`` that ``np.load`` reads, with the same bytes for the same arrays.

    ``np.savez`` stamps each member with the current time; a fixed stamp means two
    workers that fit the same basis write identical files (and checksums).
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    return buffer.getvalue()


# ---------------------------------------------------------------- one grid point


@contextmanager
def _stopping_at_max_iter_quietly() -> Iterator[None]:
    """A fit that stops at ``max_iter`` gives the point's result (``stopped_at_max_iter``),
    not a ConvergenceWarning in the worker's log for every fit."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def fit_svc(
    z_train: np.ndarray,
    train_y: np.ndarray,
    z_val: np.ndarray,
    val_y: np.ndarray,
    z_test: np.ndarray,
    *,
    C: float,
    gamma: float | str,
    seed: int,
    kernel: str = "rbf",
    max_iter: int = -1,
) -> FitOutcome:
    """An SVC (RBF, or linear) on PCA features: train and validation accuracy,
    predictions. With ``max_iter``, whether the solver stopped there before converging
    (``stopped_at_max_iter``, as the study's linear SVM did) and its ``iterations``."""
    from sklearn.svm import SVC

    started = time.perf_counter()
    svc = SVC(kernel=kernel, C=C, gamma=check_gamma(gamma), max_iter=max_iter, random_state=seed)
    with _stopping_at_max_iter_quietly():
        svc.fit(z_train, train_y)
    limited = {}
    if max_iter > 0:
        iterations = int(np.max(svc.n_iter_))  # one per pair of classes (one-vs-one)
        limited = {"stopped_at_max_iter": iterations >= max_iter, "iterations": iterations}
    empty = np.empty(0, dtype=np.int64)
    val_pred = svc.predict(z_val) if len(z_val) else empty
    test_pred = svc.predict(z_test) if len(z_test) else empty
    return FitOutcome(
        train_acc=accuracy_of(train_y, svc.predict(z_train)),
        val_acc=accuracy_of(val_y, val_pred),
        val_pred=val_pred,
        test_pred=test_pred,
        seconds=time.perf_counter() - started,
        extra={
            "support_vectors": int(svc.n_support_.sum()),
            **limited,
            **(_gamma_extra(gamma, z_train) if kernel != "linear" else {}),
        },
    )


def _gamma_extra(gamma: float | str, z_train: np.ndarray) -> dict[str, float]:
    """The value ``gamma="scale"`` took, as the study gives it ("γ scale ≈ 1e-5").

    SVC's rule: 1 / (n_features x the variance of every training value, in float64).
    """
    if gamma != "scale":
        return {}
    variance = float(np.var(z_train, dtype=np.float64))
    return {"gamma_scale": 1.0 / (z_train.shape[1] * variance) if variance else 1.0}


def point_widths(params: Mapping[str, Any]) -> list[int]:
    """The ``n_components`` a point may use: its own, or those its ``search`` tries."""
    searched = (params.get("search") or {}).get("n_components")
    return [int(k) for k in (searched or [params["n_components"]])]


def fit_point(
    z_train: np.ndarray,
    train_y: np.ndarray,
    z_val: np.ndarray,
    val_y: np.ndarray,
    z_test: np.ndarray,
    params: Mapping[str, Any],
    *,
    seed: int,
) -> tuple[FitOutcome, int]:
    """A grid point on PCA features at least as wide as it needs (their first columns
    are its components): its ``search`` first, if it has one, then its SVC.

    Returns the outcome and the ``n_components`` it used. A search's choice is in the
    outcome's extras as ``best_<name>``, with ``search_cv_acc`` (the choice's mean
    accuracy over the search's folds) and ``search_combinations``.
    """
    search = params.get("search")
    widths = point_widths(params)
    chosen: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if search:
        choice = search_svc(
            z_train[:, : max(widths)],
            train_y,
            {name: search[name] for name in ("n_components", "C", "gamma") if search.get(name)},
            folds=int(search["folds"]),
            seed=seed,
            n_components=widths[0],
            C=params.get("C", 1.0),  # a default only where the search sets it anyway
            gamma=params.get("gamma", "scale"),
            kernel=params.get("kernel", "rbf"),
            max_iter=params.get("max_iter", -1),
        )
        chosen = choice.params
        extra = {f"best_{name}": value for name, value in chosen.items()}
        extra.update(search_cv_acc=choice.cv_acc, search_combinations=choice.combinations)
    k = int(chosen.get("n_components", widths[0]))
    out = fit_svc(
        z_train[:, :k],
        train_y,
        z_val[:, :k],
        val_y,
        z_test[:, :k],
        C=chosen.get("C", params.get("C")),
        gamma=check_gamma(chosen.get("gamma", params.get("gamma"))),
        seed=seed,
        kernel=params.get("kernel", "rbf"),  # left out of a point's params at its default
        max_iter=params.get("max_iter", -1),
    )
    out.extra.update(extra)
    return out, k


def fit_svm_point(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    test_x: np.ndarray,
    params: dict[str, Any],
    *,
    seed: int,
) -> FitOutcome:
    """[StandardScaler,] PCA(n_components, whiten), SVC(kernel, C, gamma), from scratch
    (with ``search``, the PCA as wide as the widest it tries, and the search first).

    The campaign task shares one basis across grid points instead (``workers.tasks.svm``);
    this is the same computation for a single point.
    """
    started = time.perf_counter()
    if not params.get("search"):
        check_gamma(params["gamma"])  # before fitting anything
    basis = fit_pca_basis(
        train_x,
        max(point_widths(params)),
        params["whiten"],
        seed,
        standardize=params.get("standardize", False),
    )
    out, k = fit_point(
        basis.project(train_x),
        train_y,
        basis.project(val_x),
        val_y,
        basis.project(test_x),
        params,
        seed=seed,
    )
    out.seconds = time.perf_counter() - started
    out.extra["explained_variance"] = float(basis.explained_variance_ratio[:k].sum())
    return out


# ---------------------------------------------------------------- choosing the best point


@dataclass(frozen=True)
class GridPoint:
    """One parameter point of a grid, averaged over its folds (a GridSearchCV row)."""

    params: dict[str, Any]
    mean_val_acc: float | None
    mean_train_acc: float | None
    folds: int


def grid_table(rows: Iterable[Mapping[str, Any]]) -> list[GridPoint]:
    """Per-fold rows -> one :class:`GridPoint` per parameter point, in first-seen order.

    Each row is a mapping with ``params`` (the point's parameters, without the fold),
    ``val_acc`` and optionally ``train_acc``; a missing or NaN accuracy (a fold with no
    validation images, a failed unit) is left out of the mean.
    """
    points: dict[str, tuple[dict[str, Any], list[float], list[float]]] = {}
    for row in rows:
        params = dict(row["params"])
        key = json.dumps(params, sort_keys=True, default=str)
        _, vals, trains = points.setdefault(key, (params, [], []))
        vals.append(row.get("val_acc"))
        trains.append(row.get("train_acc"))
    return [
        GridPoint(params, mean_of_finite(vals), mean_of_finite(trains), len(vals))
        for params, vals, trains in points.values()
    ]


def best_point(rows: Iterable[Mapping[str, Any]]) -> GridPoint | None:
    """GridSearchCV's choice: the highest mean validation accuracy across folds.

    Ties go to the first point in the rows' order (plan order is file order: the
    cartesian product of the sweep lists as written), as GridSearchCV's ``best_index_``
    goes to the first of its ParameterGrid. Points without any validation accuracy
    never win; None when no point has one.
    """
    scored = [p for p in grid_table(rows) if p.mean_val_acc is not None]
    # max() keeps the first of equal scores
    return max(scored, key=lambda p: p.mean_val_acc) if scored else None


# ---------------------------------------------------------------- searching inside a unit


@dataclass(frozen=True)
class SearchChoice:
    """What a unit's ``[svm.search]`` chose: the best combination and its CV accuracy."""

    params: dict[str, Any]  # the searched names -> their chosen values
    cv_acc: float  # the chosen combination's mean accuracy over the search's folds
    combinations: int  # combinations scored (each on every fold)


def check_search_folds(train_y: np.ndarray, folds: int) -> None:
    """One line, before anything is fitted, when a class has fewer training images than
    the search has folds (each fold needs images of every class)."""
    counts = np.bincount(np.asarray(train_y))
    fewest = int(counts[counts > 0].min()) if len(counts) else 0
    if fewest < folds:
        raise ValueError(
            f"[svm.search] folds = {folds}: a class has only {fewest} training images here; "
            f"search with folds <= {fewest} or give the unit more images"
        )


def search_svc(
    z_train: np.ndarray,
    train_y: np.ndarray,
    grid: Mapping[str, Iterable[Any]],
    *,
    folds: int,
    seed: int,
    n_components: int,
    C: float,
    gamma: float | str,
    kernel: str = "rbf",
    max_iter: int = -1,
) -> SearchChoice:
    """GridSearchCV over ``grid`` (``n_components``, ``C``, ``gamma``) on PCA features.

    ``z_train`` holds the training rows projected on a basis at least as wide as the
    largest ``n_components`` searched; each one slices its first columns (as a grid
    point slices the shared projection). The names not in ``grid`` take the given
    values. Every ``n_components`` is scored on the same stratified folds, and ties go
    to the first combination in field order (n_components, then C, then gamma), as
    GridSearchCV's ``best_index_`` goes to the first of its grid.
    """
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.svm import SVC

    widths = [int(k) for k in grid.get("n_components", [n_components])]
    svc_grid = {name: list(grid[name]) for name in ("C", "gamma") if name in grid}
    check_search_folds(train_y, folds)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    best: SearchChoice | None = None
    combinations = 0
    for k in widths:
        if not 1 <= k <= z_train.shape[1]:
            raise ValueError(f"n_components={k}: the features have {z_train.shape[1]}")
        svc = SVC(
            kernel=kernel, C=C, gamma=check_gamma(gamma), max_iter=max_iter, random_state=seed
        )
        # refit=False: the unit refits the chosen combination itself, on all its rows;
        # error_score="raise": a fit that fails fails the unit with its reason
        search = GridSearchCV(
            svc, [svc_grid] if svc_grid else [{}], cv=cv, refit=False, error_score="raise"
        )
        with _stopping_at_max_iter_quietly():
            search.fit(np.ascontiguousarray(z_train[:, :k]), train_y)
        scores = search.cv_results_["mean_test_score"]
        combinations += len(scores)
        index = int(np.argmax(scores))  # the first of equal scores
        if best is None or scores[index] > best.cv_acc:
            chosen = dict(search.cv_results_["params"][index])
            if "n_components" in grid:
                chosen = {"n_components": k, **chosen}
            best = SearchChoice(chosen, float(scores[index]), 0)
    assert best is not None  # the grid has at least one width
    return SearchChoice(best.params, best.cv_acc, combinations)
