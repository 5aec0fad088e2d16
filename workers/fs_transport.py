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
import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._auto_delete: set[str] = set()

    def queue_declare(self, queue: str | None = None, passive: bool = False, **kwargs: Any):  # noqa: ANN201
        declared = super().queue_declare(queue, passive, **kwargs)
        if kwargs.get("auto_delete"):
            self._auto_delete.add(declared.queue)
        return declared

    def basic_cancel(self, consumer_tag: str) -> None:
        """Delete an auto-delete queue when its consumer goes, as a real broker does:
        kombu's filesystem transport never did, so each worker ever started kept its
        pidbox bound to the broadcast exchange (a demo's names hold its pid), and every
        `orchard cancel` wrote a message for each, which nothing would ever read."""
        queue = self._tag_to_queue.get(consumer_tag)
        super().basic_cancel(consumer_tag)
        if queue in self._auto_delete and queue not in self._active_queues:
            self._auto_delete.discard(queue)
            with contextlib.suppress(ChannelError, OSError):
                self._purge(queue)
                self.queue_delete(queue)

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
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel


def install() -> None:
    """Make ``filesystem://`` URLs use this transport in this process (the name stays:
    banners and logs show ``filesystem://``)."""
    import kombu.transport

    kombu.transport.TRANSPORT_ALIASES["filesystem"] = f"{__name__}:Transport"
    # resolved names are cached: one resolved before this must be resolved again
    kombu.transport._transport_cache.pop("filesystem", None)
