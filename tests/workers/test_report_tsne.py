"""Which PCA projection the report's t-SNE map is drawn from (``embed_svm_features``),
and the one line it gives where it cannot be drawn. The manifest and the projection
files are real; the store is asked only for each file's record."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from db.store import Result, Unit
from shared.artifacts import atomic_write_bytes
from shared.manifest import Manifest, build_manifest
from shared.settings import Settings
from shared.spec import parse_campaign
from shared.svm import PcaProjection
from tests.aicup import make_aicup
from workers.reporting.explain import embed_svm_features
from workers.tasks.svm import pca_path


class Records:
    """The store, as far as the loader asks it: a file's record by its path."""

    def __init__(self) -> None:
        self.sha256: dict[str, str] = {}

    def find_artifact(self, path: str) -> SimpleNamespace | None:
        sha = self.sha256.get(path)
        return None if sha is None else SimpleNamespace(sha256=sha)


@pytest.fixture
def world(tmp_path: Path) -> tuple[Records, Settings, Manifest]:
    settings = Settings(
        home=tmp_path / "home",
        broker_url="memory://",
        database_url=f"sqlite:///{tmp_path / 's.db'}",
        artifacts=tmp_path / "artifacts",
    )
    root = make_aicup(tmp_path / "data", per_class=6)
    raw = {"name": "t", "folds": 2, "dataset": {"kind": "aicup", "root": str(root)}}
    manifest = build_manifest(parse_campaign(raw, source="t"), settings.artifacts)
    return Records(), settings, manifest


def _unit(key: str, params: dict) -> Unit:
    return Unit(key, key.split("/")[0], "svm", 1, 0, params, "h", "orchard.fit_svm", "cpu",
                "SUCCESS", 1, "w", None, None, None)  # fmt: skip


def _projection(
    records: Records, settings: Settings, campaign: str, rows: int, k: int, **params: object
) -> Path:
    path = pca_path(settings.artifacts / "campaigns" / campaign, "resize16", 0, False, k)
    z = np.random.default_rng(0).normal(size=(rows, k)).astype(np.float32)
    blob = PcaProjection(z, np.full(k, 1 / k), False, rows, 768).to_bytes()
    atomic_write_bytes(path, blob)
    records.sha256[path.relative_to(settings.artifacts).as_posix()] = hashlib.sha256(
        blob
    ).hexdigest()
    return path


PARAMS = {"variant": "resize16", "whiten": False, "n_components": 6}


def _result(key: str, **extra: object) -> Result:
    return Result(key, 1.0, 0.5, None, None, None, 0.1, dict(extra))


def test_the_map_is_of_the_point_s_own_width_from_its_fold_s_projection(world) -> None:
    records, settings, manifest = world
    _projection(records, settings, "c-1", len(manifest.entries), 8)
    unit = _unit("c-1/svm/p/f0", PARAMS)
    section = embed_svm_features(
        records, settings, manifest, [unit], {unit.key: _result(unit.key, pca_components=8)},
        max_images=100, seed=0,
    )  # fmt: skip
    train, _, _ = manifest.fold_indices(0)
    assert section.drawn and section.note == ""
    assert (section.n_components, section.available, len(section.xy)) == (6, len(train), len(train))


def test_a_searched_width_and_a_reused_unit_s_source_folder_are_followed(world) -> None:
    """A [svm.search] point leaves n_components to its fold's choice (best_n_components);
    a unit copied by `submit --reuse` used its source campaign's projection."""
    records, settings, manifest = world
    _projection(records, settings, "c-0", len(manifest.entries), 8)  # the source's only
    params = {k: v for k, v in PARAMS.items() if k != "n_components"}
    unit = _unit("c-1/svm/p/f0", params)
    result = _result(unit.key, pca_components=8, best_n_components=3, reused_from="c-0/svm/p/f0")
    section = embed_svm_features(
        records, settings, manifest, [unit], {unit.key: result}, max_images=100, seed=0
    )
    assert section.drawn and section.n_components == 3


@pytest.mark.parametrize(
    ("case", "said"),
    [
        ("no fold 0", "Not drawn: the best SVM point's fold 0 did not succeed."),
        ("no width", "recorded no PCA projection."),
        ("not recorded", "the PCA projection, is not recorded in the store."),
        ("other rows", "projects 5 images, the manifest has"),
        ("changed", "the PCA projection, differs from its record (checksum)"),
    ],
)
def test_where_the_map_cannot_be_drawn_one_line_says_why(world, case: str, said: str) -> None:
    records, settings, manifest = world
    rows = 5 if case == "other rows" else len(manifest.entries)
    path = _projection(records, settings, "c-1", rows, 8)
    if case == "not recorded":
        records.sha256.clear()
    if case == "changed":  # written over since its unit recorded it
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        atomic_write_bytes(path, bytes(blob))
    unit = _unit("c-1/svm/p/f0", PARAMS)
    if case == "no fold 0":
        unit = replace(unit, key="c-1/svm/p/f1", fold=1)
    extra = {} if case == "no width" else {"pca_components": 8}
    section = embed_svm_features(
        records, settings, manifest, [unit], {unit.key: _result(unit.key, **extra)},
        max_images=100, seed=0,
    )  # fmt: skip
    assert not section.drawn and said in section.note, section.note
    if case in ("not recorded", "other rows", "changed"):
        assert str(path) in section.note
