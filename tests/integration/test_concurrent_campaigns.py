"""Two campaigns submitted at the same moment to the same workers, Redis and store do
not interfere, and `orchard status` shows both, then each one's units.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from db.store import Store
from scheduler.api import submit
from tests.conftest import REDIS_URL, REPO, TINY_CAMPAIGN
from tests.integration.test_campaign import running_workers, settings_for

pytestmark = pytest.mark.integration


def light_campaign(path: Path, name: str, data: Path) -> Path:
    """The tiny campaign cut to every family's smallest form: two folds of one epoch."""
    text = TINY_CAMPAIGN.format(name=name, root=data)
    for old, new in (
        ("[cnn]\nfolds = 5\nepochs = 2\n", "[cnn]\nfolds = 2\nepochs = 1\n"),
        ("n_components = [4, 8]", "n_components = [4]"),
        # explaining a 1-epoch CNN costs seconds
        ("[report]\nlime_samples = 50", "[report]\nlime = false"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)
    return path


def test_two_campaigns_at_once(
    tmp_path: Path,
    sqlite_url: str,
    redis_prefix: str,
) -> None:
    settings = settings_for(tmp_path, REDIS_URL, sqlite_url)
    # the same dataset: both campaigns race for the same preprocessing cache
    files = [
        light_campaign(tmp_path / f"{n}.toml", n, tmp_path / "data") for n in ("alpha", "beta")
    ]
    store = Store(sqlite_url)

    with running_workers(settings, "pair") as workers:
        with ThreadPoolExecutor(2) as pool:
            runs = list(pool.map(lambda f: submit(f, settings=settings), files))
        for run in runs:
            run.wait(timeout=300, check=workers.check)

    alpha, beta = runs
    assert alpha.id.startswith("alpha-") and beta.id.startswith("beta-")
    for run in runs:
        status = run.status()
        assert status.campaign.state == "DONE", [(u.key, u.state, u.error) for u in status.units]
        assert {u.family for u in status.units} == {"preprocess", "cnn", "svm", "rf", "report"}
        assert all(u.attempts == 1 for u in status.units)
        assert store.count_rows(run.id)["results"] == len(status.units)
        # every unit, result and report belongs to its own campaign
        assert all(u.key.startswith(run.id + "/") for u in run.status().units)
        assert all(key.startswith(run.id + "/") for key in store.results(run.id))
        assert run.report_path().is_relative_to(settings.artifacts / "campaigns" / run.id)
    assert len(alpha.status().units) == len(beta.status().units)

    env = {
        **os.environ,
        "ORCHARD_HOME": str(settings.home),
        "ORCHARD_DATABASE_URL": sqlite_url,
        "COLUMNS": "250",
    }

    def orchard_status(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "scheduler.cli", "status", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    listing = orchard_status()
    total = len(alpha.status().units)
    for run, name in ((alpha, "alpha"), (beta, "beta")):
        row = next(line for line in listing.splitlines() if run.id in line)
        assert name in row and "DONE" in row and f"{total}/{total}" in row
    units = orchard_status(alpha.id)
    assert f"{alpha.id}: DONE" in units
    for unit in alpha.status().units:
        row = next(
            line for line in units.splitlines() if unit.key.removeprefix(alpha.id + "/") in line
        )
        assert "SUCCESS" in row and unit.worker in row
    assert beta.id not in units
