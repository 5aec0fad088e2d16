"""What the classical tasks (``workers.tasks.svm``, ``workers.tasks.rf``) share."""

from __future__ import annotations

from collections.abc import Callable

from db.store import Outcome
from shared.classic import FitOutcome
from workers.outcomes import model_outcome
from workers.tasks.base import UnitContext


def fit_classic(ctx: UnitContext, fit: Callable[..., FitOutcome]) -> Outcome:
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
