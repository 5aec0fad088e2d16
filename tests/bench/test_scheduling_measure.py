"""bench/scheduling.py's arithmetic on a hand-made schedule (the benchmark itself is
run by hand: it takes minutes and its numbers depend on the machine)."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO, load_bench


@pytest.fixture(scope="module")
def scheduling():  # noqa: ANN201
    sys.path.insert(0, str(REPO / "bench"))
    yield load_bench("scheduling")
    sys.path.remove(str(REPO / "bench"))


def unit(key, stage, worker, queued, started, finished):  # noqa: ANN001, ANN201
    return {
        "key": f"c/{key}",
        "family": key.split("/")[0],
        "stage": stage,
        "state": "SUCCESS",
        "worker": worker,
        "attempts": 1,
        "queued": queued,
        "started": started,
        "finished": finished,
    }


def test_critical_path_makespan_and_dispatch_gaps(scheduling) -> None:  # noqa: ANN001
    units = [
        unit("preprocess/s0", 0, "a", 0.0, 0.1, 1.0),
        # model stage sent at 1.0: a big unit on a, two short ones back to back on b
        unit("rf/big", 1, "a", 1.0, 1.02, 5.0),
        unit("rf/s1", 1, "b", 1.0, 1.01, 2.0),
        unit("rf/s2", 1, "b", 1.0, 2.005, 3.0),  # waited: 5 ms of dispatch overhead
        unit("report", 3, "b", 5.0, 5.1, 5.5),
    ]
    got = scheduling.measure(units)
    assert got["critical_path_s"] == pytest.approx(0.9 + 3.98 + 0.4)
    assert got["makespan_s"] == pytest.approx(5.5)
    assert got["makespan_over_critical_path"] == pytest.approx(5.5 / 5.28)
    # s1 -> s2 (5 ms) and preprocess -> big (20 ms: the finishing shard sent the stage)
    # count; s2 -> report does not: the report was not waiting when s2 finished
    assert got["dispatch_gaps"] == 2
    assert got["dispatch_ms_median"] == pytest.approx(12.5)
    assert got["first_dispatch_ms"] == pytest.approx(10.0)
    assert got["longest_unit"] == "rf/big"


def test_baseline_orders_reorder_only_the_model_stage(scheduling, tmp_path) -> None:  # noqa: ANN001
    from shared.plan import TRAIN
    from shared.spec import load_campaign

    path = tmp_path / "c.toml"
    path.write_text(scheduling.CAMPAIGN.format(root=tmp_path / "data", trees=[2, 3, 4, 500]))
    campaign = load_campaign(path)
    shards = [(0, 10), (10, 20)]
    orchard = scheduling.ordered("orchard", 0)("c-1", campaign, shards)
    shortest = scheduling.ordered("shortest", 0)("c-1", campaign, shards)
    trees = [u.params["n_estimators"] for u in orchard if u.stage == TRAIN]
    assert trees[0] == 500  # orchard sends the big forest first
    assert [u.params["n_estimators"] for u in shortest if u.stage == TRAIN] == sorted(trees)
    assert [u.key for u in shortest if u.stage != TRAIN] == [
        u.key for u in orchard if u.stage != TRAIN
    ]


def test_repeated_runs_pool_their_gaps(scheduling) -> None:  # noqa: ANN001
    def run(gaps: list[float], makespan: float) -> dict:
        return {
            "order": "orchard",
            "pool": "solo",
            "makespan_s": makespan,
            "critical_path_s": 1.0,
            "makespan_over_critical_path": makespan,
            "dispatch_gaps_ms": gaps,
            "longest_unit_started_after_s": 0.01,
        }

    row = scheduling.summarize([run([1.0, 2.0, 9.0], 1.1), run([3.0], 1.3), run([4.0], 1.2)])
    assert row["runs"] == 3
    assert row["dispatch_gaps"] == 5
    assert row["dispatch_ms_median"] == pytest.approx(3.0)  # of all 5 gaps, not of 3 medians
    assert row["makespan_s"] == pytest.approx(1.2)
    assert (row["order"], row["pool"]) == ("orchard", "solo")


def test_each_row_flavour_is_an_orchard_worker_option(scheduling) -> None:  # noqa: ANN001
    assert scheduling.worker_args("prefork") == ["--pool", "prefork"]
    assert scheduling.worker_args("solo/no-events") == ["--pool", "solo", "--without-task-events"]
