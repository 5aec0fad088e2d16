"""The reviewed Celery configuration, and the message every task accepts."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.errors import OrchardError
from shared.plan import TASKS
from shared.settings import Settings
from tests.conftest import REPO
from workers.config import (
    DEFAULT_VISIBILITY_TIMEOUT,
    Reliability,
    celery_config,
    make_broker_folders,
)


def settings(tmp_path: Path, broker: str) -> Settings:
    return Settings(tmp_path, broker, "sqlite://", tmp_path / "artifacts")


def test_json_only_late_acks_prefetch_one_events_on(tmp_path: Path) -> None:
    config = celery_config(settings(tmp_path, "redis://127.0.0.1:6379/0"))
    assert config["task_serializer"] == "json"
    assert config["accept_content"] == ["json"]
    assert config["task_acks_late"] is True
    assert config["task_reject_on_worker_lost"] is True
    assert config["worker_prefetch_multiplier"] == 1
    assert config["worker_send_task_events"] is True
    assert config["task_send_sent_event"] is True
    assert config["result_backend"] is None
    assert config["broker_transport_options"]["visibility_timeout"] == DEFAULT_VISIBILITY_TIMEOUT
    assert DEFAULT_VISIBILITY_TIMEOUT >= 6 * 3600  # longer than a full-size CNN fold


def test_every_task_is_routed_to_its_queue(tmp_path: Path) -> None:
    routes = celery_config(settings(tmp_path, "redis://127.0.0.1:6379/0"))["task_routes"]
    assert routes["orchard.train_cnn_fold"] == {"queue": "gpu"}
    assert routes["orchard.fit_svm"] == {"queue": "cpu"}
    assert routes["orchard.fit_rf"] == {"queue": "cpu"}
    assert routes["orchard.preprocess_shard"] == {"queue": "preprocess"}
    assert routes["orchard.report"] == {"queue": "report"}
    assert len(routes) == len(TASKS)


def test_filesystem_broker_folders(tmp_path: Path) -> None:
    config = celery_config(settings(tmp_path, f"filesystem://{tmp_path / 'b'}"))
    options = config["broker_transport_options"]
    assert options["data_folder_in"] == options["data_folder_out"] == str(tmp_path / "b" / "queue")
    assert not (tmp_path / "b").exists()  # configuring creates nothing
    make_broker_folders(settings(tmp_path, f"filesystem://{tmp_path / 'b'}"))
    assert all((tmp_path / "b" / sub).is_dir() for sub in ("queue", "control", "processed"))


def test_redis_key_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHARD_REDIS_PREFIX", "team-a:")
    config = celery_config(settings(tmp_path, "redis://127.0.0.1:6379/0"))
    assert config["broker_transport_options"]["global_keyprefix"] == "team-a:"


def test_registered_task_names() -> None:
    from workers.app import app

    app.loader.import_default_modules()
    assert {name for name, _ in TASKS.values()} <= set(app.tasks)


def test_unit_message_takes_ids_only() -> None:
    from workers.tasks.base import UnitMessage

    ok = UnitMessage(campaign_id="quick-20261127-1", unit_key="quick-20261127-1/report")
    assert ok.unit_key.endswith("/report")
    with pytest.raises(ValidationError):
        UnitMessage(campaign_id="quick", unit_key="k", images=[[0, 1]])  # no payloads
    with pytest.raises(ValidationError):
        UnitMessage(campaign_id="../etc", unit_key="k")


def test_dead_workers_messages_are_looked_for_often_enough(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ORCHARD_VISIBILITY_TIMEOUT", "8")
    monkeypatch.setenv("ORCHARD_LEASE_SECONDS", "5")
    options = celery_config(settings(tmp_path, "redis://127.0.0.1:6379/0"))[
        "broker_transport_options"
    ]
    assert options["visibility_timeout"] == 8
    # kombu's default sweep (~100 s) would leave a killed worker's task waiting long
    # after its visibility timeout
    assert options["unacked_restore_interval"] * options["unacked_restore_throttle"] <= 2


def test_publishing_rides_out_a_broker_restart(tmp_path: Path) -> None:
    config = celery_config(settings(tmp_path, "redis://127.0.0.1:6379/0"))
    policy = config["task_publish_retry_policy"]
    assert config["task_publish_retry"] is True
    assert policy["max_retries"] * policy["interval_max"] >= 60


def test_a_worker_waits_for_its_broker_for_ever(tmp_path: Path) -> None:
    """Celery's default, 100 tries (about 50 min against a host that is down), ended the
    worker with exit code 0: no launcher or on-failure restart brought it back."""
    from celery import Celery

    config = celery_config(settings(tmp_path, "redis://127.0.0.1:6379/0"))
    assert config["broker_connection_max_retries"] is None
    app = Celery(set_as_current=False)
    app.config_from_object(config)
    assert app.conf.broker_connection_max_retries is None  # not Celery's 100


def test_rediss_verifies_the_server_certificate(tmp_path: Path, monkeypatch) -> None:
    import ssl

    monkeypatch.setenv("ORCHARD_REDIS_TLS_CA_CERTS", "/etc/orchard/ca.pem")
    config = celery_config(settings(tmp_path, "rediss://:pw@head:6380/0"))
    assert config["broker_use_ssl"] == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_check_hostname": True,  # redis-py 5 does not check it unless told
        "ssl_ca_certs": "/etc/orchard/ca.pem",
    }
    assert "broker_use_ssl" not in celery_config(settings(tmp_path, "redis://head:6379/0"))


def test_lease_and_attempt_settings(monkeypatch) -> None:
    from workers.config import DEFAULT_LEASE_SECONDS, DEFAULT_MAX_ATTEMPTS, reliability

    assert reliability().lease_seconds == DEFAULT_LEASE_SECONDS
    assert reliability().max_attempts == DEFAULT_MAX_ATTEMPTS >= 2
    # the lease must run out long before Redis hands the task to someone else
    assert DEFAULT_LEASE_SECONDS * 10 < DEFAULT_VISIBILITY_TIMEOUT
    monkeypatch.setenv("ORCHARD_LEASE_SECONDS", "6")
    monkeypatch.setenv("ORCHARD_MAX_ATTEMPTS", "5")
    assert (reliability().lease_seconds, reliability().heartbeat_seconds) == (6.0, 2.0)
    assert reliability().max_attempts == 5


@pytest.mark.parametrize(
    "name, value",
    [
        ("ORCHARD_VISIBILITY_TIMEOUT", "12h"),
        ("ORCHARD_VISIBILITY_TIMEOUT", "0"),
        ("ORCHARD_LEASE_SECONDS", "x"),
        ("ORCHARD_LEASE_SECONDS", "-1"),
        ("ORCHARD_LEASE_SECONDS", "nan"),
        ("ORCHARD_MAX_ATTEMPTS", "1.5"),
        ("ORCHARD_LEASE_SECONDS", "inf"),
        ("ORCHARD_LEASE_SECONDS", "-inf"),
        ("ORCHARD_MAX_ATTEMPTS", "nan"),
    ],
)
def test_a_bad_reliability_setting_is_one_line_naming_it(monkeypatch, name, value) -> None:
    from workers.config import reliability

    monkeypatch.setenv(name, value)
    with pytest.raises(OrchardError, match=rf"^{name}='{re.escape(value)}': expected .* than 0$"):
        reliability()


@pytest.mark.parametrize(
    ("name", "value", "limit"),
    [
        ("ORCHARD_LEASE_SECONDS", "1e12", "2592000 (30 days)"),
        ("ORCHARD_LEASE_SECONDS", "2592000.5", "2592000 (30 days)"),
        ("ORCHARD_VISIBILITY_TIMEOUT", "2592001", "2592000 (30 days)"),
        ("ORCHARD_VISIBILITY_TIMEOUT", "9" * 30, "2592000 (30 days)"),
        ("ORCHARD_MAX_ATTEMPTS", "1001", "1000"),
    ],
)
def test_a_reliability_setting_past_its_limit_is_one_line_naming_it(
    monkeypatch, name, value, limit
) -> None:
    from workers.config import reliability

    monkeypatch.setenv(name, value)
    with pytest.raises(OrchardError) as caught:
        reliability()
    assert str(caught.value) == (
        f"{name}={value!r}: expected a {'whole ' if name != 'ORCHARD_LEASE_SECONDS' else ''}"
        f"number of {'attempts' if 'ATTEMPTS' in name else 'seconds'} greater than 0 "
        f"and at most {limit}"
    )


def test_the_limits_themselves_are_taken(monkeypatch) -> None:
    from workers.config import reliability

    monkeypatch.setenv("ORCHARD_LEASE_SECONDS", "2591999")
    monkeypatch.setenv("ORCHARD_VISIBILITY_TIMEOUT", "2592000")
    monkeypatch.setenv("ORCHARD_MAX_ATTEMPTS", "1000")
    assert reliability() == Reliability(2591999.0, 1000, 2592000)
    # the reaper waits a lease period on a threading.Event: the longest must be allowed
    assert reliability().lease_seconds * 2 < threading.TIMEOUT_MAX


def test_the_worker_command_reports_an_unbounded_lease_in_one_line(tmp_path: Path) -> None:
    """The reaper thread would die of an OverflowError, leaving units QUEUED."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHARD_")}
    env["ORCHARD_HOME"] = str(tmp_path)
    orchard = [sys.executable, "-m", "scheduler.cli"]
    run = functools.partial(subprocess.run, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run([*orchard, "db", "upgrade"], env=env).returncode == 0
    env["ORCHARD_LEASE_SECONDS"] = "1e12"
    done = run([*orchard, "worker", "--queues", "cpu"], env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "orchard: error: ORCHARD_LEASE_SECONDS='1e12': expected a number of seconds "
        "greater than 0 and at most 2592000 (30 days)\n"
    )


@pytest.mark.parametrize(
    ("query", "option"),
    [("foo=bar", "foo"), ("socket_timeout=abc", "socket_timeout"), ("a=1&ssl_x=2", "a")],
)
def test_an_unknown_option_in_the_broker_urls_query_is_named(query, option) -> None:
    from workers.config import broker_url_problem

    problem = broker_url_problem(f"redis://:S3cret@127.0.0.1:6379/12?{query}")
    assert problem is not None and "S3cret" not in problem
    assert problem.startswith(f"option {option!r} in the URL's query is not one orchard's ")


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ("heartbeat=abc", "option 'heartbeat' in the URL's query: 'abc' is not a number"),
        ("heartbeat=nan", "option 'heartbeat' in the URL's query: 'nan' is not"),
        ("connect_timeout=3", "option 'connect_timeout' in the URL's query: orchard sets the "),
    ],
)
def test_a_broker_query_option_orchard_sets_or_cannot_read_is_named(query, problem) -> None:
    from workers.config import broker_url_problem

    assert broker_url_problem(f"redis://h:6379/0?{query}").startswith(problem)


def test_known_broker_options_pass_the_check() -> None:
    from workers.config import broker_url_problem

    assert broker_url_problem("redis://h:6379/0?heartbeat=10") is None


def test_a_password_in_the_broker_urls_query_is_refused_with_advice() -> None:
    """kombu takes the password from the user info only (with one in the query too, its
    URL parser fails with a TypeError)."""
    from workers.config import broker_url_problem

    problem = broker_url_problem("redis://h:6379/0?password=S3cret")
    assert problem is not None and "S3cret" not in problem
    assert problem.startswith("option 'password' in the URL's query: put the password ")


def test_a_broker_folder_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(OrchardError, match=r"^ORCHARD_BROKER_URL: cannot create the broker"):
        make_broker_folders(settings(tmp_path, f"filesystem://{tmp_path / 'file' / 'broker'}"))


def test_unit_tasks_have_no_hidden_retry_limit() -> None:
    """``task.retry(max_retries=None)`` means the task's own limit (Celery's default: 3):
    the retries that wait for a lease or the store would drop their message."""
    from workers.app import app

    app.loader.import_default_modules()  # registers them (workers.tasks alone does not)
    for name, _ in TASKS.values():
        assert app.tasks[name].max_retries is None, name


@pytest.mark.parametrize(
    "campaign_id, unit_key",
    [
        ("c-1", "c-1/../../etc/passwd"),
        ("c-1", "/etc/passwd"),
        ("c-1", "c-1/cnn/abc/f0/.."),
        ("c-1", "other/cnn/abc/f0"),
        ("c-1", "c-1\\..\\x"),
    ],
)
def test_unit_keys_are_safe_in_paths(campaign_id: str, unit_key: str) -> None:
    from workers.tasks.base import UnitMessage

    with pytest.raises(ValidationError):
        UnitMessage(campaign_id=campaign_id, unit_key=unit_key)
    ok = UnitMessage(campaign_id="c-1", unit_key="c-1/rf/0a1b2c3d4e5f/f0/t1")
    assert ok.unit_key.endswith("/t1")


def test_a_redis_broker_that_never_answers_times_out(tmp_path: Path) -> None:
    from kombu.transport.redis import Transport

    from workers.config import BROKER_CONNECT_TIMEOUT, BROKER_SOCKET_TIMEOUT

    for url in ("redis://127.0.0.1:6379/0", "rediss://:pw@head:6380/0"):
        options = celery_config(settings(tmp_path, url))["broker_transport_options"]
        assert options["socket_connect_timeout"] == BROKER_CONNECT_TIMEOUT <= 10
        assert options["socket_timeout"] == BROKER_SOCKET_TIMEOUT
    # an idle worker's BRPOP is answered, empty, every brpop_timeout: far below the socket
    # timeout, so an empty queue never looks like a dead broker
    assert Transport.brpop_timeout * 10 <= BROKER_SOCKET_TIMEOUT
    filesystem = celery_config(settings(tmp_path, f"filesystem://{tmp_path / 'b'}"))
    assert "socket_timeout" not in filesystem["broker_transport_options"]


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://:pw@head:6379/0", None),
        ("rediss://:pw@head:6380/0", None),
        ("filesystem:///srv/orchard/broker", None),
        ("http://u:pw@head:6379/0", "'http' is not a broker orchard knows; use redis://"),
        ("amqp://head", "'amqp' is not a broker orchard knows"),
        ("notaurl", "not a broker URL; use redis://"),
        ("redis://:pw@head:port/0", "not a valid URL (a port that is not a number"),
        ("redis://:p/w@head:6379/0", "a '/', '?' or '#' in the password"),
        ("rediss://u:p#w@head:6380/0", "a '/', '?' or '#' in the password"),
        ("redis://:p%2Fw@head:6379/0", None),  # percent-encoded: fine
    ],
)
def test_broker_url_problem(url: str, problem: str | None) -> None:
    from workers.config import broker_url_problem

    found = broker_url_problem(url)
    if problem is None:
        assert found is None
    else:
        assert found.startswith(problem) and "pw" not in found


@pytest.mark.parametrize(
    "query",
    [
        "ssl_cert_reqs=none",
        "ssl_cert_reqs=CERT_OPTIONAL",
        "ssl_check_hostname=false",
        "ssl_cert_reqs=required",  # harmless alone, but it would replace the rest
        "ssl_ca_certs=/etc/ca.pem",  # would drop the host-name check (redis-py 5)
    ],
)
def test_tls_options_in_the_broker_url_are_refused(query) -> None:
    """kombu takes a URL's ssl_* options in place of orchard's broker_use_ssl, so any of
    them would quietly undo "a rediss:// broker always verifies the server's certificate
    and host name": TLS settings come from ORCHARD_REDIS_TLS_* only."""
    from workers.config import broker_url_problem

    problem = broker_url_problem(f"rediss://:S3cret@head:6380/0?{query}")
    assert problem is not None and "S3cret" not in problem
    option = query.partition("=")[0]
    assert problem == (
        f"option {option!r} in the URL's query: TLS settings go in "
        "ORCHARD_REDIS_TLS_CA_CERTS, ORCHARD_REDIS_TLS_CERTFILE and ORCHARD_REDIS_TLS_KEYFILE "
        "(options in the URL would replace orchard's, which always check the server's "
        "certificate and host name); drop it"
    )
    assert broker_url_problem("rediss://h:6380/0") is None


@pytest.mark.parametrize(("lease", "visibility"), [("60", "30"), ("60", "60")])
def test_a_lease_not_shorter_than_the_visibility_timeout_is_refused(
    monkeypatch, lease: str, visibility: str
) -> None:
    """Redis would deliver a running unit's message again while its lease holds."""
    from workers.config import reliability

    monkeypatch.setenv("ORCHARD_LEASE_SECONDS", lease)
    monkeypatch.setenv("ORCHARD_VISIBILITY_TIMEOUT", visibility)
    with pytest.raises(OrchardError) as refused:
        reliability()
    assert str(refused.value) == (
        f"ORCHARD_LEASE_SECONDS ({lease}) must be shorter than ORCHARD_VISIBILITY_TIMEOUT "
        f"({visibility}): Redis would deliver a running unit's message again before its "
        "lease runs out"
    )


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5", "5000"])
def test_torch_threads_other_than_a_whole_number_are_refused_naming_the_variable(
    monkeypatch, value: str
) -> None:
    from workers.config import torch_threads

    monkeypatch.setenv("ORCHARD_TORCH_THREADS", value)
    with pytest.raises(OrchardError, match=f"^ORCHARD_TORCH_THREADS='{value}': expected a whole"):
        torch_threads()
    monkeypatch.setenv("ORCHARD_TORCH_THREADS", "4")
    assert torch_threads() == 4
    monkeypatch.delenv("ORCHARD_TORCH_THREADS")
    assert torch_threads() is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("gpu", "ORCHARD_DEVICE='gpu': not a device torch knows; use cpu, cuda or cuda:N"),
        ("cuda", "ORCHARD_DEVICE=cuda: this host has no CUDA device torch can use"),
        ("cuda:3", "ORCHARD_DEVICE=cuda:3: this host has no CUDA device torch can use"),
    ],
)
def test_a_device_torch_cannot_use_is_refused_naming_the_variable(
    monkeypatch, value: str, message: str
) -> None:
    import torch

    from workers.config import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # any machine
    with pytest.raises(OrchardError) as refused:
        check_device(value)
    assert str(refused.value).startswith(message)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda:1")
    check_device("cpu")
    check_device(None)
    with pytest.raises(OrchardError, match="sees 2 CUDA device"):
        check_device("cuda:3")
