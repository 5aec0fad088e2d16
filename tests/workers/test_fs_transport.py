"""The filesystem broker's messages: found whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest
from kombu import Connection

import workers.config  # noqa: F401 - installs orchard's transport for filesystem://
from workers import fs_transport

#: The broadcast exchange of the tests below (a worker's pidbox is bound to Celery's).
BROADCAST = "orchard-test.pidbox"


def _channel(tmp_path: Path):  # noqa: ANN202 - a kombu filesystem Channel
    folder = tmp_path / "queue"
    folder.mkdir()
    options = {"data_folder_in": str(folder), "data_folder_out": str(folder)}
    conn = Connection("filesystem://localhost/", transport_options=options)
    return conn, conn.default_channel


def test_filesystem_urls_use_orchard_s_transport(tmp_path: Path) -> None:
    conn, channel = _channel(tmp_path)
    try:
        assert isinstance(channel, fs_transport.Channel)
        assert conn.as_uri().startswith("filesystem://")  # banners name it as before
    finally:
        conn.release()


def test_a_message_being_written_is_not_taken_and_then_is_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kombu wrote into the file under its final name: a worker polling meanwhile took
    the empty file, failed to decode it and died, and the message was lost."""
    from queue import Empty

    conn, channel = _channel(tmp_path)
    seen: list[str] = []
    real_dumps = fs_transport.dumps

    def dumps_while_polled(payload: object) -> str:
        try:
            found = channel._get("cpu")  # another process polling the folder now
        except Empty:
            seen.append("nothing yet")
        else:
            seen.append(f"took {found!r}")
        return real_dumps(payload)

    monkeypatch.setattr(fs_transport, "dumps", dumps_while_polled)
    try:
        channel._put("cpu", {"body": "unit"})
        assert seen == ["nothing yet"]
        assert channel._get("cpu") == {"body": "unit"}
        with pytest.raises(Empty):
            channel._get("cpu")
        assert list((tmp_path / "queue").iterdir()) == []  # no partial file left behind
    finally:
        conn.release()


def test_an_auto_delete_queue_goes_with_its_consumer(tmp_path: Path) -> None:
    """A worker's pidbox (bound to the broadcast exchange) stayed bound after the worker
    stopped: every later broadcast (`orchard cancel`'s revoke) wrote a file for it that
    nothing read, one more per worker name ever started (a demo's hold its pid)."""
    from kombu import Exchange, Queue

    folder = tmp_path / "queue"
    folder.mkdir()
    control = tmp_path / "control"
    options = {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "control_folder": str(control),
    }
    # kombu keeps what a process declared in memory, for every connection: a name of
    # its own, not Celery's own celery.pidbox (declared otherwise by other tests)
    exchange = Exchange(BROADCAST, type="fanout")
    with Connection("filesystem://localhost/", transport_options=options) as conn:
        channel = conn.channel()
        box = Queue("w1@h.celery.pidbox", exchange, auto_delete=True, channel=channel)
        kept = Queue("kept@h.celery.pidbox", exchange, channel=channel)
        box.declare()
        kept.declare()
        channel.basic_consume(box.name, True, lambda m: None, "worker")
        producer = conn.Producer(channel)
        producer.publish({"revoke": 1}, exchange=exchange)
        assert len(channel.get_table(BROADCAST)) == 2
        channel.basic_cancel("worker")  # the worker stops
        assert [q.queue for q in channel.get_table(BROADCAST)] == [kept.name]
        assert not any(p.name.endswith(f"{box.name}.msg") for p in folder.iterdir())
        producer.publish({"revoke": 2}, exchange=exchange)
        names = sorted(p.name.partition(".")[2] for p in folder.iterdir())
        assert names == [f"{kept.name}.msg", f"{kept.name}.msg"]


def test_an_auto_delete_queue_another_process_uses_is_kept(tmp_path: Path) -> None:
    """A worker still finishing its warm shutdown while its replacement of the same name
    (the same pidbox) starts: the old one's leaving must not delete the queue the new
    one consumes. Two connections stand for the two processes."""
    from kombu import Exchange, Queue

    folder = tmp_path / "queue"
    folder.mkdir()
    options = {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "control_folder": str(tmp_path / "control"),
    }
    # kombu keeps what a process declared in memory, for every connection: a name of
    # its own, not Celery's own celery.pidbox (declared otherwise by other tests)
    exchange = Exchange(BROADCAST, type="fanout")
    with (
        Connection("filesystem://localhost/", transport_options=options) as old,
        Connection("filesystem://localhost/", transport_options=options) as new,
    ):
        channels = [old.channel(), new.channel()]
        for channel, tag in zip(channels, ("old", "new"), strict=True):
            Queue("w1@h.celery.pidbox", exchange, auto_delete=True, channel=channel).declare()
            channel.basic_consume("w1@h.celery.pidbox", True, lambda m: None, tag)
        old.Producer(channels[0]).publish({"revoke": 1}, exchange=exchange)
        channels[0].basic_cancel("old")  # the old worker leaves
        assert [q.queue for q in channels[1].get_table(BROADCAST)] == ["w1@h.celery.pidbox"]
        # the broadcast the new worker has yet to read is still there
        assert [p.name.partition(".")[2] for p in folder.iterdir()] == ["w1@h.celery.pidbox.msg"]
        channels[1].basic_cancel("new")  # the last user leaves
        assert channels[1].get_table(BROADCAST) == []


_USER = """
import sys, time
from kombu import Connection, Exchange, Queue
import workers.config  # noqa: F401
options = {"data_folder_in": sys.argv[1], "data_folder_out": sys.argv[1],
           "control_folder": sys.argv[2]}
with Connection("filesystem://localhost/", transport_options=options) as conn:
    channel = conn.channel()
    exchange = Exchange(sys.argv[3], type="fanout")
    Queue(sys.argv[4], exchange, auto_delete=True, channel=channel).declare()
    channel.basic_consume(sys.argv[4], True, lambda m: None, "worker")
    print("bound", flush=True)
    time.sleep(600)
"""


def test_an_auto_delete_queue_whose_user_was_killed_goes_when_another_is_declared(
    tmp_path: Path,
) -> None:
    """A worker SIGKILLed (or OOM-killed) never leaves its pidbox: it stayed bound, and
    every later broadcast wrote a file for it that nothing read. Its lock went with its
    process: the next auto-delete queue declared deletes the queue, its messages and
    its users file; a queue a live process uses, and one without a users file (not an
    auto-delete queue), stay."""
    import os
    import signal
    import subprocess
    import sys

    from kombu import Exchange, Queue

    folder, control = tmp_path / "queue", tmp_path / "control"
    folder.mkdir()
    options = {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "control_folder": str(control),
    }
    users = {}
    for name in ("killed@h.celery.pidbox", "alive@h.celery.pidbox"):
        users[name] = subprocess.Popen(
            [sys.executable, "-c", _USER, str(folder), str(control), BROADCAST, name],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert users[name].stdout.readline() == "bound\n"
    try:
        exchange = Exchange(BROADCAST, type="fanout")
        with Connection("filesystem://localhost/", transport_options=options) as conn:
            channel = conn.channel()
            Queue("plain@h.celery.pidbox", exchange, channel=channel).declare()
            conn.Producer(channel).publish({"revoke": 1}, exchange=exchange)
            os.kill(users["killed@h.celery.pidbox"].pid, signal.SIGKILL)
            users["killed@h.celery.pidbox"].wait()
            assert len(channel.get_table(BROADCAST)) == 3  # nothing noticed yet

            Queue("new@h.celery.pidbox", exchange, auto_delete=True, channel=channel).declare()
            bound = sorted(q.queue for q in channel.get_table(BROADCAST))
            assert bound == [
                "alive@h.celery.pidbox",
                "new@h.celery.pidbox",
                "plain@h.celery.pidbox",
            ]
            queued = sorted(p.name.partition(".")[2] for p in folder.iterdir())
            assert queued == ["alive@h.celery.pidbox.msg", "plain@h.celery.pidbox.msg"]
            assert not (control / "killed@h.celery.pidbox.users").exists()
            assert (control / "alive@h.celery.pidbox.users").exists()
    finally:
        for user in users.values():
            user.kill()
            user.wait()
