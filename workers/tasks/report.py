"""orchard.report: read the store, blend, and write the campaign's report.

Reads nothing but the store: every unit's state and result, and the test
predictions of each family's best point, which it blends by uniform vote (the
study's "five models vote for the final answer").
"""

from __future__ import annotations

import time
from collections import defaultdict
from statistics import mean

import numpy as np

from db.store import Artifact, Outcome, Result, Store, Unit
from shared.metrics import accuracy, confusion_matrix, majority_vote
from shared.plan import TRAIN
from shared.report import (
    BlendRow,
    Confusion,
    FamilyRow,
    ReportData,
    UnitSummary,
    write_report,
)
from workers.tasks.base import UnitContext, unit_task

FAMILY_TITLES = {"cnn": "CNN", "svm": "SVM", "rf": "RF"}


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return mean(present) if present else None


def best_point(units: list[Unit], results: dict[str, Result]) -> list[Unit]:
    """The folds of the parameter point with the highest mean validation accuracy."""
    points: dict[str, list[Unit]] = defaultdict(list)
    for unit in units:
        if unit.key in results:
            points[unit.params_hash].append(unit)
    if not points:
        return []

    def score(folds: list[Unit]) -> float:
        value = _mean([results[u.key].val_acc for u in folds])
        return -1.0 if value is None else value

    # max() keeps the first of equals, and dicts keep plan order: ties go to the earlier point
    return max(points.values(), key=score)


def vote(store: Store, members: list[Unit], n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, blended predictions) on the test split, aligned by image id."""
    per_member = [store.predictions(u.key, "test") for u in members]
    ids = [p.image_id for p in per_member[0]]
    for predictions in per_member[1:]:
        if [p.image_id for p in predictions] != ids:
            raise ValueError("blend members predicted different test images")
    labels = np.array([p.label for p in per_member[0]], dtype=np.int64)
    stacked = np.array([[p.pred for p in predictions] for predictions in per_member])
    if stacked.shape[1] == 0:
        return labels, np.empty(0, dtype=np.int64)
    return labels, majority_vote(stacked, n_classes)


def build_report_data(store: Store, campaign_id: str) -> ReportData:
    campaign = store.get_campaign(campaign_id)
    n_classes = len(campaign.classes)
    units = [u for u in store.units(campaign_id) if u.stage == TRAIN]
    results = store.results(campaign_id)
    blend_families = set(campaign.spec.get("blend", {}).get("families", ["cnn"]))

    summaries = []
    for u in units:
        r = results.get(u.key)
        summaries.append(
            UnitSummary(
                key=u.key,
                family=u.family,
                fold=u.fold,
                params=u.params,
                state=u.state,
                worker=u.worker,
                seconds=r.fit_seconds if r else None,
                train_acc=r.train_acc if r else None,
                val_acc=r.val_acc if r else None,
                test_acc=r.test_acc if r else None,
                error=u.error,
            )
        )

    families, blends, confusions = [], [], {}
    for family in dict.fromkeys(u.family for u in units):
        mine = [u for u in units if u.family == family]
        best = best_point(mine, results)
        title = FAMILY_TITLES.get(family, family.upper())
        families.append(
            FamilyRow(
                family=family,
                best_key=best[0].key if best else "",
                params=best[0].params if best else {},
                units=len(mine),
                succeeded=sum(u.key in results for u in mine),
                train_acc=_mean([results[u.key].train_acc for u in best]),
                val_acc=_mean([results[u.key].val_acc for u in best]),
                test_acc=_mean([results[u.key].test_acc for u in best]),
                fit_seconds=sum(results[u.key].fit_seconds for u in mine if u.key in results),
            )
        )
        if not best:
            continue
        labels, blended = vote(store, best, n_classes)
        test_labelled = bool((labels >= 0).any())
        what = f"{len(best)}-fold vote" if len(best) > 1 else "best point"
        if family in blend_families:
            blends.append(
                BlendRow(
                    name=f"{title} {what}",
                    family=family,
                    method="vote",
                    members=len(best),
                    test_acc=accuracy(labels, blended),
                )
            )
        if test_labelled:
            matrix = confusion_matrix(labels, blended, n_classes)
            confusions[family] = Confusion(f"{title} {what} (test)", matrix, "test")
        else:
            # no test labels: pool the out-of-fold validation predictions instead
            matrix = np.sum([results[u.key].val_confusion for u in best], axis=0).tolist()
            confusions[family] = Confusion(f"{title} best point (validation)", matrix, "val")

    return ReportData(
        campaign_id=campaign.id,
        campaign_name=campaign.spec.get("report", {}).get("title") or campaign.name,
        created_at=campaign.created_at.isoformat(timespec="seconds"),
        classes=campaign.classes,
        families=families,
        blends=blends,
        confusions=confusions,
        units=summaries,
    )


@unit_task("orchard.report")
def report(ctx: UnitContext) -> Outcome:
    started = time.perf_counter()
    data = build_report_data(ctx.store, ctx.campaign.id)
    files = write_report(data, ctx.campaign_dir / "report")
    written = [files.markdown, files.html, files.json, *files.figures.values()]
    return Outcome(
        fit_seconds=time.perf_counter() - started,
        extra={
            "report": ctx.relative(files.html.path),
            "blends": {b.name: b.test_acc for b in data.blends},
        },
        artifacts=[
            Artifact(
                ctx.relative(f.path), "report", f.sha256, f.size, ctx.campaign.id, ctx.unit.key
            )
            for f in written
        ],
    )
