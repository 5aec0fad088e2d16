"""Bad input as `orchard submit` and `orchard worker` meet it: one line, exit 2, nothing written.

Services that do not answer are closed ports on this machine (port 1), with a password
in the URL that must never be printed. Each command must end on its own: the
subprocess timeout is the bound, not a measured time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import REPO
from tests.scheduler.test_cli import in_process

DEAD_REDIS = "redis://:hunter2@127.0.0.1:1/0"
DEAD_POSTGRES = "postgresql+psycopg://orchard:hunter2@127.0.0.1:1/orchard"
TINY = (
    'name = "c"\nfolds = 2\n[dataset]\nkind = "{kind}"\n{dataset}\n[preprocessing]\nsize = 32\n'
    "[rf]\nn_estimators = 5\n"  # a campaign needs a model family
)


def orchard(
    *args: str, home: Path, timeout: float | None = None, **env: str
) -> subprocess.CompletedProcess:
    """`orchard ...` with no ORCHARD_ variable but ``env``: in this process (what is
    tested is the command's checks and lines, not the interpreter's start), but for
    `worker` (Celery takes its process over) and a call with a ``timeout`` (one that
    must fail rather than hang), each in a process of its own."""
    if timeout is None and args[:1] != ("worker",):
        return in_process(*args, env={"ORCHARD_HOME": str(home), **env}, clean=True)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ORCHARD_")}
    return subprocess.run(
        [sys.executable, "-m", "scheduler.cli", *args],
        cwd=REPO,
        env={**environ, "ORCHARD_HOME": str(home), **env},
        capture_output=True,
        text=True,
        timeout=timeout or 90,
    )


def assert_one_line_error(done: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    assert done.returncode == code, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "hunter2" not in done.stdout + done.stderr
    return lines[0]


def make_aicup(root: Path, per_class: int = 4) -> Path:
    (root / "train").mkdir(parents=True)
    rows = ["image_id,label"]
    for i in range(3 * per_class):
        image = np.full((20, 24, 3), 20 * i, np.uint8)
        assert cv2.imwrite(str(root / "train" / f"{i:03d}.jpg"), image)
        rows.append(f"{i:03d}.jpg,{'ABC'[i % 3]}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


def write_campaign(tmp_path: Path, root: Path) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(TINY.format(kind="aicup", dataset=f'root = "{root}"'))
    return path


def test_worker_with_unreachable_broker(tmp_path: Path) -> None:
    assert orchard("db", "upgrade", home=tmp_path).returncode == 0
    done = orchard("worker", "--queues", "cpu", home=tmp_path, ORCHARD_BROKER_URL=DEAD_REDIS)
    # 75, sysexits' EX_TEMPFAIL: the same command may succeed later (a bad URL is 2)
    assert_one_line_error(done, "broker redis://:***@127.0.0.1:1/0", "unreachable", code=75)


def test_worker_with_unreachable_database(tmp_path: Path) -> None:
    done = orchard("worker", "--queues", "cpu", home=tmp_path, ORCHARD_DATABASE_URL=DEAD_POSTGRES)
    assert_one_line_error(
        done,
        "database postgresql+psycopg://orchard:***@127.0.0.1:1/orchard",
        "unreachable",
        code=75,
    )


def test_submit_with_unreachable_database_fails_before_reading_the_dataset(tmp_path: Path) -> None:
    campaign = tmp_path / "c.toml"
    campaign.write_text(TINY.format(kind="synthetic", dataset="train_per_class = 3"))
    done = orchard("submit", str(campaign), home=tmp_path, ORCHARD_DATABASE_URL=DEAD_POSTGRES)
    assert_one_line_error(done, "postgresql+psycopg://orchard:***@127.0.0.1:1/orchard", code=75)
    assert not (tmp_path / "artifacts").exists()  # no dataset generated, no manifest


def run_in_process(monkeypatch, capsys, *args: str, home: Path, **env: str) -> tuple[int, str, str]:
    """`orchard ...` in this process (faster than a subprocess where the CLI's
    own argument and error handling is what is under test), with no ORCHARD_ variable
    but ``env``."""
    from scheduler.cli import main

    for name in [k for k in os.environ if k.startswith("ORCHARD_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("ORCHARD_HOME", str(home))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_submit_with_a_bad_csv_row_writes_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    root = make_aicup(tmp_path / "data")
    with open(root / "train.csv", "a") as fh:
        fh.write("007.jpg,Z\n")
    home = tmp_path / "home"
    code, _, err = run_in_process(
        monkeypatch, capsys, "submit", str(write_campaign(tmp_path, root)), home=home
    )
    assert code == 2
    [line] = err.strip().splitlines()
    assert f"{root / 'train.csv'}:14" in line and "unknown label 'Z'" in line
    assert not (home / "artifacts" / "campaigns").exists()
    assert not (home / "orchard.db").exists()


def test_submit_warns_of_unusable_and_unlisted_images_apart(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """An unusable image is skipped and an image no CSV lists is ignored: one line each,
    so neither is mistaken for the other."""
    root = make_aicup(tmp_path / "data", per_class=4)
    (root / "train" / "005.jpg").write_bytes(b"")  # 1 of 12: skipped
    strays = [root / "train" / f"stray{i}.jpg" for i in range(7)]
    for stray in strays:
        cv2.imwrite(str(stray), np.zeros((8, 8, 3), np.uint8))
    home = tmp_path / "home"
    code, out, err = run_in_process(
        monkeypatch, capsys, "submit", str(write_campaign(tmp_path, root)), home=home
    )
    assert code == 0, err
    campaign_id = out.strip().splitlines()[-1]
    assert err.splitlines() == [
        f"orchard: warning: 1 unusable image skipped: {root / 'train' / '005.jpg'}: empty "
        "file (0 bytes)",
        "orchard: warning: 7 images not listed in any split's CSV, ignored: "
        + "; ".join(str(s) for s in strays[:5])
        + "; and 2 more (see the report)",
    ]
    manifest = json.loads(
        (home / "artifacts" / "campaigns" / campaign_id / "manifest.json").read_text()
    )
    assert [s["image_id"] for s in manifest["skipped"]] == ["005.jpg"] + [s.name for s in strays]
    assert len(manifest["entries"]) == 11


def test_an_artifact_folder_under_a_plain_file_is_one_line_and_creates_no_store(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    root = make_aicup(tmp_path / "data")
    blocker = tmp_path / "afile"
    blocker.write_text("")
    home = tmp_path / "home"
    campaign = write_campaign(tmp_path, root)
    code, _, err = run_in_process(
        monkeypatch,
        capsys,
        "submit",
        str(campaign),
        home=home,
        ORCHARD_ARTIFACTS=str(blocker / "art"),
    )
    assert code == 2, err
    [line] = err.strip().splitlines()
    assert (
        line == f"orchard: error: artifact folder {blocker / 'art'}: {blocker} is not a directory"
    )
    assert not (home / "orchard.db").exists()


@pytest.mark.parametrize("command", [["submit"], ["db", "upgrade"]])  # status: "no store yet"
def test_a_sqlite_path_under_a_plain_file_is_one_line(
    tmp_path: Path, monkeypatch, capsys, command: list[str]
) -> None:
    root = make_aicup(tmp_path / "data")
    blocker = tmp_path / "afile"
    blocker.write_text("")
    url = f"sqlite:///{blocker}/sub/x.db"
    args = [*command, str(write_campaign(tmp_path, root))] if command == ["submit"] else command
    code, _, err = run_in_process(
        monkeypatch, capsys, *args, home=tmp_path / "home", ORCHARD_DATABASE_URL=url
    )
    assert code == 2, err
    [line] = err.strip().splitlines()
    assert line == (
        f"orchard: error: database {url}: cannot create {blocker / 'sub'}: "
        f"{blocker} is not a directory"
    )


def test_a_store_that_fails_to_record_leaves_no_campaign_folder(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    from db.store import Store, StoreError

    def unreachable(*_args, **_kwargs):
        raise StoreError("database sqlite:///x unreachable: disk I/O error")

    monkeypatch.setattr(Store, "create_campaign", unreachable)
    root = make_aicup(tmp_path / "data")
    home = tmp_path / "home"
    code, _, err = run_in_process(
        monkeypatch, capsys, "submit", str(write_campaign(tmp_path, root)), home=home
    )
    assert code == 2
    assert err == "orchard: error: database sqlite:///x unreachable: disk I/O error\n"
    assert list((home / "artifacts" / "campaigns").iterdir()) == []  # no manifest left


def store_with_a_report(tmp_path: Path) -> Path:
    """A home whose store records campaign t-1's report (its report unit SUCCESS, its
    files `<html></html>` and `# report`), which no folder here holds."""
    import hashlib

    from db.store import Artifact, Outcome, Store
    from tests.db.test_store import seed_campaign

    home = tmp_path / "home"
    store = Store(f"sqlite:///{home / 'orchard.db'}")
    store.upgrade()
    seed_campaign(store)
    files = {"report.html": b"<html></html>", "report.md": b"# report"}
    records = []
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        path = f"campaigns/t-1/report/{name}"
        records.append(Artifact(path, "report", digest, len(data), "t-1", "t-1/report"))
    store.claim_for_queue(["t-1/report"])
    store.start_unit("t-1/report", worker="w", task_id=None)
    store.finish_unit("t-1/report", Outcome(fit_seconds=1.0, artifacts=records))
    return home


def test_a_report_missing_on_this_host_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """The store knows the report, this host's artifact folder does not have it (not the
    workers' shared mount)."""
    home = store_with_a_report(tmp_path)
    code, out, err = run_in_process(monkeypatch, capsys, "report", "t-1", "--print", home=home)
    assert code == 2 and not out
    [line] = err.strip().splitlines()
    markdown = home / "artifacts" / "campaigns" / "t-1" / "report" / "report.md"
    assert line.startswith(f"orchard: error: campaign t-1: cannot read {markdown}: No such file")


def test_a_report_path_missing_on_this_host_is_one_line(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """Without --print too: `orchard report ID` does not print paths that are not there."""
    home = store_with_a_report(tmp_path)
    elsewhere = tmp_path / "not-the-share"
    code, out, err = run_in_process(
        monkeypatch, capsys, "report", "t-1", home=home, ORCHARD_ARTIFACTS=str(elsewhere)
    )
    assert code == 2 and not out
    assert err == (
        "orchard: error: campaign t-1: campaigns/t-1/report/report.html is not under the "
        f"artifact folder {elsewhere} (ORCHARD_ARTIFACTS must be the folder, or shared mount, "
        "that the workers write to)\n"
    )
    report = elsewhere / "campaigns" / "t-1" / "report" / "report.html"
    report.parent.mkdir(parents=True)
    report.write_text("<html></html>")
    report.with_suffix(".md").write_text("# report")
    code, out, err = run_in_process(
        monkeypatch, capsys, "report", "t-1", home=home, ORCHARD_ARTIFACTS=str(elsewhere)
    )
    assert (code, out, err) == (0, f"{report}\n{report.with_suffix('.md')}\n", "")


@pytest.mark.parametrize("queues", ["", " , "])
def test_worker_queues_that_name_no_queue_are_refused(
    tmp_path: Path, monkeypatch, capsys, queues: str
) -> None:
    home = tmp_path / "home"
    code, out, err = run_in_process(monkeypatch, capsys, "worker", "--queues", queues, home=home)
    assert code == 2 and not out
    assert err == (
        f"orchard: error: --queues {queues!r} names no queue; choose from gpu, cpu, "
        "preprocess, report\n"
    )
    assert not home.exists()


def test_submit_skips_a_truncated_bmp_with_one_warning(tmp_path: Path, monkeypatch, capsys) -> None:
    """The first half of a valid BMP is caught from its header at submit, not by failing
    its preprocessing shard in the worker."""
    root = make_aicup(tmp_path / "data", per_class=4)
    (root / "train" / "005.jpg").unlink()
    bmp = root / "train" / "005.bmp"
    ok, data = cv2.imencode(".bmp", np.full((64, 64, 3), 99, np.uint8))
    assert ok
    bmp.write_bytes(data.tobytes()[: len(data) // 2])
    (root / "train.csv").write_text((root / "train.csv").read_text().replace("005.jpg", "005.bmp"))
    code, out, err = run_in_process(
        monkeypatch, capsys, "submit", str(write_campaign(tmp_path, root)), home=tmp_path / "h"
    )
    assert code == 0, err
    assert err.splitlines() == [
        f"orchard: warning: 1 unusable image skipped: {bmp}: truncated BMP (file is 6,171 "
        "bytes, its header needs 12,342)"
    ]


def test_dry_run_shows_control_characters_in_file_names_rather_than_obeying_them(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """A dataset's file names and a campaign file's name reach the terminal as escapes:
    ESC and BEL would clear the screen or retitle the window."""
    root = make_aicup(tmp_path / "data", per_class=4)
    (root / "train" / "001.jpg").write_bytes(b"")  # listed, unusable
    stray = root / "train" / "un\x1b[2J\x1b]0;owned\x07.jpg"  # in no CSV: ignored
    cv2.imwrite(str(stray), np.zeros((8, 8, 3), np.uint8))
    campaign = write_campaign(tmp_path, root).rename(tmp_path / "v\x1b]0;T\x07.toml")
    code, out, err = run_in_process(
        monkeypatch, capsys, "submit", str(campaign), "--dry-run", home=tmp_path / "h"
    )
    assert code == 0, err
    assert "\x1b" not in out + err and "\x07" not in out + err
    assert out.startswith(f"{tmp_path}/v\\x1b]0;T\\x07.toml: campaign c,")
    assert err.splitlines() == [
        f"orchard: warning: 1 unusable image skipped: {root / 'train' / '001.jpg'}: empty "
        "file (0 bytes)",
        f"orchard: warning: 1 image not listed in any split's CSV, ignored: {root / 'train'}/"
        "un\\x1b[2J\\x1b]0;owned\\x07.jpg",
    ]


def test_submit_with_an_unterminated_quote_names_its_line(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    root = make_aicup(tmp_path / "data", per_class=4)
    csv = root / "train.csv"
    csv.write_text(csv.read_text().replace("009.jpg,A", '"009.jpg,A'))
    code, _, err = run_in_process(
        monkeypatch, capsys, "submit", str(write_campaign(tmp_path, root)), home=tmp_path / "h"
    )
    assert code == 2
    [line] = err.strip().splitlines()
    assert f"{csv}:11: unterminated quote" in line


@pytest.mark.skipif(sys.platform == "darwin", reason="the filesystem refuses non-UTF-8 names")
def test_submit_warns_of_an_image_name_that_is_not_utf8(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for c, name in enumerate("ABC"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            image = np.full((20, 24, 3), 20 * (4 * c + i), np.uint8)
            assert cv2.imwrite(str(root / name / f"{i}.jpg"), image)
    with open(os.fsencode(root / "A") + b"/caf\xe9.jpg", "wb") as fh:
        fh.write(cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    campaign = tmp_path / "c.toml"
    campaign.write_text(TINY.format(kind="imagefolder", dataset=f'root = "{root}"'))
    done = orchard("submit", str(campaign), home=tmp_path / "h")
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        f"orchard: warning: 1 unusable image skipped: {root / 'A'}/caf\\xe9.jpg: file name "
        "is not valid UTF-8 (rename it)"
    ]


def test_with_stderr_closed_nothing_meant_for_it_reaches_stdout(tmp_path: Path) -> None:
    """`ID=$(orchard submit c.toml --wait 2>&-)`: Python has no sys.stderr then, and
    print(file=None) wrote the error line (and --wait's progress) to stdout, the id's."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ORCHARD_")}
    done = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "status", "nope"],
        cwd=REPO,
        env={**environ, "ORCHARD_HOME": str(tmp_path)},
        stdout=subprocess.PIPE,
        text=True,
        timeout=90,
        preexec_fn=lambda: os.close(2),  # noqa: PLW1509 - the child's fd 2 only
    )
    assert (done.returncode, done.stdout) == (2, "")
