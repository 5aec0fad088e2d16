"""The filesystem broker's messages: found whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest
from kombu import Connection

import workers.config  # noqa: F401 - installs orchard's transport for filesystem://
from workers import fs_transport


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
