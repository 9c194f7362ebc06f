"""Benchmark the first two steps of the path: tokenization throughput and dataset memory.

    python scripts/bench_data.py [--corpus data/tinyshakespeare/input.txt]
    python scripts/bench_data.py --pretokenize [--mb 100] [--workers 1 2 all] [--tokenizer gpt2]

The first form prints MB/s for the char, gpt2 and o200k_base tokenizers on one thread, then the
resident memory of the sliding-window dataset (gpt2 ids, block_size=256, stride=1) against the
seed's approach, which materialises an (x, y) pair of tensors for every window.

``--pretokenize`` builds the token cache of a corpus of at least ``--mb`` MB (the corpus
repeated, in a temp dir) once per worker count, each build in a fresh process, and prints a
table: seconds, MB/s, tokens/s, speedup over the first count, and the peak RSS of the main
process and of the largest worker. Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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
    import torch

    xs, ys = [], []
    for i in range(0, len(ids) - block_size, stride):
        xs.append(torch.tensor(ids[i : i + block_size]))
        ys.append(torch.tensor(ids[i + 1 : i + block_size + 1]))
    return xs, ys


def repeated_corpus(src: Path, dst: Path, mb: float) -> int:
    """``src`` repeated into ``dst`` until it holds at least ``mb`` MB; its size in bytes."""
    data = src.read_bytes()
    with open(dst, "wb") as f:
        while f.tell() < mb * 1e6:
            f.write(data)
        return f.tell()


def build_once(corpus: str, cache: str, workers: int, tokenizer: str, shard_tokens: int) -> None:
    """One build in this (fresh) process; prints its figures as JSON on stdout."""
    import logging

    from llm.data import TextFiles, ensure_token_cache
    from llm.tokenizers import TiktokenTokenizer

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    tok = TiktokenTokenizer(tokenizer)
    tok.encode("warm up")  # load the encoding before the clock starts
    t0 = time.perf_counter()
    folder, _ = ensure_token_cache(
        TextFiles(corpus), tok, cache, workers=workers, shard_tokens=shard_tokens
    )
    seconds = time.perf_counter() - t0
    meta = json.loads((folder / "meta.json").read_text())
    kb = 1024 if sys.platform != "darwin" else 1  # ru_maxrss: KB on Linux, bytes on macOS
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    out = {
        "cpu_main_s": me.ru_utime + me.ru_stime,
        "cpu_workers_s": kids.ru_utime + kids.ru_stime,
        "seconds": seconds,
        "tokens": meta["total"],
        "bytes": meta["text_bytes"],
        "rss_main_mb": me.ru_maxrss * kb / 1e6,
        "rss_worker_mb": kids.ru_maxrss * kb / 1e6,
    }
    print(json.dumps(out))


def bench_pretokenize(args: argparse.Namespace) -> None:
    from llm.data.encoding import default_workers

    counts = [default_workers() if w == "all" else int(w) for w in args.workers]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        size = repeated_corpus(Path(args.corpus), corpus, args.mb)
        print(
            f"corpus: {Path(args.corpus).name} repeated to {size / 1e6:.1f} MB, one document; "
            f"tokenizer {args.tokenizer}; {default_workers()} cores\n"
        )
        rows = []
        for w in counts:
            cache = Path(tmp) / f"cache-{w}"
            cmd = [sys.executable, __file__, "--_build", str(corpus), str(cache), str(w)]
            cmd += [args.tokenizer, str(args.shard_tokens)]
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=True)
            rows.append((w, json.loads(r.stdout.strip().splitlines()[-1])))
            shutil.rmtree(cache)
        base = rows[0][1]["bytes"] / rows[0][1]["seconds"]
        print(
            f"\n{'workers':>7} {'seconds':>8} {'MB/s':>7} {'Mtok/s':>7} {'speedup':>8} "
            f"{'RSS main MB':>12} {'RSS worker MB':>14} {'CPU s main':>11} {'CPU s workers':>14}"
        )
        for w, r in rows:
            mbs, tps = r["bytes"] / r["seconds"], r["tokens"] / r["seconds"]
            print(
                f"{w:>7} {r['seconds']:>8.1f} {mbs / 1e6:>7.2f} {tps / 1e6:>7.2f} "
                f"{mbs / base:>7.2f}x {r['rss_main_mb']:>12.0f} {r['rss_worker_mb']:>14.0f} "
                f"{r['cpu_main_s']:>11.1f} {r['cpu_workers_s']:>14.1f}"
            )
        print(
            f"\n{rows[0][1]['tokens']:,} tokens. 1 worker encodes in the main process. RSS "
            "worker: the largest worker's peak (forked: it counts pages shared with the main "
            "process). CPU s: user + system, imports included."
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(ROOT / "data/tinyshakespeare/input.txt"))
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--pretokenize", action="store_true", help="token cache build speed")
    parser.add_argument("--mb", type=float, default=100.0, help="corpus size for --pretokenize")
    parser.add_argument("--workers", nargs="+", default=["1", "2", "all"])
    parser.add_argument("--tokenizer", default="gpt2", help="a tiktoken encoding")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000)
    parser.add_argument("--_build", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._build:
        corpus, cache, workers, tokenizer, shard_tokens = args._build
        build_once(corpus, cache, int(workers), tokenizer, int(shard_tokens))
        return
    if args.pretokenize:
        bench_pretokenize(args)
        return
    bench_tokenizers_and_memory(args)


def bench_tokenizers_and_memory(args: argparse.Namespace) -> None:
    from llm.data import SlidingWindowDataset  # imports torch: not in the --_build processes

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
