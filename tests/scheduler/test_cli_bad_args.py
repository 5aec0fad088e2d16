"""Bad input that is the command line or its surroundings rather than a campaign: a node
name Celery cannot expand, a campaign id or file path that is not UTF-8, a timeout that
is not a positive number, standard output that cannot be written, a SQLite store that
cannot be opened. One line each, no traceback, nothing left behind by a refused command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.scheduler.test_bad_input_cli import assert_one_line_error, orchard, run_in_process
from tests.scheduler.test_submit_checks import SYNTHETIC, assert_no_dataset_left

CAMPAIGN = SYNTHETIC + "[rf]\nn_estimators = 5\n"
NOT_UTF8 = os.fsdecode(b"\xff")  # what a shell's $'\xff' gives Python


def campaign_file(folder: Path, name: str = "c.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(CAMPAIGN)
    return path


def argparse_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    from scheduler.cli import _parser

    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(list(args))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()[-1]


# ---------------------------------------------------------------- worker --name


@pytest.mark.parametrize("name", ["w%q@%h", "%x", "gpu-%p@%h"])
def test_a_node_name_celery_cannot_expand_is_an_argparse_error(
    capsys: pytest.CaptureFixture[str], name: str
) -> None:
    line = argparse_error(capsys, "worker", "--name", name)
    unknown = next(name[i : i + 2] for i in range(len(name)) if name[i] == "%")
    assert line == (
        f"orchard worker: error: argument --name/-n: {name!r}: {unknown} is not a node-name "
        "abbreviation; use %h (host name), %n (its first part), %d (domain), %i, %I (process "
        "index), %% (a literal %)"
    )


def test_a_node_name_that_is_not_utf8_is_an_argparse_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = argparse_error(capsys, "worker", "-n", f"w{NOT_UTF8}@%h")
    assert line == (
        "orchard worker: error: argument --name/-n: w\\xff@%h: not UTF-8 text (a node name is "
        "sent to the broker)"
    )


def test_a_node_name_with_control_characters_is_an_argparse_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`orchard status` prints every unit's worker: ESC sequences in one would act there."""
    line = argparse_error(capsys, "worker", "-n", "w\x1b]0;x\x07@%h")
    assert line == (
        "orchard worker: error: argument --name/-n: w\\x1b]0;x\\x07@%h: holds control "
        "characters; a node name is printed by `orchard status`"
    )


@pytest.mark.parametrize("name", ["w1@%h", "w%%q@%h", "%n-%i@%d", "plain", "cpu-%I@host.example"])
def test_node_names_celery_expands_are_taken(name: str) -> None:
    from scheduler.cli import _parser

    assert _parser().parse_args(["worker", "--name", name]).name == name


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("soon", "ORCHARD_NAME_CHECK_SECONDS='soon': expected a number of seconds greater than 0"),
        ("0", "ORCHARD_NAME_CHECK_SECONDS='0': expected a number of seconds greater than 0"),
        (
            "61",
            "ORCHARD_NAME_CHECK_SECONDS='61': expected a number of seconds greater than 0 and "
            "at most 60",
        ),
    ],
)
def test_a_name_check_window_that_is_not_a_number_of_seconds_is_one_line(
    monkeypatch: pytest.MonkeyPatch, value: str, said: str
) -> None:
    """Read before the worker asks the broker anything."""
    from types import SimpleNamespace

    from scheduler.worker_command import _refuse_a_taken_name
    from shared.errors import OrchardError

    monkeypatch.setenv("ORCHARD_NAME_CHECK_SECONDS", value)
    with pytest.raises(OrchardError) as error:
        _refuse_a_taken_name(None, "w@%h", SimpleNamespace(broker_is_filesystem=False))
    assert str(error.value) == said


# ---------------------------------------------------------------- demo --timeout


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf", "-inf", "soon", ""])
def test_a_demo_timeout_that_is_not_a_positive_number_is_an_argparse_error(
    capsys: pytest.CaptureFixture[str], timeout: str
) -> None:
    line = argparse_error(capsys, "demo", f"--timeout={timeout}")  # -1 looks like an option
    assert line == (
        "orchard demo: error: argument --timeout: expected a number of seconds greater "
        f"than 0, got {timeout!r}"
    )


def test_a_positive_demo_timeout_is_taken() -> None:
    from scheduler.cli import _parser

    assert _parser().parse_args(["demo", "--timeout", "0.5"]).timeout == 0.5
    assert _parser().parse_args(["demo"]).timeout == 600.0


# ---------------------------------------------------------------- non-UTF-8 ids and paths


@pytest.mark.parametrize(
    "command", [["status"], ["status", "--watch"], ["report"], ["cancel"], ["resume"]]
)
def test_a_campaign_id_that_is_not_utf8_is_no_campaign(
    tmp_path: Path, monkeypatch, capsys, command: list[str]
) -> None:
    from db.store import Store

    home = tmp_path / "home"
    store = Store(f"sqlite:///{home / 'orchard.db'}")
    store.upgrade()
    store.dispose()
    args = [command[0], f"t-{NOT_UTF8}", *command[1:]]
    code, out, err = run_in_process(monkeypatch, capsys, *args, home=home)
    assert (code, out) == (2, "")
    assert err == (
        "orchard: error: no campaign t-\\xff: a campaign id is UTF-8 text, as `orchard "
        "status` lists it\n"
    )
    assert not (home / "broker").exists()


def test_submit_of_a_campaign_file_whose_path_is_not_utf8_creates_nothing(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    folder = tmp_path / f"data{NOT_UTF8}"
    path = campaign_file(folder)
    home = tmp_path / "home"
    code, out, err = run_in_process(monkeypatch, capsys, "submit", str(path), home=home)
    assert (code, out) == (2, "")
    assert err == (
        f"orchard: error: campaign file {tmp_path}/data\\xff/c.toml: its path is not UTF-8 "
        "text, which the store records; rename it (or copy it to a UTF-8 path)\n"
    )
    assert not home.exists()  # no store, no artifact folder, no broker folder


def test_the_demo_refuses_a_campaign_file_whose_path_is_not_utf8_first(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    path = campaign_file(tmp_path, f"{NOT_UTF8}.toml")
    home = tmp_path / "home"
    code, out, err = run_in_process(monkeypatch, capsys, "demo", "--campaign", str(path), home=home)
    assert (code, out) == (2, "")
    assert err.startswith(f"orchard: error: campaign file {tmp_path}/\\xff.toml: its path is")
    assert not home.exists()


# ---------------------------------------------------------------- standard output


def orchard_to(stdout: str, *args: str, home: Path) -> subprocess.CompletedProcess:
    """`orchard ...` with its standard output redirected by the shell: ``>/dev/full``,
    ``>&-`` (closed)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ORCHARD_")}
    return subprocess.run(
        ["bash", "-c", f'exec "$@" {stdout}', "bash", sys.executable, "-m", "scheduler.cli"]
        + list(args),
        cwd=REPO,
        env={**environ, "ORCHARD_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("stdout", "where"),
    [(">/dev/full", " (/dev/full): No space left on device"), (">&-", ": Bad file descriptor")],
)
def test_status_whose_output_cannot_be_written_is_one_line(
    tmp_path: Path, stdout: str, where: str
) -> None:
    home = tmp_path / "home"
    assert orchard("db", "upgrade", home=home).returncode == 0
    done = orchard_to(stdout, "status", home=home)
    assert done.returncode == 1
    assert done.stderr == f"orchard: error: cannot write to standard output{where}\n"


@pytest.mark.parametrize(
    ("stdout", "where"),
    [(">/dev/full", " (/dev/full): No space left on device"), (">&-", ": Bad file descriptor")],
)
def test_a_submit_whose_id_cannot_be_written_says_it_was_submitted(
    tmp_path: Path, stdout: str, where: str
) -> None:
    home = tmp_path / "home"
    done = orchard_to(stdout, "submit", str(campaign_file(tmp_path)), home=home)
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    listed = orchard("status", home=home)
    [campaign_id] = [row.split()[0] for row in listed.stdout.splitlines()[2:]]
    assert line == (
        f"orchard: error: campaign {campaign_id} WAS submitted (recorded and enqueued), but "
        f"its id could not be written to standard output{where}; do not submit it again: "
        f"`orchard status {campaign_id}` follows it"
    )


# ---------------------------------------------------------------- the SQLite store


@pytest.mark.parametrize("kind", ["directory", "not a database"])
def test_a_sqlite_store_that_cannot_be_opened_stops_submit_before_any_folder(
    tmp_path: Path, monkeypatch, capsys, kind: str
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    database = home / "orchard.db"
    if kind == "directory":
        database.mkdir()
        expected = f"database sqlite:///{database}: {database} is a directory, not a SQLite file"
    else:
        database.write_text("not a database\n")
        expected = f"database sqlite:///{database}: {database} is not a SQLite database"
    code, out, err = run_in_process(
        monkeypatch, capsys, "submit", str(campaign_file(tmp_path)), home=home
    )
    assert (code, out, err) == (2, "", f"orchard: error: {expected}\n")
    assert sorted(p.name for p in home.iterdir()) == ["orchard.db"]  # no artifacts, no broker
    if kind != "directory":
        assert database.read_text() == "not a database\n"


def test_a_store_at_an_older_schema_stops_submit_unmigrated(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """Migrating is `orchard db upgrade`'s, run once with the workers stopped: a submit
    from a host updated first would change the schema under the cluster's running
    workers. An empty store a submit still creates."""
    from db import migrate
    from db.store import Store

    home = tmp_path / "home"
    url = f"sqlite:///{home / 'orchard.db'}"
    store = Store(url)
    migrate.upgrade(store.engine, "0001")
    code, out, err = run_in_process(
        monkeypatch, capsys, "submit", str(campaign_file(tmp_path)), home=home
    )
    assert code == 2 and out == ""
    assert err.strip() == (
        f"orchard: error: database {url} is at schema 0001, expected "
        f"{migrate.head_revision()}: "
        "run `orchard db upgrade`"
    )
    assert migrate.current_revision(store.engine) == "0001"
    assert not (home / "artifacts" / "campaigns").exists() or not any(
        (home / "artifacts" / "campaigns").iterdir()
    )
    store.dispose()


def test_db_upgrade_refuses_while_units_run_unless_forced(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """A migration under running workers changes the schema their code was written for
    (a host not yet updated): refused while a unit holds a live lease, naming it and its
    worker; a lease run out (its worker killed) does not count; --force migrates."""
    from db import migrate
    from db.store import Store
    from shared.plan import UnitPlan
    from tests.db.test_store import bare_campaign

    home = tmp_path / "home"
    url = f"sqlite:///{home / 'orchard.db'}"
    home.mkdir()
    store = Store(url)
    store.upgrade()
    keys = ["c-1/svm/p0/f0", "c-1/svm/p1/f0"]
    bare_campaign(store, "c-1", [UnitPlan(key, "svm", 1, 0, {}, key[-5:]) for key in keys])
    store.claim_for_queue(keys)
    store.start_unit(keys[0], worker="cpu@a", task_id="t0", holder="h0", lease_seconds=600)
    store.start_unit(keys[1], worker="cpu@b", task_id="t1", holder="h1", lease_seconds=-1)
    migrate.downgrade(store.engine, "0006")

    code, out, err = run_in_process(monkeypatch, capsys, "db", "upgrade", home=home)
    assert code == 2 and out == ""
    assert err.strip() == (
        f"orchard: error: store {url}: 1 unit(s) running (c-1/svm/p0/f0 on cpu@a): stop the "
        "workers first (TERM: each hands its unit back at its checkpoint), update orchard on "
        "every host, then upgrade; a worker killed without a warm shutdown holds its lease "
        "until it runs out. `orchard db upgrade --force` migrates all the same"
    )
    assert store.revision() == "0006"
    code, out, err = run_in_process(monkeypatch, capsys, "db", "upgrade", "--force", home=home)
    assert (code, err) == (0, "")
    assert out.strip() == f"store {url}: migrated from schema 0006 to {migrate.head_revision()}"
    store.dispose()


# ---------------------------------------------------------------- no broker folder on refusal


def test_a_refused_campaign_file_leaves_no_broker_folder(tmp_path: Path) -> None:
    """In a process of its own: building the app makes its broker folders, from the
    environment."""
    home = tmp_path / "home"
    bad = tmp_path / "bad.toml"
    bad.write_text(CAMPAIGN + "nonsense = 1\n")
    for path in (tmp_path / "missing.toml", bad):
        done = orchard("submit", str(path), home=home)
        assert_one_line_error(done, str(path))
        assert not home.exists()


def test_an_artifact_folder_that_cannot_be_made_leaves_no_broker_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("")
    home = tmp_path / "home"
    done = orchard(
        "submit", str(campaign_file(tmp_path)), home=home, ORCHARD_ARTIFACTS=str(blocker / "art")
    )
    assert_one_line_error(done, f"artifact folder {blocker / 'art'}: {blocker} is not a directory")
    assert not home.exists()


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "submit"])
def test_an_artifact_folder_in_a_folder_that_takes_none_is_refused_by_a_dry_run_too(
    tmp_path: Path, dry_run: bool
) -> None:
    """/proc passes os.access for root, and refuses every mkdir: the check makes (and
    removes) a folder there, so `--dry-run` says what the submit would, and changes
    nothing."""
    home = tmp_path / "home"
    args = ["submit", str(campaign_file(tmp_path)), *(["--dry-run"] if dry_run else [])]
    done = orchard(*args, home=home, ORCHARD_ARTIFACTS="/proc/orchard-artifacts")
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert line in (
        "orchard: error: artifact folder /proc/orchard-artifacts: cannot create a folder in "
        "/proc (No such file or directory)",
        # as a user other than root
        "orchard: error: artifact folder /proc/orchard-artifacts: /proc is not writable",
    )
    assert not home.exists() and not os.path.exists("/proc/orchard-artifacts")


def test_a_refused_dataset_leaves_no_store_no_campaigns_folder_and_no_broker_folder(
    tmp_path: Path,
) -> None:
    """A real process: the broker is asked before the dataset is read, but a filesystem
    broker's folders are made only for a campaign that passed every check."""
    path = tmp_path / "c.toml"
    path.write_text(SYNTHETIC)  # no model family
    home = tmp_path / "home"
    done = orchard("submit", str(path), home=home)
    assert_one_line_error(done, f"{path}: no model family to train")
    assert not (home / "orchard.db").exists()
    assert not (home / "artifacts" / "campaigns").exists()
    assert not (home / "broker").exists()
    assert_no_dataset_left(home)


def test_a_broker_folder_that_cannot_be_made_stops_submit_before_the_dataset(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("")
    home = tmp_path / "home"
    done = orchard(
        "submit",
        str(campaign_file(tmp_path)),
        home=home,
        ORCHARD_BROKER_URL=f"filesystem://{blocker / 'broker'}",
    )
    folder = blocker / "broker"
    assert_one_line_error(
        done, f"ORCHARD_BROKER_URL: broker folder {folder}: {blocker} is not a directory"
    )
    assert not (home / "orchard.db").exists()
    assert_no_dataset_left(home)
