"""Errors a user can act on. Their ``str()`` is one line naming the file, field or URL."""

from __future__ import annotations

import os
from pathlib import Path


def printable(name: str | Path) -> str:
    """A file name, path or command-line argument as a line can show it: the bytes that
    are not UTF-8 (a shell's ``$'\\xff'``, a Latin-1 file name) written ``\\xe9``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


class OrchardError(Exception):
    """Base for errors reported to the user as one line, never as a traceback."""

    def __init__(self, message: object = "") -> None:
        # whatever went into the message (a file name, a TOML key), it stays one line
        super().__init__(" ".join(str(message).split("\n")).replace("\r", " "))
