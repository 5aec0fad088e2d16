"""Which model file the report's LIME section loads, and the one line it gives where the
file is not the one its unit recorded: it never explains another model than the fold's."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from db.store import Artifact, Result, Store, Unit
from shared.artifacts import atomic_write_bytes
from shared.settings import Settings
from tests.workers.conftest import N_TEST
from workers.reporting.explain import explain_cnn

KEY = "c-1/cnn/p/f1"


class Records:
    """The store, as far as the LIME loader asks it: a campaign's model files."""

    def __init__(self) -> None:
        self.models: list[SimpleNamespace] = []
        self.asked: list[str] = []

    def artifacts(self, campaign_id: str, *, kind: str) -> list[SimpleNamespace]:
        assert kind == "model"
        self.asked.append(campaign_id)
        return [m for m in self.models if m.unit_key.split("/")[0] == campaign_id]


def _unit(key: str, fold: int) -> Unit:
    return Unit(key, key.split("/")[0], "cnn", 1, fold, {}, "p", "orchard.train_cnn_fold",
                "gpu", "SUCCESS", 1, "w", None, None, None)  # fmt: skip


@pytest.mark.parametrize(
    ("case", "said"),
    [
        ("not recorded", f"no model file recorded for {KEY}"),
        ("missing", "model file missing"),
        ("changed", "checksum mismatch"),
    ],
)
def test_a_model_file_that_is_not_the_recorded_one_is_not_explained(
    tmp_path: Path, case: str, said: str
) -> None:
    settings = Settings(
        home=tmp_path / "home",
        broker_url="memory://",
        database_url=f"sqlite:///{tmp_path / 's.db'}",
        artifacts=tmp_path / "artifacts",
    )
    records = Records()
    # fold 1 is the best of the point's folds: its model, not fold 0's, is the one asked for
    folds = [_unit("c-1/cnn/p/f0", 0), _unit(KEY, 1)]
    results = {
        "c-1/cnn/p/f0": Result("c-1/cnn/p/f0", 1.0, 0.6, None, None, None, 0.1, {}),
        KEY: Result(KEY, 1.0, 0.9, None, None, None, 0.1, {}),
    }
    blob = b"a model, as its unit wrote it"
    path = settings.artifacts / "campaigns" / "c-1" / "f1.pt"
    atomic_write_bytes(path, blob)
    if case != "not recorded":
        records.models.append(
            SimpleNamespace(
                unit_key=KEY,
                path=path.relative_to(settings.artifacts).as_posix(),
                sha256=hashlib.sha256(blob).hexdigest(),
            )
        )
    if case == "missing":
        path.unlink()
    if case == "changed":
        atomic_write_bytes(path, b"another model, written over it")
    manifest = SimpleNamespace(classes=["A", "B", "C"])
    section = explain_cnn(
        records, settings, manifest, folds, results, per_class=1, num_samples=10, seed=0
    )
    assert section.items == [] and said in section.note, section.note
    assert section.unit_key == KEY and records.asked == ["c-1"]
    if case in ("missing", "changed"):
        assert section.note.startswith(str(path))


def _untrained_fold(store: Store, settings: Settings) -> Unit:
    """Campaign l-1's first CNN fold, with a model file of an untrained network of fixed
    weights (predicting one class) recorded for it."""
    import io

    import torch

    from shared.cnn import build_model

    [fold] = [u for u in store.units("l-1") if u.family == "cnn" and u.fold == 0]
    blob = io.BytesIO()
    torch.manual_seed(0)
    torch.save(
        {"params": fold.params, "state_dict": build_model(fold.params, 3).state_dict()}, blob
    )
    written = atomic_write_bytes(settings.artifacts / "campaigns/l-1/f0.pt", blob.getvalue())
    store.record_artifact(
        Artifact("campaigns/l-1/f0.pt", "model", written.sha256, written.size, "l-1", fold.key)
    )
    return fold


def test_of_a_large_test_set_a_stratified_sample_is_scored_to_pick_what_is_explained(
    cached_campaign,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The model runs on the CPU over the images it may explain: over 40,000 test images
    that took an hour, and held the whole variant in the report's process. It scores a
    sample of LIME_CANDIDATES, every class kept, read from their shards alone."""
    import shared.embedding
    import workers.data
    from workers.reporting import explain

    store, settings, manifest = cached_campaign(
        "l-1", {"cnn": {"folds": 2, "epochs": 1, "image_size": 32, "width": 0.25, "dense": "8"}}
    )
    fold = _untrained_fold(store, settings)
    asked: list[np.ndarray] = []
    load_rows = workers.data.load_rows
    monkeypatch.setattr(
        workers.data, "load_rows", lambda *args: asked.append(args[-1]) or load_rows(*args)
    )
    monkeypatch.setattr(shared.embedding, "LIME_CANDIDATES", 3)
    monkeypatch.setattr(shared.embedding, "LIME_CLASS_FLOOR", 1)
    results = {fold.key: Result(fold.key, 1.0, 0.9, None, None, None, 0.1, {})}
    section = explain.explain_cnn(
        store, settings, manifest, [fold], results, per_class=1, num_samples=10, seed=0
    )
    [rows] = asked
    test = manifest.test_indices()
    assert len(test) == N_TEST > 3 and len(rows) == 3 and set(rows) <= set(test)
    # one of each class (the test images are labelled A, B, C in turn)
    assert sorted(manifest.label_index(rows)) == [0, 1, 2]
    assert section.items and {item.image_id for item in section.items} <= {
        manifest.entries[r].image_id for r in rows
    }
    assert section.note == ""  # every class explained
    # unlabelled, each class is explained by the images predicted as it: an untrained
    # model predicts one class for these few, and the section says which it never did
    monkeypatch.setattr(type(manifest), "label_index", lambda self, rows: np.full(len(rows), -1))
    section = explain.explain_cnn(
        store, settings, manifest, [fold], results, per_class=1, num_samples=10, seed=0
    )
    explained = {item.explained for item in section.items}
    unseen = [c for c in manifest.classes if c not in explained]
    assert unseen and section.note == (
        f"No test image of {', '.join(unseen)}: the model predicted none of the 3 it scored "
        "as such."
    )


def test_the_model_scores_candidates_and_perturbed_copies_a_few_images_at_a_time(
    cached_campaign,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the CPU a prediction holds three of the network's largest layer output an
    image (19 MB for the study's CNN at 224 px): 256 at a time held 5 GB in the report's
    process. Every batch the model sees is at most LIME_SCORE_BATCH images."""
    import shared.cnn
    from workers.reporting import explain

    store, settings, manifest = cached_campaign(
        "l-1", {"cnn": {"folds": 2, "epochs": 1, "image_size": 32, "width": 0.25, "dense": "8"}}
    )
    fold = _untrained_fold(store, settings)
    batches: list[int] = []
    normalise = shared.cnn.normalise
    monkeypatch.setattr(shared.cnn, "normalise", lambda x: batches.append(len(x)) or normalise(x))
    monkeypatch.setattr(explain, "LIME_SCORE_BATCH", 4)
    results = {fold.key: Result(fold.key, 1.0, 0.9, None, None, None, 0.1, {})}
    section = explain.explain_cnn(
        store, settings, manifest, [fold], results, per_class=1, num_samples=10, seed=0
    )
    assert section.items and batches and max(batches) == 4, batches
    assert sum(batches) >= N_TEST  # every candidate scored, then the perturbed copies


def test_the_candidates_keep_a_rare_class_and_every_image_of_a_small_test_set() -> None:
    from shared.embedding import LIME_CANDIDATES, LIME_CLASS_FLOOR, lime_candidates

    small = np.array([0, 1, 2, -1] * 10)
    assert list(lime_candidates(small, seed=0)) == list(range(len(small)))
    # a class of 5 among 40,000: its share of 2,000 would be none
    labels = np.array([0] * 39_990 + [1] * 5 + [2] * 5 + [-1] * 5_000)
    rows = lime_candidates(labels, seed=0)
    counts = {c: int(np.count_nonzero(labels[rows] == c)) for c in (0, 1, 2, -1)}
    assert counts[1] == counts[2] == 5
    assert counts[-1] >= LIME_CLASS_FLOOR and counts[0] >= LIME_CANDIDATES * 0.8
    assert len(rows) <= LIME_CANDIDATES + 3 * LIME_CLASS_FLOOR
    assert list(rows) == sorted(set(rows.tolist()))  # ascending, no image twice
    np.testing.assert_array_equal(rows, lime_candidates(labels, seed=0))
