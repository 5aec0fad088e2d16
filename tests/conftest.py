"""Fixtures shared by the whole suite: real services, throwaway databases, tiny campaigns."""

from __future__ import annotations

import importlib.util
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN = os.environ.get(
    "ORCHARD_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("ORCHARD_TEST_REDIS", "redis://127.0.0.1:6379/0")


def record_begins(engine) -> list[str]:  # noqa: ANN001 - a SQLAlchemy Engine
    """The BEGIN statements ``engine`` sends from now on: one per store transaction."""
    from sqlalchemy import event

    begins: list[str] = []
    event.listen(
        engine,
        "before_cursor_execute",
        lambda conn, cursor, statement, *rest: (
            begins.append(statement) if statement.startswith("BEGIN") else None
        ),
    )
    return begins


def load_bench(name: str) -> ModuleType:
    """``bench/<name>.py`` as a module (the benchmark scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``--numprocesses auto`` (``make test``): a process per core and one more.

    About a quarter of the suite's time is waiting, not computing: workers starting,
    leases running out, retries' countdowns, outages held open. One process per core left
    that quarter of the cores idle (9 min 50 s on 2 cores); one more fills it (8 min 10 s,
    and the same tests). ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still says otherwise."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (cores or 1) + 1


# workers.app builds its Celery app from the environment on first use; keep anything it
# creates out of the checkout.
os.environ.setdefault("ORCHARD_HOME", tempfile.mkdtemp(prefix="orchard-test-home-"))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the real PostgreSQL server, dropped afterwards."""
    from sqlalchemy import create_engine, text

    name = f"orchard_test_{secrets.token_hex(4)}"
    admin = create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield POSTGRES_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str:
    """Each store test runs on SQLite and on the real PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return request.getfixturevalue(name)


TINY_CAMPAIGN = """
name = "{name}"
seed = 1
folds = 5

[dataset]
kind = "synthetic"
root = "{root}"
seed = 3
train_per_class = 10
test_per_class = 4
width = 96
height = 72

[preprocessing]
size = 64
shard_size = 16

[cnn]
folds = 5
epochs = 2
batch_size = 16
width = 0.125
image_size = 32

[svm]
variant = "polar32"
n_components = [4, 8]
C = 1.0

[rf]
variant = "resize16"
n_estimators = [10]

[blend]
families = ["cnn"]

[report]
lime_samples = 50  # LIME's default 1,000 forward passes per image: 5 s of each run
"""


def uneven_units(tmp_path: Path) -> list:
    """The plan of a campaign whose units cost very differently: two small SVM points,
    then forests of 5, 10 and 500 trees, the big one listed last in the file."""
    from shared.plan import plan_units
    from shared.spec import load_campaign

    path = tmp_path / "uneven.toml"
    path.write_text(
        'name = "c"\n[dataset]\nkind = "synthetic"\n[preprocessing]\nsize = 64\n'
        '[svm]\nvariant = "polar32"\nn_components = [4, 8]\n'
        '[rf]\nvariant = "resize16"\nn_estimators = [5, 10, 500]\n'
    )
    return plan_units("c-1", load_campaign(path), [(0, 10)])


@pytest.fixture
def tiny_campaign(tmp_path: Path) -> Path:
    """A campaign with every family, small enough to run in seconds on a CPU."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_CAMPAIGN.format(name="tiny", root=tmp_path / "data"))
    return path
