"""What a worker imports: its task modules alone load no heavy library; ``preload``
loads what its queues' units need before the pool forks, and nothing more.

Each check runs in a fresh interpreter, since this one has imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

HEAVY = ("torch", "sklearn", "matplotlib")


def loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    modules = json.loads(done.stdout.splitlines()[-1])
    return {name for name in HEAVY if name in modules}


def test_task_modules_load_no_heavy_library() -> None:
    code = "from workers.app import app\napp.loader.import_default_modules()"
    assert loaded_after(code) == set()


@pytest.mark.parametrize(
    ("queues", "expected"),
    [
        (["gpu"], {"torch"}),
        (["cpu", "preprocess"], {"sklearn"}),
        (["preprocess"], set()),
        (["cpu", "preprocess", "report"], {"sklearn", "matplotlib"}),
    ],
)
def test_preload_loads_what_the_queues_need(queues: list[str], expected: set[str]) -> None:
    code = f"from workers.app import app, preload\npreload({queues!r})"
    assert loaded_after(code) == expected
