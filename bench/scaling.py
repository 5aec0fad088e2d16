"""Horizontal scaling: one CPU sweep campaign with 1 and then 2 worker processes.

    python bench/scaling.py                 # tiny: 8 SVM/RF units, well under a minute
    python bench/scaling.py --size medium   # 24 heavier units
    python bench/scaling.py --workers 1,2,4 --broker filesystem

Each run gets a fresh store, artifact folder (so each preprocesses the images itself)
and broker namespace on the real Redis (the filesystem broker when Redis is absent),
and workers that consume every CPU queue with one task at a time, started and
answering before the campaign is submitted. The makespan is read from the store:
first unit queued to last unit finished. The speed-up is makespan(1 worker) /
makespan(n workers); on a machine with k idle cores the ideal is min(n, k).

Writes bench/results/scaling.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine_info, makespan, run_campaign, write_results  # noqa: E402

SIZES = {
    # images per class (train, test), image side, RF forest sizes, SVM grid
    "tiny": {
        "train": 20,
        "test": 5,
        "side": 64,
        "trees": [40, 80, 120, 160],
        "components": [8, 16],
        "C": [1.0, 10.0],
    },
    "medium": {
        "train": 60,
        "test": 15,
        "side": 96,
        "trees": [50, 100, 150, 200, 250, 300, 350, 400],
        "components": [8, 16, 32, 48],
        "C": [0.5, 1.0, 2.0, 10.0],
    },
}

CAMPAIGN = """
name = "scaling"
seed = 0
folds = 5

[dataset]
kind = "synthetic"
root = "{root}"
seed = 11
train_per_class = {train}
test_per_class = {test}
width = {side}
height = {side}

[preprocessing]
size = {side}
shard_size = 256

[svm]
variant = "polar32"
n_components = {components}
C = {C}

[rf]
variant = "resize32"
n_estimators = {trees}

[blend]
families = ["svm"]
"""


def run_once(root: Path, data: Path, campaign: Path, count: int, broker: str) -> dict:
    from scheduler.api import submit

    units, broker = run_campaign(root, broker, count, lambda s: submit(campaign, settings=s))
    model = [u for u in units if u["stage"] not in (0, max(x["stage"] for x in units))]
    return {
        "workers": count,
        "broker": broker,
        "units": len(units),
        "model_units": len(model),
        "makespan_s": makespan(units),
        "busy_s": sum(u["finished"] - u["started"] for u in units),
        "per_worker": {
            w: sum(1 for u in units if u["worker"] == w)
            for w in sorted({u["worker"] for u in units})
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--workers", default="1,2", help="worker counts to compare (first = base)")
    parser.add_argument("--broker", choices=["auto", "redis", "filesystem"], default="auto")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",")]
    size = SIZES[args.size]

    with tempfile.TemporaryDirectory(prefix="orchard-bench-scaling-") as tmp:
        tmp_path = Path(tmp)
        data = tmp_path / "data"
        campaign = tmp_path / "scaling.toml"
        campaign.write_text(
            CAMPAIGN.format(
                root=data,
                train=size["train"],
                test=size["test"],
                side=size["side"],
                trees=size["trees"],
                components=size["components"],
                C=size["C"],
            )
        )
        runs = []
        for count in counts:
            result = run_once(tmp_path / f"run-{count}", data, campaign, count, args.broker)
            runs.append(result)
            print(
                f"  {count} worker(s): makespan {result['makespan_s']:.2f} s "
                f"({result['model_units']} model units)",
                file=sys.stderr,
            )

    base = runs[0]["makespan_s"]
    print(f"\nscaling: CPU sweep campaign, {runs[0]['units']} units, broker {runs[0]['broker']}")
    print(f"{'workers':>8} {'makespan s':>11} {'speed-up':>9}  units per worker")
    for result in runs:
        speedup = base / result["makespan_s"]
        result["speedup"] = speedup
        print(
            f"{result['workers']:>8} {result['makespan_s']:>11.2f} {speedup:>9.2f}  "
            + ", ".join(str(n) for n in result["per_worker"].values())
        )
    info = machine_info()
    print(f"(baseline: {counts[0]} worker; {info['cores']} cores: {info['cpu']})")
    path = write_results(
        "scaling",
        {
            "benchmark": "scaling",
            "args": vars(args),
            "machine": info,
            "baseline_makespan_s": base,
            "runs": runs,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
