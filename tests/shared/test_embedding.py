"""t-SNE maps of image features (study 2.4.2): the sample they draw and the map itself."""

from __future__ import annotations

import numpy as np
import pytest

from shared.embedding import MIN_IMAGES, perplexity_for, stratified_sample, tsne_map


def _features(counts: list[int], dims: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images of ``len(counts)`` classes, ``counts[c]`` of class c, each class around its
    own centre, in shuffled order (a sample must not rely on sorted labels)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    centres = rng.normal(scale=5.0, size=(len(counts), dims))
    return centres[labels] + rng.normal(size=(len(labels), dims)), labels


def test_the_map_is_the_same_for_the_same_seed_and_differs_for_another() -> None:
    features, labels = _features([40, 30, 20])
    xy, shown = tsne_map(features, labels, max_images=60, seed=3)
    again, shown_again = tsne_map(features, labels, max_images=60, seed=3)
    np.testing.assert_array_equal(xy, again)
    np.testing.assert_array_equal(shown, shown_again)
    other, _ = tsne_map(features, labels, max_images=60, seed=4)
    assert not np.array_equal(xy, other)


def test_the_map_has_two_coordinates_per_image_shown() -> None:
    features, labels = _features([40, 30, 20])
    xy, shown = tsne_map(features, labels, max_images=60, seed=0)
    assert xy.shape == (60, 2) and shown.shape == (60,)
    assert np.isfinite(xy).all()
    # no more images than asked for: all of them
    xy, shown = tsne_map(features, labels, max_images=1000, seed=0)
    assert xy.shape == (90, 2)
    np.testing.assert_array_equal(shown, labels)


@pytest.mark.parametrize(("counts", "max_images"), [([40, 30, 20], 60), ([500, 37, 3], 101)])
def test_the_sample_keeps_each_class_s_share_within_one_image(
    counts: list[int], max_images: int
) -> None:
    _, labels = _features(counts)
    for seed in range(5):
        rows = stratified_sample(labels, max_images, seed)
        assert len(rows) == max_images == len(set(rows.tolist()))
        assert np.all(np.diff(rows) > 0)  # in the images' own order
        taken = np.bincount(labels[rows], minlength=len(counts))
        share = np.array(counts) * max_images / sum(counts)
        assert np.all(np.abs(taken - share) < 1), (taken, share)
    assert not np.array_equal(
        stratified_sample(labels, max_images, 0), stratified_sample(labels, max_images, 1)
    )


def test_each_point_keeps_the_label_of_the_image_it_maps() -> None:
    """The labels returned are the sampled images', row for row: two far-apart classes
    land apart, each where its own images are."""
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat([0, 1], 50))
    features = np.where(labels[:, None] == 1, 100.0, 0.0) + rng.normal(size=(100, 5))
    xy, shown = tsne_map(features, labels, max_images=40, seed=0)
    assert np.bincount(shown).tolist() == [20, 20]
    centres = np.array([xy[shown == c].mean(0) for c in (0, 1)])
    spread = max(np.linalg.norm(xy[shown == c] - centres[c], axis=1).max() for c in (0, 1))
    # every point nearer its own class's centre than the other's: the labels did not
    # get shuffled against the rows
    for c in (0, 1):
        own = np.linalg.norm(xy[shown == c] - centres[c], axis=1)
        other = np.linalg.norm(xy[shown == c] - centres[1 - c], axis=1)
        assert np.all(own < other)
    assert np.linalg.norm(centres[0] - centres[1]) > spread


@pytest.mark.parametrize("n", [2, 3, 5, 9])
def test_a_handful_of_images_is_still_mapped(n: int) -> None:
    # t-SNE's perplexity must stay under the number of images: 30 would fail here
    features, labels = _features([n - n // 2, n // 2] if n > 2 else [1, 1])
    xy, shown = tsne_map(features, labels, max_images=100, seed=0)
    assert xy.shape == (n, 2) and np.isfinite(xy).all()
    assert sorted(shown.tolist()) == sorted(labels.tolist())
    assert 0 < perplexity_for(n) < n


def test_one_component_features_are_mapped_too() -> None:
    features, labels = _features([6, 6], dims=1)
    xy, _ = tsne_map(features, labels, max_images=100, seed=0)
    assert xy.shape == (12, 2) and np.isfinite(xy).all()


def test_fewer_images_than_a_map_needs_say_so() -> None:
    features, labels = _features([1])
    assert len(labels) < MIN_IMAGES
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        tsne_map(features, labels, max_images=10, seed=0)
    with pytest.raises(ValueError, match="one row per label"):
        tsne_map(np.zeros((3, 2)), np.zeros(4, dtype=int), max_images=10, seed=0)


def test_perplexity_is_scikit_learn_s_default_for_a_large_sample() -> None:
    assert perplexity_for(2000) == 30.0
    assert perplexity_for(31) == 10.0
