"""What a tiny unit costs end to end, beside its own work, and how that grows with the grid.

    python bench/unit_overhead.py                    # 100 and 1,000 SVM points, 1 worker
    python bench/unit_overhead.py --units 600 --workers 2
    python bench/unit_overhead.py --units 20 --phase-repeat 20 --output /tmp/u.json  # smoke

An SVM campaign of ``--units`` grid points (one fold each, a PCA of 8 components over
16 x 16 images: each point's SVC fit takes a few milliseconds) runs on real
`orchard worker` processes (prefork, one task at a time each), the real Redis (the
filesystem broker when Redis is absent) and a SQLite store, once per entry of
``--units``. From the store:

- **slot per unit**: workers x (last point finished - first point started) / points,
  the time a worker slot spends per unit, all overhead included;
- **body**: the median ``fit_seconds`` the points recorded, their own work (the PCA
  slice, the SVC fit, its predictions): the baseline, what the unit costs without
  orchard around it;
- the ratio slot / body, and the gap on one worker between a point's ``finished_at``
  and the next point's ``started_at`` (acks, fetching, the stage check).

Then, in this process, the store calls a unit makes around its body (``start_unit``,
``finish_unit`` with as many predictions as a point records, and ``advance``'s
``stage_may_open``; also the body's own two artifact lookups, shown in parentheses:
they are part of its fit_seconds), each timed over ``--phase-repeat`` units of a
campaign of the same size, the model stage queued: what grows with the campaign's size
shows there. What remains of the slot is Celery's (the broker round trip, acks,
events, the prefork hand-off), the heartbeat thread's start and the worker's logging.

Writes bench/results/unit_overhead.json (or --output). A campaign that does not end DONE
stops the script with its first unsuccessful units' errors, and the workers' logs and the
SQLite store are copied to a folder it names (the run's own is temporary).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import cluster, unit_times, workers  # noqa: E402

from bench._report import machine_info, write_json, write_results  # noqa: E402

CAMPAIGN = """
name = "overhead"
seed = 0
folds = 2

[dataset]
kind = "synthetic"
root = "{root}"
seed = 5
train_per_class = {per_class}
test_per_class = 5
width = 32
height = 32

[preprocessing]
size = 32
shard_size = 512

[svm]
variant = "resize16"
n_components = 8
C = {C}

[blend]
families = ["svm"]
"""


def grid(points: int) -> list[float]:
    """``points`` distinct values of C: one SVM grid point (one unit) each."""
    return [round(0.5 + 0.01 * i, 4) for i in range(points)]


def per_unit(units: list[dict[str, Any]], fit_seconds: list[float], count: int) -> dict:
    """The end-to-end figures of one run from its units' times (``unit_times``) and the
    points' recorded ``fit_seconds``."""
    model = [u for u in units if u["family"] == "svm"]
    span = max(u["finished"] for u in model) - min(u["started"] for u in model)
    gaps = []
    for worker in {u["worker"] for u in model}:
        mine = sorted((u for u in model if u["worker"] == worker), key=lambda u: u["started"])
        gaps += [b["started"] - a["finished"] for a, b in zip(mine, mine[1:], strict=False)]
    slot = 1000 * span * count / len(model)
    body = 1000 * statistics.median(fit_seconds)
    return {
        "points": len(model),
        "workers": count,
        "model_stage_s": span,
        "slot_ms_per_unit": slot,
        "body_ms_median": body,
        "slot_over_body": slot / body,
        "gap_ms_median": 1000 * statistics.median(gaps) if gaps else None,
        "inside_ms_median": 1000 * statistics.median(u["finished"] - u["started"] for u in model),
    }


def keep_evidence(run_root: Path, logs: Path) -> Path:
    """A copy of a run's worker logs and SQLite store, outside the temporary folder that
    is deleted on exit, so that a run that did not end DONE can be read afterwards."""
    kept = Path(tempfile.mkdtemp(prefix="orchard-bench-overhead-failed-"))
    if logs.is_dir():
        shutil.copytree(logs, kept / "logs")
    for path in run_root.glob("store.db*"):  # with its -wal and -shm
        shutil.copy2(path, kept / path.name)
    return kept


def run_grid(root: Path, points: int, count: int, broker: str, per_class: int) -> dict:
    from db.store import Store
    from scheduler.api import submit
    from shared.errors import OrchardError

    campaign = root / "grid.toml"
    root.mkdir(parents=True, exist_ok=True)
    campaign.write_text(CAMPAIGN.format(root=root / "data", C=grid(points), per_class=per_class))
    with cluster(root / "run", broker) as c, workers(c, count) as running:
        run = submit(campaign, settings=c.settings)
        try:
            status = run.wait(timeout=1800, check=running.check)
        except OrchardError as exc:  # not finished in time, or a worker exited
            problem: str | None = str(exc)
        else:
            problem = None
            if status.campaign.state != "DONE":
                bad = [u for u in status.units if u.state != "SUCCESS"]
                lines = "".join(f"\n  {u.key} {u.state}: {u.error}" for u in bad[:5])
                problem = f"campaign {run.id} ended {status.campaign.state}:{lines}"
        if problem is None:
            store = Store(c.settings.database_url)
            try:
                results = store.results(run.id)
            finally:
                store.dispose()
            fits = [r.fit_seconds for k, r in results.items() if "/svm/" in k]
            units = unit_times(c.settings.database_url, run.id)
            return per_unit(units, fits, count) | {"broker": c.broker}
    # the workers have stopped: their logs are whole
    kept = keep_evidence(root / "run", running.logs)
    raise SystemExit(f"{problem}\n  the workers' logs and the store are kept in {kept}")


def store_phases(points: int, repeat: int, predictions: tuple[int, int]) -> dict[str, float]:
    """Median milliseconds of each store call a unit makes around its body, on a fresh
    SQLite campaign of ``points`` model units whose stage is queued."""
    from db.store import Artifact, Outcome, Prediction, Store
    from shared.plan import PREPROCESS, REPORT, TRAIN, UnitPlan

    with tempfile.TemporaryDirectory(prefix="orchard-bench-phases-") as tmp:
        store = Store(f"sqlite:///{Path(tmp) / 'store.db'}")
        store.upgrade()
        cid = "grid-1"
        shard = UnitPlan(f"{cid}/preprocess/s00000", "preprocess", PREPROCESS, None, {}, "s")
        models = [
            UnitPlan(f"{cid}/svm/p{i:06d}/f0", "svm", TRAIN, 0, {"C": c, "n_components": 8}, str(i))
            for i, c in enumerate(grid(points))
        ]
        report = UnitPlan(f"{cid}/report", "report", REPORT, None, {}, "r")
        manifest, pca = f"campaigns/{cid}/manifest.json", f"campaigns/{cid}/pca/resize16-f0.npz"
        store.create_campaign(
            cid,
            name="grid",
            source="grid.toml",
            digest="d",
            spec={"seed": 0},
            classes=["A", "B", "C"],
            units=[shard, *models, report],
            artifacts=[Artifact(path, "x", "0" * 64, 1, cid) for path in (manifest, pca)],
        )
        store.claim_for_queue([shard.key])
        store.start_unit(shard.key, worker="w", task_id=None)
        store.finish_unit(shard.key, Outcome(0.1))
        store.claim_for_queue([m.key for m in models])
        val, test = predictions
        outcome = Outcome(
            0.003,
            train_acc=0.9,
            val_acc=0.8,
            val_confusion=[[1, 0, 0], [0, 1, 0], [0, 0, 1]],
            extra={"support_vectors": 20},
            predictions={
                "val": [Prediction(f"v{j}.jpg", j % 3, (j + 1) % 3) for j in range(val)],
                "test": [Prediction(f"t{j}.jpg", -1, j % 3) for j in range(test)],
            },
        )
        times: dict[str, list[float]] = {}

        def timed(name: str, call: Callable[[], object]) -> None:
            started = time.perf_counter()
            call()
            times.setdefault(name, []).append(time.perf_counter() - started)

        for i, unit in enumerate(models[: min(repeat, len(models))]):
            key, holder = unit.key, f"d{i}"
            timed(
                "start_unit",
                lambda k=key, h=holder: store.start_unit(
                    k, worker="w", task_id=h, holder=h, max_attempts=3
                ),
            )
            # inside the body, so inside its fit_seconds: shown, not added to the store's part
            timed("(body's lookups)", lambda: [store.find_artifact(p) for p in (manifest, pca)])
            timed("finish_unit", lambda k=key, h=holder: store.finish_unit(k, outcome, holder=h))
            timed("stage_may_open", lambda: store.stage_may_open(cid))
        store.dispose()
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", default="100,1000", help="grid sizes (SVM points), each a run")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--per-class", type=int, default=20, help="training images per class")
    parser.add_argument("--phase-repeat", type=int, default=300, help="units timed in-process")
    parser.add_argument("--broker", choices=["auto", "redis", "filesystem"], default="auto")
    parser.add_argument("--output", type=Path, help="instead of bench/results/unit_overhead.json")
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.units.split(",")]
    # each point validates on its fold (half the training images) and predicts the test set
    predictions = (3 * args.per_class // 2, 3 * 5)

    rows = []
    with tempfile.TemporaryDirectory(prefix="orchard-bench-overhead-") as tmp:
        for points in sizes:
            root = Path(tmp) / f"grid-{points}"
            row = run_grid(root, points, args.workers, args.broker, args.per_class)
            row["store_ms"] = store_phases(points, args.phase_repeat, predictions)
            rows.append(row)
            print(
                f"  {points} points: {row['slot_ms_per_unit']:.1f} ms per unit, "
                f"body {row['body_ms_median']:.1f} ms",
                file=sys.stderr,
            )

    print(
        f"\nunit overhead: SVM grid points on {args.workers} worker(s), broker "
        f"{rows[0]['broker']}, SQLite"
    )
    print(
        f"{'points':>7} {'body ms':>8} {'slot ms':>8} {'slot/body':>9} {'gap ms':>7}  "
        "store calls per unit, ms (in-process)"
    )
    for row in rows:
        store_ms = row["store_ms"]
        row["store_ms_total"] = sum(ms for name, ms in store_ms.items() if name[0] != "(")
        row["rest_ms"] = row["slot_ms_per_unit"] - row["body_ms_median"] - row["store_ms_total"]
        print(
            f"{row['points']:>7} {row['body_ms_median']:>8.2f} {row['slot_ms_per_unit']:>8.2f} "
            f"{row['slot_over_body']:>9.2f} {row['gap_ms_median'] or 0:>7.2f}  "
            + ", ".join(f"{name} {ms:.2f}" for name, ms in store_ms.items())
            + f" = {row['store_ms_total']:.2f}; Celery and the rest {row['rest_ms']:.2f}"
        )
    first, last = rows[0], rows[-1]
    growth = last["slot_ms_per_unit"] / first["slot_ms_per_unit"]
    print(
        f"baseline (a point's own work, median): {last['body_ms_median']:.2f} ms; orchard's slot "
        f"per unit: {last['slot_ms_per_unit']:.2f} ms ({last['slot_over_body']:.2f}x)"
        + (
            f"; per-unit cost at {last['points']} points / at {first['points']}: {growth:.2f}x"
            if len(rows) > 1
            else ""
        )
    )
    payload = {
        "benchmark": "unit_overhead",
        "args": vars(args),
        "machine": machine_info(),
        "baseline": "the points' median fit_seconds (their own work)",
        "slot_over_body": last["slot_over_body"],
        "per_unit_growth_largest_over_smallest": growth,
        "rows": rows,
    }
    path = (
        write_json(args.output, payload) if args.output else write_results("unit_overhead", payload)
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
