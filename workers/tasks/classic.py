"""orchard.fit_svm and orchard.fit_rf: one grid / sweep point on one fold each."""

from __future__ import annotations

from collections.abc import Callable

from db.store import Outcome
from shared.classic import FitOutcome, fit_rf_point, fit_svm_point
from workers.data import load_variant
from workers.outcomes import model_outcome
from workers.tasks.base import UnitContext, unit_task


def _fit(ctx: UnitContext, fit: Callable[..., FitOutcome]) -> Outcome:
    manifest = ctx.manifest()
    params = ctx.unit.params
    images = load_variant(ctx.store, ctx.settings, manifest, params["variant"])
    train, val, test = manifest.fold_indices(ctx.unit.fold)
    labels = manifest.label_index
    result = fit(
        images[train],
        labels(train),
        images[val],
        labels(val),
        images[test],
        params,
        seed=ctx.seed + ctx.unit.fold,
    )
    return model_outcome(
        manifest,
        val_idx=val,
        test_idx=test,
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
