"""The deployment an API call works with: its settings (arguments over the environment
over the defaults, checked) and its store."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from shared.settings import Settings, absolute_sqlite_url, load_settings

if TYPE_CHECKING:  # SQLAlchemy only once a call opens the store: `orchard` starts without it
    from db.store import Store


def resolve_settings(
    settings: Settings | None,
    broker: str | None = None,
    database: str | None = None,
    artifacts: str | Path | None = None,
) -> Settings:
    """``settings`` (None: the environment's), with each URL or folder given instead of
    its setting; the URLs' form checked, one line each."""
    settings = settings or load_settings()
    if broker:
        settings = replace(settings, broker_url=broker)
    if database:
        settings = replace(settings, database_url=absolute_sqlite_url(database))
    if artifacts:
        settings = replace(settings, artifacts=Path(artifacts).resolve())
    # their form, as the commands check it: one line, not a driver's traceback
    from db.urls import check_database_url
    from workers.config import check_broker_url

    check_database_url(settings.database_url)
    check_broker_url(settings.broker_url)
    return settings


def existing_store(settings: Settings) -> Store:
    """The store of a call that reads or changes what is there: a SQLite file that does
    not exist is not created (one line: `no store at … yet`)."""
    from db.store import Store
    from db.urls import require_sqlite_file

    require_sqlite_file(settings.database_url)
    return Store(settings.database_url)


@contextmanager
def opened_store(settings: Settings) -> Iterator[Store]:
    """The existing store, its connections closed on the way out."""
    store = existing_store(settings)
    try:
        yield store
    finally:
        store.dispose()
