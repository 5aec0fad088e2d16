"""PCA + RBF SVM grid: sklearn's GridSearchCV against orchard's shared-PCA path.

Baseline, as the study ran it: ``GridSearchCV(Pipeline([PCA(svd_solver="randomized"),
SVC()]), n_components x whiten x C x gamma, cv=<the folds>, n_jobs=--jobs)``, which fits
a PCA for every grid point on every fold; with --standardize, a ``StandardScaler`` before
it, as the study's campaigns set ``standardize = true``.

orchard: per (fold, whiten) one PCA with the largest n_components of the grid, every
image projected on it once; each grid point then slices its first k columns and fits
only its SVC. The kernel fits run across --jobs processes, standing in for CPU workers.

Both run on the same synthetic images and folds in the same process, on one pool of
--jobs worker processes that is started (with scikit-learn loaded, as an orchard CPU
worker has it) before either is timed; the figures are wall-clock seconds of this run.
Writes ``bench/results/svm_grid.json``.

    python bench/svm_grid.py                 # tiny: well under a minute on 2 cores
    python bench/svm_grid.py --size smoke    # what the test suite runs
    python bench/svm_grid.py --size study --jobs 16   # the study's grid: hours of baseline
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from joblib import Parallel, delayed, parallel_config
from sklearn.decomposition import PCA
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import machine_info, now, write_json  # noqa: E402  (run from anywhere)
from shared.svm import (  # noqa: E402
    PcaProjection,
    best_point,
    fit_pca_basis,
    fit_svc,
    project_all,
)

RESULTS = Path(__file__).resolve().parent / "results" / "svm_grid.json"


@dataclass(frozen=True)
class Size:
    per_class: int  # images per class (3 classes)
    height: int  # image shape: height x width x 3, like the study's 96 x 192 x 3 "cropped"
    width: int
    folds: int
    n_components: tuple[int, ...]
    whiten: tuple[bool, ...]
    C: tuple[float, ...]
    gamma: tuple[float | str, ...]


SIZES = {
    "smoke": Size(200, 12, 24, 3, (4, 8, 16), (False, True), (1.0,), ("scale", 0.03)),
    "tiny": Size(
        150, 24, 48, 3, (8, 16, 32, 64), (False, True), (1.0, 1.5, 2.0), ("scale", 0.03, 0.3)
    ),
    # the study's grid (sections 2.4, 2.5) on its "cropped" image shape
    "study": Size(
        500,  # 1200 training images per fold: enough for 1000 components
        96,
        192,
        5,
        (50, 100, 200, 500, 1000),
        (False, True),
        (1.0, 1.5, 2.0),
        ("scale", 1e-6, 1e-5, 1e-4, 1e-3),
    ),
}


def synthetic_images(size: Size, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images of 3 classes with a photo-like spectrum: a few directions (lighting,
    background) carry most of the variance, decaying geometrically, plus pixel noise.

    The classes differ by a shift along the same directions, smaller than the spread.
    A flat spectrum would make sklearn's randomized PCA itself unstable from seed to
    seed, and the comparison would measure that rather than orchard.
    """
    rng = np.random.default_rng(seed)
    n = 3 * size.per_class
    d = size.height * size.width * 3
    rank = min(64, d)
    y = np.repeat(np.arange(3), size.per_class)
    directions = np.linalg.qr(rng.normal(size=(d, rank)))[0].T.astype(np.float32)
    spread = 13 * np.sqrt(d / rank) * 0.9 ** np.arange(rank)
    class_shift = rng.normal(size=(3, rank)) * 0.5
    latent = (class_shift[y] + rng.normal(size=(n, rank))) * spread
    pixels = 128 + latent.astype(np.float32) @ directions
    pixels += rng.normal(0, 2, (n, d)).astype(np.float32)
    images = np.clip(pixels, 0, 255).astype(np.uint8)
    order = rng.permutation(n)
    return images[order], y[order]


def grid_points(size: Size) -> list[dict[str, Any]]:
    """The grid in file order: the last dimension varies fastest, as ParameterGrid does."""
    names = ("n_components", "whiten", "C", "gamma")
    values = (size.n_components, size.whiten, size.C, size.gamma)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)]


# ---------------------------------------------------------------- baseline


def run_baseline(
    x: np.ndarray,
    y: np.ndarray,
    folds: list[tuple[np.ndarray, np.ndarray]],
    size: Size,
    args: argparse.Namespace,
) -> dict[str, Any]:
    steps = [("pca", PCA(svd_solver="randomized", random_state=args.seed)), ("svc", SVC())]
    if args.standardize:
        steps.insert(0, ("scale", StandardScaler()))
    pipeline = Pipeline(steps)
    search = GridSearchCV(
        pipeline,
        {
            "pca__n_components": list(size.n_components),
            "pca__whiten": list(size.whiten),
            "svc__C": list(size.C),
            "svc__gamma": list(size.gamma),
        },
        cv=folds,
        n_jobs=args.jobs,
        refit=False,  # orchard does not refit on all the data either
        return_train_score=True,  # the study's table has train accuracy too
    )
    started = time.perf_counter()
    search.fit(x, y)
    seconds = time.perf_counter() - started
    best = {
        k.split("__", 1)[1]: v for k, v in search.cv_results_["params"][search.best_index_].items()
    }
    results = search.cv_results_
    scores = [
        ({k.split("__", 1)[1]: v for k, v in params.items()}, float(score))
        for params, score in zip(results["params"], results["mean_test_score"], strict=True)
    ]
    return {
        "seconds": seconds,
        "best": best,
        "best_val_acc": float(results["mean_test_score"][search.best_index_]),
        "scores": scores,
    }


def _warm() -> bool:
    from workers.app import preload, preloaded

    preload(["cpu"])
    return preloaded(["cpu"])


# ---------------------------------------------------------------- orchard's path


def _projection(
    x: np.ndarray, train: np.ndarray, k: int, whiten: bool, seed: int, standardize: bool
) -> PcaProjection:
    return project_all(fit_pca_basis(x[train], k, whiten, seed, standardize=standardize), x)


def _point(
    projection: PcaProjection,
    y: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    params: dict[str, Any],
    fold: int,
    seed: int,
) -> dict[str, Any]:
    z = projection.features(params["n_components"])
    out = fit_svc(
        z[train], y[train], z[val], y[val], z[:0], C=params["C"], gamma=params["gamma"], seed=seed
    )
    return {"params": params, "fold": fold, "val_acc": out.val_acc, "train_acc": out.train_acc}


def run_orchard(
    x: np.ndarray,
    y: np.ndarray,
    folds: list[tuple[np.ndarray, np.ndarray]],
    size: Size,
    args: argparse.Namespace,
) -> dict[str, Any]:
    largest = max(size.n_components)
    bases = list(itertools.product(range(len(folds)), size.whiten))
    points = grid_points(size)
    started = time.perf_counter()
    with Parallel(n_jobs=args.jobs) as parallel:
        # the baseline pipeline's random_state on every fold (a campaign uses seed + fold):
        # where k is the largest, both then fit the very same PCA
        fitted = parallel(
            delayed(_projection)(x, folds[f][0], largest, w, args.seed, args.standardize)
            for f, w in bases
        )
        projections = dict(zip(bases, fitted, strict=True))
        rows = parallel(
            delayed(_point)(
                projections[(f, p["whiten"])], y, folds[f][0], folds[f][1], p, f, args.seed + f
            )
            for p in points
            for f in range(len(folds))
        )
    seconds = time.perf_counter() - started
    best = best_point(rows)
    return {
        "seconds": seconds,
        "best": best.params,
        "best_val_acc": best.mean_val_acc,
        "pca_fits": len(bases),
    }


# ---------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--jobs", type=int, default=2, help="processes for both (default 2)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="BLAS threads per process (default 1: parallelism comes from --jobs, as in "
        "orchard's CPU workers; more threads than cores slows BLAS down many times)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--standardize",
        action="store_true",
        help="standardize the pixel features before the PCA (a StandardScaler in the baseline)",
    )
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"default {RESULTS}")
    args = parser.parse_args(argv)
    size = SIZES[args.size]

    images, y = synthetic_images(size, args.seed)
    x = images.reshape(len(images), -1).astype(np.float32) / 255
    splitter = StratifiedKFold(size.folds, shuffle=True, random_state=args.seed)
    folds = list(splitter.split(x, y))
    n_points = len(grid_points(size))
    print(
        f"svm_grid --size {args.size}: {len(x)} images of {size.height}x{size.width}x3, "
        f"{size.folds} folds, {n_points} grid points, --jobs {args.jobs}"
        + (", standardized" if args.standardize else ""),
        flush=True,
    )

    with (
        threadpool_limits(args.threads),
        parallel_config(backend="loky", inner_max_num_threads=args.threads),
    ):
        # both paths share one pool of worker processes (joblib reuses it): start it, with
        # what a CPU worker loads before its pool starts, before either clock
        if not all(Parallel(n_jobs=args.jobs)(delayed(_warm)() for _ in range(args.jobs))):
            raise RuntimeError("a worker process started without scikit-learn loaded")
        baseline = run_baseline(x, y, folds, size, args)
        orchard = run_orchard(x, y, folds, size, args)
    ratio = baseline["seconds"] / orchard["seconds"]
    difference = abs(baseline["best_val_acc"] - orchard["best_val_acc"])
    same = baseline["best"] == orchard["best"]
    # where points tie, the two may name different ones: the baseline's own mean
    # validation accuracy at orchard's best point says whether it is one of the ties
    scores = baseline.pop("scores")
    (at_orchard_best,) = [acc for params, acc in scores if params == orchard["best"]]
    ties = sum(acc == baseline["best_val_acc"] for _, acc in scores)

    width = max(len(str(baseline["best"])), len(str(orchard["best"])))
    print(f"{'':28} {'seconds':>8}  {'best point':<{width}}  mean val acc")
    print(
        f"{'baseline GridSearchCV':28} {baseline['seconds']:8.2f}  "
        f"{str(baseline['best']):<{width}}  {baseline['best_val_acc']:.4f}"
    )
    print(
        f"{'orchard shared PCA':28} {orchard['seconds']:8.2f}  "
        f"{str(orchard['best']):<{width}}  {orchard['best_val_acc']:.4f}"
    )
    print(f"speed-up: {ratio:.2f}x  ({n_points * size.folds} PCA fits -> {orchard['pca_fits']})")
    print(f"same best point: {same}; accuracy difference: {difference * 100:.2f} %")
    print(
        f"the baseline's own mean val acc at orchard's best point: {at_orchard_best:.4f} "
        f"({ties} of its points tie at its best, {baseline['best_val_acc']:.4f})"
    )

    figures = {
        "benchmark": "svm_grid",
        "date": now(),
        "args": vars(args),
        "size": asdict(size),
        "machine": machine_info(),
        "images": len(x),
        "features": x.shape[1],
        "grid_points": n_points,
        "baseline": baseline,
        "orchard": orchard,
        "speedup": ratio,
        "same_best_point": same,
        "accuracy_difference": difference,
        "baseline_at_orchard_best": at_orchard_best,
        "baseline_ties_at_best": ties,
    }
    print(f"wrote {write_json(args.json, figures)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
