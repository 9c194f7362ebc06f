"""Atomic file writes: a reader never sees a half-written file, a killed run leaves only a tmp file.

Each helper writes to a temporary file in the destination's folder (same filesystem) and then
``os.replace``s it over the destination, which is atomic on POSIX and Windows.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def temp_file_beside(path: str | os.PathLike[str]) -> tuple[int, Path]:
    """A new temporary file (fd, path) in ``path``'s folder, for writing and then ``os.replace``.

    Same folder: same filesystem, so the replace is atomic. mkstemp makes files 0600; they get
    the permissions a plain ``open`` would give instead, or a shared cache would lock out the
    other users of the machine.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    if hasattr(os, "fchmod"):  # POSIX
        mask = os.umask(0)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)
    return fd, Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A tmp path next to ``path`` for writers that want a path (safetensors' ``save_file``).

    On success it is synced and replaces ``path``; on error it is removed.
    """
    path = Path(path)
    fd, tmp = temp_file_beside(path)
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDWR)  # the writer has closed its handle: sync by path
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a tmp file next to ``path``; on success it replaces ``path``, on error it is removed."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open supports modes 'w' and 'wb', not {mode!r}")
    with (
        atomic_path(path) as tmp,
        open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f,
    ):
        yield f


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (trailing newline, keys kept in order)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")
