"""Passwords from files (ORCHARD_BROKER_PASSWORD_FILE, ORCHARD_DATABASE_PASSWORD_FILE).

Docker secrets hand a password over as a file; orchard percent-encodes it into its URL,
so any character may be in it. Checked here against the parsers that will read the URL
(kombu, redis-py, SQLAlchemy and its psycopg dialect) and orchard's own broker check.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.errors import OrchardError
from shared.settings import load_settings, mask_url

#: every character a URL treats specially, and a few a shell or a config file does
AWKWARD = "p/w?#@%:[]!$&'()*+,;= \"\\~"


def write_password(folder: Path, name: str, text: str) -> str:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def file_env(tmp_path: Path, redis: str = AWKWARD, postgres: str = AWKWARD) -> dict[str, str]:
    return {
        "ORCHARD_HOME": str(tmp_path),
        "ORCHARD_BROKER_URL": "redis://redis:6379/0",
        "ORCHARD_BROKER_PASSWORD_FILE": write_password(tmp_path, "redis_password", redis + "\n"),
        "ORCHARD_DATABASE_URL": "postgresql+psycopg://orchard@postgres:5432/orchard",
        "ORCHARD_DATABASE_PASSWORD_FILE": write_password(
            tmp_path, "postgres_password", postgres + "\n"
        ),
    }


def test_broker_password_from_a_file_round_trips_through_kombu_and_redis_py(tmp_path):
    from kombu.utils.url import parse_url
    from redis.connection import parse_url as redis_parse_url

    from workers.config import broker_url_problem

    url = load_settings(file_env(tmp_path)).broker_url
    assert url.startswith("redis://:") and url.endswith("@redis:6379/0")
    assert broker_url_problem(url) is None  # orchard's own check takes it
    parsed = parse_url(url)
    assert (parsed["password"], parsed["hostname"], parsed["port"]) == (AWKWARD, "redis", 6379)
    assert parsed["virtual_host"] == "0"
    parsed = redis_parse_url(url)
    assert (parsed["password"], parsed["host"], parsed["port"], parsed["db"]) == (
        AWKWARD,
        "redis",
        6379,
        0,
    )
    assert mask_url(url) == "redis://:***@redis:6379/0"


def test_database_password_from_a_file_round_trips_through_sqlalchemy(tmp_path):
    from sqlalchemy.engine import make_url

    url = load_settings(file_env(tmp_path)).database_url
    parsed = make_url(url)
    assert parsed.password == AWKWARD
    assert (parsed.username, parsed.host, parsed.port, parsed.database) == (
        "orchard",
        "postgres",
        5432,
        "orchard",
    )
    # what psycopg is handed: the password as a keyword, not a URL to parse again
    _, kwargs = parsed.get_dialect()().create_connect_args(parsed)
    assert kwargs["password"] == AWKWARD and kwargs["user"] == "orchard"
    assert mask_url(url) == "postgresql+psycopg://orchard:***@postgres:5432/orchard"


def test_the_orchard_cli_accepts_the_urls_it_builds(tmp_path):
    from scheduler.cli import _check_broker_url, _check_database_url

    settings = load_settings(file_env(tmp_path))
    _check_broker_url(settings.broker_url)
    _check_database_url(settings.database_url)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://h:6379/0", "redis://:pw%2F1@h:6379/0"),
        ("redis://h", "redis://:pw%2F1@h"),
        ("redis://default@h:6379/0", "redis://default:pw%2F1@h:6379/0"),  # an ACL user
        (
            "rediss://h:6380/0?ssl_cert_reqs=required",
            "rediss://:pw%2F1@h:6380/0?ssl_cert_reqs=required",
        ),
        ("postgresql+psycopg://orchard@h/orchard", "postgresql+psycopg://orchard:pw%2F1@h/orchard"),
        (
            "postgresql+psycopg://orchard@[::1]:5432/o?sslmode=require",
            "postgresql+psycopg://orchard:pw%2F1@[::1]:5432/o?sslmode=require",
        ),
    ],
)
def test_the_password_goes_where_the_url_expects_it(tmp_path, url, expected):
    env = {
        "ORCHARD_BROKER_URL": url,
        "ORCHARD_BROKER_PASSWORD_FILE": write_password(tmp_path, "b", "pw/1"),
        "ORCHARD_DATABASE_URL": url,
        "ORCHARD_DATABASE_PASSWORD_FILE": write_password(tmp_path, "d", "pw/1\n"),
    }
    settings = load_settings(env)
    assert settings.broker_url == expected
    assert settings.database_url == expected


def test_only_trailing_newlines_are_dropped(tmp_path):
    env = file_env(tmp_path)
    write_password(tmp_path, "redis_password", " a b \n\n")
    assert load_settings(env).broker_url == "redis://:%20a%20b%20@redis:6379/0"


def test_without_the_file_variables_the_urls_are_as_given(tmp_path):
    env = file_env(tmp_path)
    env["ORCHARD_BROKER_PASSWORD_FILE"] = ""  # empty counts as unset (compose: `VAR: ""`)
    del env["ORCHARD_DATABASE_PASSWORD_FILE"]
    settings = load_settings(env)
    assert settings.broker_url == "redis://redis:6379/0"
    assert settings.database_url == "postgresql+psycopg://orchard@postgres:5432/orchard"


def one_line_error(env: dict[str, str]) -> str:
    with pytest.raises(OrchardError) as caught:
        load_settings(env)
    message = str(caught.value)
    assert "\n" not in message
    assert AWKWARD not in message
    return message


def test_a_missing_password_file_is_one_line_naming_it(tmp_path):
    env = file_env(tmp_path)
    env["ORCHARD_BROKER_PASSWORD_FILE"] = str(tmp_path / "nowhere")
    message = one_line_error(env)
    assert message == f"ORCHARD_BROKER_PASSWORD_FILE={tmp_path / 'nowhere'}: no such file"


def test_an_empty_password_file_is_one_line_naming_it(tmp_path):
    env = file_env(tmp_path, postgres="")
    message = one_line_error(env)
    assert message.startswith(f"ORCHARD_DATABASE_PASSWORD_FILE={tmp_path / 'postgres_password'}:")
    assert "empty" in message


def test_a_folder_as_password_file_is_one_line(tmp_path):
    env = file_env(tmp_path)
    env["ORCHARD_DATABASE_PASSWORD_FILE"] = str(tmp_path)
    assert one_line_error(env).startswith(f"ORCHARD_DATABASE_PASSWORD_FILE={tmp_path}: ")


def test_an_unreadable_password_file_is_one_line_naming_it(tmp_path, monkeypatch):
    env = file_env(tmp_path)
    path = env["ORCHARD_BROKER_PASSWORD_FILE"]

    def refuse(self, *args, **kwargs):  # what chmod 000 does, for root too
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)
    message = one_line_error(env)
    assert (
        message
        == f"ORCHARD_BROKER_PASSWORD_FILE={path}: not readable by this user (uid {os.getuid()})"
    )


@pytest.mark.parametrize(
    "url",
    [
        "redis://:other@redis:6379/0",
        "redis://:ot/her@redis:6379/0",  # a password urllib would cut at the '/'
        "redis://default:other@redis:6379/0",
    ],
)
def test_a_url_with_a_password_and_a_password_file_is_refused(tmp_path, url):
    env = file_env(tmp_path)
    env["ORCHARD_BROKER_URL"] = url
    message = one_line_error(env)
    assert message.startswith("ORCHARD_BROKER_URL redis://")
    assert "ORCHARD_BROKER_PASSWORD_FILE" in message and "other" not in message


def test_a_url_that_already_holds_the_files_password_is_taken_as_it_is(tmp_path):
    """``orchard worker --gpus`` hands its children the URLs it resolved, and they inherit
    the *_PASSWORD_FILE variables too: resolving again changes nothing."""
    env = file_env(tmp_path)
    first = load_settings(env)
    again = {
        **env,
        "ORCHARD_BROKER_URL": first.broker_url,
        "ORCHARD_DATABASE_URL": first.database_url,
    }
    assert load_settings(again) == first


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("ORCHARD_BROKER", "filesystem:///tmp/broker"),
        ("ORCHARD_BROKER", ""),  # the default: a filesystem broker under ORCHARD_HOME
        ("ORCHARD_DATABASE", "sqlite:////tmp/orchard.db"),
    ],
)
def test_a_password_file_for_a_url_without_a_server_is_refused(tmp_path, name, url):
    env = file_env(tmp_path)
    env[f"{name}_URL"] = url
    message = one_line_error(env)
    assert message.startswith(f"{name}_PASSWORD_FILE is set, but {name}_URL ")


def test_the_cli_reports_a_missing_password_file_in_one_line(tmp_path, monkeypatch, capsys):
    from scheduler.cli import main

    for key, value in file_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("ORCHARD_DATABASE_PASSWORD_FILE", str(tmp_path / "missing"))
    assert main(["status"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"orchard: error: ORCHARD_DATABASE_PASSWORD_FILE={tmp_path / 'missing'}: no such file\n"
    )
