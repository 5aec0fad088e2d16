"""Errors a user can act on. Their ``str()`` is one line naming the file, field or URL."""

from __future__ import annotations

import os
import re
from pathlib import Path

#: C0 and C1 control characters but tab and newline: what a terminal would act on; and
#: the bidirectional overrides and isolates, which reorder the text shown after them
#: (a file name could show as another: "Trojan Source").
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escaped(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible_controls(text: str) -> str:
    """``text`` with every control character but tab and newline written ``\\x1b``, and
    every bidirectional control ``\\u202e``: a file name, title or error text with ESC
    sequences, printed to a terminal, would act (retitle the window, write the
    clipboard, clear the screen), and one with a right-to-left override would show
    reordered, not as it is."""
    return _CONTROL.sub(lambda m: _escaped(m[0]), text)


def printable(name: str | Path) -> str:
    """A file name, path or command-line argument as a line can show it: the bytes that
    are not UTF-8 (a shell's ``$'\\xff'``, a Latin-1 file name) written ``\\xe9``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


#: The exit codes of an `orchard` command's error (README: Exit codes).
EXIT_ERROR = 2
#: sysexits.h's EX_TEMPFAIL: the broker or the database did not answer; the same
#: command may succeed later, as nothing was wrong with what it asked.
EXIT_UNREACHABLE = 75
#: as timeout(1): a wait's --timeout ran out (the campaign goes on)
EXIT_TIMEOUT = 124


class OrchardError(Exception):
    """Base for errors reported to the user as one line, never as a traceback."""

    #: what an `orchard` command that stops on it exits with
    exit_code = EXIT_ERROR

    def __init__(self, message: object = "") -> None:
        # whatever went into the message (a file name, a TOML key), it stays one line,
        # and one that a terminal shows rather than obeys
        one_line = " ".join(str(message).split("\n")).replace("\r", " ")
        super().__init__(visible_controls(one_line))


class UnreachableError(OrchardError):
    """The broker or the database did not answer (refused, timed out, lost): asking
    again later may succeed."""

    exit_code = EXIT_UNREACHABLE
