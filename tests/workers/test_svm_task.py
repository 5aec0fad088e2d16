"""orchard.fit_svm's shared PCA: fitted once per (variant, fold, whiten), sliced per point.

The task body runs against a real SQLite store and real cache shards on disk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from db.store import Artifact, Store
from shared.artifacts import sha256_file
from shared.manifest import Entry, Manifest
from shared.plan import TRAIN, plan_units
from shared.preprocess import shard_name, write_shard
from shared.settings import Settings
from shared.spec import parse_campaign
from shared.svm import fit_pca_basis, project_all
from shared.variants import derive
from workers.tasks import svm as svm_task
from workers.tasks.base import UnitContext

CAMPAIGN_ID = "s-1"
N_TRAIN, N_TEST, CACHE = 24, 6, 32


@pytest.fixture(autouse=True)
def _forget_loaded_projection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(svm_task, "_last", None)


def _images() -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    labels = [("A", "B", "C")[i % 3] for i in range(N_TRAIN + N_TEST)]
    base = np.array([[200, 60, 60], [60, 200, 60], [60, 60, 200]])[[ord(c) - 65 for c in labels]]
    noise = rng.normal(0, 30, (len(labels), CACHE, CACHE, 3))
    return np.clip(base[:, None, None, :] + noise, 0, 255).astype(np.uint8), labels


@pytest.fixture
def env(tmp_path: Path, sqlite_url: str) -> tuple[Store, Settings, Manifest]:
    settings = Settings(
        home=tmp_path / "home",
        broker_url="memory://",
        database_url=sqlite_url,
        artifacts=tmp_path / "artifacts",
    )
    store = Store(sqlite_url)
    store.upgrade()
    campaign = parse_campaign(
        {
            "name": "s",
            "folds": 2,
            "dataset": {"kind": "synthetic"},
            "preprocessing": {"size": CACHE, "shard_size": 16},
            # 1000 is more than 12 training images allow: that point must fail alone
            "svm": {
                "variant": "polar16",
                "n_components": [3, 6, 1000],
                "whiten": [False, True],
                "C": [1.0, 10.0],
                "folds": 2,
            },
        },
        source="s.toml",
    )
    images, labels = _images()
    entries = tuple(
        Entry(
            image_id=f"{i}.jpg",
            label=label,
            split="test" if i >= N_TRAIN else "train",
            path=f"/nowhere/{i}.jpg",
            fold=-1 if i >= N_TRAIN else i % 2,
        )
        for i, label in enumerate(labels)
    )
    manifest = Manifest(("A", "B", "C"), entries, "f" * 64, "k" * 16, CACHE, 16)
    for index, start in enumerate(range(0, len(images), 16)):
        rel = f"cache/{manifest.cache_key}/{shard_name(index)}"
        written = write_shard(settings.artifacts / rel, images[start : start + 16])
        store.record_artifact(Artifact(rel, "shard", written.sha256, written.size))
    store.create_campaign(
        CAMPAIGN_ID,
        name="s",
        source="s.toml",
        digest=campaign.digest(),
        spec=campaign.model_dump(mode="json"),
        classes=["A", "B", "C"],
        units=plan_units(CAMPAIGN_ID, campaign, [(0, 16), (16, 30)]),
    )
    return store, settings, manifest


def _run(env, **params):
    """Run the task body for the unit with ``params`` (and fold 0 unless given)."""
    store, settings, manifest = env
    fold = params.pop("fold", 0)
    (unit,) = [
        u
        for u in store.units(CAMPAIGN_ID)
        if u.stage == TRAIN
        and u.fold == fold
        and all(u.params[name] == value for name, value in params.items())
    ]
    ctx = UnitContext(store.get_campaign(CAMPAIGN_ID), unit, store, settings, _manifest=manifest)
    return svm_task.fit_svm.run.__wrapped__(ctx)


def _pca_records(store: Store) -> list[Artifact]:
    return store.artifacts(CAMPAIGN_ID, kind="pca")


def test_points_of_a_fold_share_one_basis_with_the_largest_k(env):
    store, settings, _ = env
    first = _run(env, n_components=3, whiten=False, C=1.0)
    assert first.extra["pca_fitted"] is True
    (record,) = _pca_records(store)
    # 12 training images in fold 0 allow 12 components: the largest usable k, not 1000
    assert record.path == f"campaigns/{CAMPAIGN_ID}/pca/polar16-f0-w0-k12.npz"
    assert record.unit_key is not None and record.sha256 == sha256_file(
        settings.artifacts / record.path
    )
    for n_components, c in [(6, 1.0), (3, 10.0), (6, 10.0)]:
        later = _run(env, n_components=n_components, whiten=False, C=c)
        assert later.extra["pca_fitted"] is False
        assert later.extra["pca_components"] == 12
    assert len(_pca_records(store)) == 1
    # whiten and the other fold each get their own basis
    assert _run(env, n_components=3, whiten=True, C=1.0).extra["pca_fitted"] is True
    assert _run(env, n_components=3, whiten=False, C=1.0, fold=1).extra["pca_fitted"] is True
    assert [Path(r.path).name for r in _pca_records(store)] == [
        "polar16-f0-w0-k12.npz",
        "polar16-f0-w1-k12.npz",
        "polar16-f1-w0-k12.npz",
    ]


def test_a_sliced_point_equals_its_own_pca(env):
    store, settings, manifest = env
    outcome = _run(env, n_components=6, whiten=True, C=10.0)
    assert outcome.train_acc is not None and outcome.val_acc is not None
    assert len(outcome.predictions["val"]) == 12 and len(outcome.predictions["test"]) == N_TEST
    (record,) = _pca_records(store)
    images = derive(_images()[0], "polar16")
    train, _, _ = manifest.fold_indices(0)
    expected = project_all(fit_pca_basis(images[train], 12, True, seed=0), images)
    blob = (settings.artifacts / record.path).read_bytes()
    assert blob == expected.to_bytes()  # the campaign seed (0) + fold (0) fixes the file
    assert 0 < outcome.extra["explained_variance"] < expected.explained(12)


def test_a_file_that_is_not_the_recorded_one_is_fitted_again(env, monkeypatch):
    store, settings, _ = env
    _run(env, n_components=3, whiten=False, C=1.0)
    (record,) = _pca_records(store)
    path = settings.artifacts / record.path
    good = path.read_bytes()
    path.write_bytes(good[:-100])  # truncated behind the store's back
    # the fitting process keeps what it wrote in memory; another process reads the file
    assert _run(env, n_components=3, whiten=False, C=10.0).extra["pca_fitted"] is False
    monkeypatch.setattr(svm_task, "_last", None)
    assert _run(env, n_components=6, whiten=False, C=1.0).extra["pca_fitted"] is True
    assert path.read_bytes() == good
    assert _pca_records(store)[0].sha256 == record.sha256


def test_too_many_components_fails_that_point_in_one_line(env):
    store, _, _ = env
    with pytest.raises(ValueError, match=r"^n_components=1000 exceeds what 12 training images"):
        _run(env, n_components=1000, whiten=False, C=1.0)
    assert _pca_records(store) == []  # nothing fitted for a point that cannot run


def test_largest_n_components_reads_the_stored_spec():
    assert svm_task.largest_n_components({"svm": {"n_components": [50, 1000, 200]}}, 50) == 1000
    assert svm_task.largest_n_components({"svm": {"n_components": 20}}, 5) == 20
    assert svm_task.largest_n_components({}, 7) == 7
