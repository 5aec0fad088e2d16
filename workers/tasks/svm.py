"""orchard.fit_svm: one PCA + RBF SVM grid point on one fold (queue ``cpu``)."""

from __future__ import annotations

from db.store import Outcome
from shared.svm import fit_svm_point
from workers.tasks.base import UnitContext, unit_task
from workers.tasks.classic import fit_classic


@unit_task("orchard.fit_svm")
def fit_svm(ctx: UnitContext) -> Outcome:
    return fit_classic(ctx, fit_svm_point)
