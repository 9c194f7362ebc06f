"""Encode a corpus with worker processes into token shards: bounded memory, resumable.

The main process reads the corpus, cuts it into pieces (:mod:`llm.data.chunking`) and groups
them into tasks of ~1 MB; ``workers`` processes encode the tasks (:mod:`llm.data.encoding`)
and the main process writes their ids in task order, so the stream is exactly a
single-process encoding whatever the number of workers, in bounded memory.

The stream is written as ``shard-000000.bin``, ``shard-000001.bin``, ... of ``shard_tokens``
ids each (the last one shorter), each written to a temporary file and renamed when full.
After each shard, ``progress.json`` records where the next one starts: the ``(document,
char)`` start of the task its first id comes from and how many of that task's ids to skip. A
killed build keeps its finished shards and a new one resumes there, re-encoding at most one
task, and writes the same bytes as an uninterrupted build.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from llm import faults
from llm.data import chunking
from llm.data.corpus import Corpus
from llm.data.encoding import Encoder, default_workers, encoded
from llm.data.progress import BuildProgress
from llm.data.shards import shard_problem
from llm.interrupts import Interrupted
from llm.io import atomic_write_json, remove_temp_files, temp_file_beside

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
SHARD_GLOB = "shard-*.bin"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.bin"


class BuildInterrupted(Interrupted):
    """SIGINT/SIGTERM stopped a build: workers stopped, temp files removed, shards kept."""


class ShardWriter:
    """Appends ids to shard ``index`` in a temp file; a full shard is renamed into place."""

    def __init__(self, folder: Path, shard_tokens: int, index: int) -> None:
        self.folder = folder
        self.shard_tokens = int(shard_tokens)
        self.index = int(index)
        self.filled = 0
        self._file: IO[bytes] | None = None
        self._tmp: Path | None = None

    @property
    def room(self) -> int:
        return self.shard_tokens - self.filled

    def write(self, ids: np.ndarray) -> None:
        if self._file is None:
            fd, self._tmp = temp_file_beside(self.folder / shard_name(self.index))
            self._file = os.fdopen(fd, "wb")
        self._file.write(memoryview(np.ascontiguousarray(ids)).cast("B"))
        self.filled += len(ids)

    def close_shard(self) -> tuple[str, int]:
        """Make the shard being written final: ``(file name, tokens)``."""
        assert self._file is not None and self._tmp is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = shard_name(self.index)
        os.replace(self._tmp, self.folder / name)
        done = (name, self.filled)
        self._file, self._tmp = None, None
        self.index, self.filled = self.index + 1, 0
        return done

    def abort(self) -> None:
        """Drop the unfinished shard (its temp file)."""
        if self._file is not None:
            self._file.close()
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                self._tmp.unlink()
        self._file, self._tmp = None, None


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise BuildInterrupted here (main thread only), so cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    raised = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal raised
        if not raised:  # a second Ctrl-C must not break off the cleanup of the first
            raised = True
            raise BuildInterrupted(signal.Signals(signum).name, signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _well_formed(state: Any) -> bool:
    """Whether progress.json has the shape a build writes (a damaged one is discarded)."""
    if not isinstance(state, dict) or not isinstance(state.get("shards"), list):
        return False
    fields = {"file", "tokens", "next"}
    return all(isinstance(s, dict) and fields <= s.keys() for s in state["shards"])


def _start_state(folder: Path, key: dict[str, Any]) -> dict[str, Any]:
    """The progress of an earlier build of the same content that is still valid, or a new one.

    Its shards are kept up to the first that is missing, damaged or named outside ``folder``
    (:func:`~llm.data.shards.shard_problem`); the build goes on from there.
    """
    fresh: dict[str, Any] = {"key": key, "shards": [], "finished": False}
    try:
        state = json.loads((folder / PROGRESS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        state = None
    except ValueError as e:
        log.warning("discarding the partial build in %s: bad %s (%s)", folder, PROGRESS, e)
        state = None
    if state is not None and not _well_formed(state):
        log.warning("discarding the partial build in %s: %s is malformed", folder, PROGRESS)
        state = None
    if state is not None and state.get("key") != key:
        log.warning("discarding the partial build in %s: made with other settings", folder)
        state = None
    if state is None:
        state = fresh
    kept = []
    dtype, vocab = np.dtype(key["dtype"]), int(key["vocab_size"])
    for shard in state["shards"]:
        problem = shard_problem(folder, shard["file"], shard["tokens"], dtype, vocab, PROGRESS)
        if problem is not None:
            log.warning("building %s again from shard %d: %s", folder, len(kept), problem)
            state["finished"] = False
            break
        kept.append(shard)
    state["shards"] = kept
    listed = {s["file"] for s in kept}
    for f in folder.glob(SHARD_GLOB):
        if f.name not in listed:  # written after the last progress update, or stale
            f.unlink()
    return state


def write_shards(
    folder: Path,
    corpus: Corpus,
    encoder: Encoder,
    key: dict[str, Any],
    shard_tokens: int,
    max_tokens: int | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Encode ``corpus`` into shards in ``folder``, resuming a killed build with the same ``key``.

    ``key`` holds whatever decides the ids (tokenizer, corpus checksum, shard size, cap): a
    partial build made with another key is discarded. Returns ``{"shards", "total",
    "text_bytes", "resumed_from"}``. However it ends, no temp file is left and the workers are
    stopped (wrap it in :func:`signals_raise` for SIGTERM to end it that way too).
    """
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be a positive integer, got {shard_tokens}")
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens must be a positive integer or null, got {max_tokens}")
    workers = default_workers() if workers is None else max(1, int(workers))
    folder.mkdir(parents=True, exist_ok=True)
    state = _start_state(folder, key)
    shards: list[dict[str, Any]] = state["shards"]
    resumed_from = len(shards)
    if shards and not state["finished"]:
        log.info("resuming the build of %s after its %d finished shards", folder, len(shards))
    writer = ShardWriter(folder, shard_tokens, len(shards))
    total = sum(s["tokens"] for s in shards)
    pos = shards[-1]["next"] if shards else None
    if state["finished"] and shards:
        return _summary(shards, total, state.get("text_bytes", 0), resumed_from)
    pos = pos or {"task": 0, "doc": 0, "char": 0, "skip": 0, "bytes": 0}
    text_bytes = pos["bytes"]

    def save() -> None:
        atomic_write_json(folder / PROGRESS, {**state, "text_bytes": text_bytes}, indent=None)

    log.info(
        "tokenizing %s with %d worker process%s into shards of %d tokens",
        corpus.name,
        workers,
        "es" if workers > 1 else "",
        shard_tokens,
    )
    progress = BuildProgress(
        f"tokenizing {corpus.name}",
        total_bytes=corpus.size_bytes(),
        max_tokens=max_tokens,
        initial_bytes=text_bytes,
        initial_tokens=total,
    )
    blocks = corpus.iter_blocks(start_doc=pos["doc"])
    specials = list(getattr(encoder.tokenizer, "special_tokens", {}) or {})
    pieces = chunking.iter_pieces(blocks, chunking.CHUNK_CHARS, specials, start_char=pos["char"])
    tasks = chunking.iter_tasks(pieces, chunking.TASK_CHARS, first_index=pos["task"])
    skip = pos["skip"]
    try:
        with encoded(encoder, tasks, workers) as results:
            for task, ids, nbytes in results:
                off, skip = skip, 0
                end = len(ids) if max_tokens is None else min(len(ids), off + max_tokens - total)
                taken = max(0, end - off)
                while off < end:
                    n = min(writer.room, end - off)
                    writer.write(ids[off : off + n])
                    off, total = off + n, total + n
                    faults.point("prepare.write")
                    if writer.room == 0:
                        name, count = writer.close_shard()
                        faults.point("prepare.shard_renamed")  # on disk, not yet recorded
                        nxt = {"task": task.index, "doc": task.doc, "char": task.char}
                        shards.append(
                            {
                                "file": name,
                                "tokens": count,
                                "next": {**nxt, "skip": off, "bytes": text_bytes},
                            }
                        )
                        save()
                        faults.point("prepare.shard_recorded")
                text_bytes += nbytes
                progress.update(nbytes, taken)
                if max_tokens is not None and total >= max_tokens:
                    break
            if writer.filled:
                name, count = writer.close_shard()
                shards.append({"file": name, "tokens": count, "next": None})
        if total == 0:
            raise ValueError(f"corpus {corpus.name!r} at {corpus.path} gave no tokens")
        state["finished"] = True
        save()
        faults.point("prepare.finished")  # progress says finished, meta.json not yet written
    finally:
        writer.abort()
        # a signal between mkstemp and the writer noting its name would leave the file behind;
        # this build holds the folder's lock, so every temp file in it is its own
        remove_temp_files(folder)
        progress.close()
    return _summary(shards, total, text_bytes, resumed_from)


def recorded_shards(folder: Path) -> int:
    """Shards progress.json lists: those a resumed build keeps (a signal may have come between
    a shard's rename and its record)."""
    try:
        return len(json.loads((folder / PROGRESS).read_text(encoding="utf-8"))["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def _summary(
    shards: list[dict[str, Any]], total: int, text_bytes: int, resumed_from: int
) -> dict[str, Any]:
    return {
        "shards": [{"file": s["file"], "tokens": s["tokens"]} for s in shards],
        "total": total,
        "text_bytes": text_bytes,
        "resumed_from": resumed_from,
    }
