"""Atomic artifact files: written under a temporary name, fsynced, renamed into place.

A reader never sees half a file, and every writer gets back the sha256 and size
that the store records, so a later reader can check what it loads.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from shared.errors import OrchardError, printable


@dataclass(frozen=True, slots=True)
class WrittenFile:
    path: Path
    sha256: str
    size: int


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_if_intact(path: Path, sha256: str) -> bytes | None:
    """The bytes of ``path`` if their sha256 is ``sha256``, else None (FileNotFoundError
    if there is no file). Read once: the caller loads the very bytes that were checked,
    never a file replaced on the share between a check and a second read."""
    data = Path(path).read_bytes()
    return data if hashlib.sha256(data).hexdigest() == sha256 else None


class ArtifactWriteError(OrchardError, OSError):
    """A file that could not be written, in one line naming it and why: a full disk, a
    read-only or foreign-owned folder. Still an OSError for callers that catch one."""


def _cannot_write(path: Path, exc: OSError) -> ArtifactWriteError:
    why = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        why += " (the disk, or this user's quota, is full)"
    elif exc.errno == errno.EFBIG:
        why += " (more than this process may write: ulimit -f)"
    elif exc.errno == errno.EROFS:
        why += " (mounted read-only)"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        why += f" (this worker's user, uid {os.getuid()}, may not write there)"
    elif exc.errno is None and "written" in why:  # numpy's short write: "N requested and M written"
        why += " (a short write: is the disk full?)"
    # the folder the failure names, where it is not the file itself nor the temporary
    # file beside it, which was never made
    named = Path(exc.filename) if exc.filename else None
    ours = named == path or (
        named is not None
        and named.parent == path.parent
        and named.name.startswith(f".{path.name}.")
        and named.name.endswith(".tmp")
    )
    where = f"{printable(exc.filename)}: " if named is not None and not ours else ""
    return ArtifactWriteError(f"cannot write {printable(path)}: {where}{why}")


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> WrittenFile:
    """Call ``write(fh)`` on a temporary file beside ``path``, then rename it to ``path``.
    A failure leaves no file behind and raises :class:`ArtifactWriteError`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are meant to be read by others
        os.replace(tmp, path)
        _sync_folder(path.parent)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, ArtifactWriteError):
            raise _cannot_write(path, exc) from None
        raise
    return WrittenFile(path=path, sha256=sha256_file(path), size=path.stat().st_size)


def _sync_folder(folder: Path) -> None:
    """Make the rename in ``folder`` durable: without it, a power loss right after may
    leave the folder without the new name, though the file's bytes were synced (and its
    record is in the store). Best effort: some filesystems cannot sync a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # EINVAL where folders cannot be synced (some network filesystems)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> WrittenFile:
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: Path, text: str) -> WrittenFile:
    return atomic_write_bytes(path, text.encode("utf-8"))


class TooLargeError(OSError):
    """A file holding more bytes than its reader takes (``size``: its size, when
    ``whole``; else how much was read before it stopped)."""

    def __init__(self, size: int, whole: bool) -> None:
        super().__init__(f"{size} bytes")
        self.size, self.whole = size, whole


class NotRegularFileError(OSError):
    """A path to read as a file that is a FIFO, a folder, a device or a socket (``kind``)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def read_bounded(path: Path | str, most: int) -> bytes:
    """The bytes of the regular file at ``path``, at most ``most`` of them: one larger
    from the start is not read at all, and one that grows while it is read stops at
    ``most + 1`` (:class:`TooLargeError` either way). A FIFO, folder, device or socket is
    :class:`NotRegularFileError`, without waiting for a writer nor reading without end
    (``/dev/zero``): a sparse file of gigabytes costs no disk, but a reader its RAM."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO's open waits for a writer
    with open(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISDIR: "a folder"}
            kind = next((k for test, k in kinds.items() if test(info.st_mode)), "a device")
            raise NotRegularFileError(kind)
        if info.st_size > most:
            raise TooLargeError(info.st_size, whole=True)
        data = file.read(most + 1)
    if len(data) > most:
        raise TooLargeError(len(data), whole=False)
    return data
