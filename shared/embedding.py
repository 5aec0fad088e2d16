"""Two-dimensional maps of image features by t-SNE, as the study's 2.4.2 drew them.

The study reduced its training images to 2 or 3 dimensions with t-SNE and saw no
clustering. A campaign's report redraws that map from the features its SVM used (a
PCA projection): :func:`tsne_map` takes those features and the images' labels, keeps a
stratified sample of at most ``max_images`` of them, and embeds it in 2-D. Pure numpy
and scikit-learn: the report task loads the features and draws the figure.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "LIME_CANDIDATES",
    "LIME_SCORE_BATCH",
    "LIME_CLASS_FLOOR",
    "MAX_COMPONENTS",
    "MIN_IMAGES",
    "lime_candidates",
    "perplexity_for",
    "stratified_sample",
    "tsne_map",
]

#: PCA components t-SNE is given at most: scikit-learn advises reducing to about 50
#: first, and the study's PCA keeps hundreds, whose tail is mostly noise to t-SNE.
MAX_COMPONENTS = 50
#: The fewest images a map can be drawn of: t-SNE's PCA start needs two.
MIN_IMAGES = 2


def perplexity_for(n_images: int) -> float:
    """scikit-learn's default perplexity, 30, lowered for a small sample: it must stay
    under the number of images, and about three neighbours per unit of it is what the
    Gaussian around each point is fitted on."""
    return min(30.0, (n_images - 1) / 3)


def stratified_sample(labels: np.ndarray, max_images: int, seed: int) -> np.ndarray:
    """Indices into ``labels`` of at most ``max_images`` images, each class keeping its
    share of them to within one image, in their original order; deterministic in
    ``seed``. Every index when there are no more than ``max_images``."""
    labels = np.asarray(labels)
    n = len(labels)
    if n <= max_images:
        return np.arange(n)
    classes, counts = np.unique(labels, return_counts=True)
    quotas = counts * (max_images / n)
    taken = np.floor(quotas).astype(np.int64)
    # the images the floors leave go to the classes with the largest remainders (ties to
    # the first class), so no class is more than one image off its share
    short = max_images - int(taken.sum())
    taken[np.argsort(-(quotas - taken), kind="stable")[:short]] += 1
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(labels == c), size=k, replace=False)
        for c, k in zip(classes, taken, strict=True)
    ]
    return np.sort(np.concatenate(chosen))


def tsne_map(
    features: np.ndarray, labels: np.ndarray, *, max_images: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(xy, labels)``: a stratified sample of at most ``max_images`` rows of
    ``features`` (:func:`stratified_sample`) embedded in 2-D by t-SNE, ``xy`` of shape
    (m, 2), and the sample's labels, row for row. Deterministic in ``seed``.

    ``ValueError`` with fewer than :data:`MIN_IMAGES` images.
    """
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels)
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(
            f"features of shape {features.shape} for {len(labels)} labels: one row per label"
        )
    rows = stratified_sample(labels, max_images, seed)
    if len(rows) < MIN_IMAGES:
        raise ValueError(f"t-SNE needs at least {MIN_IMAGES} images, got {len(rows)}")
    x = features[rows]
    tsne = TSNE(
        n_components=2,
        # the PCA start keeps the map's large-scale layout and is deterministic; it needs
        # two features, which a one-component projection does not have
        init="pca" if x.shape[1] >= 2 else "random",
        random_state=seed,
        perplexity=perplexity_for(len(rows)),
    )
    return tsne.fit_transform(x).astype(np.float64), labels[rows]


#: The most test images LIME's model scores to pick those it explains (the most
#: confident right ones per class): a sample stratified by class, of a larger test set,
#: with at least :data:`LIME_CLASS_FLOOR` of each class (all of a class with fewer).
LIME_CANDIDATES = 2000
LIME_CLASS_FLOOR = 100
#: The images the report's CNN scores at a time on the CPU, LIME's candidates and its
#: perturbed copies alike: a prediction holds about three of the network's largest layer
#: output an image in float32 (19 MB for the study's CNN at 224 px), so 0.6 GB at 32
#: where 256 held 5 GB.
LIME_SCORE_BATCH = 32


def lime_candidates(labels: np.ndarray, seed: int) -> np.ndarray:
    """Positions in ``labels`` (class indices, -1 unlabelled) of the test images LIME's
    model scores, ascending: every one of up to :data:`LIME_CANDIDATES`; of more, each
    class's share of them, and no fewer than :data:`LIME_CLASS_FLOOR` of a class (its
    share of a rare class would be none)."""
    labels = np.asarray(labels)
    rows = stratified_sample(labels, LIME_CANDIDATES, seed)
    rng = np.random.default_rng(seed)
    more = []
    for c in np.unique(labels):
        short = LIME_CLASS_FLOOR - int(np.count_nonzero(labels[rows] == c))
        if short > 0:
            rest = np.setdiff1d(np.flatnonzero(labels == c), rows)
            more.append(rng.choice(rest, size=min(short, len(rest)), replace=False))
    return np.sort(np.concatenate([rows, *more])) if more else rows
