"""`orchard prune`: the preprocessing cache that no campaign in the store uses, removed."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from db.store import Artifact, Store
from scheduler.cli import main
from tests.db.test_store import seed_campaign
from tests.scheduler.test_submit_checks import SYNTHETIC


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("ORCHARD_DATABASE_URL", "ORCHARD_BROKER_URL", "ORCHARD_ARTIFACTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ORCHARD_HOME", str(tmp_path))
    return tmp_path


def stored(home: Path, campaigns: dict[str, str]) -> Store:
    """A store with a campaign per id, each with a manifest naming its cache key, and a
    cache folder of two recorded shards per key."""
    store = Store(f"sqlite:///{home / 'orchard.db'}")
    store.upgrade()
    for cid, key in campaigns.items():
        seed_campaign(store, cid)
        folder = home / "artifacts" / "campaigns" / cid
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"cache_key": key, "entries": []}))
        for index in range(2):
            shard = home / "artifacts" / "cache" / key / f"shard-0000{index}.npy"
            shard.parent.mkdir(parents=True, exist_ok=True)
            shard.write_bytes(b"x" * 500_000)
            rel = shard.relative_to(home / "artifacts").as_posix()
            store.record_artifact(Artifact(rel, "shard", "0" * 64, 500_000, cid, None))
    return store


def prune(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["prune", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_prune_removes_the_cache_no_campaign_uses(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = stored(home, {"a-1": "used", "b-1": "orphan"})
    for cid in ("a-1", "b-1"):
        store.cancel_campaign(cid)
    cache = home / "artifacts" / "cache"
    assert main(["delete", "b-1"]) == 0
    capsys.readouterr()
    (cache / "not-a-folder").write_text("left alone")
    (cache / "another-stores").mkdir()  # sharing the artifact folder: no record here
    (cache / "another-stores" / "shard-00000.npy").write_bytes(b"x")

    code, out, err = prune(capsys, "--dry-run")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"would remove {cache / 'orphan'}: 2 file(s), 1.0 MB",
        "would remove 1 cache folder(s), 1.0 MB; kept 1 that campaigns in the store use and "
        "1 it has no record of",
    ]
    assert (cache / "orphan").is_dir() and store.find_artifact("cache/orphan/shard-00000.npy")

    code, out, err = prune(capsys)
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == f"removed {cache / 'orphan'}: 2 file(s), 1.0 MB"
    assert sorted(p.name for p in cache.iterdir()) == ["another-stores", "not-a-folder", "used"]
    assert store.find_artifact("cache/orphan/shard-00000.npy") is None
    assert store.find_artifact("cache/used/shard-00001.npy") is not None
    code, out, _ = prune(capsys)
    assert out == (
        "removed 0 cache folder(s), 0.0 MB; kept 1 that campaigns in the store use and 1 it "
        "has no record of\n"
    )


def test_prune_waits_until_no_campaign_runs(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stored(home, {"a-1": "used", "b-1": "orphan", "c-1": "orphan"})
    code, out, err = prune(capsys)
    assert code == 2 and not out
    assert re.fullmatch(
        r"orchard: error: campaign [abc]-1 \(and 2 more\) is RUNNING, reading and writing "
        r"the cache: prune when no campaign runs\n",
        err,
    )
    assert (home / "artifacts" / "cache" / "orphan").is_dir()


def test_prune_refuses_when_a_campaigns_cache_is_unknown(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = stored(home, {"a-1": "used", "b-1": "orphan"})
    for cid in ("a-1", "b-1"):
        store.cancel_campaign(cid)
    manifest = home / "artifacts" / "campaigns" / "b-1" / "manifest.json"
    manifest.unlink()
    code, out, err = prune(capsys)
    assert code == 2 and not out
    assert err == (
        f"orchard: error: {manifest}: cannot be read (No such file or directory), so which "
        "cache campaign b-1 uses is unknown: restore the file, or `orchard delete b-1`, "
        "then prune\n"
    )
    assert sorted(p.name for p in (home / "artifacts" / "cache").iterdir()) == ["orphan", "used"]
    # its whole folder gone (a store restored newer than the artifacts): `delete` needs
    # --without-folder, and the line says so
    shutil.rmtree(manifest.parent)
    code, out, err = prune(capsys)
    assert code == 2 and err.endswith(
        "restore the file, or, if its folder is gone for good, `orchard delete "
        "--without-folder b-1`, then prune\n"
    )


def _submit_during(store: Store, home: Path, cid: str, key: str) -> None:
    """A campaign over the cache ``key``, recorded while a prune runs."""
    seed_campaign(store, cid)
    folder = home / "artifacts" / "campaigns" / cid
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"cache_key": key}))


def test_a_campaign_submitted_during_the_prune_is_named(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Submitted between the prune's look at the store and its removal, a campaign over
    the same images may have found its shards and then lose them: it is named, with
    what to do."""

    from scheduler import api

    store = stored(home, {"a-1": "used", "b-1": "orphan"})
    for cid in ("a-1", "b-1"):
        store.cancel_campaign(cid)
    assert main(["delete", "b-1"]) == 0
    capsys.readouterr()
    remove = shutil.rmtree

    def submitted_meanwhile(path: Path, *args: object, **kwargs: object) -> None:
        if Path(path).name == "orphan" and store.find_campaign("c-1") is None:
            _submit_during(store, home, "c-1", "orphan")
        remove(path, *args, **kwargs)

    monkeypatch.setattr(api.shutil, "rmtree", submitted_meanwhile)
    code, out, err = prune(capsys)
    assert code == 0 and out.startswith(f"removed {home / 'artifacts' / 'cache' / 'orphan'}")
    assert err == (
        "orchard: warning: campaign c-1 was submitted during the prune and reads a cache it "
        "removed: `orchard resume c-1` decodes it again if its units fail\n"
    )


def test_a_folder_a_campaign_submitted_during_the_prune_uses_is_kept_if_not_yet_removed(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each folder is looked at again just before it goes: one that a campaign recorded
    since the prune began names stays, where removing it would make that campaign decode
    its images again."""
    from scheduler import api

    store = stored(home, {"a-1": "orphan-a", "b-1": "orphan-b"})
    for cid in ("a-1", "b-1"):
        store.cancel_campaign(cid)
    assert main(["delete", "a-1", "b-1"]) == 0
    capsys.readouterr()
    remove = shutil.rmtree

    def submitted_meanwhile(path: Path, *args: object, **kwargs: object) -> None:
        if Path(path).name == "orphan-a":  # while the first folder goes
            _submit_during(store, home, "c-1", "orphan-b")
        remove(path, *args, **kwargs)

    monkeypatch.setattr(api.shutil, "rmtree", submitted_meanwhile)
    code, out, err = prune(capsys)
    cache = home / "artifacts" / "cache"
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"removed {cache / 'orphan-a'}: 2 file(s), 1.0 MB",
        "removed 1 cache folder(s), 1.0 MB; kept 1 that campaigns in the store use",
    ]
    assert (cache / "orphan-b").is_dir() and store.count_artifacts("cache/orphan-b/") == 2


def test_a_prune_that_fails_names_the_campaign_submitted_during_it(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removal that fails after a campaign recorded meanwhile found the folder: the
    campaign is named, and not the advice to prune again, which now keeps the folder."""
    import errno

    from scheduler import api

    store = stored(home, {"b-1": "orphan"})
    store.cancel_campaign("b-1")
    assert main(["delete", "b-1"]) == 0
    capsys.readouterr()
    orphan = home / "artifacts" / "cache" / "orphan"

    def submitted_then_refused(path: Path, *args: object, **kwargs: object) -> None:
        _submit_during(store, home, "c-1", "orphan")
        (Path(path) / "shard-00000.npy").unlink()
        raise OSError(errno.ENOTEMPTY, "Directory not empty", str(path))

    monkeypatch.setattr(api.shutil, "rmtree", submitted_then_refused)
    code, out, err = prune(capsys)
    assert code == 2 and not out
    assert err == (
        f"orchard: error: cannot remove {orphan} (Directory not empty); campaign(s) c-1, "
        "submitted during the prune, read what it removed: `orchard resume` decodes it "
        "again if their units fail\n"
    )


def test_a_folder_whose_name_differs_only_in_case_leaves_the_used_caches_records(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SQLite's LIKE ignores the case of ASCII letters: ``cache/ABC/`` must not count,
    nor forget, the records of ``cache/abc/``, which a campaign uses."""
    store = stored(home, {"a-1": "abc"})
    store.cancel_campaign("a-1")
    (home / "artifacts" / "cache" / "ABC").mkdir()
    assert store.count_artifacts("cache/ABC/") == 0
    code, out, err = prune(capsys)
    assert (code, err) == (0, "")
    assert "removed 0 cache folder(s)" in out and "1 it has no record of" in out
    assert store.count_artifacts("cache/abc/") == 2
    assert (home / "artifacts" / "cache" / "ABC").is_dir()


def test_a_folder_name_that_is_not_utf8_is_left_alone(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No record can name it (the store holds UTF-8), so it is another store's, not a
    traceback."""
    import os

    store = stored(home, {"a-1": "abc"})
    store.cancel_campaign("a-1")
    os.mkdir(os.fsencode(home / "artifacts" / "cache") + b"/\xff")
    code, out, err = prune(capsys)
    assert (code, err) == (0, "")
    assert out == (
        "removed 0 cache folder(s), 0.0 MB; kept 1 that campaigns in the store use and 1 it "
        "has no record of\n"
    )


@pytest.mark.parametrize(
    "text",
    [
        '{"cache_key": null}',
        '{"cache_key": 5}',
        '{"cache_key": ["abc"]}',
        '{"cache_key": ""}',
        '["abc"]',
        "null",
        "{not json",
        "[" * 100_000,  # nested deeper than the JSON decoder goes
    ],
)
def test_a_manifest_that_names_no_cache_key_refuses_the_prune(
    home: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    store = stored(home, {"a-1": "abc", "b-1": "orphan"})
    for cid in ("a-1", "b-1"):
        store.cancel_campaign(cid)
    manifest = home / "artifacts" / "campaigns" / "a-1" / "manifest.json"
    manifest.write_text(text)
    code, out, err = prune(capsys)
    assert code == 2 and not out
    assert err.startswith(f"orchard: error: {manifest}: cannot be read (") and err.count("\n") == 1
    assert sorted(p.name for p in (home / "artifacts" / "cache").iterdir()) == ["abc", "orphan"]


def test_a_cache_that_another_stores_campaign_uses_is_kept(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two stores sharing the artifact folder, over the same images, both record the
    cache folder's shards: a prune of one keeps what the other's campaigns (whose
    manifests are in the same campaigns/ folder) still read, running or not."""
    store = stored(home, {"a-1": "shared", "b-1": "orphan"})
    for cid in ("a-1", "b-1"):
        store.cancel_campaign(cid)
    other = home / "artifacts" / "campaigns" / "other-1"  # another store's, RUNNING there
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"cache_key": "shared", "entries": []}))
    (other.parent / "other-2").mkdir()  # another store's, its manifest unreadable: skipped
    (other.parent / "other-2" / "manifest.json").write_text("{")
    assert main(["delete", "a-1", "b-1"]) == 0
    capsys.readouterr()
    code, out, err = prune(capsys)
    assert (code, err) == (0, "")
    cache = home / "artifacts" / "cache"
    assert out.splitlines()[0] == f"removed {cache / 'orphan'}: 2 file(s), 1.0 MB"
    # not "kept 1 that campaigns in the store use": the store has none now
    assert out.splitlines()[1] == (
        "removed 1 cache folder(s), 1.0 MB; kept 0 that campaigns in the store use and 1 "
        "that only another store's campaigns use"
    )
    assert out.splitlines()[2] == (
        "left 2 campaign folder(s) of no campaign in this store, with the caches they read "
        "(another store's, sharing ORCHARD_ARTIFACTS, or written after the store's backup "
        f"was taken: remove those by hand once sure): {other}, {other.parent / 'other-2'}"
    )
    assert len(out.splitlines()) == 3
    assert sorted(p.name for p in cache.iterdir()) == ["shared"]
    assert store.count_artifacts("cache/shared/") == 2


def test_the_folder_of_a_deleted_campaign_a_restore_put_back_is_named_and_left(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The artifacts restored from a backup older than a delete: the campaign's folder is
    back, its records are not. Not a submit's folder (under way: its mark)."""
    from scheduler.folders import SUBMITTING_MARK

    store = stored(home, {"a-1": "used", "b-1": "orphan"})
    for cid in ("a-1", "b-1"):
        store.cancel_campaign(cid)
    folder = home / "artifacts" / "campaigns" / "b-1"
    shutil.copytree(folder, home / "backup")
    assert main(["delete", "b-1"]) == 0
    shutil.copytree(home / "backup", folder)  # the restore
    submitting = folder.parent / "c-1"
    submitting.mkdir()
    (submitting / SUBMITTING_MARK).touch()
    capsys.readouterr()
    for args in ([], ["--dry-run"]):
        code, out, err = prune(capsys, *args)
        assert (code, err) == (0, "")
        assert out.splitlines()[-1] == (
            "left 1 folder(s) of campaigns this store deleted, put back by a restore "
            f"(`orchard delete ID` removes each): {folder}"
        )
    assert folder.is_dir() and submitting.is_dir()
    # a restore that did not keep file times: as `orchard delete`, prune cannot tell it
    # from another store's campaign under that id
    a_day_off = time.time() - 86_400
    os.utime(folder / "manifest.json", (a_day_off, a_day_off))
    code, out, err = prune(capsys)
    assert (code, err) == (0, "")
    assert out.splitlines()[-1].startswith("left 1 campaign folder(s) of no campaign in this store")
    assert out.splitlines()[-1].endswith(f": {folder}")


def test_a_dry_run_changes_nothing(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import hashlib

    store = stored(home, {"a-1": "used", "b-1": "orphan"})
    for cid in ("a-1", "b-1"):
        store.cancel_campaign(cid)
    assert main(["delete", "b-1"]) == 0
    capsys.readouterr()
    store.engine.dispose()

    def snapshot() -> tuple[dict[str, str], list[str]]:
        import sqlite3

        files = {
            p.relative_to(home).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(home.rglob("*"))
            if p.is_file() and not p.name.startswith("orchard.db")
        }
        db = sqlite3.connect(home / "orchard.db")
        try:
            return files, list(db.iterdump())
        finally:
            db.close()

    before = snapshot()
    code, out, _ = prune(capsys, "--dry-run")
    assert code == 0 and out.startswith("would remove")
    assert snapshot() == before


def test_a_folder_that_cannot_be_removed_whole_is_pruned_by_the_next_prune(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from scheduler import api

    store = stored(home, {"a-1": "used", "b-1": "orphan"})
    for cid in ("a-1", "b-1"):
        store.cancel_campaign(cid)
    assert main(["delete", "b-1"]) == 0
    capsys.readouterr()
    orphan = home / "artifacts" / "cache" / "orphan"
    remove = shutil.rmtree

    def cut_short(path: Path, *args: object, **kwargs: object) -> None:
        (Path(path) / "shard-00000.npy").unlink()  # one file goes, then the disk says no
        raise OSError(errno.EIO, "Input/output error", str(Path(path) / "shard-00001.npy"))

    monkeypatch.setattr(api.shutil, "rmtree", cut_short)
    code, out, err = prune(capsys)
    assert code == 2 and not out
    assert err == (
        f"orchard: error: cannot remove {orphan / 'shard-00001.npy'} (Input/output error); "
        "`orchard prune` again removes what is left\n"
    )
    assert store.count_artifacts("cache/orphan/") == 2  # still known as this store's
    monkeypatch.setattr(api.shutil, "rmtree", remove)
    code, out, err = prune(capsys)
    assert (code, err) == (0, "") and out.startswith(f"removed {orphan}: 1 file(s)")
    assert not orphan.exists() and store.count_artifacts("cache/orphan/") == 0


def test_a_shard_write_left_unfinished_by_a_killed_worker_is_removed_from_a_cache_kept(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A worker SIGKILLed (or OOM-killed) as it wrote a shard leaves the write's
    temporary file: nothing removed it while the cache is in use, one per kill, for
    ever. A prune removes those untouched for an hour, and no other file."""
    import os
    import time

    from scheduler.folders import STALE_WRITE_SECONDS

    store = stored(home, {"a-1": "used"})
    store.cancel_campaign("a-1")
    folder = home / "artifacts" / "cache" / "used"
    old = time.time() - STALE_WRITE_SECONDS - 60
    left = folder / ".shard-00002.npy.k3j9x_1a.tmp"
    left.write_bytes(b"x" * 300_000)
    os.utime(left, (old, old))
    writing = folder / ".shard-00003.npy.q8w2e7rt.tmp"  # another store's, being written
    writing.write_bytes(b"x")
    (folder / ".elsewhere.tmp").symlink_to(left)
    os.utime(folder / ".elsewhere.tmp", (old, old), follow_symlinks=False)

    code, out, err = prune(capsys, "--dry-run")
    assert (code, err) == (0, "")
    assert out.splitlines()[-1] == (
        "would remove 1 unfinished shard write(s) in the cache folders kept, 0.3 MB (left by "
        "workers killed as they wrote)"
    )
    assert left.exists()
    code, out, err = prune(capsys)
    assert out.splitlines()[-1].startswith("removed 1 unfinished shard write(s)")
    assert not left.exists() and writing.exists()
    assert sorted(p.name for p in folder.iterdir()) == [
        ".elsewhere.tmp",
        ".shard-00003.npy.q8w2e7rt.tmp",
        "shard-00000.npy",
        "shard-00001.npy",
    ]
    assert prune(capsys)[1].count("unfinished") == 0


def test_an_unfinished_write_it_may_not_remove_is_left_and_the_summary_still_comes(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache owned by the workers' user: the folders no campaign uses are gone by
    then, and a traceback hid what the prune had done."""
    import os
    import time

    from scheduler.folders import STALE_WRITE_SECONDS

    store = stored(home, {"a-1": "used"})
    store.cancel_campaign("a-1")
    left = home / "artifacts" / "cache" / "used" / ".shard-00002.npy.k3j9x_1a.tmp"
    left.write_bytes(b"x")
    old = time.time() - STALE_WRITE_SECONDS - 60
    os.utime(left, (old, old))
    unlink = Path.unlink

    def refused(path: Path, missing_ok: bool = False) -> None:
        if path == left:
            raise PermissionError(1, "Operation not permitted", str(path))
        unlink(path, missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    code, out, err = prune(capsys)
    assert (code, err) == (0, "")
    assert out.splitlines()[-1].startswith("removed 0 cache folder(s)")
    assert left.exists()


def test_a_generated_dataset_left_unfinished_by_a_killed_submit_is_removed(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A submit killed as it generated a synthetic dataset left its temporary folder
    under ``datasets/``, which nothing removed. A prune removes one under which nothing
    was touched for an hour; not one still being written (a file deep inside is new),
    a finished dataset, or a symbolic link."""
    import os
    import time

    from scheduler.folders import STALE_WRITE_SECONDS

    stored(home, {})
    datasets = home / "artifacts" / "datasets"
    old = time.time() - STALE_WRITE_SECONDS - 60

    def made(folder: Path, *, fresh: bool = False) -> Path:
        image = folder / "train" / "A" / "0001.png"
        image.parent.mkdir(parents=True)
        image.write_bytes(b"x" * 200_000)
        for path in (image, image.parent, image.parent.parent, folder):
            os.utime(path, (old, old))
        if fresh:
            os.utime(image)  # being written now
        return folder

    left = made(datasets / ".synthetic-1a2b.k3j9x_1a.tmp")
    writing = made(datasets / ".synthetic-1a2b.q8w2e7rt.tmp", fresh=True)
    finished = made(datasets / "synthetic-1a2b")
    (datasets / ".elsewhere.tmp").symlink_to(left)

    code, out, err = prune(capsys, "--dry-run")
    assert (code, err) == (0, "")
    assert out.splitlines()[-1] == (
        "would remove 1 unfinished generated dataset(s), 0.2 MB (left by submits killed as "
        f"they generated them): {left}"
    )
    assert left.exists()
    code, out, err = prune(capsys)
    assert (code, err) == (0, "")
    assert out.splitlines()[-1].startswith("removed 1 unfinished generated dataset(s)")
    assert not left.exists() and writing.exists() and finished.exists()
    assert sorted(p.name for p in datasets.iterdir()) == [
        ".elsewhere.tmp",
        ".synthetic-1a2b.q8w2e7rt.tmp",
        "synthetic-1a2b",
    ]
    assert "generated" not in prune(capsys)[1]


def test_a_campaign_folder_a_killed_submit_left_pins_no_cache_and_is_removed(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A submit SIGKILLed after writing its manifest, before recording the campaign: the
    manifest looked like another store's campaign's, kept its cache for ever, and no
    `delete` could remove the folder. Its .submitting mark, an hour old, tells."""
    store = stored(home, {"a-1": "shared"})
    store.cancel_campaign("a-1")
    campaigns = home / "artifacts" / "campaigns"
    killed, recording = campaigns / "k-20261207-000000-dead", campaigns / "r-1"
    for folder in (killed, recording):
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps({"cache_key": "shared", "entries": []}))
        (folder / ".submitting").touch()
    hours_ago = time.time() - 7200
    os.utime(killed / ".submitting", (hours_ago, hours_ago))
    assert main(["delete", "a-1"]) == 0
    capsys.readouterr()
    code, out, err = prune(capsys)
    assert (code, err) == (0, "")
    # one still being recorded (its mark new) keeps what it names
    assert (home / "artifacts" / "cache" / "shared").is_dir() and recording.is_dir()
    assert out.splitlines()[-1].startswith(
        "removed 1 campaign folder(s) of no campaign, 0.0 MB (left by submits killed before "
        f"they recorded them): {killed}"
    )
    assert not killed.exists()
    os.utime(recording / ".submitting", (hours_ago, hours_ago))  # and an hour later
    assert main(["delete", "r-1"]) == 0  # `delete` takes it for a leftover too
    assert not recording.exists()
    code, out, err = prune(capsys)
    assert not (home / "artifacts" / "cache" / "shared").exists()


def test_a_recorded_campaign_s_folder_keeps_no_submitting_mark(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    campaign = home / "c.toml"
    campaign.write_text(SYNTHETIC + "[rf]\nn_estimators = 5\n")
    assert main(["submit", str(campaign), "--id", "s-1"]) == 0
    folder = home / "artifacts" / "campaigns" / "s-1"
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"]
