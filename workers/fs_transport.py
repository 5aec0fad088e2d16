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
