"""Where orchard keeps things: broker, store and artifacts, read from the environment.

One place for the three locations every process must agree on. With nothing set,
orchard runs self-contained under ``./.orchard``: kombu's filesystem broker, a SQLite
store, and an artifact folder. A cluster sets the three URLs/paths to shared services.

| variable              | default                                   |
|-----------------------|-------------------------------------------|
| ORCHARD_HOME          | ./.orchard                                |
| ORCHARD_BROKER_URL    | filesystem://$ORCHARD_HOME/broker         |
| ORCHARD_DATABASE_URL  | sqlite:///$ORCHARD_HOME/orchard.db        |
| ORCHARD_ARTIFACTS     | $ORCHARD_HOME/artifacts                   |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


@dataclass(frozen=True, slots=True)
class Settings:
    home: Path
    broker_url: str
    database_url: str
    artifacts: Path

    @property
    def broker_is_filesystem(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    @property
    def broker_folder(self) -> Path:
        """The folder of a ``filesystem://`` broker (messages and exchange tables)."""
        return Path(self.broker_url.removeprefix("filesystem://"))


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    home = Path(env.get("ORCHARD_HOME") or ".orchard").expanduser().resolve()
    broker = env.get("ORCHARD_BROKER_URL") or f"filesystem://{home / 'broker'}"
    if broker.startswith("filesystem://"):
        folder = broker.removeprefix("filesystem://") or str(home / "broker")
        broker = f"filesystem://{Path(folder).expanduser().resolve()}"
    database = env.get("ORCHARD_DATABASE_URL") or f"sqlite:///{home / 'orchard.db'}"
    artifacts = Path(env.get("ORCHARD_ARTIFACTS") or home / "artifacts").expanduser().resolve()
    return Settings(home=home, broker_url=broker, database_url=database, artifacts=artifacts)


def mask_url(url: str) -> str:
    """``redis://:secret@host:6379/0`` -> ``redis://:***@host:6379/0``; safe to print."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")  # host keeps its [IPv6] brackets
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
