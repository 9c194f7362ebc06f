"""Atomic file writes: a reader never sees a half-written file, a killed run leaves only a tmp file.

Each helper writes to a temporary file in the destination's folder (same filesystem) and then
``os.replace``s it over the destination, which is atomic on POSIX and Windows; a folder is
written whole beside its destination and then swapped in (:func:`replaced_folder`). File names
read from a file (a cache's meta.json, a model's index) are kept inside their folder
(:func:`confined`), and JSON that does not parse is named (:func:`read_json`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
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
        os.fchmod(fd, normal_mode())
    return fd, Path(tmp)


def normal_mode(folder: bool = False) -> int:
    """The mode ``open`` (0o666) or ``mkdir`` (0o777) gives under the user's umask: what
    mkstemp's 0600, mkdtemp's 0700 and writers that make their own temp file get changed to."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


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
            if hasattr(os, "fchmod"):  # a writer may have made the file anew (safetensors: 0600)
                os.fchmod(fd, normal_mode())
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


@contextlib.contextmanager
def replaced_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh, empty temp folder beside ``path`` to fill; on success it takes ``path``'s place.

    Whatever was in ``path`` before is removed only once the new folder is complete, so no stale
    file of the old folder survives and a failed or killed write leaves the old one whole (a
    kill between the two renames leaves it as ``.<name>.old-*`` beside). Callers decide first
    whether ``path`` may be replaced at all.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, normal_mode(folder=True))  # mkdtemp's 0700 would lock out the others
        yield tmp
        old = None
        if path.exists() or path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old / path.name, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class OutsideFolderError(ValueError):
    """A file name read from a file that points outside the folder it must stay in."""


def confined(
    folder: str | os.PathLike[str], name: Any, what: str, follow_links: bool = True
) -> Path:
    """``folder / name`` for a file ``name`` read from a file in ``folder`` (a cache's
    meta.json, a model's index), refused unless it names a file inside ``folder``.

    Why: a crafted or damaged list must not make us read (or later delete) files elsewhere. An
    absolute path, ``..``, an empty name or one that resolves out of ``folder`` (through a link,
    with ``follow_links``) raises :class:`OutsideFolderError` naming ``what`` (the file and
    entry). ``follow_links=False`` checks the name alone: a Hugging Face hub snapshot links
    every file to ``../../blobs/``, and those links are the hub's own doing.
    """
    text = name if isinstance(name, str) else None
    problem = None
    if not text or "\x00" in text:
        problem = "is not a file name"
    elif os.path.isabs(text) or Path(text).anchor:
        problem = "is an absolute path"
    elif ".." in Path(text).parts or ".." in text.replace("\\", "/").split("/"):
        problem = "goes up out of the folder (..)"
    elif not Path(text).parts:  # "." or "./": the folder itself
        problem = "is not a file name"
    base = Path(folder)
    path = base / text if problem is None else base
    if problem is None and follow_links and not inside(path, base):
        problem = f"resolves to {path.resolve(strict=False)}, outside the folder"
    if problem is not None:
        raise OutsideFolderError(
            f"{what} {name!r} {problem}: only files inside {folder} are read from it"
        )
    return path


def inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether ``path``, links followed, lies in ``folder`` (links followed too) or is it."""
    return Path(path).resolve(strict=False).is_relative_to(Path(folder).resolve(strict=False))


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON in ``path``; one that does not parse (or is not UTF-8) is a ValueError that
    names the file and where it breaks, not json's bare "Expecting value: line 1 column 1"."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not JSON: not UTF-8 at byte offset {e.start}") from e
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from e


def remove_temp_files(folder: str | os.PathLike[str], pattern: str = ".*.tmp") -> list[str]:
    """Remove the temp files and folders (this module's ``.<name>.*.tmp``) a killed writer left in
    ``folder``; only where no other process writes there (under its lock, at a run's start)."""
    removed = []
    for p in Path(folder).glob(pattern):
        with contextlib.suppress(FileNotFoundError):
            if p.is_dir() and not p.is_symlink():  # a folder's (replaced_folder's temp folder)
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p.name)
    return removed
