"""The ``orchard`` command.

    orchard submit FILE [--wait]      validate, record and enqueue a campaign
    orchard status [ID] [--watch]     campaigns, or one campaign's units
    orchard report ID [--print]       where a campaign's report is (or its Markdown)
    orchard worker --queues Q[,Q]     run a Celery worker for orchard's queues
    orchard demo                      everything on this machine, no servers needed
    orchard db upgrade                create or migrate the store's schema

Every user error is one line on stderr (exit 2); no tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from shared.errors import OrchardError
from shared.settings import load_settings, mask_url

QUEUES = ("gpu", "cpu", "preprocess", "report")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except OrchardError as exc:
        print(f"orchard: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("orchard: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchard", description="Distributed image-grading training campaigns."
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    p = commands.add_parser("submit", help="submit a campaign file")
    p.add_argument("file", type=Path)
    p.add_argument("--wait", action="store_true", help="follow it until the report is written")
    p.set_defaults(run=cmd_submit)

    p = commands.add_parser("status", help="list campaigns, or show one campaign's units")
    p.add_argument("campaign", nargs="?")
    p.add_argument("--watch", action="store_true", help="refresh until the campaign finishes")
    p.set_defaults(run=cmd_status)

    p = commands.add_parser("report", help="show where a campaign's report is")
    p.add_argument("campaign")
    p.add_argument("--print", action="store_true", help="print the Markdown report")
    p.set_defaults(run=cmd_report)

    p = commands.add_parser("worker", help="run a Celery worker")
    p.add_argument(
        "--queues",
        "-Q",
        default="cpu,preprocess,report",
        help="comma-separated, of: " + ", ".join(QUEUES),
    )
    p.add_argument("--concurrency", "-c", type=int, default=None)
    p.add_argument("--name", "-n", default=None, help="node name (default <queue>@%%h)")
    p.add_argument("--loglevel", "-l", default="INFO")
    p.set_defaults(run=cmd_worker)

    p = commands.add_parser("demo", help="run the quick campaign on this machine alone")
    p.add_argument(
        "--campaign", type=Path, default=None, help="campaign file (default campaigns/quick.toml)"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many s")
    p.set_defaults(run=cmd_demo)

    p = commands.add_parser("db", help="store administration")
    p.add_argument("action", choices=["upgrade"])
    p.set_defaults(run=cmd_db)
    return parser


# ---------------------------------------------------------------- commands


def _store(*, check: bool = True):  # noqa: ANN202
    from db.store import Store

    store = Store(load_settings().database_url)
    if check:
        store.check_schema()
    return store


def cmd_submit(args: argparse.Namespace) -> int:
    from scheduler.api import submit

    run = submit(args.file)
    print(run.id)
    if not args.wait:
        return 0
    status = run.wait(progress=sys.stderr.isatty())
    return _finish(run, status)


def _finish(run, status) -> int:  # noqa: ANN001
    print(f"campaign {run.id}: {status.campaign.state}")
    report = run.report_path()
    if report is not None:
        print(f"report: {report}")
    for unit in status.units:
        if unit.state == "FAILED":
            print(f"  failed {unit.key}: {unit.error}", file=sys.stderr)
    return 0 if status.campaign.state == "DONE" else 1


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console

    store = _store()
    console = Console()
    if args.campaign is None:
        campaigns = store.list_campaigns()
        if not campaigns:
            print(f"no campaigns in {mask_url(store.url)}")
            return 0
        console.print(_campaigns_table(store, campaigns))
        return 0
    if not args.watch:
        console.print(_units_table(store, args.campaign))
        return 0
    from rich.live import Live

    with Live(_units_table(store, args.campaign), console=console, refresh_per_second=2) as live:
        while store.get_campaign(args.campaign).state == "RUNNING":
            time.sleep(1)
            live.update(_units_table(store, args.campaign))
        live.update(_units_table(store, args.campaign))
    return 0


def _campaigns_table(store, campaigns):  # noqa: ANN001, ANN202
    from rich.table import Table

    table = Table(title=f"campaigns in {mask_url(store.url)}")
    for column in ("id", "state", "created", "units ok/total"):
        table.add_column(column)
    for campaign in campaigns:
        units = store.units(campaign.id)
        ok = sum(u.state == "SUCCESS" for u in units)
        table.add_row(
            campaign.id,
            campaign.state,
            f"{campaign.created_at:%Y-%m-%d %H:%M:%S}",
            f"{ok}/{len(units)}",
        )
    return table


def _units_table(store, campaign_id: str):  # noqa: ANN001, ANN202
    from rich.table import Table

    campaign = store.get_campaign(campaign_id)
    results = store.results(campaign_id)
    table = Table(title=f"{campaign.id}: {campaign.state}")
    for column in ("unit", "state", "tries", "worker", "seconds", "val acc", "progress / error"):
        table.add_column(column, overflow="fold")
    for unit in store.units(campaign_id):
        result = results.get(unit.key)
        note = unit.error or ""
        if unit.state == "RUNNING" and unit.family == "cnn":
            epochs = store.metrics(unit.key).get("val_acc", [])
            if epochs:
                step, value = epochs[-1]
                note = f"epoch {step + 1}/{unit.params.get('epochs')} val_acc={value:.3f}"
        table.add_row(
            unit.key.removeprefix(campaign_id + "/"),
            unit.state,
            str(unit.attempts),
            unit.worker or "",
            f"{result.fit_seconds:.1f}" if result else "",
            f"{result.val_acc:.3f}" if result and result.val_acc is not None else "",
            note,
        )
    return table


def cmd_report(args: argparse.Namespace) -> int:
    from scheduler.api import CampaignRun

    settings = load_settings()
    store = _store()
    store.get_campaign(args.campaign)
    path = CampaignRun(args.campaign, store, settings).report_path()
    if path is None:
        raise OrchardError(f"campaign {args.campaign} has no report yet")
    if args.print:
        print(path.with_suffix(".md").read_text(encoding="utf-8"))
    else:
        print(path)
        print(path.with_suffix(".md"))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = sorted(set(queues) - set(QUEUES))
    if not queues or unknown:
        raise OrchardError(f"--queues: unknown queue(s) {unknown}; choose from {', '.join(QUEUES)}")
    argv = worker_argv(queues, concurrency=args.concurrency, name=args.name, loglevel=args.loglevel)
    settings = load_settings()
    _store()  # fail now, naming the database, not on the first task
    from workers.app import app, check_broker_reachable

    check_broker_reachable(app)
    print(
        f"orchard worker: queues {','.join(queues)} on {mask_url(settings.broker_url)}, "
        f"store {mask_url(settings.database_url)}",
        file=sys.stderr,
    )
    app.worker_main(argv)
    return 0


def worker_argv(
    queues: Sequence[str], *, concurrency: int | None, name: str | None, loglevel: str
) -> list[str]:
    """Celery worker arguments for orchard's queues.

    A worker that consumes ``gpu`` uses the solo pool with one task at a time: CUDA
    is initialised in the process that trains, never in a parent that forks.
    """
    gpu = "gpu" in queues
    pool = "solo" if gpu else "prefork"
    concurrency = 1 if gpu else (concurrency or os.cpu_count() or 1)
    argv = [
        "worker",
        "--queues",
        ",".join(queues),
        "--hostname",
        name or f"{queues[0]}-{os.getpid()}@%h",
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "--loglevel",
        loglevel,
        "--task-events",
    ]
    if load_settings().broker_is_filesystem:
        # one machine, no cluster: skip the broadcast handshakes at start-up
        argv += ["--without-mingle", "--without-gossip"]
    return argv


def cmd_demo(args: argparse.Namespace) -> int:
    from scheduler.demo import run_demo

    return run_demo(args.campaign, timeout=args.timeout)


def cmd_db(args: argparse.Namespace) -> int:
    store = _store(check=False)
    store.upgrade()
    print(f"store {mask_url(store.url)} is at the newest schema")
    return 0


if __name__ == "__main__":
    sys.exit(main())
