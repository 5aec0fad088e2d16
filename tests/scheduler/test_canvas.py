"""advance's shortcut: the aggregated counts say "nothing to do" only when reading
every unit (``next_actions``) would find nothing to do either."""

from __future__ import annotations

import itertools
import random

from scheduler.canvas import may_act
from shared.plan import TERMINAL, UnitState, next_actions

STATES = ("PENDING", "QUEUED", "RUNNING", "SUCCESS", "FAILED", "CANCELLED")


def counts(units: list[UnitState]) -> dict[int, dict[str, int]]:
    out: dict[int, dict[str, int]] = {}
    for u in units:
        if u.state not in TERMINAL:
            by_state = out.setdefault(u.stage, {})
            by_state[u.state] = by_state.get(u.state, 0) + 1
    return out


def campaigns(rng: random.Random, n: int) -> list[list[UnitState]]:
    """Random states over a preprocess / model (with a tree shard) / merge / report plan."""
    keys = [
        (0, "c/preprocess/s0"),
        (0, "c/preprocess/s1"),
        (1, "c/svm/a/f0"),
        (1, "c/rf/b/f0/t0"),
        (1, "c/rf/b/f0/t1"),
        (2, "c/rf/b/f0"),
        (3, "c/report"),
    ]
    out = []
    for _ in range(n):
        out.append([UnitState(k, stage, rng.choice(STATES)) for stage, k in keys])
    return out


def test_may_act_agrees_with_next_actions() -> None:
    seen = {True: 0, False: 0}
    for units in campaigns(random.Random(0), 3000):
        actions = next_actions(units)
        acts = bool(actions.enqueue or actions.fail) or all(u.state in TERMINAL for u in units)
        if not may_act(counts(units)):
            assert not acts, units  # the shortcut never skips real work
        seen[may_act(counts(units))] += 1
    assert seen[False] > 100 and seen[True] > 100  # both branches were exercised


def test_may_act_on_a_running_stage_and_on_the_next_one() -> None:
    stage0 = [UnitState(f"c/preprocess/s{i}", 0, "SUCCESS") for i in range(2)]
    model = [UnitState(f"c/svm/{i}/f0", 1, s) for i, s in enumerate(["SUCCESS", "RUNNING"])]
    report = [UnitState("c/report", 3, "PENDING")]
    assert not may_act(counts(stage0 + model + report))  # a model unit still runs
    done = [UnitState(u.key, u.stage, "SUCCESS") for u in model]
    assert may_act(counts(stage0 + done + report))  # the report may open
    finished = [UnitState(u.key, u.stage, "SUCCESS") for u in stage0 + done + report]
    assert may_act(counts(finished))  # the campaign may be closed
    for states in itertools.product(("QUEUED", "RUNNING"), repeat=2):
        queued = [UnitState(f"c/svm/{i}/f0", 1, s) for i, s in enumerate(states)]
        assert not may_act(counts(stage0 + queued + report))
