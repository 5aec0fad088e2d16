"""A campaign whose preprocessing already ran: a real SQLite store, its planned units,
and cache shards of tiny coloured images on disk, for running one task body at a time."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from db.store import Artifact, Store
from shared.manifest import Entry, Manifest
from shared.plan import plan_units
from shared.preprocess import shard_name, write_shard
from shared.settings import Settings
from shared.spec import parse_campaign

N_TRAIN, N_TEST, CACHE = 24, 6, 32
SHARD = 16

CachedCampaign = tuple[Store, Settings, Manifest]


def tiny_images() -> tuple[np.ndarray, list[str]]:
    """Noisy red, green and blue images, labelled A, B and C in turn."""
    rng = np.random.default_rng(0)
    labels = [("A", "B", "C")[i % 3] for i in range(N_TRAIN + N_TEST)]
    base = np.array([[200, 60, 60], [60, 200, 60], [60, 60, 200]])[[ord(c) - 65 for c in labels]]
    noise = rng.normal(0, 30, (len(labels), CACHE, CACHE, 3))
    return np.clip(base[:, None, None, :] + noise, 0, 255).astype(np.uint8), labels


def local_settings(tmp_path: Path, database_url: str) -> Settings:
    """Settings of a worker on this host: its home and artifacts under ``tmp_path``."""
    return Settings(
        home=tmp_path / "home",
        broker_url="memory://",
        database_url=database_url,
        artifacts=tmp_path / "artifacts",
    )


@pytest.fixture
def cached_campaign(
    tmp_path: Path, sqlite_url: str
) -> Callable[[str, dict[str, Any]], CachedCampaign]:
    """``make(campaign_id, families)``: the campaign ``<name>-1`` with the family
    sections ``families`` (2 folds, training images in folds 0 and 1), created."""

    def make(campaign_id: str, families: dict[str, Any]) -> CachedCampaign:
        name = campaign_id.split("-", 1)[0]
        settings = local_settings(tmp_path, sqlite_url)
        store = Store(sqlite_url)
        store.upgrade()
        campaign = parse_campaign(
            {
                "name": name,
                "folds": 2,
                "dataset": {"kind": "synthetic"},
                "preprocessing": {"size": CACHE, "shard_size": SHARD},
                **families,
            },
            source=f"{name}.toml",
        )
        images, labels = tiny_images()
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
        manifest = Manifest(("A", "B", "C"), entries, "f" * 64, "k" * 16, CACHE, SHARD)
        for index, start in enumerate(range(0, len(images), SHARD)):
            rel = f"cache/{manifest.cache_key}/{shard_name(index)}"
            written = write_shard(settings.artifacts / rel, images[start : start + SHARD])
            store.record_artifact(Artifact(rel, "shard", written.sha256, written.size))
        store.create_campaign(
            campaign_id,
            name=name,
            source=f"{name}.toml",
            digest=campaign.digest(),
            spec=campaign.model_dump(mode="json"),
            classes=["A", "B", "C"],
            units=plan_units(campaign_id, campaign, [(0, SHARD), (SHARD, N_TRAIN + N_TEST)]),
        )
        return store, settings, manifest

    return make
