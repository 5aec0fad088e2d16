"""orchard.report: read the store, blend, explain, and write the campaign's report.

Everything comes from the store (units, results, predictions, per-epoch metrics,
artifacts) plus the manifest, the preprocessing cache and the best CNN's model file
for LIME. Per family it picks the best point (highest mean validation accuracy),
blends its folds by uniform vote (the study's "five models vote for the final
answer") and by probability averaging, votes the families of ``[blend] families``
together, and names the blend (or single model: a family's best point on one fold)
with the best out-of-fold validation accuracy, reporting its test accuracy beside it;
with an unlabelled test set its predictions become ``submission.csv``. With
``[report] tsne`` it also embeds fold 0's training images, as the best SVM point's PCA
features, in 2-D by t-SNE (study 2.4.2).

The numbers are gathered by :mod:`workers.reporting` and laid out by
:mod:`shared.report`; this module is the unit: it writes the files into a staging folder
and publishes them whole, so a reader never sees half of a run's report.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from db.store import Artifact, Outcome, StoreUnreachableError
from shared.artifacts import ArtifactWriteError, WrittenFile
from shared.errors import OrchardError
from shared.manifest import Manifest
from shared.report import (
    ReportData,
    ReportFiles,
    write_report,
)
from workers.config import reliability
from workers.data import ManifestGoneError
from workers.reporting.data import build_report_data
from workers.tasks.base import UnitContext, log, unit_task


def _manifest_or_none(ctx: UnitContext) -> Manifest | None:
    try:
        return ctx.manifest()
    except StoreUnreachableError:
        raise  # the database away: the unit is handed back, not written without it
    except ManifestGoneError as exc:
        # the shared folder, without the campaign's folder (removed by hand): the report,
        # from the store alone, says what failed, in a folder made anew there
        log.warning("%s: report without the manifest: %s", ctx.campaign.id, exc)
        return None
    except OrchardError as exc:
        if not ctx.campaign_dir.is_dir():
            # no campaign folder at all: this worker's ORCHARD_ARTIFACTS is not the one
            # the campaign was submitted with, and a report written here would be lost
            raise
        # a damaged or missing manifest: the tables need only the store
        log.warning("%s: report without the manifest: %s", ctx.campaign.id, exc)
        return None


#: The prefix of the folder, inside ``report/``, that a run writes its files into before
#: it moves them into place.
STAGING_PREFIX = ".run-"


def _move_into(folder: Path, file: WrittenFile) -> WrittenFile:
    """``file`` renamed into ``folder`` (the same file system: nothing to fill)."""
    target = folder / file.path.name
    try:
        os.replace(file.path, target)
    except OSError as exc:
        raise ArtifactWriteError(
            f"cannot move {file.path} to {target}: {exc.strerror or exc}"
        ) from None
    return replace(file, path=target)


def write_then_publish(ctx: UnitContext, data: ReportData) -> ReportFiles:
    """Write the whole report into a folder of this run's own, then, if this delivery
    still holds the unit, move every file into ``report/``.

    A run that fails while writing (a full disk) leaves the report that was there
    whole, with the records that describe it; a run that lost its unit meanwhile (a
    ``resume`` reset it, another delivery took it over) writes nothing over the report
    of the run that holds it. The moves are renames in one folder, milliseconds for
    every file; the pages go last, so a reader who sees the new page finds its figures.
    Only a ``resume`` in those milliseconds can slip between the lease's renewal and
    the moves.
    """
    folder = ctx.campaign_dir / "report"
    # left by runs that died: untouched for a lease period, so none of them is at work
    # (a run cut off from the database may still write, its lease run out meanwhile)
    idle = time.time() - reliability().lease_seconds
    for old in folder.glob(f"{STAGING_PREFIX}*"):
        with contextlib.suppress(OSError):
            if old.stat().st_mtime < idle:
                shutil.rmtree(old, ignore_errors=True)
    staging = folder / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
    try:
        files = write_report(data, staging)
        # the lease renewed now, for a lease period: no other delivery takes the unit
        # while the files move (milliseconds); a store that does not answer, or a
        # lease lost, moves nothing
        ctx.confirm_lease()
        return ReportFiles(
            figures={n: _move_into(folder, f) for n, f in files.figures.items()},
            tables={n: _move_into(folder, f) for n, f in files.tables.items()},
            submission=files.submission and _move_into(folder, files.submission),
            json=_move_into(folder, files.json),
            markdown=_move_into(folder, files.markdown),
            html=_move_into(folder, files.html),
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@unit_task("orchard.report")
def report(ctx: UnitContext) -> Outcome:
    started = time.perf_counter()
    data = build_report_data(
        ctx.store, ctx.campaign.id, manifest=_manifest_or_none(ctx), settings=ctx.settings
    )
    files = write_then_publish(ctx, data)
    written: list[tuple[Any, str]] = [
        (f, "report")
        for f in (
            files.markdown,
            files.html,
            files.json,
            *files.figures.values(),
            *files.tables.values(),
        )
    ]
    if files.submission is not None:
        written.append((files.submission, "submission"))
    # what an earlier run of this report recorded and this one did not write (a table
    # no longer cut, the curve of a point no longer best): removed, with its record,
    # once this run's files are recorded; nothing else in the folder is touched
    kept = {ctx.relative(f.path) for f, _ in written}
    stale = sorted(
        a.path
        for a in ctx.store.artifacts(ctx.campaign.id)
        if a.unit_key == ctx.unit.key
        and a.path not in kept
        and not (ctx.settings.artifacts / a.path).is_symlink()
    )
    return Outcome(
        fit_seconds=time.perf_counter() - started,
        extra={
            "report": ctx.relative(files.html.path),
            "blends": {b.name: b.test_acc for b in data.blends},
            "best_blend": data.best_blend,
            "submission": ctx.relative(files.submission.path) if files.submission else None,
        },
        artifacts=[
            Artifact(ctx.relative(f.path), kind, f.sha256, f.size, ctx.campaign.id, ctx.unit.key)
            for f, kind in written
        ],
        scratch=stale,
    )


__all__ = ["report", "write_then_publish"]
