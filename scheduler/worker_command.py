"""``orchard worker``: what a worker checks before it takes a unit, the Celery worker's
arguments for orchard's queues, and ``--gpus``' one supervised worker per GPU."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from scheduler.deployment import existing_store, resolve_settings
from shared.errors import OrchardError
from shared.settings import child_env, env_number, mask_url

if TYPE_CHECKING:
    from celery import Celery

    from db.store import Store
    from shared.settings import Settings

#: The newest campaigns a starting worker looks at for one that runs without its
#: manifest in the worker's artifact folder: a store keeps every campaign ever run, and
#: a start need not look past those that can still be running.
RUNNING_CHECKED = 50


QUEUES = ("gpu", "cpu", "preprocess", "report")


POOLS = ("prefork", "solo")


def cmd_worker(args: argparse.Namespace) -> int:
    default = "gpu" if args.gpus is not None else "cpu,preprocess,report"
    text = default if args.queues is None else args.queues
    queues = [q.strip() for q in text.split(",") if q.strip()]
    if not queues:
        raise OrchardError(f"--queues {text!r} names no queue; choose from {', '.join(QUEUES)}")
    unknown = sorted(set(queues) - set(QUEUES))
    if unknown:
        raise OrchardError(f"--queues: unknown queue(s) {unknown}; choose from {', '.join(QUEUES)}")
    if args.gpus is not None:
        if args.pool == "prefork" or args.without_task_events:
            raise OrchardError("--gpus workers use the solo pool and send task events")
        if args.concurrency not in (None, 1):
            raise OrchardError(
                f"--gpus runs one task at a time per GPU; drop --concurrency {args.concurrency}"
            )
        return _gpu_workers(args, queues)
    if "gpu" in queues and args.pool != "solo" and args.concurrency not in (None, 1):
        # worker_argv would run it solo, one task at a time, without a word
        raise OrchardError(
            f"--queues {','.join(queues)}: a GPU worker runs one task at a time; "
            f"drop --concurrency {args.concurrency}"
        )
    argv = worker_argv(
        queues,
        concurrency=args.concurrency,
        name=args.name,
        loglevel=args.loglevel,
        pool=args.pool,
        task_events=not args.without_task_events,
    )
    settings = _check_worker_start()  # fail now, naming what, not on the first task
    from workers.app import app, preload
    from workers.config import check_device

    _refuse_a_taken_name(app, argv[argv.index("--hostname") + 1], settings)
    preload(queues)
    if "gpu" in queues:  # torch is loaded now
        check_device(os.environ.get("ORCHARD_DEVICE"))
    print(
        f"orchard worker: queues {','.join(queues)} on {mask_url(settings.broker_url)}, "
        f"store {mask_url(settings.database_url)}, artifacts {settings.artifacts}",
        file=sys.stderr,
    )
    if args.without_task_events:
        # workers/config.py turns them on; `celery control enable_events` (Flower) still can
        app.conf.worker_send_task_events = False
    app.worker_main(argv)
    return 0


#: How long `orchard worker` waits for a running worker of its own node name to answer
#: (an idle or prefork worker answers within milliseconds; a solo worker busy with a
#: unit does not answer until the unit ends, so it is not found this way). Every start
#: waits all of it when no worker has the name; ORCHARD_NAME_CHECK_SECONDS says
#: otherwise (a broker far away, a heavily loaded host), at most NAME_CHECK_LIMIT.
NAME_CHECK_SECONDS = 0.5


NAME_CHECK_LIMIT = 60


def _refuse_a_taken_name(app: Celery, name: str, settings: Settings) -> None:
    """Stop a worker whose node name a running worker answers to. Celery would start it
    (no mingle, whose duplicate check warns and goes on), and the broker's orders to
    that name would then reach both: a worker that stops consuming a queue (wrong
    ORCHARD_ARTIFACTS, no dataset on its host) names itself, so orchard's own order
    carries a per-worker id too; Celery's and Flower's do not."""
    if settings.broker_is_filesystem:
        return  # one machine, whose worker names carry the pid of a live process
    from celery.utils.nodenames import default_nodename, host_format

    node = host_format(default_nodename(name))
    window = env_number(
        "ORCHARD_NAME_CHECK_SECONDS",
        NAME_CHECK_SECONDS,
        float,
        "a number of seconds",
        maximum=NAME_CHECK_LIMIT,
    )
    # asked from a forked process: a broker connection pool that this one made here, and
    # Celery's pool then forked into its children, left every child that replaced a dead
    # one unable to start ("Timed out waiting for UP message")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child, which only asks
        try:
            answered = app.control.ping(destination=[node], timeout=window, limit=1)
        except BaseException:  # noqa: BLE001 - the broker answered just now: Celery will say
            os._exit(0)
        os._exit(1 if answered else 0)
    deadline = time.monotonic() + window + 5  # a broker that never answers
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:  # Celery's start, next, says what is wrong with the broker
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return
    if os.waitstatus_to_exitcode(done[1]) == 1:
        raise OrchardError(
            f"worker name {node} is taken: a running worker of that name answers on "
            f"{mask_url(settings.broker_url)} (on a cluster, each host needs a host name "
            "of its own: under Docker Compose, its own ORCHARD_NODE_NAME); stop it, or give "
            "this worker another --name"
        )


def _gpu_workers(args: argparse.Namespace, queues: list[str]) -> int:
    from scheduler.gpus import GpuLauncher, child_command, detect_gpus, parse_gpus

    if "gpu" not in queues:
        raise OrchardError("--gpus: the workers must consume the gpu queue (--queues gpu)")
    if args.name is not None:
        raise OrchardError("--gpus names its workers gpu<i>-<pid>@%h itself; drop --name")
    device = os.environ.get("ORCHARD_DEVICE")
    gpus = parse_gpus(
        args.gpus,
        available=detect_gpus(),
        device=device,
        visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )
    settings = _check_worker_start()  # once here, rather than once per GPU
    print(
        f"orchard worker: {len(gpus)} GPU worker(s) ({', '.join('gpu' + g for g in gpus)}) "
        f"on queues {','.join(queues)}, device {device or 'cuda'}, broker "
        f"{mask_url(settings.broker_url)}, store {mask_url(settings.database_url)}, "
        f"artifacts {settings.artifacts}",
        file=sys.stderr,
    )
    env = child_env(settings, os.environ)
    # each child trains on its GPU or refuses to start (a host whose torch sees none),
    # never silently on the CPU; ORCHARD_DEVICE=cpu asks for that
    if not env.get("ORCHARD_DEVICE"):
        env["ORCHARD_DEVICE"] = "cuda"
    launcher = GpuLauncher(
        gpus, lambda gpu: child_command(gpu, queues, args.loglevel, launcher=os.getpid()), env=env
    )
    return launcher.run()


def _check_worker_start() -> Settings:
    """What a worker checks before it takes a unit, each failure one line naming the
    variable: the URLs, the store and its schema, the reliability settings,
    ORCHARD_TORCH_THREADS, the broker, and the artifact folder. Returns the settings."""
    from workers.config import reliability, torch_threads

    settings = resolve_settings(None)  # the environment's, the URLs' form checked
    reliability()  # the environment's own mistakes first, before the store's
    torch_threads()
    if not os.environ.get("ORCHARD_DATABASE_URL"):
        from db.urls import require_sqlite_file

        # the default, a SQLite file in this host's ORCHARD_HOME: on a worker host that
        # is a store of its own, whose workers drop every message of the cluster's
        require_sqlite_file(settings.database_url, for_worker=True)
    store = existing_store(settings)
    store.check_schema()
    store.check_writable()
    from scheduler.api import check_creatable

    check_creatable(settings.artifacts)
    # its app makes a filesystem broker's folders: only once the rest is known good
    from workers.app import app, check_broker_reachable, evicting_broker

    check_broker_reachable(app)
    if warning := evicting_broker(app):
        print(f"orchard: warning: {warning}", file=sys.stderr)
    _check_artifacts_of_running(store, settings)
    return settings


def _check_artifacts_of_running(store: Store, settings: Settings) -> None:
    """Refuse a worker whose ``ORCHARD_ARTIFACTS`` lacks the manifest of a campaign
    running in its store (among the newest :data:`RUNNING_CHECKED`): not the folder the
    campaigns are submitted with (another path, a share not mounted). It would take
    their units and hand each one back. Where the folder holds the other campaigns'
    manifests, the manifest is missing on every host instead: said, and the worker
    starts (that campaign's units fail; the others' run)."""
    from workers.data import holds_other_manifests, missing_manifest

    missing: dict[str, Path] = {}
    for campaign in store.list_campaigns(limit=RUNNING_CHECKED):
        if campaign.state == "RUNNING" and (
            path := missing_manifest(store, settings.artifacts, campaign.id)
        ):
            missing[campaign.id] = path
    if not missing:
        return
    if not holds_other_manifests(store, settings.artifacts, missing):
        campaign_id, path = next(iter(missing.items()))
        raise OrchardError(
            f"ORCHARD_ARTIFACTS ({settings.artifacts}): campaign {campaign_id} runs, but "
            f"its manifest {path} is not there: a worker must use the folder the "
            "campaigns are submitted with (on a cluster, the same share, mounted); if "
            f"that folder is gone for good, `orchard cancel {campaign_id}` first"
        )
    for campaign_id, path in missing.items():
        print(
            f"orchard: warning: campaign {campaign_id} runs, but its manifest {path} is "
            "missing, though ORCHARD_ARTIFACTS holds the other campaigns': its folder was "
            "removed, or it was submitted with another ORCHARD_ARTIFACTS. Its units will "
            "fail; `orchard cancel` it",
            file=sys.stderr,
        )


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
