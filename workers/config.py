"""Every Celery setting orchard uses, in one reviewed dictionary.

Why each matters:
- JSON only: a worker never unpickles what someone put on the broker.
- acks late + reject on worker lost + prefetch 1: a task is removed from the queue
  only once it finished, so a killed worker's task is delivered again, and a worker
  never sits on tasks another worker could run.
- visibility timeout longer than the longest task (Redis): otherwise Redis hands a
  still-running task to a second worker.
- events on: Flower sees every task, sent, started and finished (``orchard worker
  --without-task-events`` leaves a worker's task events off until a monitor enables
  them: about 0.5 ms less per unit on a prefork worker, see README).
- no result backend: results live in orchard's SQL store, keyed by unit.
- publishing retries for about a minute: a Redis restart while a task opens the next
  stage delays the stage instead of losing it.
- Redis socket timeouts: a broker that accepts the TCP connection but never answers
  (TLS against a plain Redis, a listener that is not Redis) fails a command within
  seconds instead of hanging it forever; they are far above kombu's BRPOP timeout, so
  an idle worker never reaches them.
- ``rediss://`` brokers verify the server's certificate (ORCHARD_REDIS_TLS_CA_CERTS, or
  the system's CAs); passwords travel in the URL and are masked wherever orchard prints.

Reliability knobs that are not Celery's (read by the task wrapper, ``reliability()``):
ORCHARD_LEASE_SECONDS (how long a delivery holds its unit without a heartbeat, at most
30 days) and ORCHARD_MAX_ATTEMPTS (deliveries that may start a unit before it is failed
for good, at most 1000).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from shared.errors import OrchardError
from shared.plan import TASKS
from shared.settings import Settings, env_number, mask_url
from workers import fs_transport

fs_transport.install()  # every process that configures Celery: workers, submitters, Flower

#: Longest a single unit may take before Redis re-delivers it (a CNN fold at full size
#: takes hours on a slow card). Override with ORCHARD_VISIBILITY_TIMEOUT (seconds).
DEFAULT_VISIBILITY_TIMEOUT = 12 * 3600
#: A delivery renews its lease every third of this; a killed worker's unit can be taken
#: over this long after its last heartbeat, and the workers send it again (workers.reaper)
#: once it has been over twice this long.
DEFAULT_LEASE_SECONDS = 60.0
#: Deliveries that may start a unit; the next one marks it FAILED (a poison task that
#: kills its worker every time must not loop forever).
DEFAULT_MAX_ATTEMPTS = 3
#: Seconds to open a connection to a Redis broker, TLS handshake included (the same as
#: ``broker_connection_timeout``, and PostgreSQL's ``connect_timeout`` in ``db.store``).
BROKER_CONNECT_TIMEOUT = 5
#: Seconds a Redis command may wait for its reply before its connection counts as dead
#: (redis-py's ``socket_timeout``; kombu passes None, wait forever, unless told). An idle
#: worker waits with BRPOP, which the server answers, empty, after kombu's BRPOP timeout
#: (``kombu.transport.redis.Transport.brpop_timeout``, 1 s), and the worker reads it only
#: once the socket is readable: this must stay well above that timeout, or an empty
#: queue would look like a dead broker and the worker would reconnect in a loop.
BROKER_SOCKET_TIMEOUT = 30
#: The schemes of ``ORCHARD_BROKER_URL`` that :func:`celery_config` configures.
BROKER_SCHEMES = ("redis", "rediss", "filesystem")


@dataclass(frozen=True, slots=True)
class Reliability:
    lease_seconds: float
    max_attempts: int
    visibility_timeout: int

    @property
    def heartbeat_seconds(self) -> float:
        return self.lease_seconds / 3


#: The most each reliability setting may be: finite, and far beyond any sensible value (a
#: lease or visibility timeout of years overflows the reaper's timed waits, and a unit
#: that may start a million times is never failed).
MAX_LEASE_SECONDS = MAX_VISIBILITY_TIMEOUT = 30 * 24 * 3600
MAX_ATTEMPTS_LIMIT = 1000
_THIRTY_DAYS = f"{30 * 24 * 3600} (30 days)"


def reliability() -> Reliability:
    """The reliability settings of the environment; a value that is not a positive
    finite number within its limit is one line naming the variable, and so is a lease
    not shorter than the visibility timeout (Redis would deliver a running unit's
    message again while its lease still holds it)."""
    rules = Reliability(
        lease_seconds=env_number(
            "ORCHARD_LEASE_SECONDS",
            DEFAULT_LEASE_SECONDS,
            float,
            "a number of seconds",
            maximum=MAX_LEASE_SECONDS,
            limit=_THIRTY_DAYS,
        ),
        max_attempts=env_number(
            "ORCHARD_MAX_ATTEMPTS",
            DEFAULT_MAX_ATTEMPTS,
            int,
            "a whole number of attempts",
            maximum=MAX_ATTEMPTS_LIMIT,
        ),
        visibility_timeout=env_number(
            "ORCHARD_VISIBILITY_TIMEOUT",
            DEFAULT_VISIBILITY_TIMEOUT,
            int,
            "a whole number of seconds",
            maximum=MAX_VISIBILITY_TIMEOUT,
            limit=_THIRTY_DAYS,
        ),
    )
    if rules.lease_seconds >= rules.visibility_timeout:
        raise OrchardError(
            f"ORCHARD_LEASE_SECONDS ({rules.lease_seconds:g}) must be shorter than "
            f"ORCHARD_VISIBILITY_TIMEOUT ({rules.visibility_timeout}): Redis would deliver a "
            "running unit's message again before its lease runs out"
        )
    return rules


#: The most threads ``ORCHARD_TORCH_THREADS`` may give torch.
MAX_TORCH_THREADS = 4096


def torch_threads() -> int | None:
    """``ORCHARD_TORCH_THREADS``: the threads torch may use in a worker (None: torch's
    own default); anything but a whole number from 1 is one line naming it."""
    return env_number(
        "ORCHARD_TORCH_THREADS", None, int, "a whole number of threads", maximum=MAX_TORCH_THREADS
    )


def check_device(value: str | None) -> None:
    """``ORCHARD_DEVICE`` for a worker that trains: one torch can use on this host, or
    one line naming the variable (checked when the worker starts, not at its first
    fold, which would fail, and every fold after it)."""
    if not value or not value.strip():
        return
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise OrchardError(
            f"ORCHARD_DEVICE={value!r}: not a device torch knows; use cpu, cuda or cuda:N"
        ) from None
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise OrchardError(
            f"ORCHARD_DEVICE={value}: this host has no CUDA device torch can use (no NVIDIA "
            "driver, or CUDA_VISIBLE_DEVICES hides them all); unset it to train on the CPU"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise OrchardError(
            f"ORCHARD_DEVICE={value}: this host's torch sees {count} CUDA device(s), "
            f"cuda:0 to cuda:{count - 1}"
        )


def redis_tls_options(env: dict[str, str] | None = None) -> dict[str, Any]:
    """``broker_use_ssl`` for a ``rediss://`` broker: the server's certificate is checked
    against ORCHARD_REDIS_TLS_CA_CERTS (or the system's CAs); a client certificate is
    sent when ORCHARD_REDIS_TLS_CERTFILE / _KEYFILE are set."""
    env = dict(os.environ) if env is None else env
    # the host name too: redis-py 5 (which orchard accepts) leaves it unchecked, and then
    # any certificate a trusted CA signed, for any name, would pass
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}
    for name, key in (
        ("ORCHARD_REDIS_TLS_CA_CERTS", "ssl_ca_certs"),
        ("ORCHARD_REDIS_TLS_CERTFILE", "ssl_certfile"),
        ("ORCHARD_REDIS_TLS_KEYFILE", "ssl_keyfile"),
    ):
        if env.get(name):
            options[key] = env[name]
    return options


def make_broker_folders(settings: Settings) -> None:
    """Create a filesystem broker's folders (a Redis broker needs nothing): the workers'
    app does it when it is built, a producer just before it first sends."""
    if not settings.broker_is_filesystem:
        return
    folder = settings.broker_folder
    try:
        for sub in ("queue", "control", "processed"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OrchardError(
            f"ORCHARD_BROKER_URL: cannot create the broker folder {folder}: {exc.strerror or exc}"
        ) from None


#: Who logged a worker's line, as Celery's default formats say it.
LOG_WHO = "%(levelname)s/%(processName)s"


def celery_config(settings: Settings) -> dict[str, Any]:
    # every reliability setting is checked here, so that a worker (and `celery -A
    # workers.app`) refuses a bad one at start, not in its reaper thread or first task
    visibility = reliability().visibility_timeout
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        # for ever: Celery's 100 tries (about 50 min) ended a worker whose broker was
        # away that long, with exit code 0, which neither the GPU launcher nor a
        # supervisor's on-failure restart takes for a failure: it stayed down
        "broker_connection_max_retries": None,
        "broker_connection_timeout": 5,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "result_accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        "task_default_queue": "cpu",
        "task_routes": {name: {"queue": queue} for name, queue in TASKS.values()},
        "task_create_missing_queues": True,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 30,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 3,
        },
        "timezone": "UTC",
        "enable_utc": True,
        # the times of a worker's log lines in UTC, as everything else orchard shows
        # (workers.logs.install makes them so), whatever the host's zone
        "worker_log_format": f"[%(asctime)s UTC: {LOG_WHO}] %(message)s",
        "worker_task_log_format": f"[%(asctime)s UTC: {LOG_WHO}] "
        "%(task_name)s[%(task_id)s]: %(message)s",
    }
    transport: dict[str, Any] = {}
    if settings.broker_is_filesystem:
        folder = settings.broker_folder
        # the folder travels in the transport options; a host name keeps kombu quiet
        config["broker_url"] = "filesystem://localhost/"
        transport = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "control_folder": str(folder / "control"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "polling_interval": 0.2,
        }
    elif settings.broker_url.startswith(("redis://", "rediss://")):
        transport = {
            "visibility_timeout": visibility,
            # look for messages of dead workers about four times per visibility timeout
            # (kombu's default sweep is every ~100 s, too slow for a short timeout)
            "unacked_restore_interval": max(1, min(10, visibility // 4)),
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": BROKER_CONNECT_TIMEOUT,
            "socket_timeout": BROKER_SOCKET_TIMEOUT,
        }
        if settings.broker_url.startswith("rediss://"):
            config["broker_use_ssl"] = redis_tls_options()
        prefix = os.environ.get("ORCHARD_REDIS_PREFIX")
        if prefix:
            # several orchard installations (or test runs) can share one Redis
            transport["global_keyprefix"] = prefix
    config["broker_transport_options"] = transport
    return config


def broker_url_problem(url: str) -> str | None:
    """Why orchard cannot use ``url`` as its broker, or None. Looks at the URL only."""
    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        return "not a broker URL; " + BROKER_URL_EXAMPLES
    if scheme not in BROKER_SCHEMES:
        return f"{scheme!r} is not a broker orchard knows; " + BROKER_URL_EXAMPLES
    userinfo = url.partition("://")[2].rpartition("@")[0]
    if scheme in ("redis", "rediss") and any(c in userinfo for c in "/?#"):
        # a URL parser ends the host there: the password would be cut, and quoted
        return (
            "a '/', '?' or '#' in the password ends the host part of a URL; "
            "percent-encode them (%2F, %3F, %23)"
        )
    try:
        _ = urlsplit(url).port  # parsing it is the check
    except ValueError:  # its message may quote the URL, password included
        return "not a valid URL (a port that is not a number, or a bad [IPv6] address)"
    if scheme in ("redis", "rediss"):
        return _query_problem(url)
    return None


def check_broker_url(url: str) -> None:
    """One line naming ORCHARD_BROKER_URL and the URL (password masked) when orchard
    cannot use it as a broker; connects to nothing."""
    if problem := broker_url_problem(url):
        raise OrchardError(f"ORCHARD_BROKER_URL {mask_url(url)}: {problem}")


#: The options a Redis broker URL's query may carry: kombu passes every one to its
#: ``Connection`` as a keyword, and fails with a TypeError on any other. orchard sets
#: the socket timeouts itself (transport options), and TLS from ORCHARD_REDIS_TLS_*.
BROKER_QUERY_OPTIONS = ("heartbeat",)


def _query_problem(url: str) -> str | None:
    """Why kombu would refuse an option in the query of Redis broker ``url``, or None."""
    # the user info holds no '?' by now (broker_url_problem): the first one starts it
    query = url.partition("?")[2].partition("#")[0]
    for key, value in parse_qsl(query, keep_blank_values=True):
        where = f"option {key!r} in the URL's query"
        if key.lower() in ("password", "passwd", "pwd"):
            return (
                f"{where}: put the password in the URL's user info "
                "(redis://:PASSWORD@HOST:6379/0) or in ORCHARD_BROKER_PASSWORD_FILE"
            )
        if key == "connect_timeout":
            # kombu hands it on as text, and Celery's remote control (cancel's revokes,
            # Flower, inspect) then fails adding it to a float
            return (
                f"{where}: orchard sets the broker's connect timeout itself "
                f"({BROKER_CONNECT_TIMEOUT} s); drop it"
            )
        if key == "heartbeat":
            try:
                number = float(value)
            except ValueError:
                number = float("nan")
            if not 0 <= number < float("inf"):
                return f"{where}: {value!r} is not a number of seconds (0 or more)"
        elif key.startswith("ssl_"):
            # kombu takes the query's ssl_* options in place of orchard's broker_use_ssl:
            # one of them (even ?ssl_ca_certs=) drops the certificate and host-name checks
            return (
                f"{where}: TLS settings go in ORCHARD_REDIS_TLS_CA_CERTS, "
                "ORCHARD_REDIS_TLS_CERTFILE and ORCHARD_REDIS_TLS_KEYFILE (options in the "
                "URL would replace orchard's, which always check the server's certificate "
                "and host name); drop it"
            )
        else:
            return (
                f"{where} is not one orchard's broker connection takes "
                f"({', '.join(BROKER_QUERY_OPTIONS)}); drop it"
            )
    return None


BROKER_URL_EXAMPLES = "use redis://:PASSWORD@HOST:6379/0, rediss://... (TLS) or filesystem:///PATH"
