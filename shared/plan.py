"""From a validated campaign to units, and which units may run next.

A unit is one task's worth of work with a deterministic key
``<campaign>/<family>/<params hash>/f<fold>``: a re-delivered task finds its unit by
key and can never create a second result. Units run in three stages: preprocessing
shards, then every model unit, then the report. The store, not a chord counter,
decides when a stage is complete (see ``next_actions``), so at-least-once delivery
cannot fire the report early or twice.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from shared.spec import Campaign, params_hash, sweep_points

PREPROCESS, TRAIN, REPORT = 0, 1, 2

#: family -> (Celery task name, queue)
TASKS: dict[str, tuple[str, str]] = {
    "preprocess": ("orchard.preprocess_shard", "preprocess"),
    "cnn": ("orchard.train_cnn_fold", "gpu"),
    "svm": ("orchard.fit_svm", "cpu"),
    "rf": ("orchard.fit_rf", "cpu"),
    "report": ("orchard.report", "report"),
}

PENDING, QUEUED, RUNNING, SUCCESS, FAILED = "PENDING", "QUEUED", "RUNNING", "SUCCESS", "FAILED"
TERMINAL = frozenset({SUCCESS, FAILED})


@dataclass(frozen=True, slots=True)
class UnitPlan:
    key: str
    family: str
    stage: int
    fold: int | None
    params: dict[str, Any]
    params_hash: str

    @property
    def task(self) -> str:
        return TASKS[self.family][0]

    @property
    def queue(self) -> str:
        return TASKS[self.family][1]


def unit_key(campaign_id: str, family: str, phash: str, fold: int | None) -> str:
    suffix = "" if fold is None else f"/f{fold}"
    return f"{campaign_id}/{family}/{phash}{suffix}"


def plan_units(
    campaign_id: str, campaign: Campaign, shards: list[tuple[int, int]]
) -> list[UnitPlan]:
    """Every unit of a campaign, longest-running families first within a stage."""
    units: list[UnitPlan] = []
    for index, (start, stop) in enumerate(shards):
        params = {"shard": index, "start": start, "stop": stop}
        units.append(
            UnitPlan(
                key=f"{campaign_id}/preprocess/s{index:05d}",
                family="preprocess",
                stage=PREPROCESS,
                fold=None,
                params=params,
                params_hash=params_hash(params),
            )
        )
    for family, section in campaign.families():
        for params in sweep_points(section):
            phash = params_hash({"family": family, **params})
            for fold in range(section.folds):
                units.append(
                    UnitPlan(
                        key=unit_key(campaign_id, family, phash, fold),
                        family=family,
                        stage=TRAIN,
                        fold=fold,
                        params=params,
                        params_hash=phash,
                    )
                )
    units.append(
        UnitPlan(
            key=f"{campaign_id}/report",
            family="report",
            stage=REPORT,
            fold=None,
            params={},
            params_hash=params_hash({}),
        )
    )
    return units


@dataclass(frozen=True, slots=True)
class UnitState:
    key: str
    stage: int
    state: str


@dataclass(frozen=True, slots=True)
class Actions:
    enqueue: list[str]
    fail: list[tuple[str, str]]  # (key, reason): units that can no longer run


def next_actions(units: Iterable[UnitState]) -> Actions:
    """Which pending units to enqueue (or give up on) given every unit's state.

    A stage opens when every unit of the stages before it is terminal. Model units
    need every preprocessing shard: if one failed for good they fail too, naming it.
    The report runs once everything else is terminal, whatever failed.
    """
    units = list(units)
    by_stage: dict[int, list[UnitState]] = {}
    for unit in units:
        by_stage.setdefault(unit.stage, []).append(unit)
    enqueue: list[str] = []
    fail: list[tuple[str, str]] = []
    for stage in sorted(by_stage):
        earlier = [u for u in units if u.stage < stage]
        if any(u.state not in TERMINAL for u in earlier):
            break
        failed_shards = [u.key for u in earlier if u.stage == PREPROCESS and u.state == FAILED]
        for unit in by_stage[stage]:
            if unit.state != PENDING:
                continue
            if stage == TRAIN and failed_shards:
                fail.append((unit.key, f"preprocessing failed: {failed_shards[0]}"))
            else:
                enqueue.append(unit.key)
    return Actions(enqueue=enqueue, fail=fail)
