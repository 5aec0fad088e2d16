"""Loading the Celery app the way the `celery` command does (`celery -A workers.app ...`):
a setting orchard cannot use is one line naming it, not Celery's "Unable to load celery
application" traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def celery(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`celery -A workers.app COMMAND` in a process of its own, with ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.app", command],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("name", "url", "command"),
    [
        ("ORCHARD_BROKER", "redis://127.0.0.1:6379/0", "worker"),
        ("ORCHARD_BROKER", "redis://127.0.0.1:6379/0", "flower"),
        ("ORCHARD_DATABASE", "postgresql+psycopg://orchard@127.0.0.1/orchard", "worker"),
    ],
)
def test_the_celery_command_reports_a_missing_password_file_in_one_line(
    tmp_path: Path, name: str, url: str, command: str
) -> None:
    missing = tmp_path / "no-such-secret"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHARD_")}
    env["ORCHARD_HOME"] = str(tmp_path / "home")
    env[f"{name}_URL"] = url
    env[f"{name}_PASSWORD_FILE"] = str(missing)
    done = celery(command, env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr == f"orchard: error: {name}_PASSWORD_FILE={missing}: no such file\n"


@pytest.mark.parametrize(
    ("url", "said"),
    [
        (
            "postgresql+psycopgg://postgres:hunter2@127.0.0.1/orchard",
            "postgresql+psycopgg:// is not a known database URL",
        ),
        ("mysql://root:hunter2@127.0.0.1/orchard", "is not installed"),
    ],
)
def test_a_celery_worker_with_a_database_it_cannot_use_stops_before_taking_a_message(
    tmp_path: Path, url: str, said: str
) -> None:
    """Not only `orchard worker`: a plain `celery worker` whose ORCHARD_DATABASE_URL
    names a driver SQLAlchemy cannot load would fail every unit it took, each message
    dropped with a traceback. It stops in one line (password masked), exit code 2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHARD_")}
    env["ORCHARD_HOME"] = str(tmp_path / "home")
    env["ORCHARD_BROKER_URL"] = f"filesystem://{tmp_path / 'broker'}"
    env["ORCHARD_DATABASE_URL"] = url
    done = celery("worker", env)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("orchard: error: ORCHARD_DATABASE_URL ") and said in line, line
    assert "hunter2" not in done.stderr + done.stdout and ":***@" in line


def test_the_python_api_still_gets_the_error_to_catch(tmp_path: Path) -> None:
    """Outside the `celery` command, the app (built on first use) raises OrchardError,
    no exit; importing the module alone builds nothing."""
    code = (
        "from shared.errors import OrchardError\n"
        "import workers.app\n"
        "try:\n"
        "    from workers.app import app\n"
        "except OrchardError as exc:\n"
        "    print('caught', exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHARD_")}
    env.update(
        {
            "ORCHARD_HOME": str(tmp_path / "home"),
            "ORCHARD_BROKER_URL": "redis://127.0.0.1:6379/0",
            "ORCHARD_BROKER_PASSWORD_FILE": str(tmp_path / "missing"),
        }
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout == f"caught ORCHARD_BROKER_PASSWORD_FILE={tmp_path / 'missing'}: no such file\n"
    )


@pytest.mark.parametrize(
    ("query", "option"),
    [("foo=bar", "foo"), ("socket_timeout=abc", "socket_timeout"), ("password=S3cret", "password")],
)
def test_a_broker_url_with_an_option_kombu_refuses_is_one_line(query: str, option: str) -> None:
    """The broker check names the option, even for a URL that skipped orchard's own
    URL check (kombu raised a TypeError for a query option it does not know)."""
    from celery import Celery

    from shared.errors import OrchardError
    from workers.app import check_broker_reachable

    url = f"redis://:S3cret@127.0.0.1:6379/12?{query}"
    with pytest.raises(OrchardError) as caught:
        check_broker_reachable(Celery("t", broker=url, set_as_current=False))
    message = str(caught.value)
    shown = query.replace("S3cret", "***")
    assert message.startswith(f"broker redis://:***@127.0.0.1:6379/12?{shown}: option {option!r}")
    assert "S3cret" not in message


def test_a_type_error_from_kombu_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A URL orchard's check lets through and kombu still refuses: one line, its reason."""
    from celery import Celery

    from shared.errors import OrchardError
    from workers import app as app_module
    from workers import config

    monkeypatch.setattr(config, "broker_url_problem", lambda url: None)
    url = "redis://:S3cret@127.0.0.1:6379/12?foo=bar"
    with pytest.raises(OrchardError) as caught:
        app_module.check_broker_reachable(Celery("t", broker=url, set_as_current=False))
    assert str(caught.value) == (
        "broker redis://:***@127.0.0.1:6379/12?foo=bar: not a broker URL orchard can use "
        "(option 'foo' in the URL's query is not one kombu knows); " + config.BROKER_URL_EXAMPLES
    )


def test_the_submit_command_names_a_bad_broker_option_in_one_line(
    tmp_path: Path, tiny_campaign: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHARD_")}
    env["ORCHARD_HOME"] = str(tmp_path / "home")
    env["ORCHARD_BROKER_URL"] = "redis://127.0.0.1:6379/12?foo=bar"
    done = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "submit", str(tiny_campaign)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
    assert "redis://127.0.0.1:6379/12?foo=bar" in done.stderr and "'foo'" in done.stderr


@pytest.mark.parametrize("command", ["flower", "inspect"])
def test_the_celery_command_refuses_a_broker_url_that_turns_tls_checks_off(
    tmp_path: Path, command: str
) -> None:
    """The checks an `orchard` command makes of the broker URL hold under `celery -A
    workers.app` too (Flower): kombu would take ?ssl_cert_reqs=none over orchard's own
    TLS settings and connect without checking the certificate."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHARD_")}
    env["ORCHARD_HOME"] = str(tmp_path / "home")
    env["ORCHARD_BROKER_URL"] = "rediss://:S3cret@127.0.0.1:6380/13?ssl_cert_reqs=none"
    done = celery(command, env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(
        "orchard: error: ORCHARD_BROKER_URL rediss://:***@127.0.0.1:6380/13?ssl_cert_reqs=none: "
        "option 'ssl_cert_reqs' in the URL's query: TLS settings go in ORCHARD_REDIS_TLS_CA_CERTS"
    )
    assert done.stderr.count("\n") == 1 and "S3cret" not in done.stderr


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_a_worker_s_openmp_threads_sleep_while_they_wait(given, expected) -> None:  # noqa: ANN001
    """Set before torch loads its OpenMP runtime, unless the environment says otherwise."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, os, workers.app; assert 'torch' not in sys.modules; "
            "print(os.environ['OMP_WAIT_POLICY'])",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.strip() == expected, done.stderr
