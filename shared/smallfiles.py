"""Reading a small file a user names (a campaign file, a password file) safely: a
regular file only, and at most so many bytes. A named pipe would block the command
until something writes to it, and ``/dev/zero`` never ends."""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["FileTooLargeError", "NotRegularFileError", "read_small_file"]

#: What a path may be besides a regular file, as a line names it.
_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class NotRegularFileError(Exception):
    """The path is no regular file; ``kind`` says what it is ("a folder", ...)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class FileTooLargeError(Exception):
    """The file holds more than the limit (what it says of its size aside)."""


def _refuse_unless_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((what for test, what in _KINDS if test(mode)), "not a plain file")
        raise NotRegularFileError(kind)


def read_small_file(path: str | Path, limit: int) -> bytes:
    """The bytes of regular file ``path``, of at most ``limit`` bytes. Raises
    :class:`NotRegularFileError` from the path's ``stat``, before opening it, and
    :class:`FileTooLargeError`; ``OSError`` (no such file, no permission) as it comes."""
    _refuse_unless_regular(os.stat(path).st_mode)
    # O_NONBLOCK: should a FIFO have taken the file's place since, opening it does not
    # wait; the descriptor's own stat then refuses it
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        _refuse_unless_regular(info.st_mode)
        if info.st_size > limit:
            raise FileTooLargeError(path)
        # at most one byte past the limit, whatever the size said (a /proc file says 0)
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 16))):
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    if left <= 0:
        raise FileTooLargeError(path)
    return b"".join(chunks)
