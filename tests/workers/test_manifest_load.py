"""A unit's first read, the campaign's manifest, on a worker whose artifact folder is not
the submitter's: one line that says which variable to look at."""

from __future__ import annotations

from pathlib import Path

import pytest

from db.store import Artifact, Store
from shared.artifacts import atomic_write_text
from shared.manifest import Manifest, manifest_path
from shared.preprocess import PreprocessError
from shared.settings import Settings
from workers.data import load_manifest


def _manifest(cls: str) -> Manifest:
    return Manifest((cls,), (), "f" * 64, "k" * 20, 32, 8)


def _store(url: str, artifacts: Path) -> Store:
    """A campaign whose manifest the submitter wrote under ``artifacts``."""
    text = _manifest("A").to_json()
    written = atomic_write_text(manifest_path(artifacts / "campaigns" / "c-1"), text)
    store = Store(url)
    store.upgrade()
    relative = written.path.relative_to(artifacts).as_posix()
    store.create_campaign(
        "c-1",
        name="c",
        source="c.toml",
        digest="d",
        spec={},
        classes=["A"],
        units=[],
        artifacts=[Artifact(relative, "manifest", written.sha256, written.size, "c-1")],
    )
    return store


def test_a_worker_with_another_artifact_folder_is_told_which_variable(
    sqlite_url: str, tmp_path: Path
) -> None:
    store = _store(sqlite_url, tmp_path / "submitter")
    elsewhere = tmp_path / "worker"
    settings = Settings(tmp_path, "filesystem://x", sqlite_url, elsewhere)
    with pytest.raises(PreprocessError) as info:
        load_manifest(store, settings, "c-1")
    assert str(info.value) == (
        f"{manifest_path(elsewhere / 'campaigns' / 'c-1')}: the campaign's manifest is not "
        f"there; ORCHARD_ARTIFACTS on this worker ({elsewhere}) must be the folder the "
        "campaign was submitted with (on a cluster, the same share, mounted)"
    )


def test_the_manifest_used_is_the_one_whose_checksum_was_checked(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers import data

    artifacts = tmp_path / "shared"
    store = _store(sqlite_url, artifacts)
    settings = Settings(tmp_path, "filesystem://x", sqlite_url, artifacts)
    real = data.read_if_intact

    def check_then_swap(path: Path, sha256: str) -> bytes | None:
        checked = real(path, sha256)
        path.write_text(_manifest("Z").to_json())  # replaced right after the check
        return checked

    monkeypatch.setattr(data, "read_if_intact", check_then_swap)
    data._read_manifest.cache_clear()
    assert load_manifest(store, settings, "c-1") == _manifest("A")  # what was checked
    data._read_manifest.cache_clear()
    monkeypatch.setattr(data, "read_if_intact", real)
    with pytest.raises(PreprocessError, match="manifest checksum mismatch"):
        load_manifest(store, settings, "c-1")
