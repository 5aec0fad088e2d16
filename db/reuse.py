"""``submit --reuse``: a campaign's units filled from their twins, identical units of
earlier campaigns that already succeeded, copied in the store without running.

Runs inside :meth:`db.store.Store.reuse_finished`'s transaction, which locks the twin
campaigns FOR SHARE here: a delete of one (FOR UPDATE) waits for the copy, or the copy
for the delete.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.orm import Session

from db.models import (
    ArtifactRow,
    CampaignRow,
    MetricRow,
    PredictionRow,
    ResultRow,
    UnitRow,
)
from db.statements import KEYS_PER_STATEMENT, chunks, table_of
from db.values import DELETING
from shared.plan import PENDING, PREPROCESS, REPORT, SUCCESS, largest_n_components
from shared.spec import formats_alike


def reuse_finished_without_commit(
    s: Session,
    campaign: CampaignRow,
    *,
    equivalent_manifests: Sequence[str],
    present: Callable[[str, int], bool] | None,
    now: Callable[[], datetime],
) -> dict[str, str]:
    """Fill ``campaign``'s model units from identical units that already succeeded.

    Identical means same family, parameters (hash) and fold, in a campaign with the
    same seed and a byte-identical manifest (same images, labels, splits and folds,
    same preprocessing), or the same data digest (that manifest but for where the
    dataset lies: the same images mounted elsewhere), or one whose manifest's sha256
    is in ``equivalent_manifests`` (the same data as an earlier orchard wrote it), and
    a campaign format whose units compute alike (``shared.spec.formats_alike``); for an
    SVM point, a grid of the same largest ``n_components`` too (its PCA's). The
    result, predictions and metrics are copied (the result's ``extra["reused_from"]``
    names the unit that ran, whose artifacts stay where they are) and the unit is
    marked SUCCESS without running. Returns new key -> that unit's key.

    With ``present`` (a recorded path and size -> whether that file is there), a
    unit is copied only from a twin whose files are: the model files of the unit
    that ran and its campaign's manifest. The store restored from a backup newer
    than the artifact folder, or from before an `orchard delete`, records campaigns
    whose files are gone; the newest twin whose files are there is taken instead.

    ``now`` gives the time the copies are stamped with, asked only where there are
    some (on PostgreSQL it asks the server).
    """
    manifest_sha = s.scalar(
        select(ArtifactRow.sha256).where(
            ArtifactRow.campaign_id == campaign.id, ArtifactRow.kind == "manifest"
        )
    )
    if manifest_sha is None:
        return {}
    same_data = CampaignRow.id.in_(
        select(ArtifactRow.campaign_id).where(
            ArtifactRow.kind == "manifest",
            ArtifactRow.sha256.in_([manifest_sha, *equivalent_manifests]),
        )
    )
    if campaign.data_digest is not None:
        same_data = or_(same_data, CampaignRow.data_digest == campaign.data_digest)
    twins = [
        c
        for c in s.scalars(
            select(CampaignRow)
            .where(
                CampaignRow.id != campaign.id,
                # re-checked on the locked row: a delete that committed DELETING
                # while this waited for its lock is seen (its manifest's record,
                # read in this statement's snapshot, may still look there)
                CampaignRow.state != DELETING,
                same_data,
                # computed as this campaign's would be: a format raised since
                # means a unit computes otherwise now (unless it only added to
                # the report)
                CampaignRow.format_version.in_(sorted(formats_alike(campaign.format_version))),
            )
            # FOR SHARE: a delete of a twin (FOR UPDATE) waits for this copy and
            # then sees it, or this waits for the delete and skips the twin
            .with_for_update(read=True)
        )
        if c.spec.get("seed") == campaign.spec.get("seed") and c.state != DELETING
    ]
    if not twins:
        return {}
    # an SVM point slices its fold's PCA, fitted with the grid's largest width: a
    # point of a grid whose largest differs has (slightly) other components
    pca_width = largest_n_components(campaign.spec)
    svm_twins = {c.id for c in twins if largest_n_components(c.spec) == pca_width}
    wanted = s.scalars(
        select(UnitRow).where(
            UnitRow.campaign_id == campaign.id,
            UnitRow.stage > PREPROCESS,  # model units and forest merges
            UnitRow.stage < REPORT,
            UnitRow.state == PENDING,
        )
    ).all()
    candidates: dict[tuple[str, str, int | None], list[UnitRow]] = {}
    hashes = sorted({w.params_hash for w in wanted})
    for chunk in chunks(hashes, KEYS_PER_STATEMENT):  # a hash is in one chunk
        for row in s.scalars(
            select(UnitRow)
            .where(
                UnitRow.campaign_id.in_([c.id for c in twins]),
                UnitRow.state == SUCCESS,
                UnitRow.params_hash.in_(chunk),
            )
            .order_by(UnitRow.finished_at)
        ):
            if row.family != "svm" or row.campaign_id in svm_twins:
                candidates.setdefault((row.family, row.params_hash, row.fold), []).append(row)
    usable = _files_there(s, candidates, present) if present else None
    sources = {  # the newest wins
        twin: next((row for row in reversed(rows) if usable is None or usable(row)), None)
        for twin, rows in candidates.items()
    }
    pairs = [
        (source, unit)
        for unit in wanted
        if (source := sources.get((unit.family, unit.params_hash, unit.fold)))
    ]
    if not pairs:
        return {}
    return _copy_outcomes_without_commit(s, pairs, now())


def _files_there(
    s: Session,
    candidates: Mapping[tuple[str, str, int | None], list[UnitRow]],
    present: Callable[[str, int], bool],
) -> Callable[[UnitRow], bool]:
    """Whether a candidate's files are there: those of the unit that ran (a copy names
    it in ``reused_from``) and its campaign's manifest, each looked at once."""
    rows = [row for group in candidates.values() for row in group]
    origin = {row.key: row.key for row in rows}
    for chunk in chunks([row.id for row in rows], KEYS_PER_STATEMENT):
        for key, extra in s.execute(
            select(UnitRow.key, ResultRow.extra)
            .join(ResultRow, ResultRow.unit_id == UnitRow.id)
            .where(UnitRow.id.in_(chunk))
        ):
            origin[key] = (extra or {}).get("reused_from", key)
    files: dict[str, list[tuple[str, int]]] = {}
    origins = sorted(set(origin.values()))
    campaigns = sorted({key.split("/", 1)[0] for key in origins})
    wanted = set(origins)
    # by campaign (the artifacts' index), then by unit here: unit_key has no index
    for chunk in chunks(campaigns, KEYS_PER_STATEMENT):
        for path, size, key in s.execute(
            select(ArtifactRow.path, ArtifactRow.size, ArtifactRow.unit_key).where(
                ArtifactRow.campaign_id.in_(chunk), ArtifactRow.kind != "manifest"
            )
        ):
            if key in wanted:
                files.setdefault(key, []).append((path, size))
    manifests: dict[str, tuple[str, int]] = {}
    for chunk in chunks(campaigns, KEYS_PER_STATEMENT):
        for path, size, campaign in s.execute(
            select(ArtifactRow.path, ArtifactRow.size, ArtifactRow.campaign_id).where(
                ArtifactRow.kind == "manifest", ArtifactRow.campaign_id.in_(chunk)
            )
        ):
            manifests[campaign] = (path, size)
    seen: dict[tuple[str, int], bool] = {}

    def there(path: str, size: int) -> bool:
        if (path, size) not in seen:
            seen[(path, size)] = present(path, size)
        return seen[(path, size)]

    def usable(row: UnitRow) -> bool:
        key = origin[row.key]
        manifest = manifests.get(key.split("/", 1)[0])
        return (manifest is None or there(*manifest)) and all(
            there(path, size) for path, size in files.get(key, [])
        )

    return usable


def _copy_outcomes_without_commit(
    s: Session, pairs: Sequence[tuple[UnitRow, UnitRow]], now: datetime
) -> dict[str, str]:
    """Copy each source unit's result, predictions and metrics to its target and mark
    the target SUCCESS; returns target key -> the key of the unit that ran (the
    source, or what the source itself copied) for those copied (a source without a
    result is skipped). A few statements per KEYS_PER_STATEMENT pairs, not
    several per unit: ``--reuse`` of a grid of thousands of points."""
    results = {}
    for chunk in chunks([source.id for source, _ in pairs], KEYS_PER_STATEMENT):
        results.update(
            (r.unit_id, r) for r in s.scalars(select(ResultRow).where(ResultRow.unit_id.in_(chunk)))
        )
    pairs = [(source, target) for source, target in pairs if source.id in results]
    if not pairs:
        return {}
    s.execute(
        table_of(ResultRow).insert(),
        [
            {
                "unit_id": target.id,
                "train_acc": (r := results[source.id]).train_acc,
                "val_acc": r.val_acc,
                "test_acc": r.test_acc,
                "val_confusion": r.val_confusion,
                "test_confusion": r.test_confusion,
                "fit_seconds": r.fit_seconds,
                # a copy of a copy names the unit that ran, whose files are kept
                "extra": {**r.extra, "reused_from": r.extra.get("reused_from", source.key)},
                "created_at": now,
            }
            for source, target in pairs
        ],
    )
    ids = [{"b_source": source.id, "b_target": target.id} for source, target in pairs]
    for table, columns in (
        (table_of(PredictionRow), ("split", "image_id", "label", "pred", "probs")),
        (table_of(MetricRow), ("name", "step", "value")),
    ):
        # INSERT ... SELECT per pair, as one executemany: the rows never leave the
        # database
        copied = select(
            bindparam("b_target", type_=table.c.unit_id.type),
            *(table.c[c] for c in columns),
        ).where(table.c.unit_id == bindparam("b_source"))
        s.connection().execute(table.insert().from_select(["unit_id", *columns], copied), ids)
    units = table_of(UnitRow)
    s.connection().execute(
        update(units)
        .where(units.c.id == bindparam("b_target"))
        .values(state=SUCCESS, finished_at=now, worker=bindparam("b_worker")),
        [{"b_target": target.id, "b_worker": source.worker} for source, target in pairs],
    )
    # the unit that ran, as the copies' reused_from says
    return {
        target.key: results[source.id].extra.get("reused_from", source.key)
        for source, target in pairs
    }
