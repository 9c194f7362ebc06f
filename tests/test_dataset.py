"""SlidingWindowDataset: window arithmetic (property tests), errors, memmap reads and pickling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm.data.dataset import SlidingWindowDataset


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=400),
    block_size=st.integers(min_value=1, max_value=64),
    stride=st.integers(min_value=1, max_value=70),
)
def test_window_arithmetic(n: int, block_size: int, stride: int) -> None:
    tokens = np.arange(n, dtype=np.uint16) * 7 % 65521  # distinct-ish, not just the index
    if n < block_size + 1:
        with pytest.raises(ValueError, match="block_size"):
            SlidingWindowDataset(tokens, block_size, stride)
        return
    ds = SlidingWindowDataset(tokens, block_size, stride)
    starts = range(0, n - block_size, stride)
    assert len(ds) == len(starts) >= 1
    for i in sorted({0, 1, len(ds) // 2, len(ds) - 1} & set(range(len(ds)))):
        x, y = ds[i]
        a = i * stride
        assert x.dtype == y.dtype == torch.int64
        assert x.shape == y.shape == (block_size,)
        assert x.tolist() == tokens[a : a + block_size].tolist()
        assert torch.equal(x[1:], y[:-1])
        assert y[-1].item() == tokens[a + block_size]  # the token right after the window
    last = (len(ds) - 1) * stride
    assert last + block_size < n  # the last window's target is in bounds
    assert last + stride + block_size >= n  # and no further window would fit
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_negative_index_and_stride_one() -> None:
    ds = SlidingWindowDataset(np.arange(10), block_size=4, stride=1)
    assert len(ds) == 6
    assert ds[-1][1].tolist() == [6, 7, 8, 9]
    assert ds[2][0].tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize("block_size", [0, -3])
def test_bad_block_size(block_size: int) -> None:
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        SlidingWindowDataset(np.arange(100), block_size, 1)


@pytest.mark.parametrize("stride", [0, -1])
def test_bad_stride(stride: int) -> None:
    with pytest.raises(ValueError, match="stride must be a positive integer"):
        SlidingWindowDataset(np.arange(100), 8, stride)


def test_too_few_tokens_message() -> None:
    with pytest.raises(ValueError) as e:
        SlidingWindowDataset(np.arange(8), block_size=8, stride=1)
    msg = str(e.value)
    assert "only 8 tokens" in msg and "at least 9" in msg
    assert "smaller block_size" in msg and "bigger corpus" in msg


def test_memmap_reads_and_pickles_by_filename(tmp_path) -> None:
    path = tmp_path / "ids.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    ds = SlidingWindowDataset(mm, block_size=16, stride=3)
    blob = pickle.dumps(ds)
    assert len(blob) < 1000  # the file name, not the 2 KB of ids
    ds2 = pickle.loads(blob)
    assert isinstance(ds2.tokens, np.memmap)
    for i in (0, 5, len(ds) - 1):
        assert all(torch.equal(a, b) for a, b in zip(ds[i], ds2[i], strict=True))
    assert ds[0][0].tolist() == list(range(16))


def test_memmap_views_pickle_by_value(tmp_path) -> None:
    """A slice or strided view keeps the parent's filename but not its start: pickle the data."""
    path = tmp_path / "ids.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    for view, first in ((mm[500:], list(range(500, 504))), (mm[::2], [0, 2, 4, 6])):
        ds = SlidingWindowDataset(view, block_size=4, stride=4)
        assert ds[0][0].tolist() == first
        ds2 = pickle.loads(pickle.dumps(ds))
        assert len(ds2) == len(ds)
        for i in (0, 1, len(ds) - 1):
            assert all(torch.equal(a, b) for a, b in zip(ds[i], ds2[i], strict=True))


def test_memmap_with_offset_pickles_by_filename(tmp_path) -> None:
    """A memmap opened at an offset owns its mapping, so it still pickles as a file name."""
    path = tmp_path / "ids.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r", offset=2 * 300, shape=(600,))
    ds = SlidingWindowDataset(mm, block_size=4, stride=4)
    blob = pickle.dumps(ds)
    assert len(blob) < 1000
    assert pickle.loads(blob)[0][0].tolist() == [300, 301, 302, 303]
