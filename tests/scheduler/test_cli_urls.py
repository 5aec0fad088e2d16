"""The broker and store URLs as `orchard` meets them: a broker that never answers, a URL
orchard cannot use, a store that does not exist yet. One line naming the variable and
the URL with its password masked, exit 2, no traceback, nothing created.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from db.store import Store
from tests.conftest import REPO
from tests.scheduler.test_bad_input_cli import orchard

QUICK = str(REPO / "campaigns" / "quick.toml")


def in_process(monkeypatch, capsys, *args: str, home: Path, **env: str) -> tuple[int, str, str]:
    """`orchard ...` in this process: the URL checks come before anything that runs."""
    from scheduler.cli import main

    for name in [k for k in os.environ if k.startswith("ORCHARD_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("ORCHARD_HOME", str(home))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code: int, out: str, err: str, *needles: str, expected: int = 2) -> str:
    assert code == expected, out + err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "secret" not in out + err
    return lines[0]


@pytest.fixture
def silent_broker() -> Iterator[int]:
    """A port whose listener accepts TCP connections (the kernel completes them from the
    backlog) and never answers a byte: TLS against a plain Redis, or not Redis at all."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


@pytest.mark.parametrize(("command", "scheme"), [("submit", "rediss"), ("worker", "redis")])
def test_a_broker_that_never_answers_fails_rather_than_hangs(
    tmp_path: Path, silent_broker: int, command: str, scheme: str
) -> None:
    Store(f"sqlite:///{tmp_path / 'orchard.db'}").upgrade()
    args = ["submit", QUICK] if command == "submit" else ["worker", "--queues", "cpu"]
    url = f"{scheme}://:secret@127.0.0.1:{silent_broker}/0"
    done = orchard(*args, home=tmp_path, timeout=60, ORCHARD_BROKER_URL=url)  # hung: fails
    one_line(
        done.returncode,
        done.stdout,
        done.stderr,
        f"broker {scheme}://:***@127.0.0.1:{silent_broker}/0 unreachable",
        expected=75,
    )


BAD_DATABASE_URLS = {
    "postgres://postgres:secret@127.0.0.1/x": (
        "ORCHARD_DATABASE_URL postgres://postgres:***@127.0.0.1/x: postgres:// is not a known "
        "database URL; write postgresql+psycopg://postgres:***@127.0.0.1/x"
    ),
    "mysql://u:secret@127.0.0.1/x": "ORCHARD_DATABASE_URL mysql://u:***@127.0.0.1/x: its "
    "database driver (Python module 'MySQLdb') is not installed; orchard supports sqlite:///",
    "notaurl": "ORCHARD_DATABASE_URL notaurl: not a database URL; orchard supports sqlite:///",
}
STORE_COMMANDS = {
    "submit": ["submit", QUICK],
    "status": ["status"],
    "report": ["report", "c-1"],
    "cancel": ["cancel", "c-1"],
    "resume": ["resume", "c-1"],
    "db upgrade": ["db", "upgrade"],
    "worker": ["worker", "--queues", "cpu"],
    "demo": ["demo"],
}


@pytest.mark.parametrize("url", BAD_DATABASE_URLS)
@pytest.mark.parametrize("command", STORE_COMMANDS)
def test_a_database_url_orchard_cannot_use_is_one_line(
    tmp_path: Path, monkeypatch, capsys, command: str, url: str
) -> None:
    home = tmp_path / "home"
    done = in_process(
        monkeypatch, capsys, *STORE_COMMANDS[command], home=home, ORCHARD_DATABASE_URL=url
    )
    one_line(*done, BAD_DATABASE_URLS[url])
    assert not home.exists()


BROKER_COMMANDS = {
    "submit": ["submit", QUICK],
    "cancel": ["cancel", "c-1"],
    "resume": ["resume", "c-1"],
    "worker": ["worker", "--queues", "cpu"],
}


@pytest.mark.parametrize("command", BROKER_COMMANDS)
def test_a_broker_url_orchard_cannot_use_is_one_line(
    tmp_path: Path, monkeypatch, capsys, command: str
) -> None:
    Store(f"sqlite:///{tmp_path / 'orchard.db'}").upgrade()
    done = in_process(
        monkeypatch,
        capsys,
        *BROKER_COMMANDS[command],
        home=tmp_path,
        ORCHARD_BROKER_URL="http://u:secret@127.0.0.1:6379/0",
    )
    one_line(
        *done,
        "ORCHARD_BROKER_URL http://u:***@127.0.0.1:6379/0: 'http' is not a broker orchard "
        "knows; use redis://",
    )


@pytest.mark.parametrize("char", "/?#")
@pytest.mark.parametrize("command", BROKER_COMMANDS)
def test_a_broker_password_a_url_parser_would_cut_short_is_never_printed(
    tmp_path: Path, monkeypatch, capsys, command: str, char: str
) -> None:
    """urllib ends the host at the first '/', '?' or '#': a port error would quote the
    password's first part."""
    Store(f"sqlite:///{tmp_path / 'orchard.db'}").upgrade()
    url = f"redis://:hunter2{char}secret@127.0.0.1:6379/0"
    done = in_process(monkeypatch, capsys, *BROKER_COMMANDS[command], home=tmp_path,
                      ORCHARD_BROKER_URL=url)  # fmt: skip
    one_line(*done, "ORCHARD_BROKER_URL redis://:***@127.0.0.1:6379/0: ", "percent-encode")
    assert "hunter2" not in done[1] + done[2]


@pytest.mark.parametrize(
    ("variable", "url", "masked"),
    [
        (
            "ORCHARD_DATABASE_URL",
            "postgresql+psycopg://orchard:secret/127.0.0.1:5432/x",
            "postgresql+psycopg://orchard:***/127.0.0.1:5432/x",
        ),
        ("ORCHARD_BROKER_URL", "redis://:secret:127.0.0.1:6379/5", "redis://:***/5"),
    ],
)
@pytest.mark.parametrize("command", ["submit", "worker"])
def test_a_url_whose_at_sign_was_mistyped_keeps_its_password_hidden(
    tmp_path: Path, monkeypatch, capsys, command: str, variable: str, url: str, masked: str
) -> None:
    """`:` or `/` typed for the `@`: no user info to mask, by its form, and the whole
    URL, password and all, was the error line's."""
    done = in_process(monkeypatch, capsys, *BROKER_COMMANDS[command], home=tmp_path,
                      **{variable: url})  # fmt: skip
    one_line(*done, f"{variable} {masked}: ")


def test_url_mistakes_are_one_line_in_a_real_process(tmp_path: Path) -> None:
    """No logging or import of a command prints more than the one line."""
    done = orchard("status", home=tmp_path, ORCHARD_DATABASE_URL="postgres://p:secret@h/x")
    one_line(done.returncode, done.stdout, done.stderr, "ORCHARD_DATABASE_URL postgres://p:***@h/x")
    done = orchard("worker", home=tmp_path, ORCHARD_BROKER_URL="http://u:secret@h:6379/0")
    one_line(done.returncode, done.stdout, done.stderr, "ORCHARD_BROKER_URL http://u:***@h:6379/0")
    assert not (tmp_path / "orchard.db").exists()


@pytest.mark.parametrize(
    "args", [["status"], ["status", "c-1"], ["report", "c-1"], ["cancel", "c-1"], ["resume", "c-1"]]
)
def test_reading_a_store_that_does_not_exist_creates_nothing(
    tmp_path: Path, monkeypatch, capsys, args: list[str]
) -> None:
    home = tmp_path / "fresh"
    line = one_line(*in_process(monkeypatch, capsys, *args, home=home), "orchard db upgrade")
    assert f"no store at {home / 'orchard.db'} yet" in line
    assert not home.exists()


def test_a_worker_does_not_create_the_store_either(tmp_path: Path, monkeypatch, capsys) -> None:
    """Without ORCHARD_DATABASE_URL a worker's host would have a store of its own, whose
    workers drop every message of the cluster's campaigns: the line says to set it
    first; a store named by the variable gets the plain advice."""
    home = tmp_path / "fresh"
    done = in_process(monkeypatch, capsys, "worker", "--queues", "cpu", home=home)
    line = one_line(*done, f"no store at {home / 'orchard.db'} yet")
    assert "ORCHARD_DATABASE_URL is not set, so this worker would use a SQLite store" in line
    assert "set it to the store the campaigns are submitted to" in line
    named = f"sqlite:///{tmp_path / 'named.db'}"
    done = in_process(monkeypatch, capsys, "worker", home=home, ORCHARD_DATABASE_URL=named)
    line = one_line(*done, f"no store at {tmp_path / 'named.db'} yet", "orchard db upgrade")
    assert "is not set" not in line
    assert not (home / "orchard.db").exists() and not (tmp_path / "named.db").exists()


@pytest.mark.parametrize("command", ["cancel", "resume"])
def test_an_unknown_campaign_touches_no_broker(tmp_path: Path, command: str) -> None:
    """The store is asked first; the filesystem broker's folders are not created for a
    campaign that does not exist (a real process: building the app creates them)."""
    Store(f"sqlite:///{tmp_path / 'orchard.db'}").upgrade()
    done = orchard(command, "nope-1", home=tmp_path)
    one_line(done.returncode, done.stdout, done.stderr, "no campaign 'nope-1'")
    assert not (tmp_path / "broker").exists()
