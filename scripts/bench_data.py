"""Benchmark the first two steps of the path: tokenization throughput and dataset memory.

    python scripts/bench_data.py [--corpus data/tinyshakespeare/input.txt]

Prints MB/s for the char, gpt2 and o200k_base tokenizers, then the resident memory of the
sliding-window dataset (gpt2 ids, block_size=256, stride=1) against the seed's approach, which
materialises an (x, y) pair of tensors for every window.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llm.data import SlidingWindowDataset
from llm.tokenizers import CharTokenizer, TiktokenTokenizer

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    """Resident set size of this process, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def throughput(tokenizer, text: str, reps: int = 3) -> tuple[float, int]:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        ids = tokenizer.encode_to_array(text)
        best = min(best, time.perf_counter() - t0)
    return len(text.encode()) / 2**20 / best, len(ids)


def seed_windows(ids: list[int], block_size: int, stride: int) -> tuple[list, list]:
    """The seed's GPTDatasetV1: one x and one y tensor stored per window."""
    xs, ys = [], []
    for i in range(0, len(ids) - block_size, stride):
        xs.append(torch.tensor(ids[i : i + block_size]))
        ys.append(torch.tensor(ids[i + 1 : i + block_size + 1]))
    return xs, ys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(ROOT / "data/tinyshakespeare/input.txt"))
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--stride", type=int, default=1)
    args = parser.parse_args()
    text = Path(args.corpus).read_text(encoding="utf-8")
    print(f"corpus: {args.corpus} ({len(text.encode()) / 2**20:.2f} MB, {len(text):,} chars)\n")

    char = CharTokenizer()
    char.fit([text])
    print(f"{'tokenizer':<12} {'MB/s':>8} {'tokens':>12}")
    for name, tok in [
        ("char", char),
        ("gpt2", TiktokenTokenizer("gpt2")),
        ("o200k_base", TiktokenTokenizer("o200k_base")),
    ]:
        mbs, n = throughput(tok, text)
        print(f"{name:<12} {mbs:>8.1f} {n:>12,}")

    ids = TiktokenTokenizer("gpt2").encode_to_array(text).astype(np.uint16)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ids.bin"
        ids.tofile(path)
        gc.collect()
        before = rss_mb()
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
        ds = SlidingWindowDataset(tokens, args.block_size, args.stride)
        for i in range(0, len(ds), 997):  # touch windows all over the corpus
            ds[i]
        ours = rss_mb() - before
        n_windows = len(ds)
        del ds, tokens
        gc.collect()

    before = rss_mb()
    xs, _ys = seed_windows(ids.tolist(), args.block_size, args.stride)
    seed = rss_mb() - before
    assert len(xs) == n_windows
    print(
        f"\ndataset memory, gpt2 ids, block_size={args.block_size}, stride={args.stride}, "
        f"{n_windows:,} windows"
    )
    print(f"  SlidingWindowDataset (memmap): {ours:10.1f} MB")
    print(f"  seed (tensors per window):     {seed:10.1f} MB")
    print(f"  ratio: {seed / max(ours, 0.1):,.0f}x")


if __name__ == "__main__":
    main()
