"""Everything the report shows, gathered from the store (:func:`build_report_data`)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from db.store import Result, Store, StoreUnreachableError, Unit
from shared.manifest import Manifest
from shared.metrics import confusion_matrix
from shared.report import (
    FAILED_STATES,
    BlendRow,
    Confusion,
    CurveFigure,
    Experiment,
    FamilyRow,
    LimeSection,
    ReportData,
    Submission,
    SweepPlot,
    TsneSection,
    UnitSummary,
    family_title,
)
from shared.settings import Settings
from shared.spec import restore_omitted
from shared.times import utc_iso
from workers.lease import UnitAborted
from workers.reporting.blend import (
    FamilyBlend,
    Predicted,
    blend_members,
    blend_row,
    choose_best,
    family_blend,
    inflated,
)
from workers.reporting.explain import embed_svm_features, explain_cnn
from workers.reporting.figures import learning_curves, sweep_plots, timeline
from workers.reporting.tables import (
    file_facts,
    oob_note,
    point_rows,
    preprocessing_summary,
    projection_note,
    shard_seconds,
    skipped_inputs,
    validation_of,
    with_choices,
)
from workers.reporting.units import (
    NOT_MODELS,
    best_fold,
    best_point,
    in_study_order,
    reused_from,
)
from workers.tasks.base import log


def build_report_data(
    store: Store,
    campaign_id: str,
    *,
    manifest: Manifest | None = None,
    settings: Settings | None = None,
) -> ReportData:
    """Everything the report shows. LIME needs ``manifest`` and ``settings`` (the
    model file and the image cache); without them the section says so."""
    campaign = store.get_campaign(campaign_id)
    classes = campaign.classes
    n_classes = len(classes)
    all_units = store.units(campaign_id)
    units = [u for u in all_units if u.family not in ("preprocess", "report")]
    results = store.results(campaign_id)
    spec = campaign.spec
    blend_spec = spec.get("blend") or {}
    report_spec = spec.get("report") or {}
    method = blend_spec.get("method", "both")
    methods = ("vote", "mean") if method == "both" else (method,)
    cross_families = list(blend_spec.get("families", ["cnn"]))

    # a parameter some points of a family's sweep name is shown for all its points
    mentioned: dict[str, set[str]] = defaultdict(set)
    for u in units:
        mentioned[u.family].update(u.params)
    summaries = [
        UnitSummary(
            key=u.key,
            family=u.family,
            fold=u.fold,
            params=restore_omitted(u.family, u.params, mentioned[u.family]),
            state=u.state,
            worker=u.worker,
            seconds=results[u.key].fit_seconds if u.key in results else None,
            train_acc=results[u.key].train_acc if u.key in results else None,
            val_acc=results[u.key].val_acc if u.key in results else None,
            test_acc=results[u.key].test_acc if u.key in results else None,
            error=u.error,
            reused_from=reused_from(results.get(u.key)),
        )
        for u in units
    ]

    families: list[FamilyRow] = []
    experiments: list[Experiment] = []
    sweeps: list[SweepPlot] = []
    curves: list[CurveFigure] = []
    fam_blends: dict[str, FamilyBlend] = {}
    best_units: dict[str, list[Unit]] = {}
    # the campaign file's order (the plan sends costly points first), published figures
    from_file = file_facts(spec)
    shards = shard_seconds(units, results)
    for family in in_study_order(u.family for u in units if u.family not in NOT_MODELS):
        order = from_file.orders.get(family, {})
        mine = sorted(
            (u for u in units if u.family == family),
            key=lambda u: order.get(u.params_hash, len(order)),
        )
        best = best_point(mine, results)
        best_units[family] = best
        points = point_rows(campaign_id, family, mine, results, shards)
        if published := from_file.published.points.get(family):
            points = [
                replace(p, published=published[h])
                if (h := p.key.rsplit("/", 1)[-1]) in published
                else p
                for p in points
            ]
        best_key = f"{campaign_id}/{family}/{best[0].params_hash}" if best else None
        best_row = next((p for p in points if p.key == best_key), None)
        done = [results[u.key] for u in mine if u.key in results]
        families.append(
            FamilyRow(
                family=family,
                best_key=best_fold(best, results).key if best else "",
                params=with_choices(
                    restore_omitted(family, best[0].params, mentioned[family]), best, results
                )
                if best
                else {},
                units=len(mine),
                succeeded=len(done),
                train_acc=best_row.train_acc if best_row else None,
                val_acc=best_row.val_acc if best_row else None,
                test_acc=best_row.test_acc if best_row else None,
                # this campaign's work: a reused unit's seconds were spent in its source's
                fit_seconds=sum(r.fit_seconds for r in done if reused_from(r) is None)
                + sum(shards[u.key][1] for u in mine if u.key in shards),
                reused=sum(reused_from(r) is not None for r in done),
                best_folds=(len(best), sum(u.params_hash == best[0].params_hash for u in mine))
                if best
                else None,
            )
        )
        # units per point: one pass (a scan per point was quadratic in a grid's size)
        folds = max(Counter(u.params_hash for u in mine).values())
        table_note = None
        if family == "rf" and any(u.params.get("augment") not in (None, "none") for u in mine):
            table_note = oob_note()  # about augmented siblings: only when there are some
        elif family == "svm":
            table_note = projection_note(mine, results)
        experiments.append(
            Experiment(
                family=family,
                title=f"{family_title(family)} ({len(points)} point{'s' * (len(points) != 1)}, "
                f"{folds} fold{'s' * (folds != 1)} each)",
                points=points,
                best_key=best_key,
                note=table_note,
            )
        )
        sweeps += sweep_plots(family, points)
        if best_key:
            curves += learning_curves(store, campaign_id, family, mine, points, best_key)
            fam_blends[family] = family_blend(
                store, best, results, n_classes, best_row.val_acc if best_row else None
            )

    # -- blends: per family (vote, mean), then across families
    blends: list[BlendRow] = []
    predicted: dict[str, Predicted] = {}  # blend name -> its test predictions
    oof: dict[str, Predicted] = {}
    for family, fb in fam_blends.items():
        title = family_title(family)
        if fb.members == 1:
            # one fold: nothing to blend, whichever the method; a single model, one row
            name = f"{title} best point"
            blends.append(blend_row(name, family, "single", 1, fb.test_vote, fb.oof))
            predicted[name] = fb.test_vote
            oof[name] = fb.oof
            continue
        for m in methods:
            name = f"{title} {fb.members}-fold {m}"
            test = fb.test_vote if m == "vote" else fb.test_mean
            val = fb.oof if m == "vote" or fb.oof.probs is not None else None
            note = fb.ties if m == "vote" else ""
            if test is None:
                note = f"n/a: {title} predicts labels only"
            blends.append(blend_row(name, family, m, fb.members, test, val, note))
            if test is not None:
                predicted[name] = test
            if val is not None:
                oof[name] = val

    if len(cross_families) > 1:
        rows, tests, vals = _cross_family_blends(cross_families, fam_blends, methods, n_classes)
        blends += rows
        predicted.update(tests)
        oof.update(vals)

    by_test = any(b.test_acc is not None for b in blends)
    headline = choose_best(blends, oof)
    best_blend = headline.name
    blends = [
        replace(
            b,
            common_acc=headline.compared.get(b.name),
            published=from_file.published.blends.get((b.family, b.method), {}),
        )
        for b in blends
    ]

    cross_best = None  # the best blend, where it is one across families: its matrix too
    if best_blend and "+" in next(b.family for b in blends if b.name == best_blend):
        cross_best = (best_blend, predicted.get(best_blend) if by_test else oof.get(best_blend))
    confusions = _confusions(
        fam_blends, methods, best_units, results, n_classes, by_test, cross_best
    )
    submission = _submission(best_blend, predicted, classes, manifest)
    lime, lime_note = _lime_section(
        store, campaign_id, spec, best_units, results, manifest=manifest, settings=settings
    )
    tsne = _tsne_section(
        store, campaign_id, spec, best_units, results, manifest=manifest, settings=settings
    )

    return ReportData(
        campaign_id=campaign.id,
        campaign_name=report_spec.get("title") or campaign.name,
        description=" ".join(str(spec.get("description") or "").split()),  # one line
        created_at=utc_iso(campaign.created_at),
        classes=classes,
        families=families,
        blends=blends,
        confusions=confusions,
        units=summaries,
        experiments=experiments,
        curves=curves,
        sweeps=sweeps,
        best_blend=best_blend,
        best_by=headline.by,
        best_compared_on=headline.compared_on,
        best_compared_acc=headline.compared_acc,
        best_tied_with=list(headline.tied_with),
        best_inflated=inflated(spec, families, blends, best_blend),
        timeline=timeline(all_units, results),
        lime=lime,
        lime_note=lime_note,
        tsne=tsne,
        skipped=skipped_inputs(manifest),
        validation=validation_of(spec, manifest),
        held_out=spec.get("validation", "folds"),
        published_in=from_file.published_in,
        submission=submission,
        test_labelled=by_test,
        other_units={
            family: sum(u.family == family for u in all_units)
            for family in ("preprocess", "report")
            if any(u.family == family for u in all_units)
        },
        preprocessing=preprocessing_summary(
            all_units,
            results,
            manifest.size if manifest else int((spec.get("preprocessing") or {}).get("size", 256)),
        ),
        failed_shards=[
            UnitSummary(
                key=u.key,
                family=u.family,
                fold=None,
                params={},
                state=u.state,
                worker=u.worker,
                seconds=None,
                train_acc=None,
                val_acc=None,
                test_acc=None,
                error=u.error,
            )
            for u in all_units
            if u.family == "preprocess" and u.state in FAILED_STATES
        ],
    )


def _confusions(
    fam_blends: dict[str, FamilyBlend],
    methods: Sequence[str],
    best_units: dict[str, list[Unit]],
    results: dict[str, Result],
    n_classes: int,
    by_test: bool,
    cross_best: tuple[str, Predicted | None] | None,
) -> dict[str, Confusion]:
    """Each family's confusion matrix: its blend's on the test set where the test set is
    labelled, else its best point's folds' on what each held out; and the best blend's,
    where it is one across families (``cross_best``: its name and predictions)."""
    confusions: dict[str, Confusion] = {}
    for family, fb in fam_blends.items():
        title = family_title(family)
        # the blend the table shows: the vote, or the mean where only it is asked for
        shown, what = fb.test_vote, f"{fb.members}-fold vote"
        if "vote" not in methods and fb.test_mean is not None:
            shown, what = fb.test_mean, f"{fb.members}-fold mean"
        if fb.members == 1:
            what = "best point"
        if by_test and len(shown.ids):
            matrix = confusion_matrix(shown.labels, shown.preds, n_classes)
            confusions[family] = Confusion(f"{title} {what} (test)", matrix, "test")
        else:
            best = best_units[family]
            matrices = [results[u.key].val_confusion for u in best if results[u.key].val_confusion]
            if matrices:
                matrix = np.sum(matrices, axis=0).tolist()
                # each fold's model on the images it held out, added up: no blend
                pooled = f", its {len(matrices)} folds' models pooled" if len(matrices) > 1 else ""
                confusions[family] = Confusion(
                    f"{title} best point{pooled} (validation)", matrix, "val"
                )
    if cross_best is not None:
        name, chosen = cross_best
        if chosen is not None and len(chosen.ids):
            split = "test" if by_test else "val"
            matrix = confusion_matrix(chosen.labels, chosen.preds, n_classes)
            named = "test" if by_test else "validation"
            confusions["blend"] = Confusion(f"{name} ({named})", matrix, split)
    return confusions


def _submission(
    best_blend: str | None,
    predicted: dict[str, Predicted],
    classes: Sequence[str],
    manifest: Manifest | None,
) -> Submission | None:
    """The best blend's predictions of every unlabelled image (the test split's when it
    has no labels, and any unlabelled image of the other splits); None if there is none."""
    if best_blend and best_blend in predicted and predicted[best_blend].ids:
        chosen = predicted[best_blend]
        pred_of = dict(zip(chosen.ids, chosen.preds.tolist(), strict=True))
        if manifest is not None:
            unlabelled = (manifest.entries[i] for i in manifest.test_indices())
            order = [e.image_id for e in unlabelled if e.label is None]
        else:
            order = [i for i, label in zip(chosen.ids, chosen.labels, strict=True) if label < 0]
        if order:
            rows = [(i, classes[pred_of[i]]) for i in order if i in pred_of]
            return Submission(best_blend, rows, missing=len(order) - len(rows))
    return None


def _lime_section(
    store: Store,
    campaign_id: str,
    spec: dict[str, Any],
    best_units: dict[str, list[Unit]],
    results: dict[str, Result],
    *,
    manifest: Manifest | None,
    settings: Settings | None,
) -> tuple[LimeSection | None, str]:
    """LIME over the best CNN point's images, or None and why not. A failure is the
    section's note: an explanation is a figure, not a result."""
    report_spec = spec.get("report") or {}
    cnn_best = best_units.get("cnn") or []
    if not report_spec.get("lime", True):
        return None, "LIME is off ([report] lime = false)."
    if "cnn" not in best_units:
        return None, "No CNN in this campaign."
    if not cnn_best:
        return None, "No CNN fold succeeded."
    if int(report_spec.get("lime_per_class", 1)) < 1:
        return None, "LIME is off ([report] lime_per_class = 0)."
    if manifest is None or settings is None:
        return None, "LIME needs the model files and the image cache (run by the report task)."
    try:
        return explain_cnn(
            store,
            settings,
            manifest,
            cnn_best,
            results,
            per_class=int(report_spec.get("lime_per_class", 1)),
            num_samples=int(report_spec.get("lime_samples", 1000)),
            seed=int(spec.get("seed", 0)),
        ), ""
    except (StoreUnreachableError, UnitAborted):
        # the database away (the unit is handed back), or the unit no longer this
        # delivery's (cancelled, deleted, taken over): not written without LIME
        raise
    except Exception as exc:
        log.warning("%s: LIME failed: %s", campaign_id, exc)
        failed = f"LIME failed: {type(exc).__name__}: {exc}"
        return LimeSection("cnn", best_fold(cnn_best, results).key, 0, [], failed), ""


def _tsne_section(
    store: Store,
    campaign_id: str,
    spec: dict[str, Any],
    best_units: dict[str, list[Unit]],
    results: dict[str, Result],
    *,
    manifest: Manifest | None,
    settings: Settings | None,
) -> TsneSection | None:
    """The t-SNE of the best SVM point's features (study 2.4.2), only when asked; a
    figure, so a failure is its note and never costs the report."""
    report_spec = spec.get("report") or {}
    if not report_spec.get("tsne", False):
        return None
    svm_best = best_units.get("svm") or []
    if "svm" not in best_units:
        return TsneSection(note="Not drawn: no SVM in this campaign, whose features it maps.")
    if not svm_best:
        return TsneSection(note="Not drawn: no SVM unit succeeded.")
    if manifest is None or settings is None:
        return TsneSection(
            note="Not drawn: t-SNE needs the manifest and the PCA projection (run by the "
            "report task)."
        )
    try:
        return embed_svm_features(
            store,
            settings,
            manifest,
            svm_best,
            results,
            max_images=int(report_spec.get("tsne_images", 2000)),
            seed=int(spec.get("seed", 0)),
        )
    except (StoreUnreachableError, UnitAborted):
        raise  # as for LIME: the unit stops, or is handed back
    except Exception as exc:
        log.warning("%s: t-SNE failed: %s", campaign_id, exc)
        return TsneSection(note=f"t-SNE failed: {type(exc).__name__}: {exc}")


def _cross_family_blends(
    cross_families: Sequence[str],
    fam_blends: dict[str, FamilyBlend],
    methods: Sequence[str],
    n_classes: int,
) -> tuple[list[BlendRow], dict[str, Predicted], dict[str, Predicted]]:
    """The rows of ``[blend] families`` voted (or averaged) together, each family by its
    best point's folds' blend, with their test and out-of-fold predictions by name; a
    row saying why where fewer than two of them succeeded."""
    rows: list[BlendRow] = []
    test_of: dict[str, Predicted] = {}  # a row's test predictions, by its name
    val_of: dict[str, Predicted] = {}  # and its out-of-fold ones
    ran = [f for f in cross_families if f in fam_blends]
    joined = "+".join(cross_families)
    label = " + ".join(family_title(f) for f in cross_families)
    if len(ran) < 2:
        missing = ", ".join(family_title(f) for f in cross_families if f not in fam_blends)
        for m in methods:
            rows.append(
                BlendRow(
                    f"{label} {m}",
                    joined,
                    m,
                    len(ran),
                    None,
                    None,
                    f"n/a: {missing} did not succeed",
                )
            )
    else:
        members = [fam_blends[f] for f in ran]
        referee = max(range(len(members)), key=lambda i: members[i].val_acc or -1.0)
        tests = [fb.test_mean if fb.test_mean is not None else fb.test_vote for fb in members]
        vote_members = [fb.test_vote for fb in members]
        test_vote, _ = blend_members(vote_members, n_classes, referee)
        oof_vote, oof_mean = blend_members([fb.oof for fb in members], n_classes, referee)
        mean_ok = all(fb.test_mean is not None for fb in members)
        test_mean = blend_members(tests, n_classes)[1] if mean_ok else None
        tie = f"ties go to {family_title(ran[referee])}"
        if len(ran) == 2:
            # two voters agree or tie: the vote is the referee's predictions
            tie = (
                f"two families: each disagreement is a tie, which goes to "
                f"{family_title(ran[referee])}, so the vote is {family_title(ran[referee])}'s "
                "predictions"
            )
        for m in methods:
            name = f"{label} {m}"
            if m == "vote":
                test, val, note = test_vote, oof_vote, tie
            else:
                test, val = test_mean, oof_mean
                no_probs = [family_title(fb.family) for fb in members if fb.test_mean is None]
                note = f"n/a: {', '.join(no_probs)} predicts labels only" if no_probs else ""
            rows.append(blend_row(name, joined, m, len(ran), test, val, note))
            if test is not None:
                test_of[name] = test
            if val is not None:
                val_of[name] = val
    return rows, test_of, val_of
