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
    from scheduler.cli import _check_database_url
    from workers.config import check_broker_url

    settings = load_settings(file_env(tmp_path))
    check_broker_url(settings.broker_url)
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


# ---------------------------------------------------------------- masking, paths


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (
            "postgresql+psycopg://orchard@127.0.0.1:1/orchard?password=S3cret",
            "postgresql+psycopg://orchard@127.0.0.1:1/orchard?password=***",
        ),
        (
            "postgresql+psycopg://orchard@h/o?sslmode=require&PassWord=S3cret&application_name=x",
            "postgresql+psycopg://orchard@h/o?sslmode=require&PassWord=***&application_name=x",
        ),
        ("redis://h:6379/0?passwd=S3cret", "redis://h:6379/0?passwd=***"),
        ("redis://h:6379/0?PWD=S3cret&db=1", "redis://h:6379/0?PWD=***&db=1"),
        ("postgresql://o@h/o?sslpassword=S3cret", "postgresql://o@h/o?sslpassword=***"),
        ("postgresql://o:S3cret@h/o?password=S3cret", "postgresql://o:***@h/o?password=***"),
        # a ':' and '@' in the query's password do not unmask part of it
        ("postgresql://o@h/o?password=a:S3cret@b", "postgresql://o@h/o?password=***"),
        # names that only look alike are left alone
        (
            "postgresql://o@h/o?password_hint=x&mypwd=y",
            "postgresql://o@h/o?password_hint=x&mypwd=y",
        ),
    ],
)
def test_a_password_in_the_query_string_is_masked(url, masked):
    assert mask_url(url) == masked
    assert "S3cret" not in mask_url(url)


def test_the_cli_masks_a_password_in_the_database_urls_query(tmp_path, monkeypatch, capsys):
    from scheduler.cli import main

    monkeypatch.setenv("ORCHARD_HOME", str(tmp_path))
    monkeypatch.setenv(
        "ORCHARD_DATABASE_URL", "postgresql+psycopg://orchard@127.0.0.1:1/orchard?password=S3cret"
    )
    assert main(["db", "upgrade"]) == 2
    err = capsys.readouterr().err
    assert "S3cret" not in err and "?password=***" in err and err.count("\n") == 1


def test_a_query_password_and_a_password_file_are_refused_together(tmp_path):
    env = file_env(tmp_path)
    env["ORCHARD_DATABASE_URL"] = "postgresql+psycopg://orchard@postgres/orchard?password=S3cret"
    message = one_line_error(env)
    assert "S3cret" not in message and "carries a password" in message


def test_a_client_key_passphrase_in_the_query_is_not_a_second_password(tmp_path):
    """libpq's ?sslpassword= unlocks the client key; the login password comes from the file."""
    env = file_env(tmp_path, postgres="pw")
    query = "?sslmode=verify-full&sslkey=/k.pem&sslpassword=keypass"
    env["ORCHARD_DATABASE_URL"] += query
    url = load_settings(env).database_url
    assert url == f"postgresql+psycopg://orchard:pw@postgres:5432/orchard{query}"


@pytest.fixture
def loop(tmp_path: Path) -> Path:
    path = tmp_path / "loop"
    path.symlink_to("loop")
    return path


@pytest.mark.parametrize("name", ["ORCHARD_HOME", "ORCHARD_ARTIFACTS"])
def test_a_folder_variable_on_a_symlink_loop_is_one_line(tmp_path, loop, name):
    env = {"ORCHARD_HOME": str(tmp_path), name: str(loop / "x")}
    with pytest.raises(OrchardError) as caught:
        load_settings(env)
    assert str(caught.value).startswith(f"{name}={loop / 'x'!s}: a symbolic link loop (")


def test_a_broker_folder_or_sqlite_file_on_a_symlink_loop_is_one_line(tmp_path, loop):
    env = {"ORCHARD_HOME": str(tmp_path), "ORCHARD_BROKER_URL": f"filesystem://{loop}"}
    with pytest.raises(OrchardError, match=r"^ORCHARD_BROKER_URL=filesystem://.*symbolic link"):
        load_settings(env)
    env = {"ORCHARD_HOME": str(tmp_path), "ORCHARD_DATABASE_URL": "sqlite:///loop/x.db"}
    os.chdir(tmp_path)
    with pytest.raises(OrchardError, match=r"^ORCHARD_DATABASE_URL=sqlite:///loop/x.db: a symbo"):
        load_settings(env)


@pytest.mark.parametrize("name", ["ORCHARD_HOME", "ORCHARD_ARTIFACTS"])
def test_a_home_folder_of_an_unknown_user_is_one_line(tmp_path, name):
    env = {"ORCHARD_HOME": str(tmp_path), name: "~nosuchuser-orchard/x"}
    with pytest.raises(OrchardError) as caught:
        load_settings(env)
    assert str(caught.value) == (f"{name}=~nosuchuser-orchard/x: ~nosuchuser-orchard: no such user")


@pytest.mark.parametrize("name", ["ORCHARD_HOME", "ORCHARD_ARTIFACTS"])
def test_an_empty_folder_variable_counts_as_unset_and_whitespace_is_refused(
    tmp_path, monkeypatch, name
):
    monkeypatch.chdir(tmp_path)
    settings = load_settings({name: ""})
    assert settings.home == tmp_path / ".orchard"
    assert settings.artifacts == tmp_path / ".orchard" / "artifacts"
    with pytest.raises(OrchardError) as caught:
        load_settings({name: " \t"})
    assert str(caught.value) == (f"{name}=' \\t': only whitespace; unset it, or name a folder")
    assert list(tmp_path.iterdir()) == []


def test_the_cli_reports_a_symlink_loop_home_in_one_line(tmp_path, loop, monkeypatch, capsys):
    from scheduler.cli import main

    monkeypatch.setenv("ORCHARD_HOME", str(loop))
    assert main(["status"]) == 2
    assert capsys.readouterr().err == (
        f"orchard: error: ORCHARD_HOME={loop}: a symbolic link loop ({loop})\n"
    )


def test_dataset_roots_are_folders_separated_like_path(tmp_path):
    allowed, other = tmp_path / "data", tmp_path / "other"
    for folder in (allowed, other):
        folder.mkdir()
    env = {"ORCHARD_HOME": str(tmp_path / "home"), "ORCHARD_DATASET_ROOTS": f"{allowed}::{other}"}
    settings = load_settings(env)
    assert settings.dataset_roots == (allowed.resolve(), other.resolve())
    assert load_settings({"ORCHARD_HOME": str(tmp_path)}).dataset_roots == ()
    spaced = load_settings({**env, "ORCHARD_DATASET_ROOTS": f" {allowed} : {other} "})
    assert spaced.dataset_roots == (allowed.resolve(), other.resolve())
    for blank in ("   ", ":", " : "):
        with pytest.raises(OrchardError) as info:
            load_settings({**env, "ORCHARD_DATASET_ROOTS": blank})
        assert str(info.value) == (
            f"ORCHARD_DATASET_ROOTS={blank!r}: names no folder; unset it, or name the "
            "folders datasets may be read from, separated by ':'"
        )


def test_outside_the_dataset_roots_follows_symbolic_links(tmp_path):
    allowed, elsewhere = tmp_path / "data", tmp_path / "private"
    (allowed / "A").mkdir(parents=True)
    elsewhere.mkdir()
    (allowed / "A" / "1.jpg").write_bytes(b"x")
    (elsewhere / "secret.jpg").write_bytes(b"x")
    (allowed / "A" / "2.jpg").symlink_to(elsewhere / "secret.jpg")
    env = {"ORCHARD_HOME": str(tmp_path / "home"), "ORCHARD_DATASET_ROOTS": str(allowed)}
    settings = load_settings(env)
    assert not settings.outside_dataset_roots(allowed / "A" / "1.jpg")
    assert settings.outside_dataset_roots(allowed / "A" / "2.jpg")  # leads out
    assert settings.outside_dataset_roots(elsewhere / "secret.jpg")
    assert not settings.outside_dataset_roots(settings.artifacts / "datasets" / "s" / "1.jpg")
    unrestricted = load_settings({"ORCHARD_HOME": str(tmp_path / "home")})
    assert not unrestricted.outside_dataset_roots(elsewhere / "secret.jpg")
