"""orchard.fit_svm and orchard.fit_rf: one grid / sweep point on one fold each."""

from __future__ import annotations

from collections.abc import Callable

from db.store import Outcome
from shared.classic import FitOutcome, fit_rf_point, fit_svm_point
from workers.outcomes import model_outcome
from workers.tasks.base import UnitContext, unit_task


def _fit(ctx: UnitContext, fit: Callable[..., FitOutcome]) -> Outcome:
    params = ctx.unit.params
    data = ctx.fold_data(params["variant"])
    result = fit(*data.split(), params, seed=ctx.seed + ctx.unit.fold)
    return model_outcome(
        data.manifest,
        val_idx=data.val,
        test_idx=data.test,
        val_pred=result.val_pred,
        test_pred=result.test_pred,
        val_probs=result.val_probs,
        test_probs=result.test_probs,
        train_acc=result.train_acc,
        seconds=result.seconds,
        extra=result.extra,
    )


@unit_task("orchard.fit_svm")
def fit_svm(ctx: UnitContext) -> Outcome:
    return _fit(ctx, fit_svm_point)


@unit_task("orchard.fit_rf")
def fit_rf(ctx: UnitContext) -> Outcome:
    return _fit(ctx, fit_rf_point)
