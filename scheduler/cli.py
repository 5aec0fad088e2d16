"""The ``orchard`` command.

    orchard submit FILE [--wait]      validate, record and enqueue a campaign
                  [--reuse]           copy units that already succeeded identically
    orchard resume ID [--wait]        run again what did not succeed
    orchard cancel ID                 revoke a campaign's pending and running units
    orchard status [ID] [--watch]     campaigns, or one campaign's units
    orchard report ID [--print]       where a campaign's report is (or its Markdown)
    orchard worker --queues Q[,Q]     run a Celery worker for orchard's queues
                   [--pool solo]      one process, no pool: less dispatch time per unit
                   [--without-task-events]   no per-task events until a monitor asks
    orchard worker --gpus all|0,1     one GPU worker process per GPU, supervised
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
POOLS = ("prefork", "solo")


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
    p.add_argument(
        "--reuse",
        action="store_true",
        help="copy model units that already succeeded in an earlier campaign with the same "
        "data, folds, seed and parameters instead of running them again",
    )
    p.set_defaults(run=cmd_submit)

    p = commands.add_parser("resume", help="re-enqueue a campaign's units that did not succeed")
    p.add_argument("campaign")
    p.add_argument("--wait", action="store_true", help="follow it until the report is written")
    p.set_defaults(run=cmd_resume)

    p = commands.add_parser("cancel", help="cancel a campaign: revoke its pending/running units")
    p.add_argument("campaign")
    p.set_defaults(run=cmd_cancel)

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
        default=None,
        help="comma-separated, of: " + ", ".join(QUEUES) + " (default cpu,preprocess,report; "
        "gpu with --gpus)",
    )
    p.add_argument("--concurrency", "-c", type=int, default=None)
    p.add_argument(
        "--pool",
        choices=POOLS,
        default=None,
        help="prefork (default for cpu/preprocess/report: a killed child's unit is "
        "requeued at once) or solo (one task at a time in the worker process itself: "
        "~0.7 ms less per unit, but a killed worker's unit waits for "
        "ORCHARD_VISIBILITY_TIMEOUT); GPU workers always use solo",
    )
    p.add_argument(
        "--without-task-events",
        action="store_true",
        help="send no task events until a monitor enables them (Flower does, every few "
        "seconds): ~0.5 ms less per unit on a prefork worker; Flower misses the tasks "
        "that ran before it enabled them",
    )
    p.add_argument("--name", "-n", default=None, help="node name (default <queue>@%%h)")
    p.add_argument(
        "--gpus",
        default=None,
        metavar="all|0,1",
        help="one worker process per GPU (CUDA_VISIBLE_DEVICES=<i>, node gpu<i>@%%h, "
        "one task at a time); ids without GPUs only with ORCHARD_DEVICE=cpu",
    )
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

    run = submit(args.file, reuse=args.reuse)
    print(run.id)
    _warn_skipped(run)
    if args.reuse:
        print(f"reused {len(run.reused)} finished unit(s) from earlier campaigns", file=sys.stderr)
    if not args.wait:
        return 0
    status = run.wait(progress=sys.stderr.isatty())
    return _finish(run, status)


def cmd_resume(args: argparse.Namespace) -> int:
    from scheduler.api import resume

    run, reset = resume(args.campaign)
    print(f"campaign {run.id}: re-enqueued {len(reset)} unit(s) that had not succeeded")
    if not args.wait:
        return 0
    return _finish(run, run.wait(progress=sys.stderr.isatty()))


def cmd_cancel(args: argparse.Namespace) -> int:
    from scheduler.api import cancel

    outcome = cancel(args.campaign)
    if outcome.already_finished:
        raise OrchardError(f"campaign {args.campaign} is already {outcome.state}")
    print(
        f"campaign {args.campaign}: CANCELLED ({outcome.units} unit(s) stopped, "
        f"{len(outcome.task_ids)} task(s) revoked)"
    )
    return 0


def _warn_skipped(run, shown: int = 10) -> None:  # noqa: ANN001
    """One warning line per image the manifest left out (the report lists them all)."""
    from shared.manifest import Manifest, manifest_path

    path = manifest_path(run.settings.artifacts / "campaigns" / run.id)
    skipped = Manifest.from_json(path.read_text(encoding="utf-8")).skipped
    for item in skipped[:shown]:
        print(f"orchard: warning: skipped {item.path}: {item.reason}", file=sys.stderr)
    if len(skipped) > shown:
        print(
            f"orchard: warning: ... and {len(skipped) - shown} more skipped (see the report)",
            file=sys.stderr,
        )


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

    from shared.plan import TERMINAL

    table = Table(title=f"campaigns in {mask_url(store.url)}")
    for column in ("id", "name", "state", "units done/total", "failed", "running", "created"):
        table.add_column(column)
    for campaign in campaigns:
        units = store.units(campaign.id)
        done = sum(u.state in TERMINAL for u in units)
        table.add_row(
            campaign.id,
            campaign.name,
            campaign.state,
            f"{done}/{len(units)}",
            str(sum(u.state == "FAILED" for u in units)),
            str(sum(u.state == "RUNNING" for u in units)),
            f"{campaign.created_at:%Y-%m-%d %H:%M:%S}",
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
    default = "gpu" if args.gpus is not None else "cpu,preprocess,report"
    queues = [q.strip() for q in (args.queues or default).split(",") if q.strip()]
    unknown = sorted(set(queues) - set(QUEUES))
    if not queues or unknown:
        raise OrchardError(f"--queues: unknown queue(s) {unknown}; choose from {', '.join(QUEUES)}")
    if args.gpus is not None:
        if args.pool == "prefork" or args.without_task_events:
            raise OrchardError("--gpus workers use the solo pool and send task events")
        return _gpu_workers(args, queues)
    argv = worker_argv(
        queues,
        concurrency=args.concurrency,
        name=args.name,
        loglevel=args.loglevel,
        pool=args.pool,
        task_events=not args.without_task_events,
    )
    settings = load_settings()
    _store()  # fail now, naming the database, not on the first task
    from workers.app import app, check_broker_reachable, preload

    check_broker_reachable(app)
    print(
        f"orchard worker: queues {','.join(queues)} on {mask_url(settings.broker_url)}, "
        f"store {mask_url(settings.database_url)}",
        file=sys.stderr,
    )
    preload(queues)
    if args.without_task_events:
        # workers/config.py turns them on; `celery control enable_events` (Flower) still can
        app.conf.worker_send_task_events = False
    app.worker_main(argv)
    return 0


def _gpu_workers(args: argparse.Namespace, queues: list[str]) -> int:
    from scheduler.gpus import GpuLauncher, child_command, detect_gpus, parse_gpus

    if "gpu" not in queues:
        raise OrchardError("--gpus: the workers must consume the gpu queue (--queues gpu)")
    if args.name is not None:
        raise OrchardError("--gpus names its workers gpu<i>@%h itself; drop --name")
    device = os.environ.get("ORCHARD_DEVICE")
    gpus = parse_gpus(args.gpus, available=detect_gpus(), device=device)
    settings = load_settings()
    _store()  # fail once here, naming the database, rather than once per GPU
    from workers.app import app, check_broker_reachable

    check_broker_reachable(app)
    print(
        f"orchard worker: {len(gpus)} GPU worker(s) ({', '.join('gpu' + g for g in gpus)}) "
        f"on queues {','.join(queues)}, device {device or 'cuda'}, broker "
        f"{mask_url(settings.broker_url)}, store {mask_url(settings.database_url)}",
        file=sys.stderr,
    )
    # the children resolve nothing relative to their own working directory
    env = {
        **os.environ,
        "ORCHARD_HOME": str(settings.home),
        "ORCHARD_BROKER_URL": settings.broker_url,
        "ORCHARD_DATABASE_URL": settings.database_url,
        "ORCHARD_ARTIFACTS": str(settings.artifacts),
    }
    launcher = GpuLauncher(gpus, lambda gpu: child_command(gpu, queues, args.loglevel), env=env)
    return launcher.run()


def worker_argv(
    queues: Sequence[str],
    *,
    concurrency: int | None,
    name: str | None,
    loglevel: str,
    pool: str | None = None,
    task_events: bool = True,
) -> list[str]:
    """Celery worker arguments for orchard's queues.

    A worker that consumes ``gpu`` uses the solo pool with one task at a time: CUDA
    is initialised in the process that trains, never in a parent that forks. Other
    workers use prefork unless ``pool="solo"``: then the worker runs one task at a
    time in its own process, which saves the parent-child hand-offs (~0.7 ms of
    dispatch per unit) but has no parent to requeue the unit of a killed worker at once.
    Without ``task_events`` the worker sends no task events until a monitor enables
    them (the caller also sets ``worker_send_task_events`` off).
    """
    if pool is not None and pool not in POOLS:
        raise OrchardError(f"--pool: unknown pool {pool!r}; choose from {', '.join(POOLS)}")
    gpu = "gpu" in queues
    if gpu and pool == "prefork":
        raise OrchardError("--pool prefork: GPU workers use solo (CUDA must not be forked)")
    solo = gpu or pool == "solo"
    if pool == "solo" and concurrency not in (None, 1):
        raise OrchardError(f"--pool solo runs one task at a time; drop --concurrency {concurrency}")
    pool = "solo" if solo else "prefork"
    concurrency = 1 if solo else (concurrency or os.cpu_count() or 1)
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
    ]
    if task_events:
        argv.append("--task-events")
    # No start-up handshake (mingle waits a full second for other workers' revoked ids,
    # which orchard does not need: a cancelled unit is CANCELLED in the store, and a
    # worker discards such a delivery) and no worker-to-worker gossip (unused; Flower
    # follows the workers' events and heartbeats, which stay on).
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
