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
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.app", command],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr == f"orchard: error: {name}_PASSWORD_FILE={missing}: no such file\n"


def test_the_python_api_still_gets_the_error_to_catch(tmp_path: Path) -> None:
    """Outside the `celery` command, importing the app raises OrchardError, no exit."""
    code = (
        "from shared.errors import OrchardError\n"
        "try:\n"
        "    import workers.app\n"
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
