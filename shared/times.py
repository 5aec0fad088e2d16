"""Times as orchard prints and compares them: in UTC, with their zone."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload


@overload
def as_utc(moment: datetime) -> datetime: ...
@overload
def as_utc(moment: None) -> None: ...
def as_utc(moment: datetime | None) -> datetime | None:
    """``moment`` in UTC, with its zone. SQLite hands timezone-aware columns back naive
    (everything orchard writes is UTC); psycopg hands them back in the session's time
    zone, the server's unless set, which need not be UTC (America/New_York)."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def utc_iso(moment: datetime) -> str:
    """``moment`` in UTC as ISO 8601 with its offset; SQLite hands back naive UTC, PostgreSQL
    aware, and a report must print the same for both."""
    return as_utc(moment).isoformat(timespec="seconds")
