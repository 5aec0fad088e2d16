"""Errors a user can act on. Their ``str()`` is one line naming the file, field or URL."""

from __future__ import annotations

import os
import re
from pathlib import Path

#: C0 and C1 control characters but tab and newline: what a terminal would act on.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def visible_controls(text: str) -> str:
    """``text`` with every control character but tab and newline written ``\\x1b``: a
    file name, title or error text with ESC sequences, printed to a terminal, would
    act (retitle the window, write the clipboard, clear the screen), not show."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", text)


def printable(name: str | Path) -> str:
    """A file name, path or command-line argument as a line can show it: the bytes that
    are not UTF-8 (a shell's ``$'\\xff'``, a Latin-1 file name) written ``\\xe9``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


class OrchardError(Exception):
    """Base for errors reported to the user as one line, never as a traceback."""

    def __init__(self, message: object = "") -> None:
        # whatever went into the message (a file name, a TOML key), it stays one line,
        # and one that a terminal shows rather than obeys
        one_line = " ".join(str(message).split("\n")).replace("\r", " ")
        super().__init__(visible_controls(one_line))
