"""kombu's filesystem transport with messages written whole before they are found.

kombu creates a message's file under its final name and then writes it; a worker
polling the folder in between moves the empty file away, reads nothing and dies
(``Unrecoverable error: JSONDecodeError('Expecting value: line 1 column 1')``), and the
message is lost. Here each message is written under a name no queue matches, then
renamed into place in one step. The files are the same as kombu's: processes on
kombu's own transport read them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from pathlib import Path
from time import monotonic
from typing import TYPE_CHECKING, Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

if TYPE_CHECKING:
    from amqp.protocol import queue_declare_ok_t


class Channel(filesystem.Channel):
    """Besides the whole messages: an auto-delete queue goes when its last consumer does,
    as on a real broker. kombu's filesystem transport never deleted one, so each worker
    ever started kept its pidbox bound to the broadcast exchange (a demo's worker names
    hold its pid), and every `orchard cancel` wrote a message for each, which nothing
    would ever read. The queue's users, in any process, each hold a shared lock on a
    file beside the exchange tables from its declaration (before its binding) on; the
    one that leaves last, taking the lock exclusively, deletes it. A user that never
    leaves (SIGKILLed, the OOM killer) drops its lock with its process: the next
    auto-delete queue declared, in any process, deletes each queue no one holds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._holds: dict[str, int] = {}  # auto-delete queue -> its lock file, held shared

    def queue_declare(
        self, queue: str | None = None, passive: bool = False, **kwargs: Any
    ) -> queue_declare_ok_t:
        declared = super().queue_declare(queue, passive, **kwargs)
        name = declared.queue
        if kwargs.get("auto_delete") and name not in self._holds:
            with contextlib.suppress(OSError):  # without the lock, the queue stays
                self.control_folder.mkdir(parents=True, exist_ok=True)
                self._holds[name] = self._hold(self.control_folder / f"{name}.users")
            self._sweep_abandoned()
        return declared

    @staticmethod
    def _hold(path: Path) -> int:
        """A shared lock on ``path``, the file a leaving user removes with its queue:
        one removed between our open and our lock is made anew."""
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                if _same_file(fd, path):
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def _sweep_abandoned(self) -> None:
        """Delete every queue bound in an exchange table whose users file no process
        holds: its users are gone without leaving. A queue without such a file (not an
        auto-delete queue, or one declared by kombu's own transport) is kept."""
        try:
            tables = sorted(self.control_folder.glob("*.exchange"))
        except OSError:
            return
        for table in tables:
            exchange = table.name.removesuffix(".exchange")
            try:
                entries = self.get_table(exchange)
            except (ChannelError, ValueError):
                continue
            for entry in entries:
                if entry.queue not in self._holds:
                    self._delete_unheld(exchange, entry)

    def _delete_unheld(self, exchange: str, entry: filesystem.exchange_queue_t) -> None:
        path = self.control_folder / f"{entry.queue}.users"
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: a user is there
            if _same_file(fd, path):  # and so not removed by another sweep meanwhile
                self._delete(entry.queue, exchange, entry.routing_key, entry.pattern)
                path.unlink()
        except (ChannelError, OSError):
            pass
        finally:
            os.close(fd)

    def basic_cancel(self, consumer_tag: str) -> None:
        queue = self._tag_to_queue.get(consumer_tag)
        super().basic_cancel(consumer_tag)
        if queue not in self._holds or queue in self._active_queues:
            return
        fd = self._holds.pop(queue)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another user holds it: kept
        except OSError:
            os.close(fd)
            return
        try:
            with contextlib.suppress(ChannelError, OSError):
                self._purge(queue)
                self.queue_delete(queue)
                (self.control_folder / f"{queue}.users").unlink()
        finally:
            os.close(fd)

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        # a leading dot: `_get` takes the files whose name after the first dot is
        # "<queue>.msg", and this one's is "<name>.part"
        partial = os.path.join(self.data_folder_out, f".{name}.part")
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            # kombu's line named neither the reason nor that a folder, not a server, said it
            raise ChannelError(f"cannot write {final}: {exc.strerror or exc}") from exc


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


class Transport(filesystem.Transport):
    Channel = Channel


def install() -> None:
    """Make ``filesystem://`` URLs use this transport in this process (the name stays:
    banners and logs show ``filesystem://``)."""
    import kombu.transport

    kombu.transport.TRANSPORT_ALIASES["filesystem"] = f"{__name__}:Transport"
    # resolved names are cached: one resolved before this must be resolved again
    kombu.transport._transport_cache.pop("filesystem", None)
