"""The ``orchard`` command.

    orchard submit FILE [--wait]      validate, record and enqueue a campaign
                  [--reuse]           copy units that already succeeded identically
                  [--dry-run]         check and show the plan; record nothing
    orchard resume ID [--wait]        run again what did not succeed
    orchard cancel ID                 revoke a campaign's pending and running units
    orchard delete ID [ID ...]        finished or cancelled campaigns, their rows and files
    orchard prune                     the preprocessing cache no campaign uses
    orchard status [ID [--watch]]     campaigns (the newest 50; --all), or one campaign's units
                   [--json]           the same as one JSON document
    orchard report ID [--print]       where a campaign's report is (or its Markdown)
    orchard worker --queues Q[,Q]     run a Celery worker for orchard's queues
                   [--concurrency N] [--name NAME] [--loglevel LEVEL]
                   [--pool solo]      one process, no pool: less dispatch time per unit
                   [--without-task-events]   no per-task events until a monitor asks
    orchard worker --gpus all|0,1     one GPU worker process per GPU, supervised
    orchard demo [--campaign FILE]    everything on this machine, no servers needed
                 [--timeout S]
    orchard db upgrade                create or migrate the store's schema

Every user error is one line on stderr (exit 2); no tracebacks. Standard output that
cannot be written (a full disk, a closed descriptor) is one line too (exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TextIO

from scheduler.stopsignals import Stopped, StopSignals, exit_as_main, said_stop
from scheduler.tables import print_table
from scheduler.views import (
    NARROW_DROPS,
    campaign_json,
    campaign_rows,
    print_units,
    rows_of,
    unit_json,
    unit_lines,
    unit_rows,
    units_table,
)
from scheduler.worker_command import POOLS, QUEUES, cmd_worker
from shared.errors import OrchardError, printable, visible_controls
from shared.settings import load_settings, mask_url
from shared.times import as_utc

if TYPE_CHECKING:  # imported where used: a command loads only what it needs
    from db.store import Store, Unit
    from scheduler.run import CampaignRun, CampaignStatus
    from shared.datasets import Skipped
    from shared.plan import UnitPlan
    from shared.spec import Campaign as CampaignSpec

LOGLEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: Campaigns `orchard status` lists without --all, the newest first.
STATUS_SHOWN = 50
CAMPAIGN_ID = "campaign id, as `orchard status` lists it"
#: --wait of submit and resume
FOLLOW_HELP = "follow it until it ends: exit 0 when it ends DONE, 1 when PARTIAL or CANCELLED"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    if sys.stderr is None:
        # fd 2 closed (`2>&-`): print(file=None) writes to stdout, and a script's
        # `ID=$(orchard submit ... 2>&-)` read the error line, or progress, as the id
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the process's life
    stdout = sys.stdout
    # text its encoding lacks (an ASCII or Latin-1 terminal) is escaped, not a crash; no
    # stream (fd 1 closed) or one that cannot be reconfigured is left as it is
    with contextlib.suppress(AttributeError, ValueError, OSError):
        stdout.reconfigure(errors="backslashreplace")
    sys.stdout = _Output(stdout)  # --help too
    signals: StopSignals | None = None
    StopSignals.stopping = False  # a command of its own (tests call main again)
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # the command's own usage, which names its options, not the top level's
            args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if args.run is cmd_worker:  # Celery redirects a worker's stdout itself
            sys.stdout = stdout
        else:
            # SIGTERM and SIGHUP stop a command as Ctrl-C does, its clean-ups run (a
            # worker has Celery's own handlers, the GPU launcher its own)
            signals = StopSignals()
        code = args.run(args)
        if sys.stdout is not None:
            sys.stdout.flush()  # what is still buffered fails here, not in the final flush
        return code
    except OutputError as exc:
        print(f"orchard: error: {exc}", file=sys.stderr)
        return 1
    except OrchardError as exc:
        print(f"orchard: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except StoppedWatching as exc:
        print(f"orchard: {exc}", file=sys.stderr)
        return exc.code
    except (KeyboardInterrupt, Stopped) as exc:
        return said_stop(exc)
    except BrokenPipeError:
        # the reader left (`orchard status | head -1`): stop quietly, as `cat` does;
        # stdout is pointed at /dev/null so the interpreter's final flush fails no more
        _discard(stdout)
        return 141  # 128 + SIGPIPE, as a shell reports a process killed by it
    finally:
        sys.stdout = stdout
        if signals is not None:
            signals.restore()


class StoppedWatching(Exception):  # noqa: N818 - not an error: the user's choice
    """Ctrl-C, SIGTERM or SIGHUP while a command followed a campaign (``--wait``,
    ``status --watch``): the watching stops, the campaign does not."""

    def __init__(self, campaign_id: str, signum: int) -> None:
        super().__init__(
            f"stopped watching; campaign {campaign_id} goes on (`orchard status "
            f"{campaign_id} --watch` follows it, `orchard cancel {campaign_id}` stops it)"
        )
        self.code = 128 + signum  # as a shell reports a process the signal ended


class StoppedAfterRecording(StoppedWatching):
    """Ctrl-C, SIGTERM or SIGHUP once the submit had recorded the campaign: its id went
    to stdout, and this line says what to do (not a second submit)."""

    def __init__(self, campaign_id: str, signum: int) -> None:
        Exception.__init__(
            self,
            f"stopped; campaign {campaign_id} IS recorded, but what it has ready may not "
            f"all be sent: `orchard resume {campaign_id}` sends the rest (do not submit it "
            "again)",
        )
        self.code = 128 + signum


@contextlib.contextmanager
def _watching(campaign_id: str) -> Iterator[None]:
    """Around following a campaign: Ctrl-C, SIGTERM and SIGHUP stop the following alone,
    saying so and that the campaign goes on."""
    signals = StopSignals()
    try:
        yield
    except KeyboardInterrupt:
        raise StoppedWatching(campaign_id, signal.SIGINT) from None
    except Stopped as exc:
        raise StoppedWatching(campaign_id, exc.signum) from None
    finally:
        signals.restore()


class OutputError(OrchardError):
    """Standard output cannot be written: a full disk (``>/dev/full``), a closed
    descriptor (``>&-``), an I/O error. Told apart from the command's own errors."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"cannot write to {where}: {reason}")
        self.where = where
        self.reason = reason


class _Output:
    """``sys.stdout`` for a command: a write that fails raises :class:`OutputError`
    (a closed pipe stays ``BrokenPipeError``), once; what follows is discarded."""

    def __init__(self, stream: TextIO | None) -> None:  # None: fd 1 closed
        self._stream = stream
        self._failed = False

    def write(self, text: str) -> int:
        return self._do("write", text)

    def flush(self) -> None:
        self._do("flush")

    def _do(self, method: str, *args: str) -> Any:  # noqa: ANN401 - write's or flush's
        if self._failed:
            return len(args[0]) if args else None
        try:
            if self._stream is None:
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))
            return getattr(self._stream, method)(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            self._failed = True
            where = "standard output" + _stdout_target(self._stream)
            _discard(self._stream)
            raise OutputError(where, exc.strerror or str(exc)) from None

    def isatty(self) -> bool:
        return self._stream is not None and self._stream.isatty()

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - encoding, fileno, ...
        if self._stream is None:
            raise AttributeError(name)
        return getattr(self._stream, name)


def _stdout_target(stream: TextIO | None) -> str:
    """`` (/dev/full)``: the file standard output is, where the system says so."""
    try:
        target = os.readlink(f"/proc/self/fd/{stream.fileno()}")
    except (AttributeError, OSError, ValueError):
        return ""
    return f" ({target})" if target.startswith("/") else ""


def _discard(stream: TextIO | None) -> None:
    """Point ``stream``'s descriptor at /dev/null, so that the interpreter's final flush
    of what is still buffered does not fail again."""
    if stream is None:
        return
    try:
        fd = stream.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
    except (AttributeError, OSError, ValueError):
        return
    os.dup2(null, fd)
    os.close(null)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchard", description="Distributed image-grading training campaigns."
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    p = commands.add_parser(
        "submit",
        help="submit a campaign file",
        description="Validate a campaign file, record the campaign and its units in the "
        "store, and enqueue its first stage; prints the campaign id.",
    )
    p.add_argument("file", type=Path, help="campaign file (TOML)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--wait", action="store_true", help=FOLLOW_HELP)
    p.add_argument(
        "--reuse",
        action="store_true",
        help="copy model units that already succeeded in an earlier campaign with the same "
        "data, folds, seed and parameters instead of running them again",
    )
    how.add_argument(
        "--dry-run",
        action="store_true",
        help="check the file and its data as a submit does and print the units it would run, "
        "per stage and family; records, sends and writes nothing",
    )
    p.add_argument(
        "--id",
        metavar="ID",
        dest="campaign_id",
        help="the campaign's id (lowercase letters, digits, '-', '_', the first a letter or "
        "a digit; 80 at most) instead of "
        "one made from its name and the time: a submit retried with the same id and the "
        "same campaign submits nothing again and prints that id",
    )
    p.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=None,
        metavar="SECONDS",
        help="with --wait: stop following after this many seconds, exit 124 (the campaign goes on)",
    )
    p.set_defaults(run=cmd_submit)

    p = commands.add_parser(
        "resume",
        help="re-enqueue a campaign's units that did not succeed",
        description="Send again every unit of a campaign that is not in SUCCESS (failed, "
        "cancelled, lost); attempts start over, CNN folds continue from their checkpoints, "
        "and the report is written again.",
    )
    p.add_argument("campaign", help=CAMPAIGN_ID)
    p.add_argument("--wait", action="store_true", help=FOLLOW_HELP)
    p.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=None,
        metavar="SECONDS",
        help="with --wait: stop following after this many seconds, exit 124 (the campaign goes on)",
    )
    p.set_defaults(run=cmd_resume)

    p = commands.add_parser(
        "cancel",
        help="cancel campaigns: revoke their pending/running units",
        description="Mark a campaign and its unfinished units CANCELLED and revoke their "
        "tasks: queued ones are discarded, running ones terminated (prefork workers) or "
        "stopped at their next epoch (GPU workers); on a `--pool solo` CPU worker a running "
        "unit goes on to its end or its next call to the store. Each campaign named is "
        "cancelled on its own: one refused stops no other.",
    )
    p.add_argument("campaigns", nargs="+", metavar="campaign", help=CAMPAIGN_ID)
    p.set_defaults(run=cmd_cancel)

    p = commands.add_parser(
        "delete",
        help="delete finished or cancelled campaigns and their files",
        description="Delete campaigns that are finished or cancelled: their records in the "
        "store and their folder under ORCHARD_ARTIFACTS/campaigns (manifest, models, "
        "checkpoints, PCA bases, report). The preprocessing cache and generated datasets, "
        "shared by campaigns over the same images, stay. Refused for a campaign that "
        "runs, one cancelled while units ran less than two lease periods ago "
        "(2 x ORCHARD_LEASE_SECONDS, 2 min by default), and one whose results another "
        "campaign reuses (`submit --reuse`).",
    )
    p.add_argument("campaigns", nargs="+", metavar="campaign", help=CAMPAIGN_ID)
    p.add_argument(
        "--dry-run", action="store_true", help="say what would be deleted; delete nothing"
    )
    p.add_argument(
        "--without-folder",
        action="store_true",
        help="delete the records of a campaign whose folder is gone for good (refused "
        "without it: the folder may be on a share not mounted here)",
    )
    p.set_defaults(run=cmd_delete)

    p = commands.add_parser(
        "prune",
        help="remove the preprocessing cache that no campaign uses",
        description="Remove the preprocessing cache folders (ORCHARD_ARTIFACTS/cache/KEY) "
        "that no campaign in the store uses, with their records: the decoded images of "
        "campaigns since deleted. Refused while a campaign runs.",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="say what would be removed; remove nothing"
    )
    p.set_defaults(run=cmd_prune)

    p = commands.add_parser(
        "status",
        help="list campaigns, or show one campaign's units",
        description="List the campaigns in the store (id, name, state, units succeeded/total, "
        "failed, cancelled, running, created), or one campaign's units (state, tries, worker, "
        "seconds, validation accuracy, the epoch of a running CNN fold). Piped, it prints "
        "plain columns.",
    )
    p.add_argument(
        "campaign",
        nargs="?",
        help=CAMPAIGN_ID + "; without it, the list of campaigns (newest first)",
    )
    p.add_argument(
        "--watch",
        "--wait",
        action="store_true",
        help="refresh until the campaign finishes (needs its id); exit 0 whatever state it ends in",
    )
    p.add_argument(
        "--all",
        action="store_true",
        help=f"list every campaign (without it, the newest {STATUS_SHOWN}); not with an id",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document instead of a table (with --watch: once, at the end)",
    )
    p.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=None,
        metavar="SECONDS",
        help="with --watch: stop following after this many seconds, exit 124 (the campaign "
        "goes on)",
    )
    p.set_defaults(run=cmd_status)

    p = commands.add_parser(
        "report",
        help="show where a campaign's report is",
        description="Print the paths of a campaign's report.html and report.md, or the "
        "Markdown report itself (--print).",
    )
    p.add_argument("campaign", help=CAMPAIGN_ID)
    p.add_argument("--print", action="store_true", help="print the Markdown report")
    p.set_defaults(run=cmd_report)

    p = commands.add_parser(
        "worker",
        help="run a Celery worker",
        description="Run a Celery worker for orchard's queues (cpu,preprocess,report by "
        "default), or with --gpus one supervised GPU worker process per GPU. It checks the "
        "store and the broker first, and stops with one line if either is unusable.",
    )
    p.add_argument(
        "--queues",
        "-Q",
        default=None,
        help="comma-separated, of: " + ", ".join(QUEUES) + " (default cpu,preprocess,report; "
        "gpu with --gpus)",
    )
    p.add_argument(
        "--concurrency",
        "-c",
        type=_positive_int,
        default=None,
        metavar="N",
        help="child processes of a prefork worker (default: the number of CPUs); solo-pool "
        "and GPU workers run one task at a time",
    )
    p.add_argument(
        "--pool",
        choices=POOLS,
        default=None,
        help="prefork (default for cpu/preprocess/report: a killed child's unit is "
        "requeued at once) or solo (one task at a time in the worker process itself: "
        "~0.7 ms less per unit, but the unit of a killed worker is sent again by the other "
        "workers about two lease periods (2 x ORCHARD_LEASE_SECONDS, 2 min by default) "
        "after its last heartbeat, and `orchard cancel` cannot stop a unit it runs); GPU "
        "workers always use solo",
    )
    p.add_argument(
        "--without-task-events",
        action="store_true",
        help="send no task events until a monitor enables them (Flower does, every few "
        "seconds): ~0.5 ms less per unit on a prefork worker; Flower misses the tasks "
        "that ran before it enabled them",
    )
    p.add_argument(
        "--name",
        "-n",
        type=_node_name,
        default=None,
        help="Celery node name (default <queue>-<pid>@%%h: the first queue, this process's "
        "id and the host name)",
    )
    p.add_argument(
        "--gpus",
        default=None,
        metavar="all|0,1",
        help="one worker process per GPU (CUDA_VISIBLE_DEVICES=<i>, node gpu<i>-<pid>@%%h, "
        "one task at a time); the ids must name GPUs that are there, unless "
        "ORCHARD_DEVICE=cpu (then they only count workers)",
    )
    p.add_argument(
        "--loglevel",
        "-l",
        type=str.upper,
        choices=LOGLEVELS,
        default="INFO",
        metavar="LEVEL",
        help=f"Celery log level: {', '.join(LOGLEVELS)} (default INFO)",
    )
    p.set_defaults(run=cmd_worker)

    p = commands.add_parser(
        "demo",
        help="run the quick campaign on this machine alone",
        description="Run a campaign on this machine alone: creates the store, starts two "
        "workers of its own (gpu; cpu,preprocess,report), submits the campaign, shows its "
        "progress, prints where the report is and stops the workers. With the default "
        "settings it needs no Redis and no database server.",
    )
    p.add_argument(
        "--campaign",
        type=Path,
        default=None,
        metavar="FILE",
        help="campaign file (default campaigns/quick.toml)",
    )
    p.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=600.0,
        metavar="SECONDS",
        help="give up after this many seconds (default 600), cancelling the campaign: exit 1",
    )
    p.set_defaults(run=cmd_demo)

    p = commands.add_parser(
        "db",
        help="store administration",
        description="Store administration: `orchard db upgrade` creates the store's schema, "
        "or migrates it to the newest one.",
    )
    p.add_argument(
        "action",
        choices=["upgrade"],
        metavar="ACTION",
        help="upgrade: create or migrate the schema",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="migrate even while units run (their workers' code was written for the old schema)",
    )
    p.set_defaults(run=cmd_db)
    for command in commands.choices.values():  # for its own usage line (see main)
        command.set_defaults(parser=command)
    return parser


def _positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds greater than 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds greater than 0, got {text!r}"
        )
    return value


#: The %-abbreviations a Celery node name may hold (celery.utils.nodenames.host_format).
NODE_NAME_FORMATS = "%h (host name), %n (its first part), %d (domain), %i, %I (process index), %%"


def _node_name(text: str) -> str:
    """An argparse type: a Celery node name, NAME@HOST, that Celery can expand (it would
    stop the worker with a traceback at start-up otherwise)."""
    from celery.utils.nodenames import default_nodename, host_format
    from celery.utils.text import RE_FORMAT

    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(
            f"{printable(text)}: not UTF-8 text (a node name is sent to the broker)"
        ) from None
    if (shown := visible_controls(text)) != text:
        # every `orchard status` prints it: one with ESC sequences would act there
        raise argparse.ArgumentTypeError(
            f"{shown}: holds control characters; a node name is printed by `orchard status`"
        )
    try:
        host_format(default_nodename(text))
    except ValueError:
        keys = {"h", "n", "d", "i", "I", "%"}
        unknown = next((m.group(0) for m in RE_FORMAT.finditer(text) if m[1] not in keys), "%")
        raise argparse.ArgumentTypeError(
            f"{text!r}: {unknown} is not a node-name abbreviation; use {NODE_NAME_FORMATS} "
            "(a literal %)"
        ) from None
    return text


def _positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


# ---------------------------------------------------------------- commands


def _store(*, check: bool = True, existing: bool = False) -> Store:
    """The store of ORCHARD_DATABASE_URL; ``existing``: refuse to create a SQLite file
    (a command that only reads or changes what is there)."""
    from db.store import Store

    url = load_settings().database_url
    _check_database_url(url)
    if existing:
        _require_sqlite_file(url)
    store = Store(url)
    if check:
        store.check_schema()
    return store


def _check_database_url(url: str) -> None:
    from db.urls import check_database_url  # SQLAlchemy only for the commands that need it

    check_database_url(url)


def _require_sqlite_file(url: str) -> None:
    from db.urls import require_sqlite_file

    require_sqlite_file(url)


def _check_urls() -> None:
    """Both URLs, before a command opens anything (else a traceback from SQLAlchemy or
    kombu, deep inside)."""
    from workers.config import check_broker_url

    settings = load_settings()
    _check_database_url(settings.database_url)
    check_broker_url(settings.broker_url)


def _check_campaign_id(campaign_id: str) -> None:
    """A campaign id that is not UTF-8 text (bytes from a shell's ``$'\\xff'``) cannot be
    in any store: one line, before the store is asked (its driver cannot encode it)."""
    try:
        campaign_id.encode("utf-8")
    except UnicodeEncodeError:
        raise OrchardError(
            f"no campaign {printable(campaign_id)}: a campaign id is UTF-8 text, as "
            "`orchard status` lists it"
        ) from None


def _check_reliability() -> None:
    """ORCHARD_LEASE_SECONDS, ORCHARD_MAX_ATTEMPTS, ORCHARD_VISIBILITY_TIMEOUT: one line
    for a bad one before anything else is looked at (a dry run checks what a submit
    does)."""
    from workers.config import reliability

    reliability()


def cmd_submit(args: argparse.Namespace) -> int:
    from scheduler.api import NotSentError, check_chosen_id, submit

    _timeout_needs(args, "wait")
    if args.dry_run:
        if args.reuse:
            raise OrchardError(
                "--dry-run records nothing, so --reuse has nothing to copy into: leave one out"
            )
        _check_urls()  # their syntax: a dry run connects to neither
        _check_reliability()
        if args.campaign_id is not None:
            check_chosen_id(args.campaign_id)
        return _dry_run(args.file)
    _check_urls()
    _check_reliability()
    try:
        run = submit(args.file, reuse=args.reuse, campaign_id=args.campaign_id)
    except (KeyboardInterrupt, Stopped) as exc:
        recorded = getattr(exc, "campaign_id", None)
        if recorded is None:
            raise  # nothing recorded: a submit again is the thing to do
        with contextlib.suppress(OutputError, BrokenPipeError):
            print(recorded, flush=True)
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        raise StoppedAfterRecording(recorded, signum) from None
    except NotSentError as exc:
        # recorded: its id on stdout, as for a submit that went through, so that a
        # script resumes it rather than submitting it again (a stdout that cannot take
        # it must not hide the line that says so)
        with contextlib.suppress(OutputError, BrokenPipeError):
            print(exc.campaign_id, flush=True)
        raise
    try:
        print(run.id, flush=True)
    except (OutputError, BrokenPipeError) as exc:
        # recorded and enqueued already: a second submit would run it twice
        where, reason = (
            (exc.where, exc.reason)
            if isinstance(exc, OutputError)
            else ("standard output", "its reader has left (a closed pipe)")
        )
        print(
            f"orchard: error: campaign {run.id} WAS submitted (recorded and enqueued), but its "
            f"id could not be written to {where}: {reason}; do not submit it again: "
            f"`orchard status {run.id}` follows it",
            file=sys.stderr,
        )
        if isinstance(exc, BrokenPipeError):
            raise  # exit 141, as for every command whose reader left
        return 1
    if run.resubmitted is not None:
        earlier = run.resubmitted
        when = f"{as_utc(earlier.created_at):%Y-%m-%d %H:%M:%S} UTC"
        print(
            f"orchard: campaign {run.id} was submitted already, at {when}, and is "
            f"{earlier.state}: nothing submitted again",
            file=sys.stderr,
        )
    else:
        _warn_skipped(run)
    if args.reuse:
        print(f"reused {len(run.reused)} finished unit(s) from earlier campaigns", file=sys.stderr)
    if not args.wait:
        return 0
    with _watching(run.id):
        status = run.wait(args.timeout, progress=True, on_stall=_warn_stall)
    return _finish(run, status)


def _timeout_needs(args: argparse.Namespace, flag: str) -> None:
    if args.timeout is not None and not getattr(args, flag):
        raise OrchardError(f"--timeout is how long --{flag} follows the campaign: give both")


def cmd_resume(args: argparse.Namespace) -> int:
    from scheduler.api import resume

    _timeout_needs(args, "wait")
    _check_campaign_id(args.campaign)
    _check_urls()
    _require_sqlite_file(load_settings().database_url)
    run, reset = resume(args.campaign)
    if not reset:
        status = run.status()
        running = status.counts()["RUNNING"]  # left alone: their workers are alive
        why = f"{running} unit(s) still running" if running else "every unit succeeded"
        print(f"campaign {run.id} is {status.campaign.state}: {why}, nothing to re-enqueue")
        if not (args.wait and status.campaign.state == "RUNNING"):
            return 0
    else:
        units = [key for key in reset if key != f"{run.id}/report"]
        report = ", and its report" if len(units) < len(reset) else ""
        if units:  # failed, cancelled or lost, or a shard whose file is damaged
            print(f"campaign {run.id}: re-enqueued {len(units)} unit(s){report}")
        else:
            print(f"campaign {run.id}: re-enqueued its report")
    if not args.wait:
        return 0
    # what runs still, too: --wait ends with the campaign, whatever was sent again
    with _watching(run.id):
        status = run.wait(args.timeout, progress=True, on_stall=_warn_stall)
    return _finish(run, status)


def cmd_cancel(args: argparse.Namespace) -> int:
    from db.store import NotFoundError
    from scheduler.api import cancel

    campaign_ids = list(dict.fromkeys(args.campaigns))  # an id given twice is cancelled once
    for campaign_id in campaign_ids:
        _check_campaign_id(campaign_id)
    _check_urls()
    _require_sqlite_file(load_settings().database_url)
    refused = 0
    for campaign_id in campaign_ids:  # each on its own: one refusal stops no other
        try:
            outcome = cancel(campaign_id)
        except NotFoundError as exc:  # anything else (the store, the broker) fails them all
            print(f"orchard: error: {exc}", file=sys.stderr)
            refused += 1
            continue
        if outcome.already_finished:
            # what a cancel asks holds already: a script's retried cancel is no failure
            print(
                f"orchard: campaign {campaign_id} is already {outcome.state}: nothing to cancel",
                file=sys.stderr,
            )
            continue
        print(
            f"campaign {campaign_id}: CANCELLED ({outcome.units} unit(s) stopped, "
            f"{len(outcome.task_ids)} task(s) revoked)"
        )
    return 2 if refused else 0


def cmd_delete(args: argparse.Namespace) -> int:
    from db.store import DELETING, CampaignDeletedError, NotFoundError, StoreError
    from scheduler.cleanup import delete
    from workers.config import reliability

    campaign_ids = list(dict.fromkeys(args.campaigns))  # an id given twice is deleted once
    for campaign_id in campaign_ids:
        _check_campaign_id(campaign_id)
    url = load_settings().database_url
    _check_database_url(url)
    _require_sqlite_file(url)
    reliability()  # a bad ORCHARD_LEASE_SECONDS: one line, not one per id
    refused = 0
    for campaign_id in campaign_ids:  # each on its own: one refusal stops no other
        try:
            done = delete(campaign_id, dry_run=args.dry_run, without_folder=args.without_folder)
        except CampaignDeletedError as exc:
            # what was asked is so (a delete retried after it was stopped): no failure
            print(f"orchard: {exc}: nothing to delete", file=sys.stderr)
            continue
        except OrchardError as exc:
            if isinstance(exc, StoreError) and not isinstance(exc, NotFoundError):
                raise  # the store itself: every other id would fail the same way
            print(f"orchard: error: {exc}", file=sys.stderr)
            refused += 1
            continue
        verb = "would delete" if done.dry_run else "deleted"
        files = f"{done.files} file(s), {_megabytes(done.size)} under {done.folder}"
        if done.state is None:
            verb = "would remove" if done.dry_run else "removed"
            print(f"{verb} what was left of deleted campaign {campaign_id}: {files}")
        elif done.state == DELETING:  # a delete that stopped midway
            verb = "would finish" if done.dry_run else "finished"
            print(f"{verb} deleting campaign {campaign_id}: {done.units} unit(s), {files}")
        else:
            print(f"{verb} campaign {campaign_id} ({done.state}): {done.units} unit(s), {files}")
    return 2 if refused else 0


def cmd_prune(args: argparse.Namespace) -> int:
    from scheduler.cleanup import prune_cache

    url = load_settings().database_url
    _check_database_url(url)
    _require_sqlite_file(url)
    pruned = prune_cache(dry_run=args.dry_run)
    verb = "would remove" if pruned.dry_run else "removed"
    for folder, files, size in pruned.folders:
        print(f"{verb} {folder}: {files} file(s), {_megabytes(size)}")
    total = sum(size for _, _, size in pruned.folders)
    kept = [f"{pruned.kept - pruned.unknown - pruned.foreign} that campaigns in the store use"]
    if pruned.foreign:
        kept.append(f"{pruned.foreign} that only another store's campaigns use")
    if pruned.unknown:
        kept.append(f"{pruned.unknown} it has no record of")
    said = kept[0] if len(kept) == 1 else ", ".join(kept[:-1]) + " and " + kept[-1]
    print(f"{verb} {len(pruned.folders)} cache folder(s), {_megabytes(total)}; kept {said}")
    for folders, what in (
        (
            pruned.unrecorded_campaigns,
            "campaign folder(s) of no campaign in this store, with the caches they read "
            "(another store's, sharing ORCHARD_ARTIFACTS, or written after the store's "
            "backup was taken: remove those by hand once sure)",
        ),
        (
            pruned.deleted_campaigns,
            "folder(s) of campaigns this store deleted, put back by a restore (`orchard "
            "delete ID` removes each)",
        ),
    ):
        if folders:
            shown = ", ".join(_shown(folder) for folder in folders[:10])
            more = f" and {len(folders) - 10} more" if len(folders) > 10 else ""
            print(f"left {len(folders)} {what}: {shown}{more}")
    if pruned.unfinished:
        left = sum(size for _, size in pruned.unfinished)
        print(
            f"{verb} {len(pruned.unfinished)} unfinished shard write(s) in the cache folders "
            f"kept, {_megabytes(left)} (left by workers killed as they wrote)"
        )
    for found, what, why in (
        (pruned.unfinished_datasets, "unfinished generated dataset(s)", "as they generated"),
        (pruned.unfinished_campaigns, "campaign folder(s) of no campaign", "before they recorded"),
    ):
        if found:
            left = sum(size for _, _, size in found)
            print(
                f"{verb} {len(found)} {what}, {_megabytes(left)} (left by submits killed "
                f"{why} them): " + ", ".join(str(folder) for folder, _, _ in found)
            )
    for campaign_id in pruned.late:
        print(
            f"orchard: warning: campaign {campaign_id} was submitted during the prune and "
            f"reads a cache it removed: `orchard resume {campaign_id}` decodes it again if "
            "its units fail",
            file=sys.stderr,
        )
    return 0


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def _dry_run(path: Path) -> int:
    """``submit --dry-run``: the campaign's data and units, per stage and family."""
    from rich.console import Console

    from scheduler.api import plan
    from shared.memory import about

    planned = plan(path)
    campaign, manifest = planned.campaign, planned.manifest
    splits = Counter(e.split for e in manifest.entries)
    where = ", ".join(f"{split} {count:,}" for split, count in splits.items())
    if campaign.validation == "dev":
        scheme = "validation on the dev split"
    elif campaign.validation == "oob":
        scheme = "validation out of bag"
    else:
        scheme = f"{campaign.folds}-fold stratified cross-validation (seed {campaign.seed})"
    title = (
        f"{_shown(path)}: campaign {campaign.name}, {len(manifest.entries):,} images "
        f"({where}), {scheme}"
    )
    memory, gpu = planned.unit_memory(), planned.gpu_memory()
    rows = _plan_rows(campaign, planned.units, memory, gpu)
    print_table(Console(), title, _PLAN_COLUMNS, rows)
    largest = max(planned.units, key=lambda u: memory[u.key])
    print(
        f"{len(planned.units):,} units in all; nothing was recorded, sent or written "
        "(submit without --dry-run to run it)"
    )
    print(
        f"memory: the largest unit, {largest.key}, holds {about(memory[largest.key])} in "
        "its worker process, beside the process's own "
        "(0.2 GB; 1-2 GB with torch); a prefork worker holds that in each of its "
        "--concurrency processes"
    )
    if gpu:
        fold = max(gpu, key=lambda key: gpu[key])
        batch = next(u.params["batch_size"] for u in planned.units if u.key == fold)
        print(
            f"GPU: the largest CNN fold, {fold}, holds {about(gpu[fold])} on its GPU: its "
            f"images, the network, and a training batch of {batch} images' activations "
            "(a smaller [cnn] batch_size needs less)"
        )
    _warn_about(manifest.skipped)
    return 0


_PLAN_COLUMNS = ("Stage", "Family", "Units", "Queue", "Memory", "What")


def _plan_rows(
    campaign: CampaignSpec,
    units: Sequence[UnitPlan],
    memory: dict[str, int],
    gpu: dict[str, int],
) -> list[list[str]]:
    """One row per (stage, family) in stage order: its units, queue, the most memory one
    of them holds in its worker process (and a CNN fold's images on its GPU), and what
    they are."""
    from shared.memory import gigabytes
    from shared.plan import MERGE, PREPROCESS, REPORT, TRAIN

    stages = {PREPROCESS: "preprocess", TRAIN: "models", MERGE: "merge", REPORT: "report"}
    groups: dict[tuple[int, str], list[UnitPlan]] = {}
    for unit in units:
        groups.setdefault((unit.stage, unit.family), []).append(unit)
    rows = []
    for (stage, family), members in sorted(groups.items(), key=lambda kv: kv[0][0]):
        queues = ", ".join(sorted({u.queue for u in members}))
        most = gigabytes(max(memory[u.key] for u in members))
        if on_gpu := [gpu[u.key] for u in members if u.key in gpu]:
            most += f", GPU {gigabytes(max(on_gpu))}"
        what = _plan_what(campaign, members)
        rows.append([stages[stage], family, f"{len(members):,}", queues, most, what])
    return rows


def _plan_what(campaign: CampaignSpec, members: Sequence[UnitPlan]) -> str:
    from shared.plan import MERGE

    family = members[0].family
    if family == "preprocess":
        return f"shards of up to {campaign.preprocessing.shard_size} images"
    if family == "report":
        return "the report, once every other unit has finished"
    # a tree shard's key is its forest's and /t<i>: a point is a forest's hash
    forests = {u.key.rsplit("/", 1)[0] if family == "rf_shard" else u.key for u in members}
    points = len({key.rsplit("/", 2)[-2] for key in forests})
    folds = len({u.fold for u in members})
    what = f"{points:,} point{'s' * (points != 1)} x {folds} fold{'s' * (folds != 1)}"
    if family == "rf_shard":
        shards = Counter(u.key.rsplit("/", 1)[0] for u in members)
        counts = " or ".join(str(n) for n in sorted(set(shards.values())))
        return f"{what}, {counts} tree shards each"
    if members[0].stage == MERGE:
        return f"{what}, each merging its tree shards into one forest"
    searches = {json.dumps(u.params.get("search"), sort_keys=True) for u in members}
    if len(searches) == 1 and searches != {"null"}:
        search = json.loads(searches.pop())
        combinations = math.prod(len(v) for k, v in search.items() if k != "folds")
        what += f"; each searches {combinations:,} combinations on {search['folds']} folds"
    elif len(searches) > 1:
        what += "; each with its own [svm.search]"
    return what


def _warn_skipped(run: CampaignRun, shown: int = 5) -> None:
    """One warning line for the unusable images skipped, each with its reason, and one for
    the images in a split's folder that no CSV lists, ignored (the report lists them all)."""
    from shared.manifest import Manifest, manifest_path

    path = manifest_path(run.settings.artifacts / "campaigns" / run.id)
    _warn_about(Manifest.from_json(path.read_text(encoding="utf-8"), str(path)).skipped, shown)


def _warn_about(skipped: Sequence[Skipped], shown: int = 5) -> None:
    # a dataset's file names are anyone's: shown, not obeyed, by the terminal
    unusable = [
        f"{_shown(s.path)}: {visible_controls(s.reason)}" for s in skipped if not s.unlisted
    ]
    unlisted = [_shown(s.path) for s in skipped if s.unlisted]
    if unusable:
        _warn_images(f"{_images(len(unusable), 'unusable image')} skipped", unusable, shown)
    if unlisted:
        what = f"{_images(len(unlisted), 'image')} not listed in any split's CSV, ignored"
        _warn_images(what, unlisted, shown)


def _shown(path: str | Path) -> str:
    """A path as a line shows it: bytes that are not UTF-8 and control characters
    written as escapes."""
    return visible_controls(printable(path))


def _images(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _warn_images(what: str, items: list[str], shown: int) -> None:
    more = f"; and {len(items) - shown} more (see the report)" if len(items) > shown else ""
    print(f"orchard: warning: {what}: {'; '.join(items[:shown])}{more}", file=sys.stderr)


def _warn_stall(line: str) -> None:
    print(f"orchard: warning: {line}", file=sys.stderr)


def _warn_damaged_report(campaign_id: str, damaged: list[Path]) -> None:
    names = [_shown(path) for path in damaged[:3]]
    more = f" and {len(damaged) - 3} more" if len(damaged) > 3 else ""
    print(
        f"orchard: warning: campaign {campaign_id}: its report's {', '.join(names)}{more} "
        f"{'is' if len(damaged) == 1 else 'are'} missing or changed since its report unit "
        f"wrote {'it' if len(damaged) == 1 else 'them'}: `orchard resume {campaign_id}` "
        "writes the report again",
        file=sys.stderr,
    )


def _warn_killed(run: CampaignRun, units: Sequence[Unit]) -> None:
    """One line for the units that failed because no delivery ended in a result (an OOM
    kill, most often), naming the one that holds the most memory by ``shared.memory``'s
    estimate, where the campaign's manifest is on this host."""
    from db.store import NO_RESULT
    from shared.memory import about

    # and as earlier orchards recorded it
    said = (NO_RESULT, "the worker was lost each time")
    killed = [u for u in units if u.state == "FAILED" and any(s in (u.error or "") for s in said)]
    if not killed:
        return
    memory = run.unit_memory()
    most = max(killed, key=lambda u: memory.get(u.key, 0))
    held = ""
    if memory.get(most.key):
        which = f"the largest of them, {most.key}," if len(killed) > 1 else most.key
        held = (
            f"; {which} holds {about(memory[most.key])} in its worker process by orchard's estimate"
        )
    count = f"{len(killed)} unit{'s' if len(killed) > 1 else ''}"
    print(
        f"orchard: warning: campaign {run.id}: {count} failed with no delivery ending in "
        f"a result (a worker killed, by the OOM killer most often, or the database away)"
        f'{held}: see the README, "How much memory a worker needs"',
        file=sys.stderr,
    )


def _finish(run: CampaignRun, status: CampaignStatus) -> int:
    print(f"campaign {run.id}: {status.campaign.state}")
    report = run.report_path()
    if report is not None:  # both, as the demo and `orchard report` print them
        print(f"report: {report}")
        print(f"        {report.with_suffix('.md')}")
    for unit in status.units:
        if unit.state == "FAILED":
            print(f"  failed {unit.key}: {visible_controls(unit.error or '')}", file=sys.stderr)
    _warn_killed(run, status.units)
    return 0 if status.campaign.state == "DONE" else 1


def cmd_status(args: argparse.Namespace) -> int:
    if args.watch and args.campaign is None:
        raise OrchardError("--watch follows one campaign: give its id, `orchard status ID --watch`")
    if args.all and args.campaign is not None:
        raise OrchardError(
            "--all lists every campaign: give no id with it (`orchard status --all`)"
        )
    _timeout_needs(args, "watch")
    if not args.watch:
        return _status(args)
    # from the start: a stop while the store opens leaves the campaign going on too
    with _watching(args.campaign):
        return _status(args)


def _status(args: argparse.Namespace) -> int:
    from rich.console import Console

    if args.campaign is not None:
        _check_campaign_id(args.campaign)
    store = _store(existing=True)
    console = Console()
    if args.json:
        return _status_json(store, args)
    if args.campaign is None:
        shown = store.list_campaigns(limit=None if args.all else STATUS_SHOWN)
        if not shown:
            print(f"no campaigns in {mask_url(store.url)}")
            return 0
        older = 0 if args.all else max(0, store.count_campaigns() - len(shown))
        print_table(console, *campaign_rows(store, shown), whole="id", drops=NARROW_DROPS)
        if older:
            print(
                f"... {older} older campaign(s) not shown; --all lists every one",
                file=sys.stderr,
            )
        return 0
    from scheduler.api import CampaignRun

    run = CampaignRun(args.campaign, store, load_settings())
    if not args.watch:
        campaign, lines = unit_lines(store, args.campaign)
        print_units(console, rows_of(campaign, lines))
        # the state read with the units (run.status() would read every unit again)
        if campaign.state == "RUNNING" and (line := run.stalled()):
            _warn_stall(line)
        # DONE alone: a resume of a PARTIAL or CANCELLED one runs its other units again too
        if campaign.state == "DONE" and (damaged := run.damaged_report()):
            _warn_damaged_report(args.campaign, damaged)
        _warn_killed(run, [line.unit for line in lines])
        return 0
    if not console.is_terminal or console.is_dumb_terminal:
        # piped: no redrawing, the final table once; a terminal that cannot redraw
        # (TERM=dumb) is told the units' progress a line per change, on stderr
        run.wait(args.timeout, progress=console.is_dumb_terminal, on_stall=_warn_stall)
        print_units(console, unit_rows(store, args.campaign))
        _warn_killed(run, run.status().units)
        return 0
    from rich.live import Live

    with Live(
        units_table(store, args.campaign, console), console=console, refresh_per_second=2
    ) as live:
        built = {"at": time.monotonic(), "took": 0.0}

        def refresh(*, now: bool = False) -> None:
            # a campaign of thousands of units takes seconds to read and lay out: built
            # again at most a third of the time, not at every poll
            if not now and time.monotonic() - built["at"] < 2 * built["took"]:
                return
            started = time.monotonic()
            live.update(units_table(store, args.campaign, console))
            built.update(at=time.monotonic(), took=time.monotonic() - started)

        # stderr too: rich prints it above the table, which stays at the bottom
        run.wait(args.timeout, poll=1.0, check=refresh, on_stall=_warn_stall)
        refresh(now=True)
    _warn_killed(run, run.status().units)
    return 0


def _status_json(store: Store, args: argparse.Namespace) -> int:
    """``orchard status --json``: the list, or one campaign with its units, as one JSON
    document on stdout (times in ISO 8601 with their zone; absent values null)."""
    from scheduler.api import CampaignRun
    from shared.metrics import finite_or_none

    if args.campaign is None:
        shown = store.list_campaigns(limit=None if args.all else STATUS_SHOWN)
        counts = store.unit_counts([c.id for c in shown])
        older = 0 if args.all else max(0, store.count_campaigns() - len(shown))
        document = {
            "store": mask_url(store.url),
            "campaigns": [campaign_json(c, counts.get(c.id, {})) for c in shown],
            "not_shown": older,
        }
    else:
        run = CampaignRun(args.campaign, store, load_settings())
        if args.watch:
            with _watching(args.campaign):
                run.wait(args.timeout, on_stall=_warn_stall)
        campaign, lines = unit_lines(store, args.campaign)
        report = run.report_path()
        done = campaign.state == "DONE"
        document = {
            "store": mask_url(store.url),
            "campaign": {
                **campaign_json(campaign, Counter(line.unit.state for line in lines)),
                "report": str(report) if report else None,
                # its files missing or changed here (`orchard resume` writes them again)
                "report_damaged": [str(path) for path in (run.damaged_report() if done else [])],
                "stalled": run.stalled() if campaign.state == "RUNNING" else None,
            },
            "units": [unit_json(line) for line in lines],
        }
    # ASCII: valid JSON on any stdout encoding; no NaN or Infinity, which JSON lacks
    print(json.dumps(finite_or_none(document), indent=2, allow_nan=False))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from db.store import DELETING, BeingDeletedError

    _check_campaign_id(args.campaign)
    settings = load_settings()
    store = _store(existing=True)
    if store.get_campaign(args.campaign).state == DELETING:
        raise BeingDeletedError(args.campaign)  # its report's record is gone already
    # the records of report.html and report.md: what a report unit last wrote, kept
    # while `orchard resume` runs it again (the run that replaces them records anew)
    records = {
        PurePosixPath(a.path).name: a
        for a in store.artifacts(args.campaign, kind="report")
        if PurePosixPath(a.path).name in REPORT_FILES
    }
    _check_report_unit(store, args.campaign, settings.artifacts, records)
    html, markdown = (records.get(name) for name in REPORT_FILES)
    if html is None or markdown is None:
        missing = " and ".join(n for n in REPORT_FILES if n not in records)
        raise OrchardError(
            f"campaign {args.campaign} has no report: its report unit is SUCCESS but the "
            f"store records no {missing}"
        )
    if args.print:
        data = _intact_report_file(args.campaign, settings.artifacts, markdown, printing=True)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise OrchardError(
                f"campaign {args.campaign}: cannot read "
                f"{printable(settings.artifacts / markdown.path)}: not UTF-8 text ({exc.reason} "
                f"at byte {exc.start})"
            ) from None
        print(visible_controls(text))  # a report an earlier orchard wrote may hold ESC
    else:
        for record in (html, markdown):
            _intact_report_file(args.campaign, settings.artifacts, record, printing=False)
        print(settings.artifacts / html.path)
        print(settings.artifacts / markdown.path)
    return 0


#: The files `orchard report` names, each checked against the store's record of it.
REPORT_FILES = ("report.html", "report.md")


def _check_report_unit(
    store: Any,  # db.store.Store
    campaign_id: str,
    artifacts: Path,
    records: dict[str, Any],  # file name -> db.store.Artifact
) -> None:
    """Raise, in one line, unless the campaign's report unit is SUCCESS: the files
    recorded then belong to an earlier run (`orchard resume` reset the unit, whose new
    run is waiting, running, or failed), or there are none yet."""
    # its unit alone, not every unit of the campaign (20,000 units: 0.85 s)
    units = store.units(campaign_id, family="report")
    report = units[0] if units else None
    if report is not None and report.state == "SUCCESS":
        return
    if report is None:  # none planned: its records alone say whether it was written
        if records:
            return
        raise OrchardError(f"campaign {campaign_id} has no report yet")
    earlier = records.get(REPORT_FILES[0])
    where = (
        f"the report at {printable(artifacts / earlier.path)} is an earlier run's"
        if earlier
        else ""
    )
    if report.state in ("FAILED", "CANCELLED"):
        # a cancel records "cancelled" as the error: the state says it already
        error = report.error if report.error and report.error != report.state.lower() else ""
        why = f": {visible_controls(error)}" if error else ""
        raise OrchardError(
            f"campaign {campaign_id} has no report: its report unit is {report.state}{why}; "
            + (f"{where}; " if where else "")
            + f"`orchard resume {campaign_id}` runs it again"
        )
    if earlier is None:
        raise OrchardError(f"campaign {campaign_id} has no report yet")
    raise OrchardError(
        f"campaign {campaign_id}: its report is being written again (its report unit is "
        f"{report.state}); {where}"
    )


def _intact_report_file(
    campaign_id: str,
    artifacts: Path,
    record: Any,  # db.store.Artifact
    *,
    printing: bool,
) -> bytes:
    """The bytes of a report file, read once and checked against its record's sha256;
    else one line saying why not: the campaign's folder is not on this host (the wrong
    ORCHARD_ARTIFACTS), the file is gone, or it is not what its report unit wrote."""
    from shared.artifacts import read_if_intact

    path = artifacts / record.path
    shown = printable(path)
    try:
        data = read_if_intact(path, record.sha256)
    except OSError as exc:
        if not (artifacts / "campaigns" / campaign_id).is_dir():
            # the campaign's folder is not there: not the workers' folder or share
            where = "must be the folder, or shared mount, that the workers write to"
            if printing:
                reason = exc.strerror or str(exc)
                raise OrchardError(
                    f"campaign {campaign_id}: cannot read {shown}: {reason} (ORCHARD_ARTIFACTS "
                    f"{where})"
                ) from None
            raise OrchardError(
                f"campaign {campaign_id}: {printable(record.path)} is not under the artifact "
                f"folder {printable(artifacts)} (ORCHARD_ARTIFACTS {where})"
            ) from None
        if isinstance(exc, FileNotFoundError):
            raise OrchardError(
                f"campaign {campaign_id}: {shown} is missing; `orchard resume {campaign_id}` "
                "writes the report again"
            ) from None
        raise OrchardError(
            f"campaign {campaign_id}: cannot read {shown}: {exc.strerror or exc}"
        ) from None
    if data is None:
        raise OrchardError(
            f"campaign {campaign_id}: {shown} differs from its record (checksum): changed "
            f"since its report unit wrote it; `orchard resume {campaign_id}` writes the "
            "report again"
        )
    return data


def cmd_demo(args: argparse.Namespace) -> int:
    from scheduler.demo import run_demo

    _check_urls()
    return run_demo(args.campaign, timeout=args.timeout)


def cmd_db(args: argparse.Namespace) -> int:
    store = _store(check=False)
    if not args.force:
        _refuse_while_units_run(store)
    before, after = store.upgrade()
    where = f"store {mask_url(store.url)}"
    if before is None:
        print(f"{where}: created, schema {after}")
    elif before != after:
        print(f"{where}: migrated from schema {before} to {after}")
    else:
        print(f"{where}: already at the newest schema, {after}")
    return 0


def _refuse_while_units_run(store: Store) -> None:
    """A migration changes the schema under the workers that run now, whose code was
    written for the old one (a host not yet updated): refuse while any unit holds a live
    lease. Workers that sit idle hold none; they stop taking units within
    SCHEMA_RECHECK_SECONDS of the migration, until they are updated."""
    from db import migrate

    current = store.revision()
    if current in (None, "0001", migrate.head_revision()) or current not in (
        migrate.known_revisions()
    ):
        return  # nothing to migrate, no leases yet (0001), or upgrade's own refusal
    count, first = store.live_leases()
    if not count:
        return
    named = ", ".join(f"{key} on {visible_controls(worker or '?')}" for key, worker in first)
    more = f", and {count - len(first)} more" if count > len(first) else ""
    raise OrchardError(
        f"store {mask_url(store.url)}: {count} unit(s) running ({named}{more}): stop the "
        "workers first (TERM: each hands its unit back at its checkpoint), update orchard "
        "on every host, then upgrade; a worker killed without a warm shutdown holds its "
        "lease until it runs out. `orchard db upgrade --force` migrates all the same"
    )


if __name__ == "__main__":
    exit_as_main(main())
