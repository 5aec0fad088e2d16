"""Every module of orchard's packages imports: a name moved between modules and left
imported from its old home fails here, not on the worker that first loads it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

IMPORT_ALL = """
import importlib, json, pkgutil
package = importlib.import_module(%r)
names = sorted(m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + "."))
for name in names:
    importlib.import_module(name)
print(json.dumps(names))
"""


@pytest.mark.parametrize("package", ["db", "scheduler", "workers"])
def test_every_module_of_the_package_imports(package: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL % package],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    imported = set(json.loads(result.stdout.strip().splitlines()[-1]))
    on_disk = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for p in (REPO / package).rglob("*.py")
        if "migrations" not in p.parts  # Alembic's scripts, loaded by Alembic alone
    } - {package}
    assert on_disk <= imported, sorted(on_disk - imported)
