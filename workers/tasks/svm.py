"""orchard.fit_svm: one PCA + RBF SVM grid point on one fold (queue ``cpu``).

The grid points of a fold share one PCA. The first unit of a (variant, fold, whiten,
standardize) to run fits it with the largest ``n_components`` of the campaign's grid,
projects every image on it and records the projection as an artifact,
``campaigns/<id>/pca/<variant>-f<fold>-w<0|1>[-s1]-k<K>.npz``; every other point of that
fold loads it (checking its sha256 against the store) and keeps its first k columns.

Workers on one host take a file lock so only one of them fits a given basis while the
others wait for it. Where the lock does not hold (hosts sharing an NFS mount), two units
may fit the same basis at once: both write the same bytes under a temporary name and
rename it into place, so a reader sees one whole file or the other. A file whose
checksum is not the recorded one (the moment between one writer's rename and its record)
is never read: the unit fits the basis itself.

A point with ``[svm.search]`` chooses its searched parameters (``n_components``, ``C``,
``gamma``) by cross-validation on its training images (``shared.svm.search_svc``), on
the same shared projection, then fits the chosen combination as a grid point would; its
result records the choice as ``best_<name>`` with its ``search_cv_acc``.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

from celery.utils.log import get_task_logger

from db.store import Artifact, Outcome
from shared.artifacts import atomic_write_bytes
from shared.plan import largest_n_components
from shared.svm import (
    PcaProjection,
    check_gamma,
    check_n_components,
    check_search_folds,
    component_limit,
    fit_pca_basis,
    fit_point,
    point_widths,
    project_all,
)
from shared.variants import canonical_variant, variant_shape
from workers.data import exclusive
from workers.outcomes import model_outcome
from workers.tasks.base import UnitContext, unit_task

log = get_task_logger("orchard")

PCA_KIND = "pca"

# A CPU worker runs the grid points of a fold one after another: keep the projection it
# last loaded or fitted rather than reading the file again for every point.
_last: tuple[tuple[str, str], PcaProjection] | None = None


def pca_path(
    campaign_dir: Path, variant: str, fold: int, whiten: bool, k: int, standardize: bool = False
) -> Path:
    # aliases share their variant's file: "cropped" and "polarcrop192" are the same pixels
    scaled = "-s1" if standardize else ""  # absent otherwise: the names stay as they were
    name = f"{canonical_variant(variant)}-f{fold}-w{int(whiten)}{scaled}-k{k}.npz"
    return campaign_dir / "pca" / name


def _load_recorded(ctx: UnitContext, path: Path, n_images: int, k: int) -> PcaProjection | None:
    """The recorded projection at ``path`` if it is whole and the one recorded, else None."""
    global _last
    rel = ctx.relative(path)
    record = ctx.store.find_artifact(rel)
    if record is None:
        return None
    if _last is not None and _last[0] == (rel, record.sha256):
        return _last[1]
    try:
        blob = path.read_bytes()  # read once: the checksum covers exactly what is parsed
    except FileNotFoundError:
        return None
    if hashlib.sha256(blob).hexdigest() != record.sha256:
        log.warning("%s: checksum differs from the store's record; fitting again", path)
        return None
    projection = PcaProjection.from_bytes(blob)
    if projection.z.shape != (n_images, k):
        log.warning("%s: shape %s, expected %s; fitting again", path, projection.z.shape, k)
        return None
    _last = ((rel, record.sha256), projection)
    return projection


def shared_projection(
    ctx: UnitContext, variant: str, whiten: bool, k_max: int, *, standardize: bool = False
) -> tuple[PcaProjection, bool]:
    """This fold's images projected on its shared basis, and whether this unit fitted it."""
    global _last
    manifest = ctx.manifest()
    fold = ctx.unit.fold
    train, _, _ = manifest.fold_indices(fold)
    n_features = math.prod(variant_shape(variant, manifest.size))
    k = min(k_max, component_limit(len(train), n_features))
    n_images = len(manifest.entries)
    path = pca_path(ctx.campaign_dir, variant, fold, whiten, k, standardize)
    projection = _load_recorded(ctx, path, n_images, k)
    if projection is not None:
        return projection, False
    with exclusive(path, "fitting it"):
        # another worker may have fitted it while this one waited for the lock
        projection = _load_recorded(ctx, path, n_images, k)
        if projection is not None:
            return projection, False
        started = time.perf_counter()
        data = ctx.fold_data(variant)
        # the seed depends on the campaign and the fold only, never on which unit fits:
        # any unit of the fold produces the same file
        basis = fit_pca_basis(
            data.images[data.train], k, whiten, seed=ctx.seed + fold, standardize=standardize
        )
        projection = project_all(basis, data.images)
        written = atomic_write_bytes(path, projection.to_bytes())
        rel = ctx.relative(path)
        ctx.store.record_artifact(
            Artifact(rel, PCA_KIND, written.sha256, written.size, ctx.campaign.id, ctx.unit.key)
        )
        _last = ((rel, written.sha256), projection)
        log.info("%s: PCA(%d) fitted in %.1f s", rel, k, time.perf_counter() - started)
        return projection, True


@unit_task("orchard.fit_svm")
def fit_svm(ctx: UnitContext) -> Outcome:
    started = time.perf_counter()
    params = ctx.unit.params
    widths = point_widths(params)  # its own n_components, or those its search tries
    manifest = ctx.manifest()
    train, val, test = manifest.fold_indices(ctx.unit.fold)
    # fail a point the data cannot give before fitting anything for it
    n_features = math.prod(variant_shape(params["variant"], manifest.size))
    for k in widths:
        check_n_components(k, len(train), n_features)
    labels = manifest.label_index
    if params.get("search"):
        check_search_folds(labels(train), int(params["search"]["folds"]))
    else:
        check_gamma(params["gamma"])
    projection, fitted = shared_projection(
        ctx,
        params["variant"],
        params["whiten"],
        largest_n_components(ctx.campaign.spec, max(widths)),
        standardize=params.get("standardize", False),  # absent from earlier campaigns' units
    )
    z = projection.features(max(widths))
    result, k = fit_point(
        z[train],
        labels(train),
        z[val],
        labels(val),
        z[test],
        params,
        seed=ctx.seed + ctx.unit.fold,
    )
    return model_outcome(
        manifest,
        val_idx=val,
        test_idx=test,
        val_pred=result.val_pred,
        test_pred=result.test_pred,
        val_probs=None,
        test_probs=None,
        train_acc=result.train_acc,
        seconds=time.perf_counter() - started,
        extra={
            **result.extra,
            "explained_variance": projection.explained(k),
            "pca_components": projection.n_components,
            "pca_fitted": fitted,
        },
    )
