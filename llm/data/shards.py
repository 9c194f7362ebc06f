"""Shard files of a token cache read as one token stream, memory-mapped, nothing loaded.

A slice that spans a shard boundary reads from both files: the stream (and so every training
window) is the same whatever the shard size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llm.io import OutsideFolderError, confined


class TokenShards:
    """Tokens ``[start, stop)`` of the concatenation of ``files`` (``counts[i]`` ids each).

    Behaves like a read-only 1-D array for what the datasets need: ``len``, integer and slice
    indexing (a slice returns an ndarray), ``dtype``, ``np.asarray``. Pickles as file names, so
    DataLoader workers reopen the files instead of receiving the tokens.
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike[str]],
        counts: Sequence[int],
        dtype: Any,
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        if len(files) != len(counts):
            raise ValueError(f"{len(files)} files but {len(counts)} counts")
        self.files = [str(f) for f in files]
        self.counts = [int(c) for c in counts]
        self.dtype = np.dtype(dtype)
        self.bounds = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])
        total = int(self.bounds[-1])
        stop = total if stop is None else int(stop)
        if not 0 <= start <= stop <= total:
            raise ValueError(f"[{start}, {stop}) is not within the {total} tokens of the shards")
        self.start, self.stop = int(start), stop
        self._maps: list[np.ndarray | None] = [None] * len(self.files)

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def view(self, start: int, stop: int) -> TokenShards:
        """Tokens ``[start, stop)`` of this view, as another view (no copy)."""
        start, stop, _ = slice(start, stop).indices(len(self))
        return TokenShards(
            self.files, self.counts, self.dtype, self.start + start, self.start + max(start, stop)
        )

    def _map(self, k: int) -> np.ndarray:
        m = self._maps[k]
        if m is None:
            m = np.memmap(self.files[k], dtype=self.dtype, mode="r", shape=(self.counts[k],))
            self._maps[k] = m
        return m

    def _read(self, a: int, b: int) -> np.ndarray:
        """Absolute stream positions ``[a, b)``."""
        if a >= b:
            return np.zeros(0, dtype=self.dtype)
        k = int(np.searchsorted(self.bounds, a, side="right")) - 1
        parts = []
        while a < b:
            lo, hi = int(self.bounds[k]), int(self.bounds[k + 1])
            if hi > a:
                parts.append(self._map(k)[a - lo : min(b, hi) - lo])
                a = min(b, hi)
            k += 1
        return np.asarray(parts[0]) if len(parts) == 1 else np.concatenate(parts)

    def __getitem__(self, index: int | slice) -> Any:
        n = len(self)
        if isinstance(index, slice):
            i, j, step = index.indices(n)
            if step != 1:
                return np.asarray(self)[index]
            return self._read(self.start + i, self.start + max(i, j))
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} tokens")
        return self._read(self.start + i, self.start + i + 1)[0]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self._read(self.start, self.stop)
        return out if dtype is None else out.astype(dtype)

    def tolist(self) -> list[int]:
        return np.asarray(self).tolist()

    def __repr__(self) -> str:
        where = Path(self.files[0]).parent if self.files else "no files"
        n = len(self.files)
        return f"TokenShards({len(self):,} {self.dtype.name} tokens, {n} shards, {where})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = [None] * len(self.files)
        return state


# shards whose ids were found below a vocab size in this process, by (device, inode, size,
# mtime, dtype, vocab size): a command checks its cache two or three times (build, reuse,
# load), and each shard's ids are read once
_CHECKED: set[tuple[int, int, int, int, str, int]] = set()


def shard_problem(
    folder: Path, name: Any, count: Any, dtype: np.dtype, vocab_size: int, listed_in: str
) -> str | None:
    """Why shard ``name``, as ``listed_in`` (meta.json, progress.json) lists it, cannot be read
    as ``count`` ids below ``vocab_size``; None when it can.

    The name must stay inside ``folder`` (a crafted list must not make training read another
    file as tokens), the size must match the count, and the largest id must be below the
    vocabulary (a damaged shard of the right size would otherwise end in an IndexError deep in
    the embedding). numpy's max over a memory-mapped shard of 100M tokens (the default shard
    size) took 13 ms as uint16 (200 MB) and 26 ms as uint32 from the page cache, 70-80 ms with
    its pages dropped, on the 2-core machine this was written on; a cold read is bound by the
    disk's read rate.
    """
    try:
        path = confined(folder, name, f"{listed_in}'s shard file")
    except OutsideFolderError as e:
        return str(e)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        return f"{listed_in} gives {name} a token count of {count!r}"
    if not path.is_file():
        return f"missing {name}"
    stat = path.stat()
    size = stat.st_size
    if size != count * dtype.itemsize:
        return f"{name} has {size} bytes, {listed_in} says {count} x {dtype.itemsize}"
    seen = (stat.st_dev, stat.st_ino, size, stat.st_mtime_ns, dtype.name, int(vocab_size))
    if count and seen not in _CHECKED:
        top = int(np.memmap(path, dtype=dtype, mode="r", shape=(count,)).max())
        if top >= vocab_size:
            return (
                f"{name} holds id {top}, not below {listed_in}'s vocab_size {vocab_size}: "
                "the file is damaged"
            )
    _CHECKED.add(seen)
    return None
