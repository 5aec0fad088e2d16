"""Pieces of the store's statements: keys in chunks, the dialect's INSERT, plain tables.

Shared by :mod:`db.store` and the modules that build one of its transactions' parts
(:mod:`db.reuse`); each takes the session or the rows it works on explicitly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from sqlalchemy import func
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.errors import StoreError
from db.models import ArtifactRow

_T = TypeVar("_T")


#: Unit keys (or task ids) per statement where a call names many units: a stage of
#: thousands of units stays far below the parameter limits (PostgreSQL 65,535, SQLite
#: 32,766), and the claim's CASE over the task ids, which the database evaluates for
#: each row it updates, stays short.
KEYS_PER_STATEMENT = 500


def chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    """``items`` in slices of at most ``size``, in order."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def files_under(folder: str) -> Any:
    """Artifact records of the files under ``folder`` (relative, ending in ``/``; ``_``
    and ``%`` in it are not wildcards). The prefix is compared as well: SQLite's LIKE
    ignores the case of ASCII letters (``cache/ABC/`` would match ``cache/abc/``)."""
    return ArtifactRow.path.startswith(folder, autoescape=True) & (
        func.substr(ArtifactRow.path, 1, len(folder)) == folder
    )


def insert_of(s: Session) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT (SQLite >= 3.24 and PostgreSQL)."""
    name = s.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert
    if name == "sqlite":
        return sqlite.insert
    raise StoreError(f"unsupported database dialect {name!r}: use SQLite or PostgreSQL")


def table_of(entity: Any) -> Any:
    """The mapped class's table, for plain Core statements (executemany, no ORM)."""
    return entity.__table__
