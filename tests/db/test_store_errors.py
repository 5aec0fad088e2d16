"""What the store says when it cannot be opened: "unreachable" only for an outage (a
StoreUnreachableError, on which a worker keeps its unit for later); a database that
answers, but is not a store orchard can use, says what is wrong with it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, event, inspect, text

from db.engine import unreachable
from db.store import SchemaError, Store, StoreError, StoreUnreachableError
from db.urls import check_database_url
from shared.errors import OrchardError
from shared.settings import mask_url

REPO = Path(__file__).resolve().parents[2]


def open_store(url: str, how: str) -> StoreError:
    """The error of ``how`` (the schema check of every command, or `orchard db upgrade`)."""
    store = Store(url)
    try:
        with pytest.raises(StoreError) as info:
            store.check_schema() if how == "check" else store.upgrade()
    finally:
        store.dispose()
    assert "\n" not in str(info.value)
    return info.value


def orchard_with(url: str, home: Path, *args: str) -> subprocess.CompletedProcess:
    """`orchard ARGS` in a process of its own, on the store at ``url``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ORCHARD_")}
    return subprocess.run(
        [sys.executable, "-m", "scheduler.cli", *args],
        cwd=REPO,
        env={**environ, "ORCHARD_HOME": str(home), "ORCHARD_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=90,
    )


def run_sql_scalar(url: str, statement: str) -> object:
    engine = create_engine(url)
    with engine.connect() as conn:
        value = conn.execute(text(statement)).scalar()
    engine.dispose()
    return value


def run_sql(url: str, *statements: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))
    engine.dispose()


# ---------------------------------------------------------------- an outage


def test_a_server_that_refuses_the_connection_is_unreachable() -> None:
    """The one error a worker waits out (it keeps the unit's message for later)."""
    error = open_store("postgresql+psycopg://orchard:s3cret@127.0.0.1:1/orchard", "check")
    assert isinstance(error, StoreUnreachableError)
    assert str(error).startswith(
        "database postgresql+psycopg://orchard:***@127.0.0.1:1/orchard unreachable: "
    )


# ---------------------------------------------------------------- a SQLite file orchard cannot use


@pytest.mark.parametrize("how", ["check", "upgrade"])
def test_a_folder_as_the_store_says_so(tmp_path: Path, how: str) -> None:
    folder = tmp_path / "orchard.db"
    folder.mkdir()
    url = f"sqlite:///{folder}"
    error = open_store(url, how)
    assert not isinstance(error, StoreUnreachableError)
    assert str(error) == f"database {url}: {folder} is a directory, not a SQLite file"


@pytest.mark.parametrize("how", ["check", "upgrade"])
def test_a_file_that_is_not_a_database_says_so(tmp_path: Path, how: str) -> None:
    path = tmp_path / "orchard.db"
    path.write_text("not a database, some notes\n")
    url = f"sqlite:///{path}"
    error = open_store(url, how)
    assert not isinstance(error, StoreUnreachableError)
    assert str(error) == f"database {url}: {path} is not a SQLite database"
    assert path.read_text() == "not a database, some notes\n"  # left as it was


@pytest.fixture
def unwritable_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder this process may not create files in, though it may read it: ``chmod``
    for a user, ``chattr +i`` for root (whom no permission bit stops)."""
    folder = tmp_path / "shared"
    folder.mkdir()
    Store(f"sqlite:///{folder / 'orchard.db'}").upgrade()
    for left in folder.glob("orchard.db-*"):  # -wal, -shm: gone once the store is closed
        left.unlink()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    elif shutil.which("chattr"):
        done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"running as root, and chattr +i failed: {done.stderr.decode().strip()}")
        undo = ["chattr", "-i", str(folder)]
    else:
        pytest.skip("running as root (no permission stops it) and no chattr")
    try:
        yield folder
    finally:
        subprocess.run(undo, check=True)


@pytest.mark.parametrize("how", ["check", "upgrade"])
def test_a_store_in_a_folder_it_may_not_write_names_the_folder(
    unwritable_folder: Path, how: str
) -> None:
    """In WAL mode SQLite opens a store by creating its -wal and -shm files beside it:
    even `orchard status` cannot read a store whose folder it may not write."""
    url = f"sqlite:///{unwritable_folder / 'orchard.db'}"
    error = open_store(url, how)
    assert not isinstance(error, StoreUnreachableError)
    assert str(error) == (
        f"database {url}: {unwritable_folder} is not writable by this user (uid "
        f"{os.geteuid()}): SQLite needs to create its -wal and -shm files beside the store, "
        "so the folder must be writable"
    )


def test_a_new_store_in_a_folder_it_may_not_write_names_the_folder(
    unwritable_folder: Path,
) -> None:
    path = unwritable_folder / "new.db"
    url = f"sqlite:///{path}"
    error = open_store(url, "upgrade")
    assert not isinstance(error, StoreUnreachableError)
    assert str(error) == (
        f"database {url}: cannot create {path}: {unwritable_folder} is not writable by this "
        f"user (uid {os.geteuid()})"
    )


# ---------------------------------------------------------------- another application's database


@pytest.mark.parametrize("how", ["check", "upgrade"])
def test_a_database_with_a_table_named_as_orchards_is_not_taken_over(
    store_url: str, how: str
) -> None:
    """No orchard schema, yet a `units` table: creating orchard's tables would fail on
    it, and nothing about it is a connection."""
    run_sql(store_url, "CREATE TABLE units (sku VARCHAR(20))")
    error = open_store(store_url, how)
    assert isinstance(error, SchemaError)
    assert str(error) == (
        f"database {mask_url(store_url)} has no orchard schema but already holds a table "
        "orchard would create (units): give orchard a database of its own"
    )
    engine = create_engine(store_url)
    assert inspect(engine).get_table_names() == ["units"]  # nothing created
    engine.dispose()


@pytest.mark.parametrize("how", ["check", "upgrade"])
def test_another_applications_alembic_schema_is_not_a_newer_orchard(
    store_url: str, how: str
) -> None:
    """A database shared with another Alembic application: its revision is unknown
    here, but it is no orchard's, newer or not."""
    run_sql(
        store_url,
        "CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)",
        "INSERT INTO alembic_version VALUES ('ae1027a6acf')",
        "CREATE TABLE users (id INTEGER)",
    )
    error = open_store(store_url, how)
    assert isinstance(error, SchemaError)
    assert str(error) == (
        f"database {mask_url(store_url)} holds another application's Alembic schema "
        "(revision ae1027a6acf) and no orchard tables: give orchard a database of its own"
    )
    engine = create_engine(store_url)
    assert sorted(inspect(engine).get_table_names()) == ["alembic_version", "users"]
    engine.dispose()


# ---------------------------------------------------------------- a SQLite URL it would misread


def test_a_question_mark_in_a_sqlite_path_is_refused(tmp_path: Path) -> None:
    """SQLAlchemy ends the path at the '?': the store would be made at 'sp '."""
    url = f"sqlite:///{tmp_path}/sp ?q/x.sqlite"
    with pytest.raises(OrchardError) as info:
        check_database_url(url)
    assert str(info.value) == (
        f"ORCHARD_DATABASE_URL {url}: a '?' ends a URL's path (its query follows), so the "
        f"store would be '{tmp_path}/sp '; rename the folder or file with the '?'"
    )


def test_a_percent_escape_in_a_sqlite_path_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/a%41b.db"
    with pytest.raises(OrchardError) as info:
        check_database_url(url)
    assert str(info.value) == (
        f"ORCHARD_DATABASE_URL {url}: a URL's path is percent-decoded ('%41' is read as "
        f"'A'), so the store would be '{tmp_path}/aAb.db'; rename the folder or file with "
        "the '%'"
    )


def test_a_percent_escape_is_refused_when_the_uri_option_is_off(tmp_path: Path) -> None:
    """``uri=false`` is no SQLite URI: SQLAlchemy still decodes the path."""
    with pytest.raises(OrchardError, match="'%41' is read as 'A'"):
        check_database_url(f"sqlite:///{tmp_path}/a%41b.db?uri=false")


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///{tmp}/orchard.db",
        "sqlite:///{tmp}/orchard.db?timeout=5",  # an option of Python's sqlite3
        "sqlite:///{tmp}/50%.db",  # no escape: SQLAlchemy leaves it
        "sqlite:///{tmp}/a#b.db",  # SQLAlchemy keeps a '#' in the path
        "sqlite:///file:{tmp}/a%3Fb.db?mode=rwc&uri=true",  # an SQLite URI: SQLite's to read
        "sqlite:///{tmp}/orchard.db?",  # an empty query: the path is all there is
    ],
)
def test_a_sqlite_path_read_as_written_is_accepted(tmp_path: Path, url: str) -> None:
    check_database_url(url.format(tmp=tmp_path))


def test_db_upgrade_with_a_question_mark_in_the_path_creates_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/sp ?q/x.sqlite"
    done = orchard_with(url, tmp_path / "home", "db", "upgrade")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        f"orchard: error: ORCHARD_DATABASE_URL {url}: a '?' ends a URL's path (its query "
        f"follows), so the store would be '{tmp_path}/sp '; rename the folder or file with "
        "the '?'"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------- a server that answers no


@pytest.mark.parametrize("why", ["read-only", "no privilege"])
def test_a_database_that_refuses_writes_says_so_in_one_line(
    postgres_url: str, tmp_path: Path, why: str
) -> None:
    """A hot standby, `default_transaction_read_only`, a role that may only read: the
    server answers each write with an error that is not an outage. It was raised as
    it came (a traceback from `orchard submit`, and a worker's unit raising "unexpected",
    its message acknowledged and lost); it is now one line, as a store that refuses,
    which a worker keeps the message for."""
    from tests.db.test_store import seed_campaign

    store = Store(postgres_url)
    store.upgrade()
    seed_campaign(store)
    store.dispose()
    name = postgres_url.rsplit("/", 1)[1]
    if why == "read-only":
        run_sql(postgres_url, f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        url, said = (
            postgres_url,
            "cannot execute SELECT FOR NO KEY UPDATE in a read-only transaction",
        )
    else:
        role = f"{name}_reader"
        run_sql(
            postgres_url,
            f'CREATE ROLE "{role}" LOGIN',
            f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{role}"',
        )
        url = postgres_url.replace("://postgres@", f"://{role}@")
        said = "permission denied for table campaigns"
    try:
        store = Store(url)
        assert store.get_campaign("t-1").state == "RUNNING"  # reads still answer
        with pytest.raises(StoreError) as info:
            store.cancel_campaign("t-1")
        assert not isinstance(info.value, StoreUnreachableError)
        assert str(info.value) == f"database {mask_url(url)} refused: {said}"
        # a worker asks before it starts: it would keep every unit's message for ever
        with pytest.raises(StoreError) as info:
            store.check_writable()
        refused = said.replace("SELECT FOR NO KEY UPDATE", "UPDATE").replace("campaigns", "units")
        assert str(info.value) == f"database {mask_url(url)} refused: {refused}"
        store.dispose()
        done = orchard_with(url, tmp_path / "home", "cancel", "t-1")
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr == f"orchard: error: database {mask_url(url)} refused: {said}\n"
        done = orchard_with(url, tmp_path / "home", "worker", "--queues", "cpu")
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr == f"orchard: error: database {mask_url(url)} refused: {refused}\n"
    finally:
        if why == "no privilege":
            run_sql(postgres_url, f'DROP OWNED BY "{role}"', f'DROP ROLE "{role}"')


def test_a_full_sqlite_disk_says_how_little_room_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite says "database or disk is full", or only "disk I/O error" where its -shm
    file could not grow: the line adds how much room the store's disk has, when little
    (a page limit stands in for the full disk here, a stubbed statvfs for its room)."""
    import db.engine as engine_module

    url = f"sqlite:///{tmp_path / 'orchard.db'}"
    store = Store(url)
    store.upgrade()
    pages = run_sql_scalar(url, "PRAGMA page_count")

    def full(dbapi_connection, _record) -> None:  # noqa: ANN001 - a limit per connection
        dbapi_connection.execute(f"PRAGMA max_page_count = {pages}")

    store.engine.dispose()
    event.listen(store.engine, "connect", full)
    real = os.statvfs(tmp_path)
    room = type("Room", (), {"f_bavail": 3, "f_frsize": real.f_frsize})
    monkeypatch.setattr(engine_module.os, "statvfs", lambda folder: room)

    def a_campaign_too_big() -> None:
        store.create_campaign(
            "big", name="b", source="b.toml", digest="d", spec={"notes": "x" * 1_000_000},
            classes=["A"], units=[],
        )  # fmt: skip

    with pytest.raises(StoreError) as info:
        a_campaign_too_big()
    assert str(info.value) == (
        f"database {url} refused: database or disk is full (the disk holding {tmp_path} has "
        f"{3 * real.f_frsize:,} bytes free)"
    )
    monkeypatch.setattr(engine_module.os, "statvfs", lambda folder: real)  # room enough
    with pytest.raises(StoreError) as info:
        a_campaign_too_big()
    assert str(info.value) == f"database {url} refused: database or disk is full"
    store.dispose()


def test_a_postgresql_out_of_resources_is_not_called_unreachable() -> None:
    """Its disk full (53100), out of memory, too many connections: it answered, and a
    worker waits for it as for an outage, but "unreachable" sent one looking for a
    server that was up."""
    import psycopg
    from sqlalchemy.exc import OperationalError

    store = Store("postgresql+psycopg://orchard:s3cret@db:5432/orchard")
    full = psycopg.errors.DiskFull('could not extend file "base/16384/2619": No space left')
    error = unreachable(store.url, OperationalError("INSERT …", {}, full))
    assert str(error) == (
        "database postgresql+psycopg://orchard:***@db:5432/orchard is out of resources: "
        'could not extend file "base/16384/2619": No space left'
    )
    store.dispose()


def test_too_many_connections_at_connect_time_is_out_of_resources(postgres_url: str) -> None:
    """Refused as it connects, PostgreSQL's error carries no SQLSTATE: its words tell."""
    name = postgres_url.rsplit("/", 1)[1]
    role = f"{name}_none"
    run_sql(postgres_url, f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 0')
    try:
        url = postgres_url.replace("://postgres@", f"://{role}@")
        store = Store(url, retry_seconds=0.2)
        with pytest.raises(StoreUnreachableError) as info:
            store.check_schema()
        store.dispose()
        assert str(info.value).startswith(f"database {url} is out of resources: "), info.value
        assert f'too many connections for role "{role}"' in str(info.value)
    finally:
        run_sql(postgres_url, f'DROP ROLE "{role}"')


# ---------------------------------------------------------------- PostgreSQL in operation


def _session(store: Store) -> dict[str, object]:
    """The store's own connection's options, and the statements it has prepared."""
    with store.engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        prepared = conn.execute(text("SELECT count(*) FROM pg_prepared_statements")).scalar()
        return {**raw.info.get_parameters(), "prepared": prepared}


def test_a_urls_connection_options_win_and_no_statement_is_prepared(postgres_url: str) -> None:
    """psycopg prepared a statement run five times on a connection, which PgBouncer in
    transaction mode breaks (the next transaction may get another server connection:
    "prepared statement _pg3_0 does not exist"); and orchard's connect_timeout replaced
    the URL's. A DBA tells orchard's connections apart by their application_name."""
    from tests.db.test_store import seed_campaign

    plain = Store(postgres_url)
    plain.upgrade()
    seed_campaign(plain, "c-1")
    for _ in range(8):
        plain.list_campaigns()
        plain.get_campaign("c-1")
    told = _session(plain)
    assert (told["prepared"], told["connect_timeout"], told["application_name"]) == (
        0,
        "5",
        "orchard",
    )
    plain.dispose()
    given = Store(f"{postgres_url}?connect_timeout=30&application_name=lab-a")
    given.list_campaigns()
    told = _session(given)
    assert (told["connect_timeout"], told["application_name"]) == ("30", "lab-a")
    given.dispose()


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda url: f"{url}?sslmode=bogus", 'invalid sslmode value: "bogus"'),
        (
            lambda url: url.replace("://postgres@", "://nobody_here@"),
            'role "nobody_here" does not exist',
        ),
        (lambda url: f"{url}_not_there", "does not exist"),
    ],
)
def test_a_connection_refused_for_what_its_url_asks_is_not_unreachable(
    postgres_url: str,
    change,
    said: str,  # noqa: ANN001
) -> None:
    """A bad option, role or database name: called "unreachable", retried for the whole
    budget, and a plain `celery worker` kept every message for later, for ever."""
    url = change(postgres_url)
    # a budget far longer than the answer takes, loaded machine or not: a refusal taken
    # for an outage would be retried for all of it
    store = Store(url, retry_seconds=30)
    started = time.monotonic()
    with pytest.raises(StoreError) as info:
        store.check_schema()
    store.dispose()
    assert not isinstance(info.value, StoreUnreachableError)
    assert str(info.value).startswith(f"database {mask_url(url)} refused: "), info.value
    assert said in str(info.value) and time.monotonic() - started < 15


def test_a_server_named_like_a_refusal_is_still_unreachable() -> None:
    """The refusals are told by the server's words, not by the address libpq names: a
    host called certificate-db that is down is an outage, waited for."""
    import psycopg
    from sqlalchemy.exc import OperationalError

    from db.engine import is_transient

    for said, transient in (
        (
            'connection to server at "certificate-db" (10.0.0.5), port 5432 failed: '
            "Connection refused",
            True,
        ),
        (
            'connection to server at "db" (::1), port 5432 failed: FATAL:  password '
            'authentication failed for user "orchard"',
            False,
        ),
        (
            'connection to server on socket "/run/postgresql/.s.PGSQL.5432" failed: FATAL:  '
            "the database system is starting up",
            True,
        ),
    ):
        error = OperationalError("connect", {}, psycopg.OperationalError(said))
        assert is_transient(error) is transient, said


def test_a_lock_timeout_is_told_as_one(postgres_url: str) -> None:
    """A DBA's lock_timeout (or statement_timeout) met: retried as before, but it was
    worded "unreachable", which sent one looking for a server that was up."""
    from tests.db.test_store import seed_campaign

    store = Store(postgres_url, retry_seconds=0.3)
    store.upgrade()
    seed_campaign(store, "c-1")
    name = postgres_url.rsplit("/", 1)[1]
    run_sql(postgres_url, f"ALTER DATABASE \"{name}\" SET lock_timeout = '100ms'")
    store.dispose()  # its connections took the setting when they began
    holder = create_engine(postgres_url)
    try:
        with holder.begin() as conn:
            conn.execute(text("SELECT * FROM campaigns FOR UPDATE"))
            with pytest.raises(StoreUnreachableError) as info:
                store.cancel_campaign("c-1")
    finally:
        holder.dispose()
        store.dispose()
    assert str(info.value).startswith(
        f"database {mask_url(postgres_url)} timed out: canceling statement due to lock timeout"
    ), info.value


def test_a_statement_timeout_does_not_stop_a_delete_for_good(postgres_url: str) -> None:
    """The cascade that deletes a campaign's millions of rows outlasted a DBA's
    statement_timeout every time: the campaign stayed DELETING, and `orchard delete`
    again failed the same way. Its transaction sets none of its own; a lock on one of
    the campaign's units, held longer than the timeout, stands for the long delete."""
    import threading

    from tests.db.test_store import seed_campaign

    store = Store(postgres_url)
    store.upgrade()
    seed_campaign(store, "c-1")
    store.cancel_campaign("c-1")
    name = postgres_url.rsplit("/", 1)[1]
    run_sql(postgres_url, f"ALTER DATABASE \"{name}\" SET statement_timeout = '300ms'")
    store.dispose()
    store = Store(postgres_url, retry_seconds=0.5)  # the lock outlasts its retries
    holder = create_engine(postgres_url)
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        with holder.begin() as conn:
            conn.execute(text("SELECT * FROM units WHERE key LIKE 'c-1/%' FOR UPDATE"))
            locked.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert locked.wait(30)
        threading.Timer(2.0, release.set).start()
        store.delete_campaign("c-1", quiet_seconds=0)
    finally:
        release.set()
        thread.join(30)
        holder.dispose()
    assert store.find_campaign("c-1") is None
    store.dispose()
