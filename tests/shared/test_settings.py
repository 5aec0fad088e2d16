"""Passwords from files (ORCHARD_BROKER_PASSWORD_FILE, ORCHARD_DATABASE_PASSWORD_FILE).

Docker secrets hand a password over as a file; orchard percent-encodes it into its URL,
so any character may be in it. Checked here against the parsers that will read the URL
(kombu, redis-py, SQLAlchemy and its psycopg dialect) and orchard's own broker check.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from shared import settings as settings_module
from shared.errors import OrchardError
from shared.settings import check_database_url_form, load_settings, mask_url

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

    real_open = os.open

    def refuse(file, *args, **kwargs):  # what chmod 000 does, for root too
        if os.fspath(file) == path:
            raise PermissionError(13, "Permission denied", path)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
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
    # the example is a URL of the variable's kind, a database's for the database
    database = name == "ORCHARD_DATABASE"
    example = "postgresql+psycopg://USER@HOST/DB" if database else "redis://HOST:6379/0"
    assert message.endswith(f"; unset it, or give a URL like {example}")


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
    assert main(["db", "upgrade"]) == 75  # unreachable: may succeed later
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


@pytest.mark.parametrize("folder", ["runs ?1", "a%41b"])
def test_a_home_whose_path_a_sqlite_url_would_misread_is_named_itself(tmp_path, folder):
    """The default store URL is built from ORCHARD_HOME: the line names that, not the
    ORCHARD_DATABASE_URL the user never set; with one set, the home is fine."""
    home = tmp_path / folder
    with pytest.raises(OrchardError) as caught:
        load_settings({"ORCHARD_HOME": str(home)})
    assert str(caught.value).startswith(f"ORCHARD_HOME={home}: a SQLite URL cannot name")
    url = f"sqlite:///{tmp_path / 'store.db'}"
    assert load_settings({"ORCHARD_HOME": str(home), "ORCHARD_DATABASE_URL": url}).home == home


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


# ---------------------------------------------------------------- password files that are no files


def load_within(env: dict[str, str], release: Path | None = None, seconds: float = 10) -> str:
    """The one-line error ``load_settings(env)`` raises, failing the test (not hanging it)
    when it has not returned within ``seconds``; ``release``: a FIFO to write to then,
    so that a read blocked on it ends."""
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            load_settings(env)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            outcome.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if release is not None:  # a writer that closes at once: the reader sees its end
            os.close(os.open(release, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(seconds)
        pytest.fail(f"load_settings still waiting after {seconds} s")
    assert outcome and isinstance(outcome[0], OrchardError), outcome
    message = str(outcome[0])
    assert "\n" not in message
    return message


def test_a_fifo_as_password_file_is_refused_without_waiting_for_a_writer(tmp_path):
    env = file_env(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    env["ORCHARD_BROKER_PASSWORD_FILE"] = str(fifo)
    assert load_within(env, release=fifo) == (
        f"ORCHARD_BROKER_PASSWORD_FILE={fifo}: a named pipe (FIFO), not a regular file; "
        "name the password's file"
    )


def test_a_device_as_password_file_is_refused_unread(tmp_path, monkeypatch):
    """/dev/null here, which reads as empty: /dev/zero, which never ends, would take all
    memory of an orchard without this check, and of this test with it."""
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    real_open, opened = os.open, []

    def spy(file, *args, **kwargs):
        opened.append(os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    env = file_env(tmp_path)
    env["ORCHARD_DATABASE_PASSWORD_FILE"] = "/dev/null"
    assert load_within(env) == (
        "ORCHARD_DATABASE_PASSWORD_FILE=/dev/null: a character device, not a regular file; "
        "name the password's file"
    )
    assert "/dev/null" not in opened


def test_the_cli_refuses_a_device_as_password_file_in_one_line(tmp_path, monkeypatch, capsys):
    from scheduler.cli import main

    for key, value in file_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("ORCHARD_BROKER_PASSWORD_FILE", "/dev/null")
    assert main(["status"]) == 2
    assert capsys.readouterr().err == (
        "orchard: error: ORCHARD_BROKER_PASSWORD_FILE=/dev/null: a character device, "
        "not a regular file; name the password's file\n"
    )


def test_a_password_file_over_64_kib_is_refused(tmp_path):
    env = file_env(tmp_path)
    write_password(tmp_path, "redis_password", "p" * (64 * 1024 + 1))
    assert load_within(env) == (
        f"ORCHARD_BROKER_PASSWORD_FILE={tmp_path / 'redis_password'}: larger than 64 KiB, "
        "not a password file"
    )
    write_password(tmp_path, "redis_password", "p" * (64 * 1024))  # the limit itself is fine
    assert load_settings(env).broker_url == f"redis://:{'p' * 64 * 1024}@redis:6379/0"


def test_a_password_file_that_says_it_is_empty_is_read_no_further_than_the_limit(
    tmp_path, monkeypatch
):
    """A /proc file is a regular file of size 0 whatever it holds; so, for the reader,
    is a file that grows while it is read."""
    proc = Path("/proc/self/status")
    if not proc.is_file() or proc.stat().st_size != 0:
        pytest.skip("needs Linux's /proc")
    limit = 16  # /proc/self/status holds more
    monkeypatch.setattr(settings_module, "PASSWORD_FILE_LIMIT", limit)
    real_read, asked = os.read, []

    def read(fd: int, size: int) -> bytes:
        asked.append(size)
        return real_read(fd, size)

    monkeypatch.setattr(os, "read", read)
    env = file_env(tmp_path)
    env["ORCHARD_BROKER_PASSWORD_FILE"] = str(proc)
    assert "larger than" in load_within(env)
    assert 0 < sum(asked) <= limit + 1


def test_a_symbolic_link_to_a_password_file_is_followed(tmp_path):
    """Kubernetes mounts each secret as a link into a ..data folder."""
    env = file_env(tmp_path, redis="pw")
    (tmp_path / "link").symlink_to(env["ORCHARD_BROKER_PASSWORD_FILE"])
    env["ORCHARD_BROKER_PASSWORD_FILE"] = str(tmp_path / "link")
    assert load_settings(env).broker_url == "redis://:pw@redis:6379/0"


# ---------------------------------------------------------------- mistyped URLs are masked too


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis:/:S3cretPW@127.0.0.1:6379/9", "redis:/:***@127.0.0.1:6379/9"),
        ("redis//:S3cretPW@127.0.0.1:6379/9", "redis//:***@127.0.0.1:6379/9"),
        ("redis:S3cretPW@127.0.0.1:6379/9", "redis:***@127.0.0.1:6379/9"),
        ("redis:///:S3cretPW@127.0.0.1:6379/9", "redis:///:***@127.0.0.1:6379/9"),
        (
            "postgresql+psycopg:/postgres:S3cretPW@127.0.0.1/x",
            "postgresql+psycopg:/postgres:***@127.0.0.1/x",
        ),
        ("postgresql+psycopg//postgres:S3cret/PW@h/x", "postgresql+psycopg//postgres:***@h/x"),
        # no ':' after the user: in a mistyped URL, the whole user info is hidden
        ("postgresql+psycopg:/S3cretPW@h/x", "postgresql+psycopg:/***@h/x"),
        ("redis:/:/S3cretPW@h", "redis:/:/***@h"),
        # no scheme at all, or blanks before it
        ("postgres:S3cretPW@127.0.0.1/x", "postgres:***@127.0.0.1/x"),
        (":S3cretPW@127.0.0.1:6379/9", ":***@127.0.0.1:6379/9"),
        (" redis://:S3cretPW@h:6379/0", " redis:***@h:6379/0"),
        # a '://' later on is no scheme's
        ("redis:/:S3cretPW@h/0?next=http://x", "redis:/:***@h/0?next=http://x"),
        ("postgresql:/o@h/o?password=S3cretPW", "postgresql:/***@h/o?password=***"),
        # the '@' left out, or mistyped as '/' or ':'
        (
            "postgresql+psycopg://orchard:S3cretPW/127.0.0.1:5432/x",
            "postgresql+psycopg://orchard:***/127.0.0.1:5432/x",
        ),
        (
            "postgresql+psycopg://orchard:S3cretPW127.0.0.1:5432/x",
            "postgresql+psycopg://orchard:***/x",
        ),
        ("redis://:S3cretPW:127.0.0.1:6379/5", "redis://:***/5"),
        ("redis://:S3cretPW/127.0.0.1", "redis://:***/127.0.0.1"),
        ("redis:/:S3cretPW:h/0", "redis:/:***/0"),
        ("redis:S3cretPW:h", "redis:***"),
        # an empty host before digits is no host and port; a mistyped start of '/' alone
        ("redis://:123#abc/0", "redis://:***/0"),
        ("redis://:12?34/0", "redis://:***/0"),
        ("redis//user:S3cretPW:head/0", "redis//***/0"),
        # SQLAlchemy reads a query password up to the next '&', ';' and '#' within it
        ("postgresql://o@h/o?password=ab;S3cretPW", "postgresql://o@h/o?password=***"),
        ("postgresql://o@h/o?password=ab#S3cretPW&x=1", "postgresql://o@h/o?password=***&x=1"),
        # a password parameter's name percent-encoded: SQLAlchemy decodes it
        ("postgresql://o@h/o?pass%77ord=S3cretPW", "postgresql://o@h/o?pass%77ord=***"),
        ("postgresql://o@h/o?a=1&%70wd=S3cretPW", "postgresql://o@h/o?a=1&%70wd=***"),
    ],
)
def test_a_mistyped_url_is_masked_too(url, masked):
    assert mask_url(url) == masked
    assert "S3cret" not in mask_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:6379/0",
        "redis://default@h:6379/0",
        "postgresql+psycopg://orchard@h/orchard",
        "postgresql+psycopg://orchard@[::1]:5432/o?sslmode=require",
        "filesystem:///tmp/orchard/broker",
        "filesystem:///tmp/a@b/broker",
        "sqlite:////tmp/x.db",
        "sqlite:///file:x.db?mode=ro&uri=true",
        "redis://h:6379?db=1",
        "postgresql+psycopg://head:5432,head2:5432/orchard",  # libpq's several hosts
        "redis://[::1]:6379/0",
        "localhost:6379",
        "not a URL",
        "",
    ],
)
def test_a_url_without_a_password_is_shown_as_it_is(url):
    assert mask_url(url) == url


def test_settings_show_their_urls_masked():
    """A Settings object ends up in logs, and in tracebacks that show locals (error
    reporters, ``pytest -l``): its URLs' passwords are masked there, every field shown."""
    import dataclasses

    from shared.settings import Settings

    settings = Settings(
        home=Path("/h"),
        broker_url="redis://:S3cretPW@h:6379/0",
        database_url="postgresql+psycopg://orchard:S3cretPW@h/orchard",
        artifacts=Path("/a"),
        dataset_roots=(Path("/d"),),
    )
    shown = repr(settings)
    assert "S3cret" not in shown
    assert "redis://:***@h:6379/0" in shown and "orchard:***@h/orchard" in shown
    for field in dataclasses.fields(Settings):
        assert f"{field.name}=" in shown


def test_a_mistyped_broker_url_is_refused_with_its_password_masked():
    from workers.config import check_broker_url

    with pytest.raises(OrchardError) as caught:
        check_broker_url("redis:/:S3cretPW@127.0.0.1:6379/9")
    assert str(caught.value).startswith(
        "ORCHARD_BROKER_URL redis:/:***@127.0.0.1:6379/9: not a broker URL; "
    )


def test_the_cli_masks_a_mistyped_database_url(tmp_path, monkeypatch, capsys):
    from scheduler.cli import main

    monkeypatch.setenv("ORCHARD_HOME", str(tmp_path))
    monkeypatch.setenv("ORCHARD_DATABASE_URL", "postgresql+psycopg:/postgres:S3cretPW@127.0.0.1/x")
    assert main(["status"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "orchard: error: ORCHARD_DATABASE_URL postgresql+psycopg:/postgres:***@127.0.0.1/x: "
    )
    assert "S3cret" not in err and err.count("\n") == 1


# ---------------------------------------------------------------- database URLs refused


#: what SQLAlchemy reads as host 'T4il@127.0.0.1' (or 'b@T4il'): the password's tail
UNENCODED_AT = [
    "postgresql+psycopg://postgres:S3cret@T4il@127.0.0.1/x",
    "postgresql+psycopg://postgres:S3cret@T4il@127.0.0.1:5432/x?sslmode=require",
    "postgresql+psycopg://postgres:S3/cr?et@T4il@127.0.0.1/x",
    "postgresql+psycopg://:S3cret@T4il@127.0.0.1/x",
    "postgresql+psycopg://postgres:S3cret@b@T4il@127.0.0.1/x",
]


@pytest.mark.parametrize("url", UNENCODED_AT)
def test_an_unencoded_at_in_the_database_password_is_refused(tmp_path, url):
    from sqlalchemy.engine import make_url

    assert "@" in make_url(url).host  # what the driver would be handed, and print
    env = {"ORCHARD_HOME": str(tmp_path), "ORCHARD_DATABASE_URL": url}
    message = load_within(env)
    assert message.startswith("ORCHARD_DATABASE_URL postgresql+psycopg://")
    assert message.endswith(
        ": an '@' in the password ends it there, and the rest would be taken for the host; "
        "percent-encode the password ('@' as %40, '%' as %25), or put it in "
        "ORCHARD_DATABASE_PASSWORD_FILE"
    )
    assert "S3" not in message and "T4il" not in message


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://postgres:S3cret%40T4il@127.0.0.1/x",  # encoded
        "postgresql+psycopg://admin@server:pw@127.0.0.1/x",  # user 'admin@server'
        "postgresql+psycopg://admin@server@127.0.0.1/x",  # user 'admin@server', no password
        "postgresql+psycopg://orchard@h/my@db",  # the database's name
        "postgresql+psycopg://orchard:pw@h/o?application_name=a@b@c",  # the query's
    ],
)
def test_an_at_that_sqlalchemy_reads_right_is_accepted(tmp_path, url):
    from sqlalchemy.engine import make_url

    assert "@" not in make_url(url).host
    env = {"ORCHARD_HOME": str(tmp_path), "ORCHARD_DATABASE_URL": url}
    assert load_settings(env).database_url == url


def test_the_cli_refuses_an_unencoded_at_before_connecting(tmp_path, monkeypatch, capsys):
    from scheduler.cli import main

    monkeypatch.setenv("ORCHARD_HOME", str(tmp_path))
    monkeypatch.setenv("ORCHARD_DATABASE_URL", UNENCODED_AT[0])
    assert main(["status"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "orchard: error: ORCHARD_DATABASE_URL postgresql+psycopg://postgres:***@127.0.0.1/x: "
        "an '@' in the password"
    )
    assert "T4il" not in err and err.count("\n") == 1


def test_check_database_url_form_names_what_it_is_given():
    """For a URL that is no environment variable's (the API's ``database=``)."""
    check_database_url_form("postgresql+psycopg://orchard:pw@h/o")
    with pytest.raises(OrchardError) as caught:
        check_database_url_form("sqlite://", "database")
    assert str(caught.value).startswith("database sqlite://: an in-memory SQLite database")


IN_MEMORY = [
    "sqlite://",
    "sqlite:///",
    "sqlite:///:memory:",
    "sqlite+pysqlite://",
    "sqlite://?timeout=5",
    "sqlite:///file::memory:?uri=true",
    "sqlite:///file:orchard?mode=memory&cache=shared&uri=true",
]


@pytest.mark.parametrize("url", IN_MEMORY)
def test_an_in_memory_sqlite_database_is_refused(tmp_path, url):
    env = {"ORCHARD_HOME": str(tmp_path), "ORCHARD_DATABASE_URL": url}
    assert load_within(env) == (
        f"ORCHARD_DATABASE_URL {url}: an in-memory SQLite database: each orchard process "
        "(this command, every worker) would have its own, empty one; give a file "
        "(sqlite:///PATH) or a server (postgresql+psycopg://USER@HOST/DB)"
    )


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:////tmp/orchard.db",
        "sqlite:///file:/tmp/x.db?mode=ro&uri=true",
        "sqlite+pysqlite:////tmp/x.db?timeout=5",
    ],
)
def test_a_sqlite_file_is_not_taken_for_memory(tmp_path, url):
    env = {"ORCHARD_HOME": str(tmp_path), "ORCHARD_DATABASE_URL": url}
    assert load_settings(env).database_url == url


def test_the_cli_refuses_an_in_memory_store_without_advising_an_upgrade(
    tmp_path, monkeypatch, capsys
):
    from scheduler.cli import main

    monkeypatch.setenv("ORCHARD_HOME", str(tmp_path))
    monkeypatch.setenv("ORCHARD_DATABASE_URL", "sqlite://")
    assert main(["status"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orchard: error: ORCHARD_DATABASE_URL sqlite://: an in-memory SQLite")
    assert "upgrade" not in err and err.count("\n") == 1
