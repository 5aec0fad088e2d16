"""Scheduling: dispatch overhead per unit, and makespan / critical path, by send order.

    python bench/scheduling.py                       # tiny: 40 short forests + 1 big one
    python bench/scheduling.py --short 120 --long-trees 4000 --orders shortest,random,orchard
    python bench/scheduling.py --pools prefork       # skip the comparison rows
    python bench/scheduling.py --repeat 5            # 5 interleaved runs of each row

A synthetic campaign of many short units (random forests of a few trees) and one long
one (a big forest), listed in the campaign file shortest first, runs on the real Redis
(the filesystem broker when Redis is absent) with ``--workers`` worker processes of
one task each. It runs once per send order:

- ``shortest``: model units sent shortest first (the big forest last): the baseline;
- ``random``: a seeded shuffle;
- ``orchard``: the order ``shared.plan.plan_units`` gives, which puts the longest
  units first (``estimated_cost``) so the big forest overlaps the short ones.

Every order runs on orchard's default CPU workers (prefork pool, task events on); the
orchard order runs once more per other ``--pools`` entry: ``solo`` (``orchard worker
--pool solo``: one process, no parent-child hand-off, but a killed worker's unit waits
for the visibility timeout instead of being requeued at once) and
``prefork/no-events`` (``--without-task-events``: no task events until a monitor such
as Flower enables them).

With ``--repeat N`` the rows run N times, interleaved (so a machine that gets busier
slows every row alike); each row then shows the medians over its runs, its dispatch
figures over the gaps of all its runs.

Measured from the store's unit timestamps:

- makespan: first unit queued to last unit finished;
- critical path: longest preprocessing unit + longest model unit + report, each by
  its own started -> finished time (no schedule can beat it);
- dispatch overhead per unit: on one worker, the gap between finishing a unit and
  starting the next one that was already waiting (ack, the next stage check, fetching
  from Redis, marking it RUNNING); target <= 5 ms;
- first dispatch: the model stage's send to its first unit starting.

Writes bench/results/scheduling.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine_info, makespan, run_campaign, write_results  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Callable

    from scheduler.api import CampaignRun
    from shared.plan import UnitPlan
    from shared.settings import Settings

CAMPAIGN = """
name = "scheduling"
seed = 0
folds = 5

[dataset]
kind = "synthetic"
root = "{root}"
seed = 17
train_per_class = 30
test_per_class = 5
width = 48
height = 48

[preprocessing]
size = 48
shard_size = 512

[rf]
variant = "resize16"
n_estimators = {trees}

[blend]
families = ["rf"]
"""


def ordered(order: str, seed: int) -> Callable[..., list[UnitPlan]]:
    """plan_units, with the model stage re-ordered for the baselines."""
    from shared.plan import TRAIN, plan_units

    def plan(*args: Any, **kwargs: Any) -> list[UnitPlan]:
        units = plan_units(*args, **kwargs)
        if order == "orchard":
            return units
        model = [u for u in units if u.stage == TRAIN]
        if order == "shortest":
            model.sort(key=lambda u: u.params["n_estimators"])
        else:
            random.Random(seed).shuffle(model)
        it = iter(model)
        return [next(it) if u.stage == TRAIN else u for u in units]

    return plan


def run_once(
    root: Path, campaign: Path, order: str, count: int, broker: str, seed: int, pool: str
) -> dict:
    import scheduler.api as api

    def submit_in_order(settings: Settings) -> CampaignRun:
        original = api.plan_units
        api.plan_units = ordered(order, seed)
        try:
            return api.submit(campaign, settings=settings)
        finally:
            api.plan_units = original

    units, broker = run_campaign(root, broker, count, submit_in_order, worker_args(pool))
    return measure(units) | {"order": order, "pool": pool, "broker": broker, "workers": count}


#: ``--pools`` entries: `orchard worker` flavours
FLAVOURS = ("prefork", "solo", "prefork/no-events", "solo/no-events")


def worker_args(flavour: str) -> list[str]:
    """`orchard worker` arguments for a ``--pools`` entry, e.g. ``prefork/no-events``."""
    pool, _, events = flavour.partition("/")
    return ["--pool", pool] + (["--without-task-events"] if events == "no-events" else [])


def measure(units: list[dict[str, Any]]) -> dict[str, Any]:
    last = max(u["stage"] for u in units)

    def longest(stage_units: list[dict[str, Any]]) -> float:
        return max((u["finished"] - u["started"] for u in stage_units), default=0.0)

    preprocess = [u for u in units if u["stage"] == 0]
    model = [u for u in units if 0 < u["stage"] < last]
    report = [u for u in units if u["stage"] == last]
    critical = longest(preprocess) + longest(model) + longest(report)
    gaps = []
    for worker in {u["worker"] for u in units}:
        mine = sorted((u for u in units if u["worker"] == worker), key=lambda u: u["started"])
        for prev, nxt in zip(mine, mine[1:], strict=False):
            if nxt["queued"] <= prev["finished"]:  # it was waiting: the gap is all overhead
                gaps.append(nxt["started"] - prev["finished"])
    span = makespan(units)
    big = max(model, key=lambda u: u["finished"] - u["started"])
    return {
        "units": len(units),
        "model_units": len(model),
        "makespan_s": span,
        "critical_path_s": critical,
        "makespan_over_critical_path": span / critical,
        "dispatch_gaps": len(gaps),
        "dispatch_gaps_ms": [round(1000 * g, 3) for g in gaps],
        "dispatch_ms_median": 1000 * statistics.median(gaps) if gaps else None,
        "dispatch_ms_mean": 1000 * statistics.fmean(gaps) if gaps else None,
        "dispatch_ms_p90": 1000 * statistics.quantiles(gaps, n=10)[-1] if len(gaps) > 1 else None,
        "first_dispatch_ms": 1000
        * (min(u["started"] for u in model) - min(u["queued"] for u in model)),
        "longest_unit": big["key"].split("/", 1)[1],
        "longest_unit_started_after_s": big["started"] - min(u["queued"] for u in model),
        "attempts_max": max(u["attempts"] for u in units),
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of the table from the repeated runs of one order and pool."""
    gaps = [g for r in runs for g in r["dispatch_gaps_ms"]]

    def median(name: str) -> float:
        return statistics.median(r[name] for r in runs)

    return {
        "order": runs[0]["order"],
        "pool": runs[0]["pool"],
        "runs": len(runs),
        "makespan_s": median("makespan_s"),
        "critical_path_s": median("critical_path_s"),
        "makespan_over_critical_path": median("makespan_over_critical_path"),
        "dispatch_gaps": len(gaps),
        "dispatch_ms_median": statistics.median(gaps) if gaps else None,
        "dispatch_ms_p90": statistics.quantiles(gaps, n=10)[-1] if len(gaps) > 1 else None,
        "longest_unit_started_after_s": median("longest_unit_started_after_s"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=40, help="short units (forests of 2+ trees)")
    parser.add_argument("--long-trees", type=int, default=1500, help="trees of the big forest")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--orders", default="shortest,orchard", help="of shortest,random,orchard")
    parser.add_argument(
        "--pools",
        default="prefork,solo,prefork/no-events",
        help="worker flavours, of " + ",".join(FLAVOURS) + ": the first runs every order "
        "(prefork is orchard's default), the others only the orchard order",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each row, interleaved")
    parser.add_argument("--broker", choices=["auto", "redis", "filesystem"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    orders = args.orders.split(",")
    if unknown := set(orders) - {"shortest", "random", "orchard"}:
        parser.error(f"--orders: unknown {sorted(unknown)}")
    pools = args.pools.split(",")
    if unknown := set(pools) - set(FLAVOURS):
        parser.error(f"--pools: unknown {sorted(unknown)}")
    configs = [(order, pools[0]) for order in orders]
    configs += [("orchard", pool) for pool in pools[1:]]
    # sweep points in the file shortest first: forests of 2, 3, ... trees, then the big one
    trees = list(range(2, 2 + args.short)) + [args.long_trees]

    runs = []
    with tempfile.TemporaryDirectory(prefix="orchard-bench-scheduling-") as tmp:
        tmp_path = Path(tmp)
        campaign = tmp_path / "scheduling.toml"
        campaign.write_text(CAMPAIGN.format(root=tmp_path / "data", trees=trees))
        for i, (order, pool) in enumerate(configs * args.repeat):
            result = run_once(
                tmp_path / f"run-{i}-{order}-{pool.replace('/', '-')}",
                campaign,
                order,
                args.workers,
                args.broker,
                args.seed,
                pool,
            )
            runs.append(result)
            print(
                f"  {order} ({pool}): makespan {result['makespan_s']:.2f} s, critical path "
                f"{result['critical_path_s']:.2f} s",
                file=sys.stderr,
            )

    print(
        f"\nscheduling: {runs[0]['model_units']} model units ({len(trees) - 1} short forests, "
        f"one of {args.long_trees} trees) on {args.workers} workers, broker {runs[0]['broker']}"
    )
    header = (
        f"{'order':<9} {'pool':<17} {'makespan s':>10} {'crit. path s':>12} {'ratio':>6} "
        f"{'dispatch ms':>11} {'p90 ms':>7} {'big unit starts s':>17}"
    )
    print(header)
    rows = [summarize([r for r in runs if (r["order"], r["pool"]) == c]) for c in configs]
    for r in rows:
        print(
            f"{r['order']:<9} {r['pool']:<17} {r['makespan_s']:>10.2f} "
            f"{r['critical_path_s']:>12.2f} "
            f"{r['makespan_over_critical_path']:>6.2f} {r['dispatch_ms_median'] or 0:>11.1f} "
            f"{r['dispatch_ms_p90'] or 0:>7.1f} {r['longest_unit_started_after_s']:>17.2f}"
        )
    base = rows[0]
    mine = next((r for r in rows if r["order"] == "orchard"), rows[-1])
    speedup = base["makespan_s"] / mine["makespan_s"]
    print(
        f"makespan {base['order']} / {mine['order']}: {speedup:.2f}x; "
        f"{mine['order']} makespan / critical path {mine['makespan_over_critical_path']:.2f} "
        f"(target <= 1.15); dispatch overhead median {mine['dispatch_ms_median'] or 0:.1f} ms "
        f"with the {mine['pool']} pool (target <= 5 ms)"
        + "".join(
            f"; {r['pool']} pool {r['dispatch_ms_median'] or 0:.1f} ms"
            for r in rows
            if r["order"] == "orchard" and r is not mine
        )
        + (f" (medians of {args.repeat} runs each)" if args.repeat > 1 else "")
    )
    path = write_results(
        "scheduling",
        {
            "benchmark": "scheduling",
            "args": vars(args),
            "machine": machine_info(),
            "trees": trees,
            "baseline": base["order"],
            "makespan_ratio_baseline_over_orchard": speedup,
            "rows": rows,
            "runs": runs,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
