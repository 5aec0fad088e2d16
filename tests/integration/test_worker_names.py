"""Two workers of one node name, on real Redis: the second is refused at its start."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from db.store import Store
from tests.conftest import REDIS_URL
from tests.integration.test_campaign import settings_for
from tests.integration.workerpool import REPO, WorkerPool, wait_for
from tests.scheduler.test_cli import assert_one_line_error


def test_a_worker_whose_name_a_running_worker_answers_to_is_refused(
    tmp_path: Path, sqlite_url: str, redis_prefix: str
) -> None:
    """A host configured as another (the same ORCHARD_NODE_NAME or --name): the broker's
    orders to that name would reach both workers, so the second does not start."""
    settings = settings_for(tmp_path, REDIS_URL, sqlite_url)
    Store(settings.database_url).upgrade()
    with WorkerPool(settings) as pool:
        pool.start("dup", "cpu")
        wait_for(lambda: " ready." in pool.log("dup"), 120, "the first worker", check=pool.check)
        second = subprocess.run(
            [sys.executable, "-m", "scheduler.cli", "worker", "--queues", "preprocess"]
            + ["--name", "dup-0@%h"],
            # the idle first worker answers in milliseconds, and the ping ends at its
            # answer: the 0.5 s a start waits by default, on a loaded machine, may not be
            # enough for the answer to come
            env={**pool.env, "ORCHARD_NAME_CHECK_SECONDS": "20"},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        node = f"dup-0@{socket.gethostname()}"
        assert_one_line_error(
            second,
            f"worker name {node} is taken: a running worker of that name answers on "
            f"{REDIS_URL} (on a cluster, each host needs a host name of its own: under Docker "
            "Compose, its own ORCHARD_NODE_NAME); stop it, or give this worker another --name",
        )
        pool.check()  # the first runs on
