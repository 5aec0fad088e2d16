"""shared/ stays free of the queue and the database; settings and atomic writes."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.artifacts import (
    ArtifactWriteError,
    atomic_write,
    atomic_write_text,
    read_if_intact,
    sha256_file,
)
from shared.errors import OrchardError
from shared.settings import load_settings, mask_url

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ("celery", "kombu", "redis", "sqlalchemy")

IMPORT_ALL = """
import importlib, json, pkgutil, sys
import shared
names = sorted(m.name for m in pkgutil.walk_packages(shared.__path__, "shared."))
for name in names:
    importlib.import_module(name)
forbidden = %r
bad = sorted(m for m in sys.modules if m.split(".")[0] in forbidden)
print(json.dumps({"modules": names, "bad": bad}))
"""


def test_shared_imports_no_queue_or_database_library():
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL % (FORBIDDEN,)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # every module, those of its packages (shared.report) too
    expected = {
        ".".join(("shared", *p.relative_to(REPO / "shared").with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        for p in (REPO / "shared").rglob("*.py")
    } - {"shared"}
    assert "shared.report.figures" in expected
    assert expected <= set(report["modules"])  # every module really was imported
    assert report["bad"] == []


# ---------------------------------------------------------------- settings


def test_settings_defaults_under_orchard_home(tmp_path):
    settings = load_settings({"ORCHARD_HOME": str(tmp_path)})
    assert settings.home == tmp_path.resolve()
    assert settings.broker_url == f"filesystem://{tmp_path.resolve() / 'broker'}"
    assert settings.broker_is_filesystem
    assert settings.broker_folder == tmp_path.resolve() / "broker"
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / 'orchard.db'}"
    assert settings.artifacts == tmp_path.resolve() / "artifacts"


def test_settings_default_home_is_dot_orchard_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings({})
    assert settings.home == tmp_path.resolve() / ".orchard"
    assert settings.database_url.startswith("sqlite:////")  # absolute sqlite path
    assert settings.artifacts == settings.home / "artifacts"


def test_settings_ignores_process_environment_when_env_given(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHARD_DATABASE_URL", "postgresql://u:pw@h/db")
    settings = load_settings({"ORCHARD_HOME": str(tmp_path)})
    assert settings.database_url.startswith("sqlite:///")


def test_settings_explicit_urls(tmp_path):
    env = {
        "ORCHARD_HOME": str(tmp_path),
        "ORCHARD_BROKER_URL": "redis://:secret@h:6379/0",
        "ORCHARD_DATABASE_URL": "postgresql://u:pw@h/db",
        "ORCHARD_ARTIFACTS": str(tmp_path / "elsewhere"),
    }
    settings = load_settings(env)
    assert settings.broker_url == "redis://:secret@h:6379/0"
    assert not settings.broker_is_filesystem
    assert settings.database_url == "postgresql://u:pw@h/db"
    assert settings.artifacts == (tmp_path / "elsewhere").resolve()


def test_settings_empty_filesystem_broker_means_home_broker(tmp_path):
    settings = load_settings({"ORCHARD_HOME": str(tmp_path), "ORCHARD_BROKER_URL": "filesystem://"})
    assert settings.broker_folder == tmp_path.resolve() / "broker"


def test_settings_make_a_relative_sqlite_path_absolute(tmp_path, monkeypatch):
    """Workers started in another folder (the demo's, --gpus children) open the same file."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    env = {"ORCHARD_HOME": str(tmp_path), "ORCHARD_DATABASE_URL": "sqlite:///../x.db"}
    assert load_settings(env).database_url == f"sqlite:///{tmp_path.resolve() / 'x.db'}"
    env["ORCHARD_DATABASE_URL"] = "sqlite+pysqlite:///x.db?timeout=5"
    expected = f"sqlite+pysqlite:///{tmp_path.resolve() / 'here' / 'x.db'}?timeout=5"
    assert load_settings(env).database_url == expected


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:////tmp/orchard.db",
        "sqlite:///file:x.db?mode=ro&uri=true",
        "postgresql+psycopg://u:pw@h/db",
    ],
)
def test_settings_leave_other_database_urls_alone(url):
    assert load_settings({"ORCHARD_DATABASE_URL": url}).database_url == url


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:secret@h:6379/0", "redis://:***@h:6379/0"),
        # where urllib's netloc ends: the password must not be printed for all that
        ("redis://:se/cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        (
            "postgresql+psycopg://orchard:se/cret@127.0.0.1/orchard",
            "postgresql+psycopg://orchard:***@127.0.0.1/orchard",
        ),
        ("redis://:se#cret@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://u:se?cret@h:6379/0", "redis://u:***@h:6379/0"),
        ("redis://u:se@c/ret@h:6379/0?x=1", "redis://u:***@h:6379/0?x=1"),
        ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
        (
            "postgresql+psycopg://u:pw@h:5432/db?sslmode=require",
            "postgresql+psycopg://u:***@h:5432/db?sslmode=require",
        ),
    ],
)
def test_mask_url_hides_password(url, masked):
    assert mask_url(url) == masked
    assert "secret" not in mask_url(url) and ":pw@" not in mask_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:6379/0",
        "postgresql://u@h/db",
        "sqlite:////tmp/orchard.db",
        "filesystem:///tmp/broker",
    ],
)
def test_mask_url_leaves_passwordless_urls_alone(url):
    assert mask_url(url) == url


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_leaves_no_temp_file_when_writer_raises(tmp_path):
    target = tmp_path / "out" / "a.bin"

    def writer(fh):
        fh.write(b"partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(target, writer)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_atomic_write_keeps_old_file_when_writer_raises(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")

    def writer(fh):
        fh.write(b"new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, writer)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device (the disk"),
        (
            OSError(errno.EROFS, "Read-only file system"),
            "Read-only file system (mounted read-only)",
        ),
        (OSError(errno.EACCES, "Permission denied"), "Permission denied (this worker's user, uid"),
        # numpy's words for a short write (ndarray.tofile), with no errno
        (OSError("196608 requested and 147328 written"), "(a short write: is the disk full?)"),
    ],
)
def test_a_write_that_fails_names_the_file_and_why_in_one_line(tmp_path, error, said):
    """A full disk's OSError names no file (the write call has none): the error the
    unit records and the worker logs must, without a traceback."""
    target = tmp_path / "cache" / "shard-00000.npy"

    def writer(fh):
        fh.write(b"partial")
        raise error

    with pytest.raises(ArtifactWriteError) as info:
        atomic_write(target, writer)
    message = str(info.value)
    assert message.startswith(f"cannot write {target}: ") and said in message, message
    assert isinstance(info.value, OSError) and isinstance(info.value, OrchardError)
    assert list(target.parent.iterdir()) == []  # no temporary file left


def test_a_shard_cut_short_keeps_the_error_s_words(tmp_path):
    """numpy writes an array into a real file with ``tofile``, whose short write loses
    the errno ("786432 requested and 299008 written", on a disk that fills up midway):
    a shard is written through ``write``, whose OSError says why, as every other
    file's does. A file size limit cuts the write short here, as a full disk does."""
    import numpy as np

    from shared.preprocess import load_shard, write_shard

    target = tmp_path / "cache" / "shard-00000.npy"
    script = (
        "import resource, signal, sys\n"
        "import numpy as np\n"
        "from shared.artifacts import ArtifactWriteError\n"
        "from shared.preprocess import write_shard\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))\n"
        "try:\n"
        "    write_shard(sys.argv[1], np.full((4, 256, 256, 3), 7, np.uint8))\n"
        "except ArtifactWriteError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(target)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout == (
        f"cannot write {target}: File too large (more than this process may write: ulimit -f)\n"
    ), done.stdout + done.stderr
    assert list(target.parent.iterdir()) == []
    images = np.full((4, 256, 256, 3), 7, dtype=np.uint8)
    written = write_shard(target, images)  # the same bytes as np.save's
    assert np.array_equal(load_shard(target, written.sha256), images)
    with open(tmp_path / "saved.npy", "wb") as fh:
        np.save(fh, images, allow_pickle=False)
    assert target.read_bytes() == (tmp_path / "saved.npy").read_bytes()


def test_a_temporary_file_that_could_not_be_made_is_not_named(tmp_path, monkeypatch):
    """mkstemp's error names the temporary file it meant to make, which never existed:
    the line names the file being written, once."""
    import shared.artifacts as artifacts

    target = tmp_path / "checkpoints" / "fold.pt"

    def read_only(prefix, suffix, dir):
        raise OSError(errno.EROFS, "Read-only file system", f"{dir}/{prefix}c4fvhosl{suffix}")

    monkeypatch.setattr(artifacts.tempfile, "mkstemp", read_only)
    with pytest.raises(ArtifactWriteError) as info:
        atomic_write_text(target, "x")
    assert str(info.value) == (f"cannot write {target}: Read-only file system (mounted read-only)")


def test_a_folder_that_cannot_be_made_is_named(tmp_path):
    (tmp_path / "campaigns").write_text("a file where a folder should be")
    target = tmp_path / "campaigns" / "c-1" / "model.pt"
    with pytest.raises(ArtifactWriteError) as info:
        atomic_write_text(target, "x")
    assert str(info.value) == f"cannot write {target}: {target.parent}: Not a directory"


def test_atomic_write_reports_sha_and_size(tmp_path):
    written = atomic_write_text(tmp_path / "b.txt", "héllo")
    assert written.path.read_text(encoding="utf-8") == "héllo"
    assert written.size == len("héllo".encode())
    assert written.sha256 == sha256_file(written.path)
    assert (written.path.stat().st_mode & 0o777) == 0o644


def test_mask_url_keeps_ipv6_brackets():
    assert mask_url("redis://:pw@[::1]:6379/0") == "redis://:***@[::1]:6379/0"


def test_read_if_intact_returns_the_very_bytes_it_checked(tmp_path):
    written = atomic_write_text(tmp_path / "m.json", '{"a": 1}')
    assert read_if_intact(written.path, written.sha256) == b'{"a": 1}'
    written.path.write_text('{"a": 2}')  # replaced on the share
    assert read_if_intact(written.path, written.sha256) is None
    written.path.unlink()
    with pytest.raises(FileNotFoundError):
        read_if_intact(written.path, written.sha256)


def test_a_written_file_s_folder_is_synced_after_the_rename(tmp_path, monkeypatch):
    """The file's bytes are synced before the rename; the rename itself lives in the
    folder, synced after it, or a power loss could leave the old name (or none) behind
    a record that names the new bytes."""
    import shared.artifacts as artifacts

    synced: list[tuple[str, bool]] = []
    real_fsync, real_replace = os.fsync, os.replace
    renamed = []

    def fsync(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), bool(renamed)))
        real_fsync(fd)

    def replace(src, dst):
        renamed.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(artifacts.os, "fsync", fsync)
    monkeypatch.setattr(artifacts.os, "replace", replace)
    target = tmp_path / "models" / "m.pt"
    atomic_write_text(target, "weights")
    assert [after for _, after in synced] == [False, True]
    assert synced[1][0] == str(target.parent)
