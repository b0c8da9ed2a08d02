"""Durable file writes: write to a temporary name in the same directory, fsync, rename.

A reader sees either the old file or the new one, never a torn write.

>>> import tempfile
>>> d = Path(tempfile.mkdtemp())
>>> write_text_atomic(d / "a.json", "{}")
>>> (d / "a.json").read_text()
'{}'
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` only if the block completes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_writer(path) as fh:
        fh.write(data)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_with_atomic(path: Path, writer: Callable[[BinaryIO], None]) -> None:
    """Atomically write ``path`` with a callback that writes into an open binary file."""
    with atomic_writer(path) as fh:
        writer(fh)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in blocks (checksums in version and checkpoint metadata)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def npz_bytes(**arrays: Any) -> bytes:
    """A numpy archive (no pickle) in memory, ready for ``write_bytes_atomic``."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()
