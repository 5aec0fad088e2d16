"""The report's explanations: LIME over the best CNN fold's test images (study 2.6), and a
t-SNE of the best SVM point's PCA features (study 2.4.2)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from db.store import Result, Store, Unit
from shared.embedding import LIME_SCORE_BATCH, lime_candidates
from shared.manifest import Manifest
from shared.report import (
    LimeItem,
    LimeSection,
    TsneSection,
)
from shared.settings import Settings
from workers.reporting.units import best_fold, reused_from


def explain_cnn(
    store: Store,
    settings: Settings,
    manifest: Manifest,
    best: Sequence[Unit],
    results: dict[str, Result],
    *,
    per_class: int,
    num_samples: int,
    seed: int,
) -> LimeSection:
    """LIME on the best CNN point's :func:`best_fold`, ``per_class`` test images per class.

    With test labels it explains images the model got right (the study's "parts that
    are helpful to the model for correct predictions"), most confident first; without,
    the images it predicted most confidently per class. It picks them among the test
    images :func:`lime_candidates` samples of a large test set.
    """
    from shared.artifacts import read_if_intact
    from shared.cnn import build_model, normalise, resize_batch
    from shared.explain import explain_images
    from shared.variants import cnn_variant
    from workers.data import load_rows
    from workers.tasks.cnn import torch_module

    torch = torch_module()

    fold = best_fold(best, results)
    # a fold reused from an earlier campaign (`submit --reuse`) kept its model there
    source = reused_from(results[fold.key]) or fold.key
    source_campaign = source.split("/", 1)[0]
    models = [a for a in store.artifacts(source_campaign, kind="model") if a.unit_key == source]
    if not models:
        return LimeSection(
            "cnn", fold.key, num_samples, [], f"no model file recorded for {fold.key}"
        )
    path = settings.artifacts / models[0].path
    try:
        blob = read_if_intact(path, models[0].sha256)  # what is loaded is what was checked
    except FileNotFoundError:
        return LimeSection("cnn", fold.key, num_samples, [], f"{path}: model file missing")
    if blob is None:
        return LimeSection("cnn", fold.key, num_samples, [], f"{path}: checksum mismatch")
    checkpoint = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    classes = list(manifest.classes)
    model = build_model(checkpoint["params"], len(classes))
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()

    test = manifest.test_indices()
    if not len(test):
        return LimeSection("cnn", fold.key, num_samples, [], "no test images to explain")
    # scored on the CPU to pick the images it explains: of a large test set a sample, so
    # that 40,000 test images are neither scored (an hour) nor held in this process
    test = test[lime_candidates(manifest.label_index(test), seed)]
    framing = checkpoint["params"].get("input", "crop")
    images = load_rows(store, settings, manifest, cnn_variant(manifest.size, framing), test)
    images = resize_batch(images, int(checkpoint["params"]["image_size"]))

    @torch.no_grad()
    def predict(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
        return torch.softmax(model(normalise(x)).float(), dim=1).numpy()

    step = LIME_SCORE_BATCH
    probs = np.concatenate([predict(images[s : s + step]) for s in range(0, len(images), step)])
    labels = manifest.label_index(test)
    labelled = bool((labels >= 0).any())
    picked: list[tuple[int, int]] = []  # (row in test, class explained)
    for c in range(len(classes)):
        if labelled:
            rows = np.flatnonzero(labels == c)
            right = rows[probs[rows].argmax(1) == c]
            rows = right if len(right) else rows
        else:
            rows = np.flatnonzero(probs.argmax(1) == c)
        rows = rows[np.argsort(-probs[rows, c], kind="stable")][:per_class]
        picked += [(int(r), c) for r in rows]
    if not picked:
        return LimeSection("cnn", fold.key, num_samples, [], "no test image to explain")
    explanations = explain_images(
        images[[r for r, _ in picked]],
        predict,
        labels=[c for _, c in picked],
        num_samples=num_samples,
        batch_size=LIME_SCORE_BATCH,
        seed=seed,
    )
    items = [
        LimeItem(
            image_id=manifest.entries[test[r]].image_id,
            true_label=classes[labels[r]] if labels[r] >= 0 else None,
            explained=classes[c],
            probability=float(e.probabilities[c]),
            image=e.image,
            overlay=e.overlay,
        )
        for (r, c), e in zip(picked, explanations, strict=True)
    ]
    # an unlabelled test set is explained per predicted class: say which it never predicted
    explained = {c for _, c in picked}
    unseen = [name for c, name in enumerate(classes) if c not in explained]
    note = ""
    if unseen:
        why = (
            "none is labelled so"
            if labelled
            else f"the model predicted none of the {len(test):,} it scored as such"
        )
        note = f"No test image of {', '.join(unseen)}: {why}."
    return LimeSection("cnn", fold.key, num_samples, items, note)


def embed_svm_features(
    store: Store,
    settings: Settings,
    manifest: Manifest,
    best: Sequence[Unit],
    results: dict[str, Result],
    *,
    max_images: int,
    seed: int,
) -> TsneSection:
    """Fold 0's training images as the best SVM point's features, embedded by t-SNE.

    The features are the fold's shared PCA projection that the point's fold-0 unit
    used (the file it, or another point of the fold, recorded; a unit copied with
    ``submit --reuse`` used its source campaign's), checked against the store's sha256,
    and of it the first ``n_components`` of the point, at most
    :data:`~shared.embedding.MAX_COMPONENTS`. Where that cannot be had, the section
    says why instead.
    """
    from shared.artifacts import read_if_intact
    from shared.embedding import MAX_COMPONENTS, MIN_IMAGES, perplexity_for, tsne_map
    from shared.svm import PcaProjection
    from workers.tasks.svm import pca_path

    zero = next((u for u in best if u.fold == 0), None)
    if zero is None:
        return TsneSection(note="Not drawn: the best SVM point's fold 0 did not succeed.")
    result = results[zero.key]
    width = (result.extra or {}).get("pca_components")
    if not isinstance(width, int):
        return TsneSection(zero.key, note=f"Not drawn: {zero.key} recorded no PCA projection.")
    params = zero.params
    variant = str(params["variant"])
    source_campaign = (reused_from(result) or zero.key).split("/", 1)[0]
    path = pca_path(
        settings.artifacts / "campaigns" / source_campaign,
        variant,
        0,
        bool(params.get("whiten", False)),
        width,
        bool(params.get("standardize", False)),  # absent from earlier campaigns' units
    )

    def not_drawn(why: str) -> TsneSection:
        return TsneSection(zero.key, variant, note=f"Not drawn: {why}.")

    record = store.find_artifact(path.relative_to(settings.artifacts).as_posix())
    if record is None:
        return not_drawn(f"{path}, the PCA projection, is not recorded in the store")
    try:
        blob = read_if_intact(path, record.sha256)  # what is loaded is what was checked
    except FileNotFoundError:
        return not_drawn(f"{path}, the PCA projection, is missing")
    if blob is None:
        return not_drawn(f"{path}, the PCA projection, differs from its record (checksum)")
    projection = PcaProjection.from_bytes(blob)
    if len(projection.z) != len(manifest.entries):
        return not_drawn(
            f"{path} projects {len(projection.z)} images, the manifest has {len(manifest.entries)}"
        )
    # the point's own width, or the one its [svm.search] chose on this fold
    chosen = params.get("n_components") or result.extra.get("best_n_components") or width
    k = min(int(chosen), MAX_COMPONENTS, projection.n_components)
    train, _, _ = manifest.fold_indices(0)
    labels = manifest.label_index(train)
    train, labels = train[labels >= 0], labels[labels >= 0]
    if len(train) < MIN_IMAGES:
        return not_drawn(f"fold 0 has {len(train)} labelled training images, too few to map")
    xy, shown = tsne_map(projection.features(k)[train], labels, max_images=max_images, seed=seed)
    return TsneSection(
        unit_key=zero.key,
        variant=variant,
        n_components=k,
        available=len(train),
        xy=xy,
        labels=shown,
        perplexity=perplexity_for(len(xy)),
        seed=seed,
    )
