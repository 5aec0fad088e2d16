"""A unit's first read, the campaign's manifest, on a worker whose artifact folder is not
the submitter's: one line that says which variable to look at."""

from __future__ import annotations

from pathlib import Path

import pytest

from db.store import Artifact, Store
from shared.artifacts import atomic_write_text
from shared.manifest import manifest_path
from shared.preprocess import PreprocessError
from shared.settings import Settings
from workers.tasks.base import load_manifest


def _store(url: str, artifacts: Path) -> Store:
    """A campaign whose manifest the submitter wrote under ``artifacts``."""
    written = atomic_write_text(manifest_path(artifacts / "campaigns" / "c-1"), "{}")
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
