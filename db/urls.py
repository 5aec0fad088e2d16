"""Whether a database URL is one orchard can use, said before anything connects."""

from __future__ import annotations

from pathlib import Path

from shared.errors import OrchardError
from shared.settings import check_database_url_form, mask_url

__all__ = ["DATABASE_URLS", "check_database_url", "require_sqlite_file"]

#: What ORCHARD_DATABASE_URL may be.
DATABASE_URLS = "orchard supports sqlite:///PATH and postgresql+psycopg://USER:PASSWORD@HOST/DB"


def check_database_url(url: str) -> None:
    """One line naming ORCHARD_DATABASE_URL and the URL (password masked) when SQLAlchemy
    cannot use it: a scheme it does not know, a driver that is not installed, not a URL
    at all; and what SQLAlchemy would misread (an in-memory SQLite, an unencoded '@' in
    the password). Connects to nothing and creates no file."""
    check_database_url_form(url)
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    where = f"ORCHARD_DATABASE_URL {mask_url(url)}"
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # SQLAlchemy's message would repeat the password
        raise OrchardError(f"{where}: not a database URL; {DATABASE_URLS}") from None
    scheme = url.partition(":")[0]
    advice = DATABASE_URLS
    if parsed.get_backend_name() in ("postgres", "postgresql"):
        advice = f"write {mask_url('postgresql+psycopg' + url[len(scheme) :])}"
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise OrchardError(f"{where}: {scheme}:// is not a known database URL; {advice}") from None
    except ImportError as exc:
        raise OrchardError(f"{where}: {missing_driver(exc)}; {advice}") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        raise OrchardError(f"{where}: {missing_driver(exc)}; {advice}") from None


def missing_driver(exc: ImportError) -> str:
    module = exc.name or str(exc)
    return f"its database driver (Python module {module!r}) is not installed"


def require_sqlite_file(url: str, *, for_worker: bool = False) -> None:
    """A SQLite store that does not exist yet is not created by a command that reads it.
    ``for_worker``: the URL is the default one, which on a worker's host is a store of
    its own rather than the cluster's (whose messages its workers would all drop)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return
    if database.startswith("file:") or parsed.query.get("uri"):
        return  # an SQLite URI: whatever it names, SQLite decides
    path = Path(database).expanduser().absolute()
    if not path.exists():
        if for_worker:
            raise OrchardError(
                f"no store at {path} yet: ORCHARD_DATABASE_URL is not set, so this worker "
                "would use a SQLite store of its own; set it to the store the campaigns are "
                "submitted to (README: Run on a cluster), or, on the host that submits, "
                "run `orchard db upgrade` or submit a campaign first"
            )
        raise OrchardError(
            f"no store at {path} yet (ORCHARD_DATABASE_URL {mask_url(url)}): "
            "run `orchard db upgrade`, or submit a campaign"
        )
