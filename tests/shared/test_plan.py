"""Units with deterministic keys, and the store-driven stage gating of next_actions."""

from __future__ import annotations

from collections import Counter

import pytest

from shared.plan import (
    FAILED,
    MERGE,
    PENDING,
    PREPROCESS,
    QUEUED,
    REPORT,
    RUNNING,
    SUCCESS,
    TRAIN,
    UnitPlan,
    UnitState,
    is_model_unit,
    next_actions,
    plan_units,
    tree_shard_keys,
)
from shared.spec import CampaignError, parse_campaign

SHARDS = [(0, 64), (64, 128), (128, 150)]


def _campaign(**sections):
    raw = {
        "name": "t",
        "folds": 5,
        "dataset": {"kind": "synthetic"},
        "cnn": {"folds": 5, "epochs": 2},
        "svm": {"n_components": [20, 50], "C": [1.0, 10.0]},
        "rf": {"n_estimators": [100, 300]},
    }
    raw.update(sections)
    return parse_campaign(raw, source="<test>")


def _units(campaign_id: str = "t-0001", **sections) -> list[UnitPlan]:
    return plan_units(campaign_id, _campaign(**sections), SHARDS)


# ---------------------------------------------------------------- plan_units


def test_unit_counts_per_family():
    counts = Counter(u.family for u in _units())
    assert counts == {"preprocess": 3, "cnn": 5, "svm": 4, "rf": 2, "report": 1}


def test_keys_are_unique_and_deterministic():
    first, second = _units(), _units()
    keys = [u.key for u in first]
    assert len(set(keys)) == len(keys)
    assert keys == [u.key for u in second]
    assert all(k.startswith("t-0001/") for k in keys)


def test_other_campaign_id_gives_other_keys_same_hashes():
    a, b = _units("t-0001"), _units("t-0002")
    assert not {u.key for u in a} & {u.key for u in b}
    assert [u.params_hash for u in a] == [u.params_hash for u in b]


def test_different_params_give_different_hashes():
    svm = [u for u in _units() if u.family == "svm"]
    assert len({u.params_hash for u in svm}) == 4
    lr1 = {u.params_hash for u in _units(cnn={"epochs": 2, "lr": 0.01}) if u.family == "cnn"}
    lr2 = {u.params_hash for u in _units(cnn={"epochs": 2, "lr": 0.02}) if u.family == "cnn"}
    assert len(lr1) == len(lr2) == 1
    assert lr1 != lr2


def test_same_params_in_two_families_do_not_collide():
    units = _units(svm={"variant": "resize128"}, rf={"variant": "resize128"})
    svm = {u.params_hash for u in units if u.family == "svm"}
    rf = {u.params_hash for u in units if u.family == "rf"}
    assert not svm & rf


def test_cnn_units_are_one_per_fold_sharing_a_hash():
    cnn = [u for u in _units() if u.family == "cnn"]
    (phash,) = {u.params_hash for u in cnn}
    assert [u.fold for u in cnn] == [0, 1, 2, 3, 4]
    assert [u.key for u in cnn] == [f"t-0001/cnn/{phash}/f{i}" for i in range(5)]
    assert all(u.stage == TRAIN for u in cnn)


def test_preprocess_units_one_per_shard():
    pre = [u for u in _units() if u.family == "preprocess"]
    assert [u.key for u in pre] == [f"t-0001/preprocess/s{i:05d}" for i in range(3)]
    assert [(u.params["start"], u.params["stop"]) for u in pre] == SHARDS
    assert all(u.stage == PREPROCESS and u.fold is None for u in pre)


def test_single_report_unit_last():
    units = _units()
    reports = [u for u in units if u.family == "report"]
    assert len(reports) == 1
    assert units[-1] is reports[0]
    assert reports[0].key == "t-0001/report"
    assert reports[0].stage == REPORT


def test_stages_are_in_order():
    stages = [u.stage for u in _units()]
    assert stages == sorted(stages)


@pytest.mark.parametrize(
    ("family", "task", "queue"),
    [
        ("preprocess", "orchard.preprocess_shard", "preprocess"),
        ("cnn", "orchard.train_cnn_fold", "gpu"),
        ("svm", "orchard.fit_svm", "cpu"),
        ("rf", "orchard.fit_rf", "cpu"),
        ("report", "orchard.report", "report"),
    ],
)
def test_queue_and_task_per_family(family, task, queue):
    units = [u for u in _units() if u.family == family]
    assert units
    assert {(u.task, u.queue) for u in units} == {(task, queue)}


def test_nvjpeg_decoder_sends_the_shards_to_the_gpu_workers():
    pre = [u for u in _units(preprocessing={"decoder": "nvjpeg"}) if u.family == "preprocess"]
    assert {(u.task, u.queue, u.params["decoder"]) for u in pre} == {
        ("orchard.preprocess_shard", "gpu", "nvjpeg")
    }
    opencv = [u for u in _units(preprocessing={"decoder": "opencv"}) if u.family == "preprocess"]
    # the default keeps the params, and so the hashes and reuse, of earlier campaigns
    default = [u for u in _units() if u.family == "preprocess"]
    assert [u.params_hash for u in opencv] == [u.params_hash for u in default]
    assert all("decoder" not in u.params for u in opencv)
    assert {u.params_hash for u in pre}.isdisjoint(u.params_hash for u in opencv)


def test_disabled_family_has_no_units():
    units = _units(rf={"enabled": False})
    assert "rf" not in {u.family for u in units}


# ---------------------------------------------------------------- next_actions


def _states(units: list[UnitPlan], **by_family: str) -> list[UnitState]:
    """Every unit PENDING unless its family is given a state."""
    return [UnitState(u.key, u.stage, by_family.get(u.family, PENDING)) for u in units]


def _keys(units: list[UnitPlan], *families: str) -> list[str]:
    return [u.key for u in units if u.family in families]


def _failed(states: list[UnitState], *keys: str) -> list[UnitState]:
    """``states`` with the units ``keys`` FAILED."""
    return [UnitState(s.key, s.stage, FAILED if s.key in keys else s.state) for s in states]


MODEL = ("cnn", "svm", "rf")


def test_fresh_campaign_enqueues_only_shards():
    units = _units()
    actions = next_actions(_states(units))
    assert actions.enqueue == _keys(units, "preprocess")
    assert actions.fail == []


def test_nothing_of_stage_one_before_all_shards_terminal():
    units = _units()
    states = _states(units, preprocess=SUCCESS)
    last_shard = _keys(units, "preprocess")[-1]
    for in_flight in (PENDING, QUEUED, RUNNING):
        states = [
            UnitState(s.key, s.stage, in_flight if s.key == last_shard else s.state) for s in states
        ]
        actions = next_actions(states)
        expected = [last_shard] if in_flight == PENDING else []
        assert actions.enqueue == expected, in_flight
        assert actions.fail == []


def test_all_shards_done_enqueues_every_model_unit_not_report():
    units = _units()
    actions = next_actions(_states(units, preprocess=SUCCESS))
    assert actions.enqueue == _keys(units, *MODEL)
    assert "t-0001/report" not in actions.enqueue


def test_report_waits_for_every_model_unit():
    units = _units()
    states = _states(units, preprocess=SUCCESS, cnn=SUCCESS, svm=SUCCESS, rf=RUNNING)
    assert next_actions(states).enqueue == []
    states = _states(units, preprocess=SUCCESS, cnn=SUCCESS, svm=SUCCESS, rf=SUCCESS)
    assert next_actions(states).enqueue == ["t-0001/report"]


def test_failed_shard_fails_pending_model_units_naming_it():
    units = _units()
    bad_shard = _keys(units, "preprocess")[1]
    states = _failed(_states(units, preprocess=SUCCESS), bad_shard)
    actions = next_actions(states)
    assert actions.enqueue == []
    assert [key for key, _ in actions.fail] == _keys(units, *MODEL)
    assert all(bad_shard in reason for _, reason in actions.fail)


def test_several_failed_shards_are_counted_in_the_reason():
    units = _units()
    shards = _keys(units, "preprocess")
    actions = next_actions(_failed(_states(units, preprocess=SUCCESS), *shards[:2]))
    more = len(shards[:2]) - 1
    assert {reason for _, reason in actions.fail} == {
        f"preprocessing failed: {shards[0]} (and {more} more)"
    }


def test_report_becomes_ready_after_failures():
    units = _units()
    bad_shard = _keys(units, "preprocess")[0]
    done = _states(units, preprocess=SUCCESS, cnn=FAILED, svm=FAILED, rf=FAILED)
    states = _failed(done, bad_shard)
    actions = next_actions(states)
    assert actions.enqueue == ["t-0001/report"]
    assert actions.fail == []


def test_failed_model_units_do_not_block_report():
    units = _units()
    states = _states(units, preprocess=SUCCESS, cnn=FAILED, svm=SUCCESS, rf=FAILED)
    assert next_actions(states).enqueue == ["t-0001/report"]


def test_queued_and_running_units_are_not_enqueued_again():
    units = _units()
    model = _keys(units, *MODEL)
    queued, running = model[0], model[1]
    states = []
    for s in _states(units, preprocess=SUCCESS):
        state = {queued: QUEUED, running: RUNNING}.get(s.key, s.state)
        states.append(UnitState(s.key, s.stage, state))
    actions = next_actions(states)
    assert queued not in actions.enqueue
    assert running not in actions.enqueue
    assert actions.enqueue == model[2:]


def test_finished_report_is_not_enqueued_again():
    units = _units()
    states = _states(
        units, preprocess=SUCCESS, cnn=SUCCESS, svm=SUCCESS, rf=SUCCESS, report=SUCCESS
    )
    actions = next_actions(states)
    assert actions.enqueue == []
    assert actions.fail == []


def test_campaign_without_shards_goes_straight_to_models():
    units = plan_units("t-0001", _campaign(), [])
    actions = next_actions(_states(units))
    assert actions.enqueue == _keys(units, *MODEL)


# ---------------------------------------------------------------- tree-sharded forests


def _sharded(shards: int = 2, **sections) -> list[UnitPlan]:
    return _units(rf={"n_estimators": [100, 300], "tree_shards": shards}, **sections)


def test_unsharded_forest_has_no_merge_stage():
    units = _units()
    assert MERGE not in {u.stage for u in units}
    assert not [u for u in units if u.family == "rf_shard"]
    assert {u.stage for u in units if u.family == "rf"} == {TRAIN}


def test_sharded_forest_is_shard_units_then_a_merge_unit():
    units = _sharded(shards=3)
    rf = [u for u in units if u.family == "rf"]
    parts = [u for u in units if u.family == "rf_shard"]
    assert Counter(u.family for u in units) == {
        "preprocess": 3,
        "cnn": 5,
        "svm": 4,
        "rf_shard": 6,
        "rf": 2,
        "report": 1,
    }
    assert all(u.stage == MERGE for u in rf)
    assert all(u.stage == TRAIN and u.task == "orchard.fit_rf_shard" for u in parts)
    assert {(u.task, u.queue) for u in parts} == {("orchard.fit_rf_shard", "cpu")}
    for merge in rf:
        mine = [u for u in parts if u.key.startswith(merge.key + "/")]
        assert [u.key for u in mine] == tree_shard_keys(merge.key, 3)
        assert [u.key for u in mine] == [f"{merge.key}/t{k}" for k in range(3)]
        assert [u.params["shard"] for u in mine] == [0, 1, 2]
        # the key carries the point's hash; each shard has a hash of its own
        assert all(f"/rf/{merge.params_hash}/" in u.key for u in mine)
        assert len({u.params_hash for u in mine} | {merge.params_hash}) == 4
        assert all({**u.params, "shard": None} == {**merge.params, "shard": None} for u in mine)
        assert merge.key.count("/") == 3 and "/rf/" in merge.key
    stages = [u.stage for u in units]
    assert stages == sorted(stages)


def test_model_units_are_what_the_report_compares():
    units = _sharded()
    model = [u.key for u in units if is_model_unit(u.family, u.stage)]
    assert model == _keys(units, "cnn", "svm", "rf")
    assert not any(is_model_unit(u.family, u.stage) for u in units if u.family == "rf_shard")


def test_merge_waits_for_every_training_unit():
    units = _sharded()
    states = _states(units, preprocess=SUCCESS, cnn=RUNNING, svm=SUCCESS, rf_shard=SUCCESS)
    assert next_actions(states).enqueue == []
    states = _states(units, preprocess=SUCCESS, cnn=SUCCESS, svm=SUCCESS, rf_shard=SUCCESS)
    actions = next_actions(states)
    assert actions.enqueue == _keys(units, "rf")
    assert actions.fail == []


def test_shards_are_enqueued_with_the_other_model_units():
    units = _sharded()
    actions = next_actions(_states(units, preprocess=SUCCESS))
    assert actions.enqueue == _keys(units, "cnn", "svm", "rf_shard")


def test_failed_tree_shard_fails_its_merge_naming_it():
    units = _sharded()
    merges = _keys(units, "rf")
    bad = f"{merges[1]}/t1"
    states = [
        UnitState(s.key, s.stage, FAILED if s.key == bad else s.state)
        for s in _states(units, preprocess=SUCCESS, cnn=SUCCESS, svm=SUCCESS, rf_shard=SUCCESS)
    ]
    actions = next_actions(states)
    assert actions.enqueue == [merges[0]]
    assert actions.fail == [(merges[1], f"tree shard failed: {bad}")]


def test_report_waits_for_merges_and_runs_after_failed_ones():
    units = _sharded()
    done = {"preprocess": SUCCESS, "cnn": SUCCESS, "svm": SUCCESS, "rf_shard": SUCCESS}
    assert next_actions(_states(units, **done, rf=RUNNING)).enqueue == []
    assert next_actions(_states(units, **done, rf=SUCCESS)).enqueue == ["t-0001/report"]
    assert next_actions(_states(units, **done, rf=FAILED)).enqueue == ["t-0001/report"]


def test_failed_preprocessing_reaches_merges_through_their_shards():
    units = _sharded()
    bad_shard = _keys(units, "preprocess")[0]
    states = _failed(_states(units, preprocess=SUCCESS), bad_shard)
    first = next_actions(states)
    assert [k for k, _ in first.fail] == _keys(units, "cnn", "svm", "rf_shard")
    failed = dict(first.fail)
    states = _failed(states, *failed)
    second = next_actions(states)
    assert [k for k, _ in second.fail] == _keys(units, "rf")
    assert all(reason.startswith("tree shard failed: ") for _, reason in second.fail)


def test_tree_shards_beyond_trees_is_a_campaign_error():
    with pytest.raises(CampaignError, match=r"\[rf\].*tree_shards \(4\) must not exceed"):
        _units(rf={"n_estimators": [10, 3], "tree_shards": 4})


def test_model_units_are_sent_longest_first(tmp_path):
    """A big forest listed last is sent first: it must not start after the short ones."""
    from shared.plan import TRAIN, estimated_cost
    from tests.conftest import uneven_units

    units = uneven_units(tmp_path)
    model = [u for u in units if u.stage == TRAIN]
    costs = [estimated_cost(u.family, u.params, 64) for u in model]
    assert costs == sorted(costs, reverse=True)
    assert model[0].family == "rf" and model[0].params["n_estimators"] == 500
    # within one sweep, more trees or more components cost more
    assert estimated_cost("rf", {"variant": "resize16", "n_estimators": 10}, 64) > estimated_cost(
        "rf", {"variant": "resize16", "n_estimators": 5}, 64
    )
    assert estimated_cost("svm", {"variant": "polar32", "n_components": 8}, 64) > estimated_cost(
        "svm", {"variant": "polar32", "n_components": 4}, 64
    )
    # a point that searches fits an SVC per combination and search fold: it costs more
    search = {"folds": 3, "C": [1.0, 2.0], "gamma": [1e-3, 1e-2]}
    assert estimated_cost(
        "svm", {"variant": "polar32", "n_components": 4, "search": search}, 64
    ) > estimated_cost("svm", {"variant": "polar32", "n_components": 8}, 64)
    # stages stay in order around it
    assert [u.stage for u in units] == sorted(u.stage for u in units)
