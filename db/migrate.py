"""Schema migrations with Alembic, driven from code (``orchard db upgrade``)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Alembic logs "setup plugin alembic.autogenerate.…" at INFO, seven lines, as it is
# imported: noise at the top of every worker's and Flower's log, which run at INFO.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from alembic.runtime.migration import MigrationContext  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402
from sqlalchemy import Connection, Engine, inspect, text  # noqa: E402

MIGRATIONS = Path(__file__).with_name("migrations")
# Any fixed number works; it only has to be the same for every orchard process.
_PG_LOCK_ID = 0x0C4A4D


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


@functools.cache
def head_revision() -> str:
    """The newest revision this orchard's migrations know. Read once per process: a
    worker left running while its host's checkout is updated keeps the schema its code
    was written for, not the one now on disk."""
    return ScriptDirectory.from_config(_config()).get_current_head()


@functools.cache
def known_revisions() -> frozenset[str]:
    """Every revision this orchard's migrations know (a store upgraded by a newer
    orchard is at one it does not); read once per process, as :func:`head_revision`."""
    return frozenset(
        script.revision for script in ScriptDirectory.from_config(_config()).walk_revisions()
    )


def current_revision(engine: Engine) -> str | None:
    # read-only: on SQLite a deferred BEGIN, not the write lock every check would take
    with engine.connect().execution_options(orchard_read_only=True) as conn:
        return MigrationContext.configure(conn).get_current_revision()


#: Tables every orchard store has: a database without them is not orchard's, whatever
#: its Alembic revision (another application may use Alembic too).
STORE_TABLES = ("campaigns", "units")


def orchard_tables(bind: Engine | Connection) -> list[str]:
    """Which of the tables orchard's migrations create the database already holds."""
    if isinstance(bind, Engine):
        with bind.connect().execution_options(orchard_read_only=True) as conn:
            return orchard_tables(conn)
    from db.models import Base

    return sorted(set(inspect(bind).get_table_names()) & set(Base.metadata.tables))


class UnknownRevisionError(Exception):
    """The schema is at a revision these migrations do not know: a newer orchard's, or,
    without ``store_tables``, another application's that uses Alembic too."""

    def __init__(self, revision: str, *, store_tables: bool = True) -> None:
        super().__init__(revision)
        self.revision = revision
        self.store_tables = store_tables


class TablesInTheWayError(Exception):
    """A database with no orchard schema already holds tables named as orchard's."""

    def __init__(self, tables: list[str]) -> None:
        super().__init__(", ".join(tables))
        self.tables = tables


class BrokenReferencesError(Exception):
    """A migration on SQLite left rows that refer to rows no longer there."""


@contextmanager
def _migrating(engine: Engine) -> Iterator[Connection]:
    """One transaction for a migration. On SQLite with foreign keys off: SQLite cannot
    alter or drop a column in place, so Alembic rebuilds such a table (a copy, the old
    table dropped, the copy renamed), and with foreign keys on, dropping ``units`` or
    ``campaigns`` would delete every row referring to them by cascade: every result,
    prediction and metric. SQLite ignores the pragma inside a transaction, so it is set
    before the BEGIN; the references are checked before the commit."""
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():
                yield conn
                if sqlite and (broken := conn.exec_driver_sql("PRAGMA foreign_key_check").all()):
                    table, rowid, parent, _ = broken[0]
                    raise BrokenReferencesError(
                        f"{len(broken)} row(s) refer to rows no longer there (the first: "
                        f"{table} row {rowid}, in {parent}): nothing was changed"
                    )
        finally:
            if sqlite:
                conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON")


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Bring the schema to ``revision``; safe when several processes do it at once.
    Returns the revision it found (None: no schema yet), read under the same lock."""
    config = _config()
    with _migrating(engine) as conn:
        if conn.dialect.name == "postgresql":
            # two schedulers starting together must not both create the tables
            conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK_ID})
        before = MigrationContext.configure(conn).get_current_revision()
        if before is not None and before not in known_revisions():
            found = orchard_tables(conn)
            raise UnknownRevisionError(before, store_tables=any(t in found for t in STORE_TABLES))
        if before is None and (found := orchard_tables(conn)):
            # creating them would fail on the first: say so before, naming them all
            raise TablesInTheWayError(found)
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
    return before


def downgrade(engine: Engine, revision: str) -> None:
    config = _config()
    with _migrating(engine) as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, revision)
