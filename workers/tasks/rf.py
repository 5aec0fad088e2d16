"""orchard.fit_rf: one random-forest sweep point on one fold (queue ``cpu``)."""

from __future__ import annotations

from db.store import Outcome
from shared.forest import fit_rf_point
from workers.tasks.base import UnitContext, unit_task
from workers.tasks.classic import fit_classic


@unit_task("orchard.fit_rf")
def fit_rf(ctx: UnitContext) -> Outcome:
    return fit_classic(ctx, fit_rf_point)
