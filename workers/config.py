"""Every Celery setting orchard uses, in one reviewed dictionary.

Why each matters:
- JSON only: a worker never unpickles what someone put on the broker.
- acks late + reject on worker lost + prefetch 1: a task is removed from the queue
  only once it finished, so a killed worker's task is delivered again, and a worker
  never sits on tasks another worker could run.
- visibility timeout longer than the longest task (Redis): otherwise Redis hands a
  still-running task to a second worker.
- events on: Flower sees every task, sent, started and finished.
- no result backend: results live in orchard's SQL store, keyed by unit.
"""

from __future__ import annotations

import os
from typing import Any

from shared.plan import TASKS
from shared.settings import Settings

#: Longest a single unit may take before Redis re-delivers it (a CNN fold at full size
#: takes hours on a slow card). Override with ORCHARD_VISIBILITY_TIMEOUT (seconds).
DEFAULT_VISIBILITY_TIMEOUT = 12 * 3600


def celery_config(settings: Settings) -> dict[str, Any]:
    visibility = int(os.environ.get("ORCHARD_VISIBILITY_TIMEOUT", DEFAULT_VISIBILITY_TIMEOUT))
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
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
        "timezone": "UTC",
        "enable_utc": True,
    }
    transport: dict[str, Any] = {}
    if settings.broker_is_filesystem:
        folder = settings.broker_folder
        for sub in ("queue", "control", "processed"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
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
        transport = {"visibility_timeout": visibility}
        prefix = os.environ.get("ORCHARD_REDIS_PREFIX")
        if prefix:
            # several orchard installations (or test runs) can share one Redis
            transport["global_keyprefix"] = prefix
    config["broker_transport_options"] = transport
    return config
