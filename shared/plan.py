"""From a validated campaign to units, and which units may run next.

A unit is one task's worth of work with a deterministic key
``<campaign>/<family>/<params hash>/f<fold>``: a re-delivered task finds its unit by
key and can never create a second result. Units run in stages: preprocessing shards,
then every model unit, then the merges of tree-sharded forests, then the report. The
store, not a chord counter, decides when a stage is complete (see ``next_actions``),
so at-least-once delivery cannot fire the report early or twice.

A random forest with ``tree_shards = k > 1`` is k ``rf_shard`` units in the model stage
(keys ``<rf unit key>/t<i>``, each training its share of the trees) and the ``rf`` unit
itself in the merge stage, which merges their trees into one forest and records the
result like an unsharded forest.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from shared.spec import Campaign, params_hash, sweep_points
from shared.variants import variant_shape

PREPROCESS, TRAIN, MERGE, REPORT = 0, 1, 2, 3

#: family -> (Celery task name, queue)
TASKS: dict[str, tuple[str, str]] = {
    "preprocess": ("orchard.preprocess_shard", "preprocess"),
    "cnn": ("orchard.train_cnn_fold", "gpu"),
    "svm": ("orchard.fit_svm", "cpu"),
    "rf": ("orchard.fit_rf", "cpu"),  # merges the tree shards when it has any
    "rf_shard": ("orchard.fit_rf_shard", "cpu"),
    "report": ("orchard.report", "report"),
}

PENDING, QUEUED, RUNNING, SUCCESS, FAILED = "PENDING", "QUEUED", "RUNNING", "SUCCESS", "FAILED"
CANCELLED = "CANCELLED"  # `orchard cancel`: will not run unless the campaign is resumed
#: Every state a unit may be in, in its order of life.
UNIT_STATES = (PENDING, QUEUED, RUNNING, SUCCESS, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCESS, FAILED, CANCELLED})

#: families whose units make a part of another unit's model, not a model result
PART_FAMILIES = frozenset({"rf_shard"})

_PART_SUFFIX = re.compile(r"/t\d+$")


def is_model_unit(family: str, stage: int) -> bool:
    """Whether a unit's result is a model result (what the report compares)."""
    return stage in (TRAIN, MERGE) and family not in PART_FAMILIES


def tree_shard_keys(key: str, shards: int) -> list[str]:
    """The keys of the tree-shard units of the ``rf`` unit ``key``."""
    return [f"{key}/t{k}" for k in range(shards)]


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
        if self.family == "preprocess" and self.params.get("decoder") == "nvjpeg":
            return "gpu"  # decoded on a GPU worker (shared.nvjpeg)
        return TASKS[self.family][1]


def unit_key(campaign_id: str, family: str, phash: str, fold: int | None) -> str:
    suffix = "" if fold is None else f"/f{fold}"
    return f"{campaign_id}/{family}/{phash}{suffix}"


def plan_units(
    campaign_id: str, campaign: Campaign, shards: list[tuple[int, int]]
) -> list[UnitPlan]:
    """Every unit of a campaign, in stage order, longest-running families first within one."""
    units: list[UnitPlan] = []
    merges: list[UnitPlan] = []
    decoder = campaign.preprocessing.decoder
    for index, (start, stop) in enumerate(shards):
        params: dict[str, Any] = {"shard": index, "start": start, "stop": stop}
        if decoder != "opencv":  # absent for OpenCV: the units' hashes stay as they were
            params["decoder"] = decoder
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
            shards = params.get("tree_shards", 1) if family == "rf" else 1
            for fold in range(section.folds):
                key = unit_key(campaign_id, family, phash, fold)
                whole = UnitPlan(key, family, TRAIN, fold, params, phash)
                if shards == 1:
                    units.append(whole)
                    continue
                for shard, shard_key in enumerate(tree_shard_keys(key, shards)):
                    # a hash of its own: shards of one point differ (in their trees), and
                    # whatever matches units by (family, hash, fold) must tell them apart
                    part = {**params, "shard": shard}
                    part_hash = params_hash({"family": "rf_shard", **part})
                    units.append(UnitPlan(shard_key, "rf_shard", TRAIN, fold, part, part_hash))
                merges.append(UnitPlan(key, family, MERGE, fold, params, phash))
    units.extend(merges)
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
    return longest_first(units, campaign.preprocessing.size)


#: the families that fit a PCA: (their campaign file section, the components' field)
FITS_PCA = {
    "svm": ("svm", "n_components"),
    "rf": ("rf", "pca_components"),
    "rf_shard": ("rf", "pca_components"),
}


def pca_width(params: dict[str, Any], field: str) -> int | None:
    """The most components a unit projects on: its ``field``, or the largest that its
    ``search`` tries (an SVM point with ``[svm.search] n_components``); None if no PCA."""
    searched = (params.get("search") or {}).get(field)
    return max(searched) if searched else params.get(field)


def data_problems(
    units: Iterable[UnitPlan],
    train_sizes: Mapping[int, int],
    cache_size: int,
    class_counts: Mapping[int, Mapping[str, int]] | None = None,
) -> list[str]:
    """What planned units ask of the data that it cannot give, one line each.

    ``train_sizes`` maps each fold to its number of training images, ``class_counts``
    to those of each class (an ``[svm.search]`` needs one of every class per search
    fold: at least ``folds`` of each). PCA cannot have
    more components than training rows or features: an SVM's ``n_components``, a
    forest's ``pca_components`` (its rows count the augmented copies; with
    ``select_scaling`` the features are known only once selected). Checked when a
    campaign is submitted, so a grid the dataset is too small for is refused before
    anything runs, instead of failing unit by unit.
    """
    from shared.forest import AUGMENT_COPIES  # scikit-learn's side of orchard, on demand

    problems: dict[tuple[str, int], str] = {}
    for unit in units:
        if unit.stage != TRAIN or unit.fold is None or unit.family not in FITS_PCA:
            continue
        search_folds = (unit.params.get("search") or {}).get("folds")
        if search_folds and class_counts is not None and unit.fold in class_counts:
            counts = class_counts[unit.fold]
            name = min(counts, key=lambda c: (counts[c], c))
            if counts[name] < search_folds and ("search", 0) not in problems:
                problems[("search", 0)] = (
                    f"[svm] search.folds = {search_folds} exceeds the {counts[name]} training "
                    f"images of class {name!r} in fold {unit.fold} (each search fold needs "
                    "images of every class)"
                )
        section, field = FITS_PCA[unit.family]
        k = pca_width(unit.params, field)
        if (unit.params.get("search") or {}).get(field):
            field = f"search.{field}"  # [svm.search] n_components: the largest it tries
        if k is None or (section, k) in problems:
            continue
        n_train = train_sizes[unit.fold]
        rows = n_train * AUGMENT_COPIES.get(unit.params.get("augment", "none"), 1)
        limit = rows
        if unit.params.get("select_scaling") is None:
            limit = min(rows, math.prod(variant_shape(unit.params["variant"], cache_size)))
        if k > limit:
            what = f"{n_train} training images" if rows == n_train else f"{rows} training rows"
            problems[(section, k)] = (
                f"[{section}] {field} = {k} exceeds what {what} of fold {unit.fold} "
                f"allow (at most {limit})"
            )
    return [problems[k] for k in sorted(problems)]  # the smallest value first


def estimated_cost(family: str, params: dict[str, Any], cache_size: int) -> float:
    """A unit's rough relative run time (operations per training image); 0 if unknown.

    Only the order it gives matters: a stage is sent longest first, so a big forest or
    a CNN fold starts at once and the short units fill the other workers around it,
    and the makespan approaches the critical path instead of ending on a long unit
    that happened to be sent last (bench/scheduling.py measures both).
    """
    if family == "cnn":
        return params["epochs"] * params["image_size"] ** 2 * (64 * params["width"]) ** 2
    try:
        height, width, channels = variant_shape(params["variant"], cache_size)
        features = height * width * channels
    except (KeyError, ValueError):
        features = cache_size * cache_size * 3
    if family in ("rf", "rf_shard"):
        trees = params.get("n_estimators", 100)
        if family == "rf_shard":
            trees /= params.get("tree_shards", 1)
        return trees * features**0.5 * 16  # sqrt(features) tried per split, ~log2(n) levels
    if family == "svm":
        # the PCA projection dominates; a search fits an SVC per combination and fold
        search = params.get("search") or {}
        fits = math.prod(len(search.get(name) or [0]) for name in ("n_components", "C", "gamma"))
        return (
            features
            * (pca_width(params, "n_components") or 1)
            * (1 + fits * search.get("folds", 0))
        )
    return 0.0


def longest_first(units: list[UnitPlan], cache_size: int) -> list[UnitPlan]:
    """Stages in order; within one, the costliest units first (ties keep file order)."""
    return sorted(units, key=lambda u: (u.stage, -estimated_cost(u.family, u.params, cache_size)))


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
    Likewise a merge unit fails, naming it, if one of its tree shards failed. The
    report runs once everything else is terminal, whatever failed.
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
        lost_parts: dict[str, list[UnitState]] = {}  # merge key -> its unfinished shards
        for u in earlier:
            if u.stage == TRAIN and u.state != SUCCESS and _PART_SUFFIX.search(u.key):
                lost_parts.setdefault(_PART_SUFFIX.sub("", u.key), []).append(u)
        for unit in by_stage[stage]:
            if unit.state != PENDING:
                continue
            if stage == TRAIN and failed_shards:
                more = f" (and {len(failed_shards) - 1} more)" if len(failed_shards) > 1 else ""
                fail.append((unit.key, f"preprocessing failed: {failed_shards[0]}{more}"))
            elif stage == MERGE and unit.key in lost_parts:
                part = lost_parts[unit.key][0]
                fail.append((unit.key, f"tree shard {part.state.lower()}: {part.key}"))
            else:
                enqueue.append(unit.key)
    return Actions(enqueue=enqueue, fail=fail)


def largest_n_components(spec: Mapping[str, Any], at_least: int = 0) -> int:
    """The largest ``n_components`` any point of the campaign's SVM grid uses (``spec``
    as stored): its own, or the largest its ``[svm.search]`` tries instead. Each fold's
    PCA is fitted once with it and every point slices it (a randomized fit, whose first
    components depend slightly on how many it finds): a point's numbers are the same in
    another campaign only where this is too."""

    def as_list(value: Any) -> list[Any]:
        return list(value) if isinstance(value, list | tuple) else [value]

    svm = spec.get("svm") or {}
    values = as_list(svm.get("n_components", []))
    searches = [s for s in as_list(svm.get("search")) if s]  # [None] without one
    if searches:
        # a point that searches n_components does not use its own; the others do
        values = [] if all(s.get("n_components") for s in searches) else values
        values += [v for s in searches for v in s.get("n_components") or ()]
    return max([int(v) for v in values] + [at_least])
