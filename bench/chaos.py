"""Chaos benchmark: a campaign survives workers killed or stopped at random, exactly once.

Runs a small campaign (CNN folds + SVM grid + RF sweep on synthetic data) twice on the
real Redis (a key prefix of its own) with three real `orchard worker` processes (one
gpu-queue worker, two cpu/preprocess/report workers):

1. undisturbed, as the baseline;
2. while a killer disrupts a random worker every ``--interval`` seconds (at most
   ``--kills`` times) and starts it again: SIGKILL of its process group (a crash, the
   OOM killer), or, for a ``--stops`` share of the disruptions, SIGTERM (a node being
   drained: Celery's warm shutdown, a GPU worker hands its fold back at its next
   checkpoint).

Then it checks the store of the disturbed run: every unit SUCCESS with exactly one
result row (duplicates must be 0, lost must be 0), the report present, and every
unit's accuracies and predictions, and the report's blends, equal to the undisturbed
run's (training is seeded; a CNN fold resumes from its checkpoint with its RNG state).

    python bench/chaos.py            # default size, a few minutes on 2 cores
    python bench/chaos.py --tiny     # smaller and fewer kills, well under a minute of campaign

Workers run with a short Redis visibility timeout so a killed worker's task comes back
within seconds (see README, Reliability). Writes bench/results/chaos.json.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/chaos.py` from anywhere
    sys.path.insert(0, str(REPO))

from bench._harness import (  # noqa: E402
    REDIS_URL,
    drop_redis_keys,
    machine_info,
    wait_for_pings,
    write_results,
)
from db.store import Store  # noqa: E402
from scheduler.api import CampaignRun, submit  # noqa: E402
from shared.settings import Settings  # noqa: E402
from tests.integration.workerpool import WorkerPool  # noqa: E402

CAMPAIGN = """
name = "chaos"
seed = {seed}
folds = 3

[dataset]
kind = "synthetic"
root = "{root}"
seed = {seed}
train_per_class = {per_class}
test_per_class = 6
width = 96
height = 72

[preprocessing]
size = 64
shard_size = 32

[cnn]
folds = {cnn_folds}
epochs = {epochs}
batch_size = 16
width = 0.25
image_size = 64
augment = true

[svm]
variant = "polar32"
n_components = [4, 8]
C = [1.0, 10.0]

[rf]
variant = "resize16"
n_estimators = [20, 40]

[blend]
families = ["cnn", "svm", "rf"]
"""

WORKERS = {
    "gpu": ("gpu", 1),
    "cpu1": ("cpu,preprocess,report", 1),
    "cpu2": ("cpu,preprocess,report", 1),
}


def fingerprint(store: Store, run: CampaignRun) -> dict[str, Any]:
    """What must not depend on kills: per unit (key without the campaign id) its
    accuracies and predictions, and the report's blends."""
    out: dict[str, Any] = {}
    results = store.results(run.id)
    for unit in run.status().units:
        name = unit.key.removeprefix(run.id + "/")
        result = results.get(unit.key)
        if result is None:
            out[name] = None
            continue
        if unit.family == "report":
            out[name] = {"blends": result.extra.get("blends")}
            continue
        if unit.family == "preprocess":
            out[name] = "ok"
            continue
        out[name] = {
            "val_acc": result.val_acc,
            "test_acc": result.test_acc,
            "val": [(p.image_id, p.pred) for p in store.predictions(unit.key, "val")],
            "test": [(p.image_id, p.pred) for p in store.predictions(unit.key, "test")],
        }
    return out


def check(store: Store, run: CampaignRun) -> dict[str, int]:
    status = run.status()
    units = status.units
    rows = store.count_rows(run.id)["results"]
    succeeded = sum(u.state == "SUCCESS" for u in units)
    return {
        "units": len(units),
        "succeeded": succeeded,
        # a unit not SUCCESS at the end, or SUCCESS without its result
        "lost": len(units)
        - succeeded
        + len({u.key for u in units if u.state == "SUCCESS"} - set(store.results(run.id))),
        # result rows beyond one per unit (the unique constraint should make this 0)
        "duplicates": rows - len(store.results(run.id)),
        "attempts": sum(u.attempts for u in units),
    }


def killer(
    pool: WorkerPool,
    stop: threading.Event,
    kills: int,
    interval: float,
    rng: random.Random,
    log: list[dict[str, Any]],
    stops: float,
) -> None:
    while len(log) < kills and not stop.wait(interval):
        name = rng.choice(sorted(WORKERS))
        how = "SIGTERM" if rng.random() < stops else "SIGKILL"
        if how == "SIGTERM":
            pool.terminate(name, timeout=120)  # a CPU worker finishes its units first
        else:
            pool.kill(name)
        pool.restart(name)
        log.append({"worker": name, "signal": how, "at": time.monotonic()})
        print(f"  {how} {name} (disruption {len(log)}/{kills})", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smaller campaign, 2 kills")
    parser.add_argument("--kills", type=int, default=None, help="most kills (default 5)")
    parser.add_argument("--interval", type=float, default=4.0, help="seconds between kills")
    parser.add_argument(
        "--stops",
        type=float,
        default=0.3,
        help="share of the disruptions that are SIGTERM instead of SIGKILL (default 0.3)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="CNN epochs (default 12)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep data, store and logs here (else a temporary folder, removed at the end)",
    )
    args = parser.parse_args()
    kills = args.kills if args.kills is not None else (2 if args.tiny else 5)
    epochs = args.epochs or (4 if args.tiny else 12)
    per_class = 20 if args.tiny else 40
    cnn_folds = 2 if args.tiny else 3

    root = args.workdir or Path(tempfile.mkdtemp(prefix="orchard-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    prefix = f"orchard-chaos-{secrets.token_hex(4)}:"
    env = {
        "ORCHARD_REDIS_PREFIX": prefix,
        "ORCHARD_VISIBILITY_TIMEOUT": "8",
        "ORCHARD_LEASE_SECONDS": "5",
        # kills must not make a unit give up: this bench is about surviving them
        "ORCHARD_MAX_ATTEMPTS": str(kills + 3),
    }
    os.environ.update(env)  # the submitting side talks to the same prefix
    settings = Settings(
        home=root / "home",
        broker_url=REDIS_URL,
        database_url=f"sqlite:///{root / 'store.db'}",
        artifacts=root / "artifacts",
    )
    store = Store(settings.database_url)
    store.upgrade()
    campaign = root / "chaos.toml"
    campaign.write_text(
        CAMPAIGN.format(
            seed=args.seed,
            root=root / "data",
            per_class=per_class,
            epochs=epochs,
            cnn_folds=cnn_folds,
        )
    )
    print(f"chaos: {root} (Redis prefix {prefix})", flush=True)
    log: list[dict[str, Any]] = []
    try:
        with WorkerPool(settings, warm=False) as pool:
            for name, (queues, concurrency) in WORKERS.items():
                pool.start(name, queues, concurrency=concurrency)
            # start-up is not campaign time
            wait_for_pings(settings, [f"{n}-" for n in WORKERS], pool.check, pool.logs)
            started = time.perf_counter()
            calm = submit(campaign, settings=settings)
            calm.wait(timeout=args.timeout, check=pool.check)
            calm_seconds = time.perf_counter() - started
            print(f"  undisturbed run {calm.id}: {calm_seconds:.1f} s", flush=True)

            stop = threading.Event()
            rng = random.Random(args.seed)
            thread = threading.Thread(
                target=killer,
                args=(pool, stop, kills, args.interval, rng, log, args.stops),
                daemon=True,
            )
            started = time.perf_counter()
            chaos = submit(campaign, settings=settings)
            thread.start()
            try:
                chaos.wait(timeout=args.timeout, check=pool.check)
            finally:
                stop.set()
                thread.join()
            chaos_seconds = time.perf_counter() - started
    finally:
        drop_redis_keys(prefix)

    counts = check(store, chaos)
    baseline_counts = check(store, calm)
    same = fingerprint(store, calm) == fingerprint(store, chaos)
    report = chaos.report_path()
    report_present = report is not None and report.exists()
    ok = counts["lost"] == 0 and counts["duplicates"] == 0 and same and report_present
    rows = [
        ("kills survived", "0", str(len(log)), ""),
        ("units", str(baseline_counts["units"]), str(counts["units"]), ""),
        ("task starts", str(baseline_counts["attempts"]), str(counts["attempts"]), ""),
        ("duplicates", str(baseline_counts["duplicates"]), str(counts["duplicates"]), ""),
        ("lost", str(baseline_counts["lost"]), str(counts["lost"]), ""),
        ("report present", "yes", "yes" if report_present else "NO", ""),
        ("results equal", "-", "yes" if same else "NO", ""),
        (
            "wall seconds",
            f"{calm_seconds:.1f}",
            f"{chaos_seconds:.1f}",
            f"{chaos_seconds / calm_seconds:.2f}x",
        ),
    ]
    print(f"\n{'':16} {'undisturbed':>12} {'with kills':>12} {'ratio':>8}")
    for what, base, mine, ratio in rows:
        print(f"{what:16} {base:>12} {mine:>12} {ratio:>8}")
    path = write_results(
        "chaos",
        {
            "machine": machine_info(),
            "args": vars(args) | {"kills": kills, "epochs": epochs, "workdir": str(root)},
            "environment": env,
            "undisturbed": {"campaign": calm.id, "seconds": calm_seconds, **baseline_counts},
            "chaos": {
                "campaign": chaos.id,
                "seconds": chaos_seconds,
                "kills_survived": len(log),
                "killed": [k["worker"] for k in log],
                "signals": [k["signal"] for k in log],
                **counts,
                "report_present": report_present,
                "results_equal_to_undisturbed": same,
            },
            "ok": ok,
        },
    )
    print(f"\n{'OK' if ok else 'FAILED'}: wrote {path}")
    if args.workdir is None and ok:
        shutil.rmtree(root, ignore_errors=True)
    elif not ok:
        print(f"store, logs and data kept in {root}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
