"""Next-token windows over a flat token stream, read on demand (nothing stored per window)."""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


class SlidingWindowDataset(Dataset):
    """Item i is (x, y): ``x = tokens[i*stride : i*stride + block_size]``, y = x shifted by one.

    ``tokens`` is usually an ``np.memmap`` of the token cache: each item slices ``block_size + 1``
    ids, so memory per item is O(block_size) whatever the corpus size or the stride.
    """

    def __init__(self, tokens: Any, block_size: int, stride: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {block_size}")
        if stride <= 0:
            raise ValueError(f"stride must be a positive integer, got {stride}")
        n = len(tokens)
        if n < block_size + 1:
            raise ValueError(
                f"only {n} tokens but block_size={block_size} needs at least {block_size + 1} "
                f"(block_size + 1); use a smaller block_size or a bigger corpus"
            )
        self.tokens = tokens
        self.block_size = int(block_size)
        self.stride = int(stride)
        self._len = len(range(0, n - block_size, stride))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"index {i} out of range for {self._len} windows")
        a = i * self.stride
        chunk = torch.from_numpy(
            np.asarray(self.tokens[a : a + self.block_size + 1]).astype(np.int64)
        )
        return chunk[:-1], chunk[1:]

    def __getstate__(self) -> dict[str, Any]:
        """Pickle a whole memmap as its file name (spawned workers reopen it), not its data.

        Only a memmap that owns its mapping qualifies: a slice or strided view keeps the
        parent's filename but its ``offset`` stays 0 and it may not be contiguous, so reopening
        it would read the wrong tokens; such views are pickled by value instead.
        """
        state = self.__dict__.copy()
        t = self.tokens
        if (
            isinstance(t, np.memmap)
            and t.filename is not None
            and isinstance(t.base, mmap.mmap)
            and t.flags.c_contiguous
        ):
            state["tokens"] = ("__memmap__", t.filename, t.dtype.str, t.offset, t.shape)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        t = state["tokens"]
        if isinstance(t, tuple) and len(t) == 5 and t[0] == "__memmap__":
            _, filename, dtype, offset, shape = t
            state["tokens"] = np.memmap(filename, dtype=dtype, mode="r", offset=offset, shape=shape)
        self.__dict__.update(state)
