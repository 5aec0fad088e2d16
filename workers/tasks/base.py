"""What every orchard task does around its body, in one place.

A task message carries two small strings, the campaign id and the unit key, checked
by a pydantic model on arrival. The wrapper then asks the store whether the unit
still needs running (a re-delivered finished unit returns at once), runs the body,
writes the outcome in one transaction (first write wins), and opens whatever stage
is now ready. The body itself only turns inputs into an :class:`Outcome`.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from celery import Task
from celery.exceptions import Reject
from celery.utils.log import get_task_logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from db.store import Campaign, Outcome, Store, Unit
from scheduler.canvas import advance
from shared.artifacts import sha256_file
from shared.manifest import Manifest, manifest_path
from shared.preprocess import PreprocessError
from shared.settings import Settings, load_settings
from workers.app import app
from workers.data import load_variant

log = get_task_logger("orchard")


class UnitMessage(BaseModel):
    """The whole payload of every orchard task: ids, never arrays."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    campaign_id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,79}$")
    unit_key: str = Field(min_length=1, max_length=200)


@functools.cache
def _settings(pid: int) -> Settings:
    return load_settings()


@functools.cache
def _store(pid: int) -> Store:
    # one engine per process: a pool inherited through fork would share sockets
    store = Store(_settings(pid).database_url)
    store.check_schema()
    return store


def worker_settings() -> Settings:
    return _settings(os.getpid())


def worker_store() -> Store:
    return _store(os.getpid())


@dataclass(frozen=True)
class FoldData:
    """Manifest indices of one fold's splits, and every cached image as one variant."""

    manifest: Manifest
    images: np.ndarray
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def split(self) -> tuple[np.ndarray, ...]:
        """(train images, train labels, val images, val labels, test images)."""
        labels = self.manifest.label_index
        return (
            self.images[self.train],
            labels(self.train),
            self.images[self.val],
            labels(self.val),
            self.images[self.test],
        )


@dataclass
class UnitContext:
    campaign: Campaign
    unit: Unit
    store: Store
    settings: Settings
    _manifest: Manifest | None = field(default=None, repr=False)

    @property
    def campaign_dir(self) -> Path:
        return self.settings.artifacts / "campaigns" / self.campaign.id

    @property
    def seed(self) -> int:
        return int(self.campaign.spec.get("seed", 0))

    def manifest(self) -> Manifest:
        # once per task: each load asks the store for the manifest's checksum
        if self._manifest is None:
            self._manifest = load_manifest(self.store, self.settings, self.campaign.id)
        return self._manifest

    def fold_data(self, variant: str) -> FoldData:
        """This unit's fold of the cached images, as ``variant``, with labels."""
        manifest = self.manifest()
        images = load_variant(self.store, self.settings, manifest, variant)
        train, val, test = manifest.fold_indices(self.unit.fold)
        return FoldData(manifest, images, train, val, test)

    def relative(self, path: Path) -> str:
        """Artifact paths are stored relative to the artifact root, so hosts may mount it
        at different places."""
        return path.relative_to(self.settings.artifacts).as_posix()


@functools.lru_cache(maxsize=4)
def _read_manifest(path: Path, sha256: str) -> Manifest:
    if sha256_file(path) != sha256:
        raise PreprocessError(f"{path}: manifest checksum mismatch (truncated or altered)")
    return Manifest.from_json(path.read_text(encoding="utf-8"))


def load_manifest(store: Store, settings: Settings, campaign_id: str) -> Manifest:
    path = manifest_path(settings.artifacts / "campaigns" / campaign_id)
    record = store.find_artifact(path.relative_to(settings.artifacts).as_posix())
    if record is None:
        raise PreprocessError(f"{path}: manifest not recorded in the store")
    return _read_manifest(path, record.sha256)


def unit_task(name: str) -> Callable[[Callable[[UnitContext], Outcome]], Task]:
    """Register ``body`` as the Celery task ``name`` with orchard's unit protocol."""

    def register(body: Callable[[UnitContext], Outcome]) -> Task:
        @app.task(name=name, bind=True)
        @functools.wraps(body)
        def task(self: Task, **kwargs: Any) -> dict[str, Any]:
            try:
                message = UnitMessage.model_validate(kwargs)
            except ValidationError as exc:
                # a malformed message can never succeed: drop it, loudly
                log.error(
                    "%s: rejected malformed message %s: %s",
                    name,
                    json.dumps(kwargs)[:200],
                    exc.errors()[0]["msg"],
                )
                raise Reject(
                    f"malformed message: {exc.errors()[0]['msg']}", requeue=False
                ) from None
            return run_unit(self, message, body)

        return task

    return register


def run_unit(task: Task, message: UnitMessage, body: Callable[[UnitContext], Outcome]) -> dict:
    store = worker_store()
    settings = worker_settings()
    key = message.unit_key
    start = store.start_unit(key, worker=task.request.hostname or "?", task_id=task.request.id)
    if not start.run:
        log.info("%s already %s; nothing to do", key, start.state)
        advance(store, task.app, message.campaign_id)
        return {"unit": key, "state": start.state, "duplicate": True}

    campaign = store.get_campaign(message.campaign_id)
    context = UnitContext(campaign, store.get_unit(key), store, settings)
    started = time.perf_counter()
    log.info("%s started (attempt %d)", key, start.attempts)
    try:
        outcome = body(context)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:2000]
        store.fail_unit(key, error)
        log.error("%s failed after %.1f s: %s", key, time.perf_counter() - started, error)
        advance(store, task.app, message.campaign_id)
        raise
    recorded = store.finish_unit(key, outcome)
    log.info(
        "%s %s in %.1f s",
        key,
        "succeeded" if recorded else "finished, but another delivery recorded it first",
        time.perf_counter() - started,
    )
    advance(store, task.app, message.campaign_id)
    return {"unit": key, "state": "SUCCESS", "recorded": recorded}
