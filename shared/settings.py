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
| ORCHARD_DATASET_ROOTS | (anywhere) folders datasets may be in, ':'-separated |

A password can also come from a file, the way Docker secrets hand it over
(``/run/secrets/...``): ORCHARD_BROKER_PASSWORD_FILE and ORCHARD_DATABASE_PASSWORD_FILE.
The URL then names no password (``redis://redis:6379/0``,
``postgresql+psycopg://orchard@postgres/orchard``); orchard reads the file, drops its
trailing newlines (as the servers' ``$(cat FILE)`` does), percent-encodes the password
and puts it into the URL, so any character may be in it. The password then never
appears on a command line or in a container's configured environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

from shared.errors import OrchardError, printable
from shared.smallfiles import FileTooLargeError, NotRegularFileError, read_small_file


@dataclass(frozen=True, slots=True)
class Settings:
    home: Path
    broker_url: str
    database_url: str
    artifacts: Path
    #: ORCHARD_DATASET_ROOTS: the folders datasets may be read from (besides the artifact
    #: folder, where synthetic ones are made); empty: anywhere the process may read
    dataset_roots: tuple[Path, ...] = ()

    def __repr__(self) -> str:
        # the URLs' passwords masked: a settings object ends up in logs, tracebacks
        # that show locals, error reporters
        broker, database = mask_url(self.broker_url), mask_url(self.database_url)
        return (
            f"Settings(home={self.home!r}, broker_url={broker!r}, database_url={database!r}, "
            f"artifacts={self.artifacts!r}, dataset_roots={self.dataset_roots!r})"
        )

    def outside_dataset_roots(self, path: Path) -> bool:
        """Whether ``path`` (resolved: symbolic links followed) is outside every dataset
        root and the artifact folder; never when no dataset roots are set."""
        if not self.dataset_roots:
            return False
        real = Path(os.path.realpath(path))
        return not any(real.is_relative_to(root) for root in (*self.dataset_roots, self.artifacts))

    @property
    def broker_is_filesystem(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    @property
    def broker_folder(self) -> Path:
        """The folder of a ``filesystem://`` broker (messages and exchange tables)."""
        return Path(self.broker_url.removeprefix("filesystem://"))


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    home = folder_setting(env, "ORCHARD_HOME", ".orchard")
    broker = env.get("ORCHARD_BROKER_URL") or f"filesystem://{home / 'broker'}"
    if broker.startswith("filesystem://"):
        folder = broker.removeprefix("filesystem://") or str(home / "broker")
        broker = f"filesystem://{resolved(folder, 'ORCHARD_BROKER_URL', broker)}"
    broker = url_with_password_file(
        broker, "ORCHARD_BROKER_URL", "ORCHARD_BROKER_PASSWORD_FILE", env
    )
    database = env.get("ORCHARD_DATABASE_URL") or default_store_url(home)
    check_database_url_form(database, "ORCHARD_DATABASE_URL")
    database = absolute_sqlite_url(database, "ORCHARD_DATABASE_URL")
    database = url_with_password_file(
        database, "ORCHARD_DATABASE_URL", "ORCHARD_DATABASE_PASSWORD_FILE", env
    )
    artifacts = folder_setting(env, "ORCHARD_ARTIFACTS", home / "artifacts")
    roots = env.get("ORCHARD_DATASET_ROOTS") or ""
    dataset_roots = tuple(
        resolved(part.strip(), "ORCHARD_DATASET_ROOTS", roots)
        for part in roots.split(os.pathsep)
        if part.strip()
    )
    if roots and not dataset_roots:  # meant to restrict, and would allow everything
        raise OrchardError(
            f"ORCHARD_DATASET_ROOTS={roots!r}: names no folder; unset it, or name the "
            f"folders datasets may be read from, separated by {os.pathsep!r}"
        )
    return Settings(
        home=home,
        broker_url=broker,
        database_url=database,
        artifacts=artifacts,
        dataset_roots=dataset_roots,
    )


#: What SQLAlchemy decodes in a URL's path (a '%' without two hex digits stays as it is).
PERCENT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")


def default_store_url(home: Path) -> str:
    """``sqlite:///HOME/orchard.db``; a home whose path a URL would misread (a '?' ends
    its path, '%41' is read as 'A') is one line naming ORCHARD_HOME, which the user
    set, not ORCHARD_DATABASE_URL, which they did not."""
    if "?" in str(home) or PERCENT_ESCAPE.search(str(home)):
        raise OrchardError(
            f"ORCHARD_HOME={printable(home)}: a SQLite URL cannot name a store in it (a '?' "
            "ends a URL's path, a '%' escape is decoded); rename the folder, or set "
            "ORCHARD_DATABASE_URL"
        )
    return f"sqlite:///{home / 'orchard.db'}"


def folder_setting(env: Mapping[str, str], name: str, default: str | Path) -> Path:
    """The folder ``env[name]``, ``~`` expanded, made absolute; ``default`` when it is
    unset or empty (compose's ``VAR: ""``). Only whitespace is refused: it would make a
    folder named by blanks in the working directory, surely not what was meant."""
    value = env.get(name) or ""
    if value and not value.strip():
        raise OrchardError(f"{name}={value!r}: only whitespace; unset it, or name a folder")
    return resolved(value or default, name, value or None)


def expand_home(path: Path) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded; a ValueError saying why one
    cannot be (an unknown user, HOME unset)."""
    if not str(path).startswith("~"):
        return path
    try:
        return path.expanduser()
    except RuntimeError:  # Python's "Could not determine home directory."
        user = str(path).partition("/")[0][1:]
        if not user:
            raise ValueError("'~' names no home folder (HOME is unset)") from None
        raise ValueError(f"~{user}: no such user") from None


def resolved(path: str | Path, name: str, value: str | None = None) -> Path:
    """``path`` with ``~`` expanded, absolute, symbolic links resolved; a path that
    cannot be (an unknown user's ``~``, a symbolic link loop) is one line naming the
    variable ``name`` and its ``value`` (``None``: unset, ``path`` is its default)."""
    where = f"{name}={value}" if value is not None else f"{name} (unset: {path})"
    try:
        path = expand_home(Path(path))
    except ValueError as exc:
        raise OrchardError(f"{where}: {exc}") from None
    try:
        return path.resolve()
    except RuntimeError as exc:  # Python < 3.13: "Symlink loop from '/x/loop'"
        loop = re.sub(r"^Symlink loop from ", "", str(exc)).strip("'\"")
        raise OrchardError(f"{where}: a symbolic link loop ({loop})") from None
    except OSError as exc:  # Python 3.13: ELOOP, and anything else the lookups hit
        reason = exc.strerror or type(exc).__name__
        if exc.filename:
            reason = f"{reason} ({exc.filename})"
        raise OrchardError(f"{where}: {reason}") from None


def child_env(settings: Settings, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of the worker processes orchard starts (``--gpus``'s children,
    the demo's workers): ``settings`` resolved, since they resolve nothing relative to
    their own working directory, except that a password read from a file stays in the
    file, out of their environment (they read it themselves)."""
    env = {
        **environ,
        "ORCHARD_HOME": str(settings.home),
        "ORCHARD_ARTIFACTS": str(settings.artifacts),
    }
    if settings.dataset_roots:
        env["ORCHARD_DATASET_ROOTS"] = os.pathsep.join(map(str, settings.dataset_roots))
    for name, url in (
        ("ORCHARD_BROKER_URL", settings.broker_url),
        ("ORCHARD_DATABASE_URL", settings.database_url),
    ):
        password_file = name.removesuffix("URL") + "PASSWORD_FILE"
        if environ.get(password_file):
            env[password_file] = str(Path(environ[password_file]).resolve())
        else:
            env[name] = url
    return env


def url_with_password_file(url: str, url_name: str, file_name: str, env: Mapping[str, str]) -> str:
    """``url`` with the password read from the file ``env[file_name]``, percent-encoded;
    ``url`` as it is when ``file_name`` is unset. Anything wrong is one line naming both
    variables and the file, never the password.

    A URL that already carries a password is refused, unless it is the file's (a
    ``--gpus`` launcher hands its children the URL it resolved, with the same file).
    """
    path = env.get(file_name)
    if not path:
        return url
    scheme, sep, rest = url.partition("://")
    # the user info and host: up to the first '/', '?' or '#' (none is left in a
    # password-less user info)
    authority = re.match(r"[^/?#]*", rest)[0]
    if not sep or not authority.rpartition("@")[2] or scheme.startswith("filesystem"):
        example = (
            "postgresql+psycopg://USER@HOST/DB" if "DATABASE" in url_name else "redis://HOST:6379/0"
        )
        raise OrchardError(
            f"{file_name} is set, but {url_name} {mask_url(url)} names no server to log in "
            f"to; unset it, or give a URL like {example}"
        )
    password = quote(read_password_file(path, file_name), safe="")
    user, _, host = authority.rpartition("@")
    # a login password in the URL: in its user info, by orchard's own rule (mask_url of
    # the URL without its query), or libpq's ?password= (not, say, ?sslpassword=, the
    # client key's passphrase, which mask_url hides too)
    before_query, _, query = rest.partition("?")
    in_user_info = mask_url(f"{scheme}://{before_query}") != f"{scheme}://{before_query}"
    query_keys = {k.lower() for k, _ in parse_qsl(query.partition("#")[0], True)}
    if in_user_info or "password" in query_keys:
        user, _, host_and_tail = rest.rpartition("@")
        if url == f"{scheme}://{user.partition(':')[0]}:{password}@{host_and_tail}":
            return url  # the file's, already in
        raise OrchardError(
            f"{url_name} {mask_url(url)} carries a password, and {file_name} gives one too: "
            "give it in one place only (drop it from the URL)"
        )
    return f"{scheme}://{user}:{password}@{host}{rest[len(authority) :]}"


#: The most a password file may hold. A password is a line; anything longer is the
#: wrong file, and a device or a /proc file that never ends must not be read whole.
PASSWORD_FILE_LIMIT = 64 * 1024


def read_password_file(path: str, name: str) -> str:
    """The password in file ``path`` (env ``name``) without its trailing newlines.

    Only a regular file of at most ``PASSWORD_FILE_LIMIT`` bytes: a FIFO would block
    the command until something writes to it, and ``/dev/zero`` never ends.
    """
    where = f"{name}={printable(path)}"
    try:
        data = read_small_file(path, PASSWORD_FILE_LIMIT)
    except NotRegularFileError as exc:
        if exc.kind == "a folder":
            raise OrchardError(f"{where}: a folder, not a password file") from None
        raise OrchardError(
            f"{where}: {exc.kind}, not a regular file; name the password's file"
        ) from None
    except FileTooLargeError:
        raise OrchardError(
            f"{where}: larger than {PASSWORD_FILE_LIMIT // 1024} KiB, not a password file"
        ) from None
    except FileNotFoundError:
        raise OrchardError(f"{where}: no such file") from None
    except PermissionError:
        raise OrchardError(f"{where}: not readable by this user (uid {os.getuid()})") from None
    except OSError as exc:
        raise OrchardError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    try:
        password = data.decode("utf-8").rstrip("\n")
    except UnicodeDecodeError:
        raise OrchardError(f"{where}: not UTF-8 text") from None
    if not password:
        raise OrchardError(f"{where}: the file is empty; write the password into it")
    return password


def absolute_sqlite_url(url: str, name: str = "ORCHARD_DATABASE_URL") -> str:
    """``sqlite:///rel/x.db`` -> ``sqlite:////cwd/rel/x.db``; any other URL as it is.

    SQLite opens a relative path from the process's working directory, so a worker or
    a ``--gpus`` child started elsewhere would open another file. In-memory databases
    and SQLite ``file:`` URIs are left to SQLite. A path that cannot be resolved is one
    line naming ``name`` and the URL.
    """
    scheme, sep, rest = url.partition(":///")
    if not sep or scheme.partition("+")[0] != "sqlite":
        return url
    path, query_sep, query = rest.partition("?")
    if not path or path == ":memory:" or path.startswith("file:") or Path(path).is_absolute():
        return url
    return f"{scheme}:///{resolved(path, name, mask_url(url))}{query_sep}{query}"


#: Query parameters whose value is a password (libpq's ``password``, ``sslpassword``;
#: redis-py's ``password``; the ``passwd``/``pwd`` of other drivers), in any case.
_PASSWORD_KEY = re.compile(r"(?:[a-z_]*password|passwd|pwd)", re.IGNORECASE)
#: A query parameter: its separator before, its name (percent-encoded or not), its value.
_QUERY_PARAMETER = re.compile(r"([?&;])([^=&;#]*)=([^&]*)")
#: The part of a URL before its path where no ``@`` is: a host, and a port if any, or a
#: list of them (libpq's ``host1:5432,host2:5432``).
_HOST = r"(?:\[[^\]]*\]|[^:\[\],;]+)(?::\d*)?"
_HOST_AND_PORT = re.compile(rf"{_HOST}(?:[,;]{_HOST})*")


def _mask_query_password(match: re.Match[str]) -> str:
    separator, key, _ = match.groups()
    if _PASSWORD_KEY.fullmatch(unquote(key)):  # ?pass%77ord= is a password too
        return f"{separator}{key}=***"
    return match[0]


#: A URL's start as typed: a scheme and the ``://`` after it (``redis://``).
_WELL_FORMED_START = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
#: A mistyped URL's start: a scheme-like word and the ``:`` and ``/`` after it
#: (``redis:/``, ``redis//``, ``redis:/:``), or nothing.
_MISTYPED_START = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.\-]*)?[:/]*")


def mask_url(url: str) -> str:
    """``redis://:secret@host:6379/0`` -> ``redis://:***@host:6379/0``; safe to print.

    Not parsed as a URL: a password with ``/``, ``#``, ``?`` or ``@`` ends the netloc
    early for ``urllib``, which would then print it. Everything between the first
    ``:`` of the user info and the last ``@`` is masked. So is the value of a query
    parameter named like a password (``?password=...``, ``passwd``, ``pwd``,
    ``sslpassword``, any case), up to the next ``&``, ``;`` or ``#``.

    A mistyped URL (``redis:/:secret@host``, ``redis//:secret@host``, no scheme at all)
    is masked too, more widely: after its scheme-like start and any ``:`` and ``/``
    there, everything up to the last ``@``, but a user name before a ``:``
    (``postgresql:/orchard:***@host/db``, ``redis:/:***@host``).
    """
    # the query's passwords first: a ':' or '@' in one would look like user info
    url = _QUERY_PARAMETER.sub(_mask_query_password, url)
    well_formed = _WELL_FORMED_START.match(url)
    start = (well_formed or _MISTYPED_START.match(url))[0]
    userinfo, at, host = url[len(start) :].rpartition("@")
    if not at:
        return _mask_without_at(url, start, well_formed is not None)
    if well_formed and ":" not in userinfo:
        return url  # only a user name
    user, colon, _ = userinfo.partition(":")
    return f"{start}{user}:***@{host}" if colon else f"{start}***@{host}"


def _mask_without_at(url: str, start: str, well_formed: bool) -> str:
    """``url`` with no ``@`` after its ``start``: a host and port, or user info whose
    ``@`` was mistyped (``redis://:secret:host``, ``…://user:secret/host``), masked
    from its first ``:`` to the path (a mistyped URL's start may hold that ``:``)."""
    rest = url[len(start) :]
    authority, slash, path = rest.partition("/")
    if well_formed:
        host = re.split(r"[?#]", authority, maxsplit=1)[0]
        if not host or _HOST_AND_PORT.fullmatch(host):  # none: sqlite:////x, file:///x
            return url
        user, _, _ = authority.partition(":")
        return f"{start}{user}:***{slash}{path}"
    if not re.search(r"[:/]", start) or not authority or authority.isdigit():
        return url  # not a URL (a word), or a scheme-less host and port
    return f"{start}***{slash}{path}"


def check_database_url_form(url: str, name: str = "ORCHARD_DATABASE_URL") -> None:
    """One line naming ``name`` and ``url`` (password masked) for a database URL orchard
    refuses whatever SQLAlchemy makes of it (see ``database_url_problem``); connects to
    nothing."""
    if problem := database_url_problem(url):
        raise OrchardError(f"{name} {mask_url(url)}: {problem}")


def database_url_problem(url: str) -> str | None:
    """Why orchard refuses database ``url``, or None. Looks at the URL only:

    - an in-memory SQLite database (``sqlite://``, ``sqlite:///:memory:``, a
      ``mode=memory`` URI): every process, the command and each worker, would have its
      own, empty one;
    - an ``@`` in the password: SQLAlchemy ends the password at the first ``@`` after
      the user's ``:``, and hands the rest to the driver as the host
      (``failed to resolve host 'PW@127.0.0.1'``: the password's tail, printed).
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None  # not a URL: the CLI's own check says so
    if scheme.partition("+")[0].lower() == "sqlite":
        if _sqlite_in_memory(rest):
            return (
                "an in-memory SQLite database: each orchard process (this command, every "
                "worker) would have its own, empty one; give a file (sqlite:///PATH) or a "
                "server (postgresql+psycopg://USER@HOST/DB)"
            )
        return None
    # SQLAlchemy's reading: a user up to the first ':' or '/', its password up to the
    # first '@', then the host up to the first '/' or '?' (a user name may hold an '@':
    # 'admin@server:pw@host' is user 'admin@server'; a password may not)
    login = re.match(r"[^:/]*:[^@]*@(?P<host>[^/?]*)", rest)
    if login and "@" in login["host"]:
        return (
            "an '@' in the password ends it there, and the rest would be taken for the "
            "host; percent-encode the password ('@' as %40, '%' as %25), or put it in "
            "ORCHARD_DATABASE_PASSWORD_FILE"
        )
    return None


def _sqlite_in_memory(rest: str) -> bool:
    """Whether ``sqlite://`` + ``rest`` is an in-memory database, as SQLAlchemy's pysqlite
    dialect opens it: no database (``sqlite://``, ``sqlite:///``), ``:memory:``, or an
    SQLite URI naming ``:memory:`` or ``mode=memory``."""
    before_query, _, query = rest.partition("?")
    database = before_query.partition("/")[2]
    if database in ("", ":memory:"):
        return True
    params = {key.lower(): value.lower() for key, value in parse_qsl(query, True)}
    return database.startswith("file:") and (
        database.removeprefix("file:").startswith(":memory:") or params.get("mode") == "memory"
    )


def env_number(
    name: str,
    default: float,
    kind: type[float] | type[int],
    what: str,
    *,
    maximum: float,
    limit: str = "",
    zero: bool = False,
    env: Mapping[str, str] | None = None,
) -> Any:
    """The environment variable ``name`` as a finite ``kind`` greater than 0 (``zero``:
    0 or more) and at most ``maximum``; ``default`` when unset or blank. Anything else
    is one line naming the variable and its value: ``NAME='1m': expected a number of
    seconds greater than 0``, ``... and at most 2592000 (30 days)`` (``limit``: how
    the maximum reads)."""
    env = os.environ if env is None else env
    text = env.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = kind(text)
    except ValueError:  # int(): '1.5', 'nan', 30 000 digits; float(): '1m'
        value = None
    expected = f"{name}={text!r}: expected {what} " + ("of 0 or more" if zero else "greater than 0")
    # nan compares False to everything: refused here, as are inf and -inf
    if value is None or not (value >= 0 if zero else value > 0) or value == float("inf"):
        raise OrchardError(expected)
    if value > maximum:
        raise OrchardError(f"{expected} and at most {limit or f'{maximum:g}'}")
    return value
