"""The Celery app. Task modules import it and stay small."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

from celery import Celery, signals
from celery.app.amqp import AMQP
from kombu.pools import ProducerPool

from shared.errors import OrchardError, UnreachableError
from shared.settings import Settings, load_settings
from workers import logs
from workers.config import celery_config, check_broker_url, make_broker_folders
from workers.etaslot import EtaKeepsItsSlot
from workers.reaper import LostUnitReaper

if TYPE_CHECKING:
    from kombu.connection import ConnectionPool

# Before any OpenMP runtime loads (torch's, on the first unit or at preload): its threads
# that wait for work sleep rather than spin. A CNN fold on the CPU beside other busy
# processes (the demo's CPU worker, another campaign's) otherwise lost most of its time
# to threads spinning on cores others needed: the demo took 2.5-3 min beside two busy
# processes on 2 cores, about 1.2 min with this, and the same 48-50 s on quiet cores.
# A worker's environment may say otherwise (OMP_WAIT_POLICY=ACTIVE)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TASK_MODULES = [
    "workers.tasks.preprocess",
    "workers.tasks.cnn",
    "workers.tasks.svm",
    "workers.tasks.rf",
    "workers.tasks.report",
]

#: The libraries the units of each queue need. The task modules import them on first
#: use, so that no worker loads what its queues never run (a CPU worker, torch); a
#: worker imports its queues' share with :func:`preload` before its pool starts, so the
#: prefork children inherit them and no unit pays the import.
QUEUE_LIBRARIES = {
    "gpu": ("shared.cnn",),  # torch
    "cpu": (
        "sklearn.decomposition",
        "sklearn.ensemble",
        "sklearn.feature_selection",
        "sklearn.pipeline",
        "sklearn.svm",
    ),
    "report": ("matplotlib.backends.backend_agg", "matplotlib.figure"),
}


def preload(queues: Iterable[str]) -> None:
    for queue in queues:
        for module in QUEUE_LIBRARIES.get(queue, ()):
            importlib.import_module(module)


def preloaded(queues: Iterable[str]) -> bool:
    """Whether this process has imported every library of ``queues`` (the benchmarks
    check it in the processes they time)."""
    return all(m in sys.modules for q in queues for m in QUEUE_LIBRARIES.get(q, ()))


class _OwnPoolsAMQP(AMQP):
    """Celery's AMQP, whose producers come from its app's own connection pool."""

    @property
    def producer_pool(self) -> ProducerPool:
        if self._producer_pool is None:
            self._producer_pool = ProducerPool(self.app.pool, limit=self.app.pool.limit)
        return self._producer_pool


class _ProducerApp(Celery):
    """The app of a command or an API call (it sends, it does not run tasks), with
    connection and producer pools of its own, which ``close()`` (the end of ``with
    make_app(...) as app``) closes. Celery keeps an app's in kombu's pools, which
    belong to the process and are shared by every app of the same broker URL: a script
    that submitted a campaign and then waited for hours held two sockets to Redis, and
    two more per cancel, and closing those would pull them from under another app."""

    amqp_cls = f"{__name__}:_OwnPoolsAMQP"

    @property
    def pool(self) -> ConnectionPool:
        if self._pool is None:
            self._ensure_after_fork()
            self._pool = self.connection_for_write().Pool(limit=self.conf.broker_pool_limit)
        return self._pool

    def close(self) -> None:
        amqp = self.__dict__.get("amqp")
        producers = amqp._producer_pool if amqp is not None else None
        connections = self._pool
        super().close()
        if amqp is not None:
            amqp._producer_pool = None
        for held in (producers, connections):
            if held is not None:
                with contextlib.suppress(Exception):  # a broker gone: nothing to hand back
                    held.force_close_all()


def make_app(settings: Settings, *, with_tasks: bool = True, broker_folders: bool = True) -> Celery:
    """An app for ``settings``; a producer (the scheduler) needs no task modules. Without
    ``broker_folders`` a filesystem broker's folders are left to the caller
    (:func:`workers.config.make_broker_folders` before it sends)."""
    config = celery_config(settings)
    if broker_folders:
        make_broker_folders(settings)
    # a worker's app keeps Celery's pools; a sender's has its own (_ProducerApp)
    celery = (Celery if with_tasks else _ProducerApp)(
        "orchard", include=TASK_MODULES if with_tasks else []
    )
    celery.config_from_object(config)
    if with_tasks:
        celery.steps["worker"].add(LostUnitReaper)
        # a countdown retry keeps its prefetch slot: see workers.etaslot
        celery.steps["consumer"].add(EtaKeepsItsSlot)
        logs.install()
        signals.celeryd_init.connect(_refuse_an_unusable_store, weak=False)
    return celery


def _refuse_an_unusable_store(conf: object = None, **_: object) -> None:
    """A worker (`celery -A workers.app worker` too, not only `orchard worker`) whose
    ORCHARD_DATABASE_URL names a database SQLAlchemy cannot use (a mistyped driver, one
    not installed) stops before taking a message: every unit it took would fail as a
    traceback and its message be dropped. A database that is only unreachable is not
    refused: the units wait for it (their messages are kept)."""
    from db.urls import check_database_url

    try:
        check_database_url(load_settings().database_url)
    except OrchardError as exc:
        print(f"orchard: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None  # a BaseException: Celery's signal lets it through


def _app_from_environment() -> Celery:
    """The app for the environment's settings. Under the `celery` command (`celery -A
    workers.app worker`, `flower`), which prints a traceback for any exception its app
    module raises, a bad setting (a missing password file) is one line and exit code 2;
    anywhere else (the Python API) it stays an OrchardError."""
    try:
        settings = load_settings()
        # the check `orchard` commands make first: under `celery -A workers.app` (Flower,
        # inspect) nothing else would, and kombu would take a URL's ?ssl_cert_reqs=none
        # over orchard's TLS settings
        check_broker_url(settings.broker_url)
        return make_app(settings)
    except OrchardError as exc:
        if "celery.bin.celery" not in sys.modules:
            raise
        print(f"orchard: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None  # a BaseException: Celery's loader lets it through


def __getattr__(name: str) -> Celery:
    # `app` is built on first use (`from workers.app import app`, `celery -A
    # workers.app`), not on import: a process that only builds its own app (`orchard
    # submit`) creates nothing of the environment's (a filesystem broker's folders)
    if name == "app":
        globals()["app"] = built = _app_from_environment()
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _login_refused(exc: BaseException, reason: str) -> bool:
    """A Redis that answered, refusing the password (or asking for one): redis-py's
    AuthenticationError, which kombu wraps, or its words (WRONGPASS, NOAUTH)."""
    chain = [exc, exc.__cause__, exc.__context__]
    if any(type(e).__name__ == "AuthenticationError" for e in chain if e is not None):
        return True
    words = ("invalid username-password", "wrongpass", "noauth", "authentication required")
    return any(word in reason.lower() for word in words)


def _answer_quickly() -> dict[str, float]:
    """Redis transport options for a check: connecting and each answer within
    ``BROKER_CONNECT_TIMEOUT`` seconds, not the workers' longer socket timeout."""
    from workers.config import BROKER_CONNECT_TIMEOUT

    return {
        "socket_connect_timeout": BROKER_CONNECT_TIMEOUT,
        "socket_timeout": BROKER_CONNECT_TIMEOUT,
    }


def evicting_broker(celery: Celery) -> str | None:
    """The warning a worker starts with when its Redis broker evicts keys of any kind
    once its memory is full (``maxmemory-policy allkeys-*``): the queues and the
    unacknowledged messages go with the rest, silently, and their units wait until an
    idle worker sends them again (``workers.reaper``). None otherwise, or when the
    broker does not say (``INFO`` refused, another transport)."""
    from shared.settings import mask_url

    url = celery.conf.broker_url
    if not url.startswith(("redis://", "rediss://")):
        return None
    options = _answer_quickly()
    try:
        with celery.connection_for_write(transport_options=options) as conn:
            memory = conn.default_channel.client.info("memory")
    except Exception:  # noqa: BLE001 - a broker that does not say: nothing to warn of
        return None
    policy = str(memory.get("maxmemory_policy", "noeviction"))
    if not (int(memory.get("maxmemory") or 0) and policy.startswith("allkeys-")):
        return None
    return (
        f"broker {mask_url(url)} evicts keys when its memory is full (maxmemory-policy "
        f"{policy}): queued messages would go silently, their units waiting until an idle "
        "worker sends them again; set maxmemory-policy noeviction (orchard's keys never "
        "expire, so a volatile-* policy spares them too)"
    )


def check_broker_reachable(celery: Celery) -> None:
    """Fail within seconds, naming the broker (password masked), if it is unreachable.

    A Redis broker that accepts the connection but never answers (TLS against a plain
    Redis) is given one try of ``BROKER_CONNECT_TIMEOUT`` seconds, connecting and
    answering PING, not the workers' longer socket timeout; one that refuses it is
    tried three times within about a second.
    """
    from kombu.exceptions import OperationalError

    from shared.settings import mask_url
    from workers.config import BROKER_CONNECT_TIMEOUT, BROKER_URL_EXAMPLES, broker_url_problem

    url = celery.conf.broker_url
    if problem := broker_url_problem(url):  # before kombu, whose errors may quote it
        raise OrchardError(f"broker {mask_url(url)}: {problem}")
    options = _answer_quickly() if url.startswith(("redis://", "rediss://")) else {}
    try:
        with celery.connection_for_write(transport_options=options) as conn:
            conn.ensure_connection(
                max_retries=2,
                interval_start=0.2,
                interval_step=0.5,
                timeout=BROKER_CONNECT_TIMEOUT,  # no second try after a try that hung
            )
    except (OperationalError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if _login_refused(exc, reason):  # reached, and it said no: not "unreachable"
            raise OrchardError(
                f"broker {mask_url(url)} refused the login: {reason} (the password of the "
                "URL or of ORCHARD_BROKER_PASSWORD_FILE)"
            ) from None
        raise UnreachableError(f"broker {mask_url(url)} unreachable: {reason}") from None
    except (KeyError, ValueError, TypeError) as exc:
        # kombu: no such transport, a port not a number, a query option it does not
        # take as a keyword (broker_url_problem names those it knows of first)
        reason = str(exc.args[0]) if exc.args else type(exc).__name__
        if isinstance(exc, TypeError):
            reason = _keyword_problem(reason)
        raise OrchardError(
            f"broker {mask_url(url)}: not a broker URL orchard can use ({reason}); "
            + BROKER_URL_EXAMPLES
        ) from None


def _keyword_problem(message: str) -> str:
    """kombu's TypeError for a URL query option it has no keyword for, as the option."""
    match = re.search(r"(?:unexpected|multiple values for) keyword argument '(\w+)'", message)
    if match:
        return f"option {match[1]!r} in the URL's query is not one kombu knows"
    return message.splitlines()[0] if message else "TypeError"
