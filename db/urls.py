"""Whether a database URL is one orchard can use, said before anything connects."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, unquote

from shared.errors import OrchardError
from shared.settings import PERCENT_ESCAPE, check_database_url_form, mask_url

__all__ = ["DATABASE_URLS", "check_database_url", "require_sqlite_file", "sqlite_path_problem"]

#: What ORCHARD_DATABASE_URL may be.
DATABASE_URLS = "orchard supports sqlite:///PATH and postgresql+psycopg://USER:PASSWORD@HOST/DB"


def check_database_url(url: str) -> None:
    """One line naming ORCHARD_DATABASE_URL and the URL (password masked) when SQLAlchemy
    cannot use it: a scheme it does not know, a driver that is not installed, not a URL
    at all; and what SQLAlchemy would misread (an in-memory SQLite, an unencoded '@' in
    the password, a SQLite path with a '?' or a '%'). Connects to nothing and creates no
    file."""
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
    if parsed.get_backend_name() == "sqlite" and (problem := sqlite_path_problem(url)):
        raise OrchardError(f"{where}: {problem}")


#: The query options SQLAlchemy hands to Python's sqlite3 (``sqlite:///PATH?timeout=5``);
#: ``uri`` makes the path an SQLite URI, which SQLite reads itself.
_SQLITE_OPTIONS = {"timeout", "isolation_level", "detect_types", "check_same_thread"}
_SQLITE_OPTIONS |= {"cached_statements", "uri"}


def sqlite_path_problem(url: str) -> str | None:
    """Why the file SQLAlchemy would open for SQLite ``url`` is not the path written in
    it, or None: a URL's path ends at a '?' (the rest is taken for driver options and
    dropped, and the store made at the path's first part), and is percent-decoded
    ('%41' is 'A'). A ``file:`` URI (``sqlite:///file:PATH?uri=true``) is SQLite's to
    read: its '?' and '%' mean what SQLite says."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    database = parsed.database
    uri = str(parsed.query.get("uri", "")).lower() in ("true", "1")
    if not database or database.startswith("file:") or uri:
        return None
    written, mark, query = url.partition("://")[2].partition("?")
    written = written.removeprefix("/")  # the path follows the empty host's '/'
    options = [key for key, _ in parse_qsl(query, keep_blank_values=True)]
    if query and not (options and set(options) <= _SQLITE_OPTIONS):
        # not driver options: the '?' is part of a folder's or the file's name
        return (
            f"a '?' ends a URL's path (its query follows), so the store would be "
            f"{database!r}; rename the folder or file with the '?'"
        )
    if escape := next((m[0] for m in PERCENT_ESCAPE.finditer(written)), None):
        return (
            f"a URL's path is percent-decoded ({escape!r} is read as {unquote(escape)!r}), so "
            f"the store would be {database!r}; rename the folder or file with the '%'"
        )
    return None


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
