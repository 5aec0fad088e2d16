"""The Python API as a script uses it, on the real PostgreSQL: every call gives its
database connections back, a campaign submitted to one database is reached again by
id with the same keywords, and a database URL the API cannot use is one line, as the
commands say it. No worker is needed: submit, cancel, resume and delete only record
and send (a filesystem broker here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

import scheduler
from shared.errors import OrchardError
from tests.conftest import POSTGRES_ADMIN
from tests.scheduler.test_cli_bad_args import campaign_file


def connections_to(url: str) -> int:
    """Connections to ``url``'s database, as PostgreSQL counts them (not this query's:
    it goes to the admin database)."""
    name = url.rsplit("/", 1)[1]
    admin = create_engine(POSTGRES_ADMIN)
    try:
        with admin.connect() as conn:
            return conn.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE datname = :name"),
                {"name": name},
            ).scalar_one()
    finally:
        admin.dispose()


@pytest.fixture
def where(tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    # the environment names another store: the keywords must be what counts
    for name in ("ORCHARD_DATABASE_URL", "ORCHARD_BROKER_URL", "ORCHARD_ARTIFACTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ORCHARD_HOME", str(tmp_path / "env-home"))
    return {
        "broker": f"filesystem://{tmp_path / 'broker'}",
        "database": postgres_url,
        "artifacts": str(tmp_path / "artifacts"),
    }


def test_each_call_gives_its_connections_back(tmp_path: Path, where: dict[str, str]) -> None:
    path = campaign_file(tmp_path)
    with scheduler.submit(path, **where) as run:
        assert run.status().campaign.state == "RUNNING"
    assert connections_to(where["database"]) == 0
    others = []
    for _ in range(3):  # a script that keeps going: nothing piles up
        with scheduler.submit(path, **where) as other:
            others.append(other.id)
        assert connections_to(where["database"]) == 0
    outcome = scheduler.cancel(run.id, **where)
    assert outcome.state == "CANCELLED"
    assert connections_to(where["database"]) == 0
    resumed, keys = scheduler.resume(run.id, **where)
    assert keys and resumed.status().campaign.state == "RUNNING"
    resumed.close()
    assert connections_to(where["database"]) == 0
    for campaign_id in [run.id, *others]:
        scheduler.cancel(campaign_id, **where)
    assert scheduler.delete(run.id, **where).state == "CANCELLED"
    assert scheduler.prune_cache(dry_run=True, **where).dry_run
    assert connections_to(where["database"]) == 0
    assert not (tmp_path / "env-home").exists()  # the environment's store never opened


def test_attach_reaches_a_campaign_by_id_in_the_database_it_was_submitted_to(
    tmp_path: Path, where: dict[str, str]
) -> None:
    with scheduler.submit(campaign_file(tmp_path), **where) as run:
        keys = [u.key for u in run.status().units]
    with scheduler.attach(run.id, **where) as again:
        assert again.status().campaign.id == run.id
        assert [u.key for u in again.status().units] == keys
    with pytest.raises(OrchardError, match=re.escape(f"no campaign 'x-1' in {where['database']}")):
        scheduler.attach("x-1", **where)
    assert connections_to(where["database"]) == 0


@pytest.mark.parametrize(
    ("database", "said"),
    [
        (
            "postgres://u:secret@127.0.0.1/x",
            "ORCHARD_DATABASE_URL postgres://u:***@127.0.0.1/x: postgres:// is not a known "
            "database URL; write postgresql+psycopg://u:***@127.0.0.1/x",
        ),
        (
            "mysql://u:secret@127.0.0.1/x",
            "ORCHARD_DATABASE_URL mysql://u:***@127.0.0.1/x: its database driver (Python "
            "module 'MySQLdb') is not installed",
        ),
    ],
)
def test_a_database_url_the_api_cannot_use_is_the_commands_line(
    tmp_path: Path, where: dict[str, str], database: str, said: str
) -> None:
    for call in (
        lambda: scheduler.submit(campaign_file(tmp_path), **{**where, "database": database}),
        lambda: scheduler.cancel("x-1", **{**where, "database": database}),
        lambda: scheduler.attach("x-1", **{**where, "database": database}),
    ):
        with pytest.raises(OrchardError) as raised:
            call()
        assert str(raised.value).startswith(said)
        assert "secret" not in str(raised.value)


def test_a_call_on_a_sqlite_store_that_is_not_there_creates_none(tmp_path: Path) -> None:
    """As the commands: reading or changing what is there never makes an empty store."""
    database = f"sqlite:///{tmp_path / 'none.db'}"
    where = {"database": database, "broker": f"filesystem://{tmp_path / 'broker'}"}
    for call in (
        lambda: scheduler.attach("x-1", **where),
        lambda: scheduler.cancel("x-1", **where),
        lambda: scheduler.resume("x-1", **where),
        lambda: scheduler.delete("x-1", **where),
        lambda: scheduler.prune_cache(**where),
    ):
        with pytest.raises(
            OrchardError, match=re.escape(f"no store at {tmp_path / 'none.db'} yet")
        ):
            call()
    assert not (tmp_path / "none.db").exists()


def test_a_filesystem_broker_whose_folder_is_full_is_not_called_unreachable(
    tmp_path: Path, where: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full (or read-only) queue folder was worded as kombu had it: `broker
    filesystem://… unreachable: Cannot add file '…' to directory`, which sent one
    looking for a server and named no reason."""
    import errno

    from scheduler.api import NotSentError
    from workers import fs_transport

    replace = fs_transport.os.replace

    def full(source: str, target: str) -> None:
        if str(target).endswith(".msg"):  # the queue folder's disk, not the dataset's
            raise OSError(errno.ENOSPC, "No space left on device")
        replace(source, target)

    monkeypatch.setattr(fs_transport.os, "replace", full)
    with pytest.raises(NotSentError) as caught:
        scheduler.submit(campaign_file(tmp_path), **where)
    line = str(caught.value)
    assert "unreachable" not in line
    assert re.search(
        r"\(broker filesystem://localhost/: cannot write /\S+\.msg: No space left on device\)",
        line,
    ), line
