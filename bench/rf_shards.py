"""Tree-sharded random forest vs one forest: wall time, accuracy and peak memory.

Baseline: one ``RandomForestClassifier(n_estimators=N, n_jobs=1)`` on the 8x augmented
(rotate + flip) training set, fitted and scored in one process (``fit_rf_point``, what an
unsharded ``orchard.fit_rf`` unit runs). Orchard: the same N trees as ``--shards`` tree
shards trained in that many parallel processes (stand-ins for CPU workers, running the
functions ``orchard.fit_rf_shard`` runs: ``fit_scored_shard``, which fits the shard's trees
and scores them on the fold, + ``save_model``), then one merge process (``load_model`` +
``merge_rf_point``, what the merge unit runs: it adds the shards' scores). Every process is
started before the clock starts, forked after ``workers.app.preload(["cpu"])``, so it has
scikit-learn loaded as a CPU worker does before its pool starts (the script stops if one
has not): no timed task pays the import.

Data: synthetic uint8 images (three classes that differ in colour and blob size, plus
noise); each process builds its own float32 training rows from the uint8 images, as a
worker does from the preprocessing cache. Peak RSS is ``ru_maxrss`` of each process.

    python bench/rf_shards.py            # default: about half a minute on 2 cores
    python bench/rf_shards.py --tiny     # a smoke run of a few seconds
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import machine_info, now, write_json  # noqa: E402  (after the path fix)
from shared.classic import FitOutcome  # noqa: E402
from shared.forest import (  # noqa: E402
    fit_rf_point,
    fit_scored_shard,
    load_model,
    merge_rf_point,
    save_model,
)
from shared.spec import RfParams  # noqa: E402
from workers.app import preload, preloaded  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "rf_shards.json"


def make_images(n: int, side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three overlapping classes: a disc whose colour and size depend on the class, on noise
    (a forest gets about three in four right, like the study's mangoes)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    rows, cols = np.mgrid[:side, :side]
    centre = (side - 1) / 2
    radius = np.hypot(rows - centre, cols - centre)
    colours = np.array([[170, 150, 60], [150, 160, 60], [130, 165, 65]], dtype=np.float32)
    sizes = np.array([0.40, 0.36, 0.32]) * side
    images = rng.normal(80, 40, (n, side, side, 3)).astype(np.float32)
    for i, label in enumerate(y):
        disc = radius < sizes[label] * rng.uniform(0.8, 1.2)
        images[i][disc] = colours[label] + rng.normal(0, 40, (disc.sum(), 3))
    return np.clip(images, 0, 255).astype(np.uint8), y


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _warm(_: int) -> bool:
    time.sleep(0.3)  # long enough that every pool process starts
    return preloaded(["cpu"])


def _baseline(data: tuple, test_y: np.ndarray, params: dict, seed: int) -> dict[str, Any]:
    cpu = time.process_time()
    return _forest_figures(fit_rf_point(*data, params, seed=seed), test_y, cpu)


def _shard(data: tuple, params: dict[str, Any], seed: int, shard: int, path: str) -> dict:
    cpu = time.process_time()
    train_x, train_y, val_x, _, test_x = data
    model, seconds = fit_scored_shard(
        train_x, train_y, val_x, test_x, params, seed=seed, shard=shard
    )
    written = save_model(model, Path(path))
    return {
        "cpu_seconds": time.process_time() - cpu,
        "path": path,
        "sha256": written.sha256,
        "trees": model.trees,
        "seconds": seconds,
        "peak_rss_mib": _peak_rss_mib(),
    }


def _merge(data: tuple, test_y: np.ndarray, params: dict, shards: list[dict]) -> dict[str, Any]:
    cpu = time.process_time()
    models = [load_model(Path(s["path"]), s["sha256"]) for s in shards]
    out = merge_rf_point(models, *data, params, shard_seconds=[s["seconds"] for s in shards])
    # the merge adds the shards' scores when every shard has them (else it scores the trees)
    return {
        **_forest_figures(out, test_y, cpu),
        "shards_scored": all(m.scores is not None for m in models),
    }


def _forest_figures(out: FitOutcome, test_y: np.ndarray, cpu_started: float) -> dict[str, Any]:
    """What a whole forest (baseline) and a merged one (orchard) report alike."""
    return {
        "cpu_seconds": time.process_time() - cpu_started,
        "trees": out.extra["trees"],
        "val_acc": out.val_acc,
        "test_acc": float((out.test_pred == test_y).mean()),
        "oob_score": out.extra["oob_score"],
        "oob_grouped": out.extra["oob_grouped"],
        "peak_rss_mib": _peak_rss_mib(),
    }


def _pool(workers: int) -> ProcessPoolExecutor:
    # forked after the imports a CPU worker makes before its pool starts (scikit-learn),
    # so no timed task pays them, as no unit does
    preload(["cpu"])
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    if not all(pool.map(_warm, range(workers))):
        pool.shutdown()
        raise RuntimeError("a pool process started without scikit-learn loaded")
    return pool


def run(args: argparse.Namespace) -> dict[str, Any]:
    n_train, n_val, n_test = args.images, max(args.images // 4, 6), max(args.images // 4, 6)
    x, y = make_images(n_train + n_val + n_test, args.side, args.seed)
    (train_x, val_x, test_x), (train_y, val_y, test_y) = (
        np.split(a, [n_train, n_train + n_val]) for a in (x, y)
    )
    # what a unit gets: test images without labels; the test accuracy is scored here
    data = (train_x, train_y, val_x, val_y, test_x)
    params = RfParams(
        variant=f"resize{args.side}",
        n_estimators=args.trees,
        augment=args.augment,
        tree_shards=args.shards,
    ).model_dump()

    with _pool(1) as pool:
        started = time.perf_counter()
        baseline = pool.submit(_baseline, data, test_y, params, args.seed).result()
        baseline["wall_seconds"] = time.perf_counter() - started

    folder = Path(tempfile.mkdtemp(prefix="rf-shards-"))
    try:
        with _pool(args.shards) as shard_pool, _pool(1) as merge_pool:
            started = time.perf_counter()
            futures = [
                shard_pool.submit(_shard, data, params, args.seed, k, str(folder / f"t{k}.joblib"))
                for k in range(args.shards)
            ]
            shards = [f.result() for f in futures]
            shards_done = time.perf_counter()
            merged = merge_pool.submit(_merge, data, test_y, params, shards).result()
            finished = time.perf_counter()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    orchard = {
        **merged,
        "wall_seconds": finished - started,
        "shard_wall_seconds": shards_done - started,
        "merge_seconds": finished - shards_done,
        "shard_trees": [s["trees"] for s in shards],
        "shard_cpu_seconds": [s["cpu_seconds"] for s in shards],
        "shard_fit_seconds": [s["seconds"] for s in shards],
        # the wall time if every process had a core of its own (CPU time does not count
        # the time a busy machine makes a process wait)
        "wall_seconds_with_free_cores": max(s["cpu_seconds"] for s in shards)
        + merged["cpu_seconds"],
        "peak_rss_mib": max([merged["peak_rss_mib"], *[s["peak_rss_mib"] for s in shards]]),
    }
    rows = args.images * {"none": 1, "flip": 2, "rotate": 4, "rotate_flip": 8}[args.augment]
    return {
        "benchmark": "rf_shards",
        "date": now(),
        "args": vars(args),
        "machine": machine_info(),
        "training_rows": rows,
        "features": args.side * args.side * 3,
        "float32_training_matrix_mib": rows * args.side * args.side * 3 * 4 / 2**20,
        "baseline": baseline,
        "orchard": orchard,
        "speedup": baseline["wall_seconds"] / orchard["wall_seconds"],
        "speedup_with_free_cores": baseline["cpu_seconds"]
        / orchard["wall_seconds_with_free_cores"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="training images (before 8x)")
    parser.add_argument("--side", type=int, default=32, help="image side in pixels")
    parser.add_argument("--trees", type=int, default=48, help="N, trees in the forest")
    parser.add_argument("--shards", type=int, default=2, help="tree shards = parallel workers")
    parser.add_argument(
        "--augment", default="rotate_flip", choices=["none", "flip", "rotate", "rotate_flip"]
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="smallest size, a smoke run")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.images, args.side, args.trees = 48, 12, 8
    report = run(args)
    base, orch = report["baseline"], report["orchard"]
    print(
        f"{report['training_rows']} training rows x {report['features']} features "
        f"({args.augment}), N = {args.trees} trees, {args.shards} shards; "
        f"{report['machine']['free_cores']} cores, {report['machine']['cpu']}"
    )
    print(f"{'path':<34} {'wall s':>8} {'test acc':>9} {'val acc':>8} {'OOB':>6} {'peak RSS':>10}")
    print(
        f"{'baseline: one forest, 1 process':<34} {base['wall_seconds']:>8.2f} "
        f"{base['test_acc']:>9.3f} {base['val_acc']:>8.3f} {base['oob_score']:>6.3f} "
        f"{base['peak_rss_mib']:>7.0f} MiB"
    )
    label = f"orchard: {args.shards} shards + merge"
    print(
        f"{label:<34} {orch['wall_seconds']:>8.2f} {orch['test_acc']:>9.3f} "
        f"{orch['val_acc']:>8.3f} {orch['oob_score']:>6.3f} {orch['peak_rss_mib']:>7.0f} MiB"
    )
    print(
        f"speed-up {report['speedup']:.2f}x wall (shards {orch['shard_wall_seconds']:.2f} s, "
        f"merge {orch['merge_seconds']:.2f} s); from CPU seconds, with a free core per "
        f"process: baseline {base['cpu_seconds']:.2f} s, orchard "
        f"{orch['wall_seconds_with_free_cores']:.2f} s = {report['speedup_with_free_cores']:.2f}x"
    )
    print(
        f"merged forest: {orch['trees']} trees {orch['shard_trees']}; float32 training matrix "
        f"{report['float32_training_matrix_mib']:.0f} MiB per process; load average "
        f"{report['machine']['load_average'][0]:.1f} on {report['machine']['free_cores']} cores"
    )
    print(f"wrote {write_json(args.output, report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
