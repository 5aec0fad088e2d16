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
    database = absolute_sqlite_url(
        env.get("ORCHARD_DATABASE_URL") or f"sqlite:///{home / 'orchard.db'}"
    )
    artifacts = Path(env.get("ORCHARD_ARTIFACTS") or home / "artifacts").expanduser().resolve()
    return Settings(home=home, broker_url=broker, database_url=database, artifacts=artifacts)


def absolute_sqlite_url(url: str) -> str:
    """``sqlite:///rel/x.db`` -> ``sqlite:////cwd/rel/x.db``; any other URL as it is.

    SQLite opens a relative path from the process's working directory, so a worker or
    a ``--gpus`` child started elsewhere would open another file. In-memory databases
    and SQLite ``file:`` URIs are left to SQLite.
    """
    scheme, sep, rest = url.partition(":///")
    if not sep or scheme.partition("+")[0] != "sqlite":
        return url
    path, query_sep, query = rest.partition("?")
    if not path or path == ":memory:" or path.startswith("file:") or Path(path).is_absolute():
        return url
    return f"{scheme}:///{Path(path).expanduser().resolve()}{query_sep}{query}"


def mask_url(url: str) -> str:
    """``redis://:secret@host:6379/0`` -> ``redis://:***@host:6379/0``; safe to print.

    Not parsed as a URL: a password with ``/``, ``#``, ``?`` or ``@`` ends the netloc
    early for ``urllib``, which would then print it. Everything between the first
    ``:`` of the user info and the last ``@`` is masked.
    """
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:***@{host}"
