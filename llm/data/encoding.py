"""Encode tasks of text in worker processes, in order, with every id checked against the vocab.

At most ``2 * workers`` tasks are in flight, so the main process holds about 2 MB of text per
worker whatever the corpus size; results come back in task order, so the ids are exactly
those of a single process whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm.data.chunking import Task


def default_workers() -> int:
    """All the cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class TokenIdError(ValueError):
    """A tokenizer made an id its vocabulary does not have (the model would index past it)."""


@dataclass
class Encoder:
    """Encodes a task's items into one id array of ``dtype``, checking every id is < vocab."""

    tokenizer: Any
    vocab_size: int
    eot_id: int | None
    dtype: np.dtype
    what: str  # "tokenizer X on corpus Y", for error messages

    def __call__(self, items: list[tuple[bool, str]]) -> tuple[np.ndarray, int]:
        parts: list[np.ndarray] = []
        nbytes = 0
        for eot_first, text in items:
            if eot_first and self.eot_id is not None:
                parts.append(np.array([self.eot_id], dtype=np.int64))
            if text:
                parts.append(np.asarray(self.tokenizer.encode_to_array(text)))
                nbytes += len(text) if text.isascii() else len(text.encode("utf-8"))
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if ids.size:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.vocab_size:
                bad = hi if hi >= self.vocab_size else lo
                raise TokenIdError(
                    f"{self.what} made token id {bad}, outside its vocab_size "
                    f"{self.vocab_size}: the tokenizer is broken or its vocab_size is wrong; "
                    f"no cache was written with it"
                )
        return ids.astype(self.dtype, copy=False), nbytes


_ENCODER: Encoder | None = None


def _init_worker(encoder: Encoder, parent: int) -> None:
    # Ctrl-C reaches the whole process group: the main process stops the workers itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)
    global _ENCODER
    _ENCODER = encoder


def _die_with_parent(parent: int) -> None:
    """A worker whose main process was killed (SIGKILL, out of memory) would wait for tasks
    forever: on Linux the kernel kills it with its parent instead."""
    if sys.platform != "linux":
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


def _encode_in_worker(items: list[tuple[bool, str]]) -> tuple[np.ndarray, int]:
    assert _ENCODER is not None
    return _ENCODER(items)


def _mp_context() -> Any:
    # fork: workers start in milliseconds and do not re-import the caller (llm.train imports
    # torch); macOS and Windows get spawn
    if sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


@contextlib.contextmanager
def encoded(
    encoder: Encoder, tasks: Iterable[Task], workers: int
) -> Iterator[Iterator[tuple[Task, np.ndarray, int]]]:
    """``(task, ids, text bytes)`` in task order, encoded by ``workers`` processes (1: here).

    Leaving the context stops the workers (pending tasks cancelled), however it is left.
    """
    if workers <= 1:
        yield ((t, *encoder(t.items)) for t in tasks)
        return
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=_mp_context(),
        initializer=_init_worker,
        initargs=(encoder, os.getpid()),
    )

    def results() -> Iterator[tuple[Task, np.ndarray, int]]:
        pending: deque[Any] = deque()
        for task in tasks:
            pending.append((task, pool.submit(_encode_in_worker, task.items)))
            task.items = []  # the worker has its copy: hold only the in-flight ones
            while len(pending) >= 2 * workers:
                yield _result(*pending.popleft())
        while pending:
            yield _result(*pending.popleft())

    try:
        yield results()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _result(task: Task, future: Any) -> tuple[Task, np.ndarray, int]:
    try:
        ids, nbytes = future.result()
    except BrokenProcessPool as e:
        raise RuntimeError(
            "a tokenizer worker process died (killed, or out of memory?); finished shards are "
            "kept: run again to resume"
        ) from e
    return task, ids, nbytes
