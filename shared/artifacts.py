"""Atomic artifact files: written under a temporary name, fsynced, renamed into place.

A reader never sees half a file, and every writer gets back the sha256 and size
that the store records, so a later reader can check what it loads.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


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


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> WrittenFile:
    """Call ``write(fh)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return WrittenFile(path=path, sha256=sha256_file(path), size=path.stat().st_size)


def atomic_write_bytes(path: Path, data: bytes) -> WrittenFile:
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: Path, text: str) -> WrittenFile:
    return atomic_write_bytes(path, text.encode("utf-8"))
