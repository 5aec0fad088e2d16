"""What `pip install .` installs (the Docker image does; so may a user): the wheel carries
every file the commands read at run time, not only the modules an editable install
finds in the checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

#: what the wheel is built from, as docker/Dockerfile copies it
SOURCES = ("pyproject.toml", "README.md", "shared", "db", "workers", "scheduler", "campaigns")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the sources, unpacked: a site-packages of its own."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(
                path, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(path, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = (tmp / "dist").glob("orchard-*.whl")
    site = tmp / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def packaged(site: Path, folder: str, pattern: str) -> set[str]:
    return {p.relative_to(site / folder).as_posix() for p in (site / folder).glob(pattern)}


def test_the_wheel_carries_every_migration_and_the_demo_s_campaign(installed: Path) -> None:
    migrations = REPO / "db" / "migrations"
    for pattern in ("*.py", "*.mako", "versions/*.py"):
        expected = {p.relative_to(migrations).as_posix() for p in migrations.glob(pattern)}
        assert expected and packaged(installed, "db/migrations", pattern) == expected
    quick = installed / "scheduler" / "quick.toml"
    assert not quick.is_symlink()  # the file itself, not a link to a folder not installed
    assert quick.read_bytes() == (REPO / "campaigns" / "quick.toml").read_bytes()


def test_installed_from_the_wheel_the_demo_finds_its_campaign_and_the_store_migrates(
    installed: Path, tmp_path: Path
) -> None:
    """Run from another folder, with only the wheel's files on the path (the checkout's
    editable install is not consulted: the wheel's folders come first)."""
    probe = (
        "import scheduler.demo as demo, db.store as store;"
        f"assert demo.__file__.startswith({str(installed)!r}), demo.__file__;"
        "from shared.spec import load_campaign;"
        "print(load_campaign(demo.QUICK).name);"
        f"s = store.Store('sqlite:///' + {str(tmp_path / 'orchard.db')!r}); print(s.upgrade()[1])"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(installed), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    name, head = done.stdout.split()
    assert name == "quick"
    from db import migrate

    assert head == migrate.head_revision()
