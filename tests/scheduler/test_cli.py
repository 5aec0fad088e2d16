"""The `orchard` command as a user meets it: one clear line on bad input, never a traceback."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scheduler.worker_command import worker_argv
from tests.conftest import REPO


def orchard(*args: str, env: dict[str, str] | None = None, timeout: float = 60):
    """`orchard ARGS` with ``env`` added to this process's environment: `worker` (Celery
    takes the process over) and a command given PYTHON* variables (read as the
    interpreter starts) in a process of their own, every other command in this one,
    which is what it tests (its arguments, checks and error lines) at a fraction of a
    process's start; tests/scheduler/test_cli_signals.py and the integration tests run
    the real processes."""
    if args[:1] == ("worker",) or any(name.startswith("PYTHON") for name in env or {}):
        return subprocess.run(
            [sys.executable, "-m", "scheduler.cli", *args],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    return in_process(*args, env=env)


#: How long a command run in this process may take before its test fails, as
#: ``subprocess.run(timeout=...)`` would fail the test of one run in a process of its own.
IN_PROCESS_TIMEOUT = 60.0


class Hung(BaseException):
    """A command run in this process did not return within its time; a BaseException,
    so that no ``except Exception`` of the command's own takes it for its error."""


def in_process(
    *args: str, env: dict[str, str] | None = None, clean: bool = False
) -> subprocess.CompletedProcess:
    """`orchard ARGS` in this process, as a finished process: with ``env`` added to the
    environment (``clean``: to an environment without ORCHARD_ variables) and run from
    the repository, all put back afterwards. One that takes longer than
    :data:`IN_PROCESS_TIMEOUT` fails its test (SIGALRM, in the main thread) rather than
    hang the suite, once it is back in Python code (a C call that retries on EINTR
    itself finishes first)."""
    from scheduler.cli import main

    def hung(signum: int, frame: object) -> None:
        raise Hung(f"orchard {' '.join(args)}: no return within {IN_PROCESS_TIMEOUT:g} s")

    out, err = io.StringIO(), io.StringIO()
    before = dict(os.environ)
    cwd = Path.cwd()
    if clean:
        for name in [k for k in os.environ if k.startswith("ORCHARD_")]:
            del os.environ[name]
    os.environ.update(env or {})
    alarm = signal.signal(signal.SIGALRM, hung)
    try:
        os.chdir(REPO)
        signal.setitimer(signal.ITIMER_REAL, IN_PROCESS_TIMEOUT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's usage errors and --help
                code = exc.code if isinstance(exc.code, int) else 1
    except Hung as exc:
        pytest.fail(f"{exc}\nstdout: {out.getvalue()}\nstderr: {err.getvalue()}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, alarm)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(before)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def assert_one_line_error(done: subprocess.CompletedProcess, *needles: str, code: int = 2) -> None:
    assert done.returncode == code, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0]


def test_submit_bad_campaign_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[dataset]\nkind = "synthetic"\n[cnn]\nlr = "fast"\n')
    done = orchard("submit", str(bad))
    assert_one_line_error(done, str(bad), "[cnn] lr")


def test_submit_missing_file(tmp_path: Path) -> None:
    assert_one_line_error(orchard("submit", str(tmp_path / "nope.toml")), "nope.toml")


def test_unreachable_broker_fails_and_masks_the_password(tmp_path: Path) -> None:
    # a hang would stop at orchard()'s timeout and fail the test
    done = orchard(
        "submit",
        str(REPO / "campaigns" / "quick.toml"),
        env={
            "ORCHARD_HOME": str(tmp_path),
            "ORCHARD_BROKER_URL": "redis://:hunter2@127.0.0.1:1/0",
        },
    )
    assert_one_line_error(done, "redis://:***@127.0.0.1:1/0", "unreachable", code=75)
    assert "hunter2" not in done.stderr + done.stdout
    assert not (tmp_path / "orchard.db").exists()  # nothing half-written


def test_status_on_an_empty_database_says_what_to_do(tmp_path: Path) -> None:
    done = orchard("status", env={"ORCHARD_HOME": str(tmp_path)})
    assert_one_line_error(done, "orchard db upgrade")
    created = orchard("db", "upgrade", env={"ORCHARD_HOME": str(tmp_path)})
    assert created.returncode == 0 and ": created, schema " in created.stdout
    again = orchard("db", "upgrade", env={"ORCHARD_HOME": str(tmp_path)})
    assert again.returncode == 0 and ": already at the newest schema, " in again.stdout
    listed = orchard("status", env={"ORCHARD_HOME": str(tmp_path)})
    assert listed.returncode == 0 and "no campaigns in sqlite" in listed.stdout


def test_unknown_queue_is_refused(tmp_path: Path) -> None:
    done = orchard("worker", "--queues", "gpu,bogus", env={"ORCHARD_HOME": str(tmp_path)})
    assert_one_line_error(done, "bogus")


def test_unknown_campaign_is_named(tmp_path: Path) -> None:
    env = {"ORCHARD_HOME": str(tmp_path)}
    orchard("db", "upgrade", env=env)
    assert_one_line_error(orchard("report", "nope-1", env=env), "nope-1")


@pytest.mark.parametrize(
    ("queues", "pool", "concurrency"),
    [(["gpu"], "solo", "1"), (["cpu", "preprocess"], "prefork", "3")],
)
def test_gpu_workers_never_fork(queues: list[str], pool: str, concurrency: str) -> None:
    argv = worker_argv(queues, concurrency=3, name=None, loglevel="INFO")
    assert argv[argv.index("--pool") + 1] == pool
    assert argv[argv.index("--concurrency") + 1] == concurrency
    assert argv[argv.index("--queues") + 1] == ",".join(queues)
    assert "--task-events" in argv


def test_cpu_workers_may_choose_the_solo_pool() -> None:
    argv = worker_argv(["cpu"], concurrency=None, name=None, loglevel="INFO", pool="solo")
    assert argv[argv.index("--pool") + 1] == "solo"
    assert argv[argv.index("--concurrency") + 1] == "1"
    assert "--task-events" in argv
    default = worker_argv(["cpu"], concurrency=2, name=None, loglevel="INFO")
    assert default[default.index("--pool") + 1] == "prefork"
    quiet = worker_argv(["cpu"], concurrency=2, name=None, loglevel="INFO", task_events=False)
    assert "--task-events" not in quiet and "--task-events" in default


@pytest.mark.parametrize(
    ("queues", "pool", "concurrency", "needle"),
    [
        (["cpu"], "solo", 4, "one task at a time"),
        (["gpu"], "prefork", None, "GPU workers use solo"),
        (["cpu"], "threads", None, "unknown pool"),
    ],
)
def test_pool_choices_that_cannot_work_are_refused(
    queues: list[str], pool: str, concurrency: int | None, needle: str
) -> None:
    from shared.errors import OrchardError

    with pytest.raises(OrchardError, match=needle):
        worker_argv(queues, concurrency=concurrency, name=None, loglevel="INFO", pool=pool)


def test_bad_dataset_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "mango"
    (data / "train").mkdir(parents=True)
    (data / "train.csv").write_text("image_id,label\n00001.jpg,A\n")  # the image is missing
    campaign = tmp_path / "c.toml"
    campaign.write_text(f'name = "c"\n[dataset]\nkind = "aicup"\nroot = "{data}"\n')
    done = orchard("submit", str(campaign), env={"ORCHARD_HOME": str(tmp_path / "home")})
    assert_one_line_error(done, "train.csv", "00001.jpg")
    assert not (tmp_path / "home").exists()  # no store, no folder for one, no campaign


def test_too_many_folds_for_the_smallest_class(tmp_path: Path) -> None:
    campaign = tmp_path / "c.toml"
    campaign.write_text(
        'name = "c"\nfolds = 5\n[dataset]\nkind = "synthetic"\ntrain_per_class = 3\n'
        "test_per_class = 1\nwidth = 64\nheight = 48\nlabel_noise = 0.0\n"
    )
    done = orchard("submit", str(campaign), env={"ORCHARD_HOME": str(tmp_path / "home")})
    assert_one_line_error(done, "fewer than folds = 5")


def test_gpu_workers_refuse_prefork_and_silence(tmp_path: Path) -> None:
    env = {"ORCHARD_HOME": str(tmp_path)}
    for flag in (["--pool", "prefork"], ["--without-task-events"]):
        done = orchard("worker", "--gpus", "all", *flag, env=env)
        assert_one_line_error(done, "--gpus workers use the solo pool")


SUBCOMMANDS = (
    "submit",
    "resume",
    "cancel",
    "delete",
    "prune",
    "status",
    "report",
    "worker",
    "demo",
    "db",
)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_help_says_what_it_does(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from scheduler.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    paragraphs = capsys.readouterr().out.split("\n\n")
    assert paragraphs[0].startswith(f"usage: orchard {command}")
    description = paragraphs[1]  # before the arguments
    assert not description.startswith(("positional arguments:", "options:")), description
    assert len(description.split()) >= 8


#: what each command needs before an option of its own
NEEDS = {
    "submit": ["x.toml"],
    "resume": ["c-1"],
    "cancel": ["c-1"],
    "delete": ["c-1"],
    "report": ["c-1"],
    "db": ["upgrade"],
}


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_an_unknown_option_shows_the_command_s_own_usage(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`orchard status ID --wiat`: the usage of `status`, which names its options, not
    the top level's `usage: orchard [-h] COMMAND ...`."""
    from scheduler.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([command, *NEEDS.get(command, []), "--wiat"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: orchard {command} [-h]")
    assert err.endswith(f"\norchard {command}: error: unrecognized arguments: --wiat\n")


def test_status_follows_with_wait_as_submit_and_resume_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from scheduler.cli import _parser, main

    assert _parser().parse_args(["status", "c-1", "--wait"]).watch is True
    assert _parser().parse_args(["status", "c-1", "--watch"]).watch is True
    monkeypatch.setenv("ORCHARD_DATABASE_URL", f"sqlite:///{tmp_path / 'orchard.db'}")
    # --all lists campaigns: with an id it would be ignored, so it is refused
    assert main(["status", "c-1", "--all"]) == 2
    assert capsys.readouterr().err == (
        "orchard: error: --all lists every campaign: give no id with it (`orchard status --all`)\n"
    )
    assert not (tmp_path / "orchard.db").exists()


def test_worker_help_tells_the_truth(capsys: pytest.CaptureFixture[str]) -> None:
    from scheduler.cli import main

    with pytest.raises(SystemExit):
        main(["worker", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    # the default node name is what worker_argv builds
    argv = worker_argv(["cpu"], concurrency=None, name=None, loglevel="INFO")
    assert argv[argv.index("--hostname") + 1] == f"cpu-{os.getpid()}@%h"
    assert "default <queue>-<pid>@%h" in text
    # a killed solo worker's unit is sent again by the reaper (README, Reliability 1)
    assert "ORCHARD_VISIBILITY_TIMEOUT" not in text
    assert "two lease periods" in text and "ORCHARD_LEASE_SECONDS" in text
    assert "--concurrency N, -c N child processes of a prefork worker" in text


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["--concurrency", "-2"],
            "argument --concurrency/-c: expected a whole number of at least 1",
        ),
        (
            ["--concurrency", "0"],
            "argument --concurrency/-c: expected a whole number of at least 1",
        ),
        (["-c", "two"], "argument --concurrency/-c: expected a whole number of at least 1"),
        (["--loglevel", "bogus"], "argument --loglevel/-l: invalid choice: 'BOGUS'"),
    ],
)
def test_worker_options_celery_cannot_take_are_argparse_errors(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from scheduler.cli import _parser

    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["worker", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"orchard worker: error: {needle}"), err


def test_worker_loglevel_is_case_insensitive() -> None:
    from scheduler.cli import _parser

    args = _parser().parse_args(["worker", "-l", "debug", "-c", "3"])
    assert (args.loglevel, args.concurrency) == ("DEBUG", 3)
    assert _parser().parse_args(["worker"]).loglevel == "INFO"


def test_a_reader_that_leaves_early_ends_the_output_quietly(tmp_path: Path) -> None:
    """`orchard status | head -1`: the closed pipe stops orchard with no traceback."""
    from db.store import Store
    from tests.db.test_store import seed_campaign

    home = tmp_path / "home"
    store = Store(f"sqlite:///{home / 'orchard.db'}")
    store.upgrade()
    for i in range(40):
        seed_campaign(store, f"t-{i}")
    done = _with_the_reader_gone(["status", "t-1"], home)
    assert done.returncode == 141 and done.stderr == "", done.stderr


def _with_the_reader_gone(args: list[str], home: Path) -> subprocess.CompletedProcess:
    """`orchard ARGS` whose stdout is a pipe whose reader is gone before it writes."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ORCHARD_")},
        "ORCHARD_HOME": str(home),
    }
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, "-m", "scheduler.cli", *args],
            cwd=REPO,
            env=env,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)


def test_a_submit_whose_reader_left_says_the_campaign_was_submitted(tmp_path: Path) -> None:
    """`orchard submit c.toml | …` whose reader is gone: the campaign is recorded and
    sent, and its id, the one line a script keeps, was lost without a word (exit 141):
    a retry would run it twice. It is said on stderr, as for a stdout that is full."""
    from db.store import Store
    from tests.scheduler.test_cli_bad_args import campaign_file

    home = tmp_path / "home"
    done = _with_the_reader_gone(["submit", str(campaign_file(tmp_path))], home)
    [campaign] = Store(f"sqlite:///{home / 'orchard.db'}").list_campaigns()
    assert done.returncode == 141, done.stderr
    assert done.stderr == (
        f"orchard: error: campaign {campaign.id} WAS submitted (recorded and enqueued), but its "
        "id could not be written to standard output: its reader has left (a closed pipe); do "
        f"not submit it again: `orchard status {campaign.id}` follows it\n"
    )


def worker_start_lines(args: list[str], env: dict[str, str]) -> list[str]:
    """What `orchard worker ARGS` says on stderr up to its start line; then stopped,
    with the GPU launcher's children."""
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "scheduler.cli", "worker", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("orchard worker"):
                break
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return lines or [""]


@pytest.mark.parametrize(
    ("args", "extra_env"),
    [
        (["--queues", "cpu", "--pool", "solo"], {}),
        (["--gpus", "0"], {"ORCHARD_DEVICE": "cpu"}),
    ],
)
def test_worker_start_line_names_the_artifact_folder(
    tmp_path: Path, args: list[str], extra_env: dict[str, str]
) -> None:
    """A worker on another host must see the submitter's ORCHARD_ARTIFACTS (README, Where
    things are); its start line names that folder beside the broker and the store, so a
    worker started without it (./.orchard/artifacts) shows before its units fail."""

    share = tmp_path / "share"
    env = {
        **os.environ,
        "ORCHARD_HOME": str(tmp_path / "home"),
        "ORCHARD_ARTIFACTS": str(share),
        **extra_env,
    }
    assert orchard("db", "upgrade", env=env).returncode == 0
    line = worker_start_lines(args, env)[-1]
    assert line.startswith("orchard worker: "), line
    assert f"artifacts {share}" in line, line


def test_a_dry_run_prints_the_plan_and_touches_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    campaign = tmp_path / "grid.toml"
    campaign.write_text(
        'name = "grid"\nvalidation = "dev"\n'
        '[dataset]\nkind = "synthetic"\ntrain_per_class = 6\ndev_per_class = 2\n'
        "test_per_class = 1\nwidth = 64\nheight = 48\n[preprocessing]\nsize = 32\n"
        'shard_size = 10\n[svm]\nvariant = "resize8"\nn_components = [4, 8]\n'
        '[svm.search]\nfolds = 3\nC = [1.0, 2.0]\ngamma = [1e-3, 1e-2, "scale"]\n'
        '[rf]\nvariant = "resize8"\nn_estimators = [4, 8]\ntree_shards = 2\n'
    )
    # a broker and a store that cannot be reached: a dry run asks neither
    env = {
        "ORCHARD_HOME": str(home),
        "ORCHARD_BROKER_URL": "redis://:hunter2@127.0.0.1:1/0",
        "ORCHARD_DATABASE_URL": f"sqlite:///{tmp_path / 'no' / 'store.db'}",
    }
    done = orchard("submit", str(campaign), "--dry-run", env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == (
        f"{campaign}: campaign grid, 27 images (train 18, dev 6, test 3), validation on "
        "the dev split"
    )
    rows = [re.split(r"\s{2,}", line) for line in lines[2:-2]]
    small = "< 0.1 GB"  # the most one unit holds: these images are 8 x 8 px
    assert rows == [
        ["preprocess", "preprocess", "3", "preprocess", small, "shards of up to 10 images"],
        ["models", "svm", "2", "cpu", small,
         "2 points x 1 fold; each searches 6 combinations on 3 folds"],
        ["models", "rf_shard", "4", "cpu", small, "2 points x 1 fold, 2 tree shards each"],
        ["merge", "rf", "2", "cpu", small,
         "2 points x 1 fold, each merging its tree shards into one forest"],
        ["report", "report", "1", "report", small,
         "the report, once every other unit has finished"],
    ]  # fmt: skip
    assert lines[-2].startswith("12 units in all; nothing was recorded, sent or written")
    assert re.fullmatch(
        r"memory: the largest unit, grid/svm/\w+/f0, holds under 0\.1 GB in its "
        r"worker process, .*--concurrency processes",
        lines[-1],
    ), lines[-1]
    assert not home.exists() and not (tmp_path / "no").exists()  # no dataset, store, folder


def test_a_dry_run_gives_a_cnn_fold_s_gpu_memory_which_its_batch_size_sets(
    tmp_path: Path,
) -> None:
    """The CNN row's Memory: the host's share, then what a fold holds on its GPU, which
    its batch's activations make most of (``shared.memory.cnn_device_bytes``)."""
    figures = {}
    for batch in (32, 128):
        campaign = tmp_path / f"cnn{batch}.toml"
        campaign.write_text(
            f'name = "cnn{batch}"\n[dataset]\nkind = "synthetic"\ntrain_per_class = 60\n'
            "test_per_class = 15\n[preprocessing]\nsize = 256\n"
            f"[cnn]\nfolds = 5\nbatch_size = {batch}\n"
        )
        done = orchard("submit", str(campaign), "--dry-run", env={"ORCHARD_HOME": str(tmp_path)})
        assert done.returncode == 0, done.stderr
        row = next(line for line in done.stdout.splitlines() if re.match(r"models\s+cnn\s", line))
        cells = re.split(r"\s{2,}", row)
        assert cells[:4] == ["models", "cnn", "5", "gpu"], row
        figures[batch] = float(re.fullmatch(r".* GB, GPU ([\d.]+) GB", cells[4])[1])
        assert re.fullmatch(
            rf"GPU: the largest CNN fold, cnn{batch}/cnn/\w+/f\d, holds about "
            rf"{figures[batch]} GB on its GPU: its images, the network, and a training batch "
            rf"of {batch} images' activations \(a smaller \[cnn\] batch_size needs less\)",
            done.stdout.splitlines()[-1],
        ), done.stdout
    # 225 images at 224 px are 34 MB; 32 images' activations 1.6 GB, 128's 6.4 GB
    assert 1.5 < figures[32] < 2.5 and 6 < figures[128] < 8, figures


def test_a_dry_run_refuses_what_a_submit_refuses_in_one_line(tmp_path: Path) -> None:
    campaign = tmp_path / "big.toml"
    campaign.write_text(
        'name = "big"\n[dataset]\nkind = "synthetic"\ntrain_per_class = 4\n'
        '[preprocessing]\nsize = 32\n[svm]\nvariant = "resize8"\nn_components = 500\n'
    )
    env = {"ORCHARD_HOME": str(tmp_path)}
    done = orchard("submit", str(campaign), "--dry-run", env=env)
    # the synthetic dataset is named where a submit would make it, not where the dry run did
    assert_one_line_error(done, f"dataset {tmp_path}/artifacts/datasets/synthetic-", "folds = 5")
    campaign.write_text(campaign.read_text().replace('name = "big"', 'name = "big"\nfolds = 2'))
    done = orchard("submit", str(campaign), "--dry-run", env=env)
    assert_one_line_error(done, str(campaign), "[svm] n_components = 500 exceeds what")
    both = orchard("submit", str(campaign), "--dry-run", "--wait")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_a_dry_run_checks_what_a_submit_checks_before_it_connects(tmp_path: Path) -> None:
    campaign = tmp_path / "c.toml"
    campaign.write_text(
        'name = "c"\nfolds = 2\n[dataset]\nkind = "synthetic"\ntrain_per_class = 4\n'
        '[preprocessing]\nsize = 32\n[rf]\nvariant = "resize8"\nn_estimators = [4, 8]\n'
        "tree_shards = [2, 4]\n"
    )
    blocker = tmp_path / "afile"
    blocker.write_text("")
    home = {"ORCHARD_HOME": str(tmp_path / "home")}
    done = orchard(
        "submit", str(campaign), "--dry-run", env={**home, "ORCHARD_ARTIFACTS": f"{blocker}/x"}
    )
    assert_one_line_error(done, f"artifact folder {blocker}/x: {blocker} is not a directory")
    url = f"sqlite:///{blocker}/db.sqlite"
    done = orchard("submit", str(campaign), "--dry-run", env={**home, "ORCHARD_DATABASE_URL": url})
    assert_one_line_error(done, f"database {url}: cannot create {blocker}")
    done = orchard(
        "submit", str(campaign), "--dry-run", env={**home, "ORCHARD_BROKER_URL": "foo://x"}
    )
    assert_one_line_error(done, "ORCHARD_BROKER_URL foo://x")
    done = orchard("submit", str(campaign), "--dry-run", "--reuse", env=home)
    assert_one_line_error(done, "--dry-run records nothing")
    # forests of 2 and 4 tree shards: said as they are, not as their average
    done = orchard("submit", str(campaign), "--dry-run", env=home)
    assert done.returncode == 0, done.stderr
    assert "4 points x 1 fold, 2 or 4 tree shards each" in done.stdout
    assert not (tmp_path / "home").exists()


def test_a_synthetic_root_that_cannot_be_made_stops_dry_run_and_submit_alike(
    tmp_path: Path,
) -> None:
    """The dry run generates a synthetic dataset in a folder of its own: it must still
    refuse a root a submit cannot make, in the same line, before anything is written."""
    blocker = tmp_path / "afile"
    blocker.write_text("")
    campaign = tmp_path / "c.toml"
    campaign.write_text(
        f'name = "c"\nfolds = 2\n[dataset]\nkind = "synthetic"\nroot = "{blocker}/sub"\n'
        'train_per_class = 4\n[preprocessing]\nsize = 32\n[rf]\nvariant = "resize8"\n'
    )
    env = {"ORCHARD_HOME": str(tmp_path / "home"), "ORCHARD_BROKER_URL": "redis://127.0.0.1:1/0"}
    line = f"{campaign}: [dataset] root {blocker}/sub: {blocker} is not a directory"
    for extra in (["--dry-run"], []):
        assert_one_line_error(orchard("submit", str(campaign), *extra, env=env), line)
    assert not (tmp_path / "home").exists()


def test_a_dry_run_leaves_an_empty_dataset_folder_empty(tmp_path: Path) -> None:
    from scheduler.api import plan
    from shared.spec import load_campaign

    root = tmp_path / "synthetic"
    root.mkdir()  # made ready for the dataset a submit will generate
    campaign = tmp_path / "c.toml"
    campaign.write_text(
        f'name = "c"\nfolds = 2\n[dataset]\nkind = "synthetic"\nroot = "{root}"\n'
        'train_per_class = 4\n[preprocessing]\nsize = 32\n[rf]\nvariant = "resize8"\n'
    )
    planned = plan(campaign, artifacts=tmp_path / "artifacts")
    assert list(root.iterdir()) == []
    # what a submit would record: the file's campaign, its images where it will make them
    assert planned.campaign == load_campaign(campaign)
    paths = planned.manifest.image_paths(planned.manifest.entries, tmp_path / "artifacts")
    assert all(p.startswith(f"{root}/") and not os.path.exists(p) for p in paths)
    assert not (tmp_path / "artifacts").exists()
    # what each unit holds in its worker: a forest at least its variant's images
    memory = planned.unit_memory()
    assert set(memory) == {u.key for u in planned.units}
    images = len(planned.manifest.entries) * 8 * 8 * 3
    assert all(memory[u.key] > images for u in planned.units if u.family == "rf")


def _stored_campaigns(home: Path, running: str, *finished: str) -> int:
    """Campaigns recorded as a submit records them, with a folder each: ``running``
    RUNNING, the others CANCELLED. Returns how many units each has."""
    from db.store import Store
    from tests.db.test_store import seed_campaign

    store = Store(f"sqlite:///{home / 'orchard.db'}")
    store.upgrade()
    for cid in (running, *finished):
        units = len(seed_campaign(store, cid))
        folder = home / "artifacts" / "campaigns" / cid
        (folder / "models").mkdir(parents=True)
        (folder / "manifest.json").write_text("{}")
        (folder / "models" / "m.pt").write_bytes(b"x" * 1_500_000)
    for cid in finished:
        store.cancel_campaign(cid)
    store.dispose()
    return units


def test_delete_removes_finished_campaigns_and_refuses_a_running_one(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {"ORCHARD_HOME": str(home)}
    first, running, last = (f"t-20261205-00000{i}-abc{i}" for i in range(3))
    units = _stored_campaigns(home, running, first, last)
    campaigns = home / "artifacts" / "campaigns"
    cache = home / "artifacts" / "cache" / "k" / "shard-00000.npy"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"shared")

    dry = orchard("delete", first, running, last, "--dry-run", env=env)
    assert dry.returncode == 2
    assert dry.stdout.splitlines() == [
        f"would delete campaign {cid} (CANCELLED): {units} unit(s), 2 file(s), 1.5 MB under "
        f"{campaigns / cid}"
        for cid in (first, last)
    ]
    assert dry.stderr == (
        f"orchard: error: campaign {running} is RUNNING: cancel it first "
        f"(`orchard cancel {running}`), or let it finish\n"
    )
    assert all((campaigns / cid / "models" / "m.pt").exists() for cid in (first, running, last))

    done = orchard("delete", first, running, last, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stdout.startswith(f"deleted campaign {first} (CANCELLED): {units} unit(s), 2 file")
    assert sorted(p.name for p in campaigns.iterdir()) == [running]
    assert cache.read_bytes() == b"shared"  # the cache is every campaign's
    listed = orchard("status", env=env)
    assert running in listed.stdout and first not in listed.stdout and last not in listed.stdout
    # deleted already, as asked: a delete retried is no failure (it said so in exit 2)
    again = orchard("delete", first, env=env)
    assert_one_line_error(again, f"campaign {first} was deleted (`orchard delete`) at ", code=0)
    assert again.stderr.endswith(": nothing to delete\n")


def test_delete_removes_a_deleted_campaigns_leftovers_and_nothing_else(tmp_path: Path) -> None:
    """A folder a delete could not remove whole has no manifest: deleting the id again
    removes it. Nothing else outside the store's campaigns is touched: not a folder
    with a manifest (another store's campaign), not a path that is not a campaign id."""
    home = tmp_path / "home"
    env = {"ORCHARD_HOME": str(home)}
    running = "t-20261205-000000-abcd"
    _stored_campaigns(home, running)
    campaigns = home / "artifacts" / "campaigns"
    leftover = campaigns / "t-20261205-000001-abcd"
    (leftover / "checkpoints").mkdir(parents=True)
    (leftover / "checkpoints" / "cnn-s0.pt").write_bytes(b"x" * 10)
    elsewhere = campaigns / "t-20261205-000002-abcd"
    elsewhere.mkdir()
    (elsewhere / "manifest.json").write_text("{}")
    (campaigns / "not-an-id").mkdir()

    done = orchard("delete", leftover.name, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"removed what was left of deleted campaign {leftover.name}: 1 file(s), 0.0 MB "
        f"under {leftover}\n"
    )
    assert not leftover.exists()
    for name in (elsewhere.name, "not-an-id", "..", f"{running}/../not-an-id"):
        assert_one_line_error(orchard("delete", name, env=env), f"no campaign {name!r}")
    assert sorted(p.name for p in campaigns.iterdir()) == sorted(
        [running, "not-an-id", elsewhere.name]
    )


def test_delete_removes_a_deleted_campaigns_folder_a_restore_put_back(tmp_path: Path) -> None:
    """The artifact folder restored from a backup taken before a delete: the campaign's
    folder is back, manifest and all, while the store knows it as deleted. Deleting the
    id again removes it; a folder under that id written after the delete (another
    store's campaign's) stays."""
    import shutil

    home = tmp_path / "home"
    env = {"ORCHARD_HOME": str(home)}
    gone = "t-20261205-000001-abcd"
    _stored_campaigns(home, "t-20261205-000000-abcd", gone)
    folder = home / "artifacts" / "campaigns" / gone
    shutil.copytree(folder, tmp_path / "backup")  # file times kept, as cp -a keeps them
    assert orchard("delete", gone, env=env).returncode == 0
    assert not folder.exists()
    shutil.copytree(tmp_path / "backup", folder)  # the restore
    done = orchard("delete", gone, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"removed what was left of deleted campaign {gone}: 2 file(s), 1.5 MB under {folder}\n"
    )
    assert not folder.exists()
    # another store's campaign under that id, submitted an hour after this one was
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    later = time.time() + 3600
    os.utime(folder / "manifest.json", (later, later))
    done = orchard("delete", gone, env=env)
    assert done.returncode == 0 and done.stderr.endswith(": nothing to delete\n"), done.stderr
    assert (folder / "manifest.json").exists()


def test_delete_of_a_campaign_whose_folder_is_a_symlink_touches_nothing_outside(
    tmp_path: Path,
) -> None:
    """A campaign folder moved to another disk and linked back: the delete removes the
    link, never the files it points to (not even the manifest); a link inside a
    campaign's folder goes too, not what it points to (the shared cache)."""
    from db.store import Store

    home = tmp_path / "home"
    env = {"ORCHARD_HOME": str(home)}
    first, linked = "t-20261205-000000-abcd", "t-20261205-000001-abcd"
    _stored_campaigns(home, first, linked)
    campaigns = home / "artifacts" / "campaigns"
    moved = tmp_path / "bigdisk" / linked
    moved.parent.mkdir()
    (campaigns / linked).rename(moved)
    (campaigns / linked).symlink_to(moved)
    before = sorted(p.relative_to(moved).as_posix() for p in moved.rglob("*"))
    assert "manifest.json" in before
    cache = home / "artifacts" / "cache" / "k"
    cache.mkdir(parents=True)
    (cache / "shard-00000.npy").write_bytes(b"shared")
    (campaigns / first / "cache").symlink_to(cache)

    dry = orchard("delete", linked, "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "(CANCELLED)" in dry.stdout and " 0 file(s), 0.0 MB under " in dry.stdout
    done = orchard("delete", linked, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"deleted campaign {linked} (CANCELLED)")
    assert " 0 file(s), 0.0 MB under " in done.stdout
    assert not (campaigns / linked).is_symlink() and not (campaigns / linked).exists()
    assert sorted(p.relative_to(moved).as_posix() for p in moved.rglob("*")) == before

    store = Store(f"sqlite:///{home / 'orchard.db'}")
    store.cancel_campaign(first)
    store.dispose()
    done = orchard("delete", first, env=env)
    assert done.returncode == 0, done.stderr
    assert not (campaigns / first).exists()
    assert (cache / "shard-00000.npy").read_bytes() == b"shared"


@pytest.fixture
def cancelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """ORCHARD_HOME of a store with a RUNNING campaign and a CANCELLED one; the
    cancelled one's id."""
    home = tmp_path / "home"
    monkeypatch.setenv("ORCHARD_HOME", str(home))
    running, cancelled = "t-20261205-000000-abcd", "t-20261205-000001-abcd"
    _stored_campaigns(home, running, cancelled)
    return home, cancelled


def test_delete_whose_manifest_cannot_be_removed_is_finished_by_deleting_again(
    cancelled: tuple[Path, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The store's rows are gone but the manifest stays: the folder's .deleting mark
    says whose it is, so `orchard delete` again removes it (and not another store's
    campaign folder, which has no mark)."""
    from scheduler.cli import main

    home, cancelled = cancelled
    folder = home / "artifacts" / "campaigns" / cancelled
    unlink = Path.unlink

    def refuse_the_manifest(path: Path, missing_ok: bool = False) -> None:
        if path.name == "manifest.json":
            raise PermissionError(13, "Permission denied", str(path))
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse_the_manifest)
    assert main(["delete", cancelled]) == 2
    out, err = capsys.readouterr()
    assert not out and len(err.splitlines()) == 1, err
    assert f"{folder / 'manifest.json'} could not be removed (Permission denied)" in err
    assert f"`orchard delete {cancelled}` removes what is left" in err
    monkeypatch.setattr(Path, "unlink", unlink)
    assert (folder / "manifest.json").exists() and (folder / ".deleting").exists()
    assert main(["delete", cancelled]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"removed what was left of deleted campaign {cancelled}: 2 file(s)")
    assert not folder.exists()


def test_a_delete_killed_before_its_commit_leaves_the_campaign_whole(
    cancelled: tuple[Path, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The mark is written before the rows' commit: a delete stopped there (killed, a
    database gone) leaves the campaign in the store with a marked folder, which a
    delete again removes like any other; a folder the mark cannot be written to
    deletes nothing."""
    from db.store import Store
    from scheduler.cli import main

    home, cancelled = cancelled
    folder = home / "artifacts" / "campaigns" / cancelled
    touch = Path.touch

    def killed_after_marking(path: Path, *args: object, **kwargs: object) -> None:
        touch(path, *args, **kwargs)
        raise KeyboardInterrupt  # as SIGINT between the mark and the commit

    monkeypatch.setattr(Path, "touch", killed_after_marking)
    assert main(["delete", cancelled]) == 130
    store = Store(f"sqlite:///{home / 'orchard.db'}")
    assert store.get_campaign(cancelled).state == "CANCELLED" and store.units(cancelled)
    assert (folder / ".deleting").exists() and (folder / "manifest.json").exists()
    monkeypatch.setattr(Path, "touch", touch)
    assert main(["status", cancelled]) == 0  # the campaign is as it was
    capsys.readouterr()

    def refused(path: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "touch", refused)
    assert main(["delete", cancelled]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"orchard: error: campaign {cancelled}: cannot write {folder / '.deleting'} "
        "(Permission denied), so its folder could not be removed either: nothing deleted"
    )
    assert store.get_campaign(cancelled).state == "CANCELLED" and store.units(cancelled)
    monkeypatch.setattr(Path, "touch", touch)
    assert main(["delete", cancelled]) == 0
    assert not folder.exists()
    with pytest.raises(Exception, match=f"^campaign {cancelled} was deleted"):
        store.get_campaign(cancelled)
    store.dispose()


def test_a_delete_killed_after_deciding_is_finished_by_deleting_again(
    cancelled: tuple[Path, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Killed while its rows go (between batches): the campaign stays DELETING, which
    status shows and resume refuses, and `orchard delete` again finishes it."""
    from db.store import Store
    from scheduler.cli import main

    home, cancelled = cancelled
    folder = home / "artifacts" / "campaigns" / cancelled
    batch = Store._delete_batch

    def killed(*args: object, **kwargs: object) -> bool:
        raise KeyboardInterrupt  # as SIGINT once the campaign is DELETING

    monkeypatch.setattr(Store, "_delete_batch", killed)
    assert main(["delete", cancelled]) == 130
    monkeypatch.setattr(Store, "_delete_batch", batch)
    capsys.readouterr()
    assert main(["status", cancelled, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["campaign"]["state"] == "DELETING" and status["units"]
    being_deleted = (
        f"orchard: error: campaign {cancelled} is being deleted: `orchard delete {cancelled}` "
        "finishes a delete that stopped midway"
    )
    for command in ("resume", "report"):
        assert main([command, cancelled]) == 2
        assert capsys.readouterr().err.strip() == being_deleted
    assert main(["delete", cancelled]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"finished deleting campaign {cancelled}: ")
    assert not folder.exists()
    assert main(["status", cancelled]) == 2


def test_delete_refuses_when_the_artifacts_folder_holds_no_campaigns(tmp_path: Path) -> None:
    """ORCHARD_ARTIFACTS not the folder the campaigns were submitted with (a share not
    mounted on this host): deleting the rows would leave the folder, manifest and all,
    where no `orchard delete` removes it. Nothing is deleted."""
    home = tmp_path / "home"
    running, cancelled = "t-20261205-000000-abcd", "t-20261205-000001-abcd"
    _stored_campaigns(home, running, cancelled)
    env = {"ORCHARD_HOME": str(home), "ORCHARD_ARTIFACTS": str(tmp_path / "unmounted")}
    for args in ((cancelled, "--dry-run"), (cancelled,)):
        assert_one_line_error(
            orchard("delete", *args, env=env),
            f"{tmp_path / 'unmounted' / 'campaigns'} is not there",
            "nothing deleted",
        )
    listed = orchard("status", env={"ORCHARD_HOME": str(home)})
    assert cancelled in listed.stdout
    assert (home / "artifacts" / "campaigns" / cancelled / "manifest.json").exists()


def test_delete_refuses_a_campaign_whose_recorded_folder_is_not_there(tmp_path: Path) -> None:
    """A share that failed to mount over a folder used before: `campaigns/` is there,
    empty. The campaign's manifest is recorded, so it had a folder; deleting its rows
    here would orphan that folder for good. `--without-folder` is for a folder lost."""
    from db.store import Artifact, Store
    from shared.plan import UnitPlan

    home = tmp_path / "home"
    cid = "t-20261205-000001-abcd"
    store = Store(f"sqlite:///{home / 'orchard.db'}")
    store.upgrade()
    manifest = Artifact(f"campaigns/{cid}/manifest.json", "manifest", "a" * 64, 2, cid)
    store.create_campaign(
        cid, name="t", source="t.toml", digest="d", spec={}, classes=["A"],
        units=[UnitPlan(f"{cid}/report", "report", 3, None, {}, "r")], artifacts=[manifest],
    )  # fmt: skip
    store.cancel_campaign(cid)
    store.dispose()
    (home / "artifacts" / "campaigns" / cid).mkdir(parents=True)
    (home / "artifacts" / "campaigns" / cid / "manifest.json").write_text("{}")
    elsewhere = tmp_path / "unmounted"
    (elsewhere / "campaigns").mkdir(parents=True)
    env = {"ORCHARD_HOME": str(home), "ORCHARD_ARTIFACTS": str(elsewhere)}
    for args in ((cid, "--dry-run"), (cid,)):
        assert_one_line_error(
            orchard("delete", *args, env=env),
            f"campaign {cid}: its folder {elsewhere / 'campaigns' / cid} is not there",
            f"nothing deleted. If the folder is gone for good, `orchard delete --without-folder "
            f"{cid}` deletes its records",
        )
    assert cid in orchard("status", env={"ORCHARD_HOME": str(home)}).stdout
    done = orchard("delete", "--without-folder", cid, env=env)
    assert done.returncode == 0 and done.stdout.startswith(f"deleted campaign {cid} (CANCELLED)")
    assert cid not in orchard("status", env={"ORCHARD_HOME": str(home)}).stdout


def test_delete_takes_an_id_given_twice_once_and_a_bad_setting_in_one_line(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    env = {"ORCHARD_HOME": str(home)}
    first, running = "t-20261205-000000-abc0", "t-20261205-000001-abc1"
    units = _stored_campaigns(home, running, first)
    bad = orchard("delete", first, running, env={**env, "ORCHARD_LEASE_SECONDS": "abc"})
    assert_one_line_error(bad, "ORCHARD_LEASE_SECONDS='abc'")
    done = orchard("delete", first, first, env=env)
    assert done.returncode == 0 and not done.stderr
    assert done.stdout.startswith(f"deleted campaign {first} (CANCELLED): {units} unit(s)")
    assert len(done.stdout.splitlines()) == 1


def test_text_an_ascii_stdout_cannot_encode_is_escaped_not_a_crash(tmp_path: Path) -> None:
    from db.store import Store
    from tests.db.test_store import deliver, seed_campaign

    store = Store(f"sqlite:///{tmp_path / 'orchard.db'}")
    store.upgrade()
    (unit, *_) = seed_campaign(store, "t-1")
    deliver(store, unit.key, worker="wörker@höst", task_id="x")
    store.fail_unit(unit.key, "ValueError: café ☕")
    store.dispose()
    env = {"ORCHARD_HOME": str(tmp_path), "PYTHONIOENCODING": "ascii"}
    done = orchard("status", "t-1", env=env)
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert "w\\xf6rker@h\\xf6st" in done.stdout and "caf\\xe9 \\u2615" in done.stdout
    # escaped before the columns are measured: the next column still lines up
    lines = done.stdout.splitlines()
    header, failed = (next(line for line in lines if word in line) for word in ("unit ", "FAILED"))
    column = header.index("  seconds") + 2
    assert failed[column - 2 : column + 1] == "  -", done.stdout


def test_wide_characters_count_as_two_columns_in_plain_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from db.store import Store
    from scheduler.cli import main
    from tests.db.test_store import deliver, seed_campaign

    store = Store(f"sqlite:///{tmp_path / 'orchard.db'}")
    store.upgrade()
    (wide, narrow, *_) = seed_campaign(store, "t-1")
    deliver(store, wide.key, worker="工人@主机", task_id="x")  # 9 columns on a terminal
    deliver(store, narrow.key, worker="worker@h", task_id="y")  # 8
    store.dispose()
    monkeypatch.setenv("ORCHARD_HOME", str(tmp_path))
    assert main(["status", "t-1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    from rich.cells import cell_len

    header = next(line for line in lines if line.startswith("unit "))
    column = header.index("  seconds") + 2  # ASCII up to there
    for worker in ("工人@主机", "worker@h"):
        row = next(line for line in lines if worker in line)
        after = row.index(worker) + len(worker)
        seconds = after + len(row[after:]) - len(row[after:].lstrip())
        assert cell_len(row[:seconds]) == column and row[seconds] == "-", lines


@pytest.mark.parametrize("how", [["--queues", "cpu"], ["--gpus", "0"]])
def test_a_worker_whose_artifacts_lack_a_running_campaign_s_manifest_is_refused(
    tmp_path: Path, how: list[str]
) -> None:
    """Another ORCHARD_ARTIFACTS than the submitter's (a share not mounted): it would take
    the campaign's units and hand every one back; refused before it consumes anything."""
    from db.store import Artifact, Store

    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    running = "t-20261205-000000-abcd"
    _stored_campaigns(home, running)
    store = Store(f"sqlite:///{home / 'orchard.db'}")
    store.record_artifact(
        Artifact(f"campaigns/{running}/manifest.json", "manifest", "0" * 64, 2, running)
    )
    store.dispose()
    env = {"ORCHARD_HOME": str(home), "ORCHARD_ARTIFACTS": str(elsewhere), "ORCHARD_DEVICE": "cpu"}
    done = orchard("worker", *how, env=env)
    assert_one_line_error(
        done,
        f"orchard: error: ORCHARD_ARTIFACTS ({elsewhere}): campaign {running} runs, but its "
        f"manifest {elsewhere / 'campaigns' / running / 'manifest.json'} is not there: a "
        "worker must use the folder the campaigns are submitted with",
    )


def test_resume_refuses_a_campaign_whose_manifest_is_not_there(tmp_path: Path) -> None:
    """Every unit reads the manifest: resumed without it, each one sent came back to its
    queue or failed again. Refused in one line, nothing reset or sent (no broker asked)."""
    from db.store import Artifact, Store

    home = tmp_path / "home"
    cid = "t-20261205-000000-abcd"
    _stored_campaigns(home, cid)
    store = Store(f"sqlite:///{home / 'orchard.db'}")
    store.record_artifact(Artifact(f"campaigns/{cid}/manifest.json", "manifest", "0" * 64, 2, cid))
    store.cancel_campaign(cid)
    states = {u.key: u.state for u in store.units(cid)}
    store.dispose()
    manifest = home / "artifacts" / "campaigns" / cid / "manifest.json"
    manifest.unlink()
    env = {"ORCHARD_HOME": str(home), "ORCHARD_BROKER_URL": "redis://127.0.0.1:1/0"}
    assert_one_line_error(
        orchard("resume", cid, env=env),
        f"orchard: error: campaign {cid}: its manifest {manifest} is not there, and every "
        f"unit reads it: ORCHARD_ARTIFACTS ({home / 'artifacts'}) must be the folder it was "
        "submitted with",
        "nothing sent. If its folder is gone for good, submit the campaign again",
    )
    store = Store(f"sqlite:///{home / 'orchard.db'}")
    assert {u.key: u.state for u in store.units(cid)} == states
    store.dispose()


def test_a_worker_whose_artifact_folder_cannot_be_written_is_refused(tmp_path: Path) -> None:
    """Every unit it took would fail on its first file: refused before it consumes."""
    home, artifacts = tmp_path / "home", tmp_path / "artifacts"
    artifacts.write_text("a file where the folder should be")
    env = {"ORCHARD_HOME": str(home), "ORCHARD_ARTIFACTS": str(artifacts)}
    assert orchard("db", "upgrade", env=env).returncode == 0
    assert_one_line_error(
        orchard("worker", "--queues", "cpu", env=env),
        f"orchard: error: artifact folder {artifacts}: {artifacts} is not a directory",
    )


def test_a_worker_starts_beside_a_running_campaign_whose_manifest_is_missing_everywhere(
    tmp_path: Path,
) -> None:
    """Its folder holds the other campaigns' manifests: the folder is the right one, and
    one campaign's folder was removed by hand (or written by a submitter with another
    ORCHARD_ARTIFACTS). That campaign used to keep every worker of the cluster from
    starting; the worker now says so and starts, for the other campaigns."""

    from db.store import Artifact, Outcome, Store
    from tests.db.test_store import deliver

    home = tmp_path / "home"
    gone, fine = "t-20261205-000000-abcd", "t-20261205-000001-abcd"
    _stored_campaigns(home, gone)
    _stored_campaigns(home, fine)
    store = Store(f"sqlite:///{home / 'orchard.db'}")
    for cid in (gone, fine):
        store.record_artifact(
            Artifact(f"campaigns/{cid}/manifest.json", "manifest", "0" * 64, 2, cid)
        )
    # a unit of the other campaign ran: some worker found its manifest here
    ran = store.units(fine)[0].key
    deliver(store, ran, worker="w", task_id="t", holder="h")
    store.finish_unit(ran, Outcome(0.01), holder="h")
    store.dispose()
    (home / "artifacts" / "campaigns" / gone / "manifest.json").unlink()
    env = {**os.environ, "ORCHARD_HOME": str(home)}
    lines = worker_start_lines(["--queues", "cpu", "--pool", "solo"], env)
    assert lines[-1].startswith("orchard worker: "), lines
    manifest = home / "artifacts" / "campaigns" / gone / "manifest.json"
    assert lines[:-1] == [
        f"orchard: warning: campaign {gone} runs, but its manifest {manifest} is missing, "
        "though ORCHARD_ARTIFACTS holds the other campaigns': its folder was removed, or it "
        "was submitted with another ORCHARD_ARTIFACTS. Its units will fail; `orchard "
        "cancel` it\n"
    ]


@pytest.mark.parametrize(
    ("command", "variable", "value"),
    [
        (("submit", "CAMPAIGN", "--dry-run"), "ORCHARD_MAX_ATTEMPTS", "0"),
        (("submit", "CAMPAIGN"), "ORCHARD_LEASE_SECONDS", "1m"),
        (("worker",), "ORCHARD_VISIBILITY_TIMEOUT", "abc"),
    ],
)
def test_a_bad_reliability_variable_is_told_first_and_creates_nothing(
    tmp_path: Path, tiny_campaign: Path, command: tuple[str, ...], variable: str, value: str
) -> None:
    """A dry run checks it as the submit would (it passed, and the submit then
    refused); a worker on a fresh home says it before "no store yet", not after."""
    home = tmp_path / "home"
    env = {"ORCHARD_HOME": str(home), variable: value}
    env |= {k: "" for k in ("ORCHARD_DATABASE_URL", "ORCHARD_BROKER_URL", "ORCHARD_ARTIFACTS")}
    args = [str(tiny_campaign) if a == "CAMPAIGN" else a for a in command]
    assert_one_line_error(orchard(*args, env=env), f"{variable}={value!r}: expected ")
    assert not home.exists()


def test_submit_wait_ends_with_both_report_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As the demo and `orchard report` print them: the HTML report and its Markdown."""
    from types import SimpleNamespace

    from scheduler.cli import _finish

    html = tmp_path / "campaigns" / "c-1" / "report" / "report.html"
    run = SimpleNamespace(id="c-1", report_path=lambda: html)
    status = SimpleNamespace(campaign=SimpleNamespace(state="DONE"), units=[])
    assert _finish(run, status) == 0
    assert capsys.readouterr().out.splitlines() == [
        "campaign c-1: DONE",
        f"report: {html}",
        f"        {html.with_suffix('.md')}",
    ]


def test_a_worker_warns_of_a_broker_that_evicts_keys(tmp_path: Path) -> None:
    """Redis with maxmemory-policy allkeys-* evicts the queues and the unacknowledged
    messages with the rest once its memory is full: the units wait, and nothing named
    the cause. A worker says so at start; not for Redis's default, noeviction."""
    import shutil
    import socket
    import time

    import redis

    from db.store import Store

    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (the suite needs it, as .ci/run does)")
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
            "--maxmemory",
            "64mb",
            "--maxmemory-policy",
            "allkeys-lru",
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        home = tmp_path / "home"
        Store(f"sqlite:///{home / 'orchard.db'}").upgrade()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("ORCHARD_")},
            "ORCHARD_HOME": str(home),
            "ORCHARD_BROKER_URL": f"redis://127.0.0.1:{port}/0",
        }
        lines = worker_start_lines(["--queues", "cpu", "--pool", "solo"], env)
        assert lines[0] == (
            f"orchard: warning: broker redis://127.0.0.1:{port}/0 evicts keys when its memory "
            "is full (maxmemory-policy allkeys-lru): queued messages would go silently, their "
            "units waiting until an idle worker sends them again; set maxmemory-policy "
            "noeviction (orchard's keys never expire, so a volatile-* policy spares them too)\n"
        )
        assert lines[-1].startswith("orchard worker: queues cpu"), lines
        client.config_set("maxmemory-policy", "noeviction")
        lines = worker_start_lines(["--queues", "cpu", "--pool", "solo"], env)
        assert lines[0].startswith("orchard worker: queues cpu"), lines
    finally:
        client.close()
        server.kill()
        server.wait()
