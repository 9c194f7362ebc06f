"""Token cache: tokenize a corpus once into shard files of ids that training memory-maps.

Layout of ``cache_root/<corpus checksum[:12]>-<tokenizer identity>[-max<N>]/``:
``shard-000000.bin``, ... (raw uint16/uint32 ids, ``shard_tokens`` each, the last one shorter:
together the token stream, documents separated by end-of-text), ``tokenizer.json`` (the fitted
tokenizer), ``progress.json`` (where each shard ends in the corpus, to resume a killed build),
``build.lock`` (held while building) and ``meta.json``, written last: a folder without a valid
meta is never trusted. See :mod:`llm.data.pretokenize` for how the shards are written.

The validation split is not in the cache: it is the last ``val_fraction`` of the token stream,
taken when the cache is loaded (as nanoGPT does), so changing it needs no new tokenization.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from llm.data import chunking
from llm.data.chunking import CHUNK_CHARS, split_text
from llm.data.corpus import Corpus
from llm.data.encoding import Encoder, TokenIdError, default_workers
from llm.data.pretokenize import (
    BuildInterrupted,
    recorded_shards,
    remove_temp_files,
    signals_raise,
    write_shards,
)
from llm.data.shards import TokenShards, shard_problem
from llm.io import atomic_write_json, confined
from llm.tokenizers.base import Tokenizer, short_hash

log = logging.getLogger(__name__)

__all__ = [
    "CHUNK_CHARS",
    "BuildInterrupted",
    "TokenIdError",
    "build_token_cache",
    "cache_folder",
    "check_cache",
    "ensure_token_cache",
    "load_token_cache",
    "split_counts",
    "split_text",
    "token_dtype",
]

CACHE_VERSION = 2
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB of uint16 ids a shard
LOCK = "build.lock"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id: uint16 below 65536, else uint32."""
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


def split_counts(total: int, val_fraction: float) -> tuple[int, int]:
    """(train, val) token counts: val is the last ``val_fraction`` of the stream."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_train = int(total * (1.0 - val_fraction))
    return n_train, total - n_train


def cache_folder(
    corpus: Corpus,
    tokenizer: Any,
    cache_root: str | os.PathLike[str],
    max_tokens: int | None = None,
    checksum: str | None = None,
) -> Path:
    """Where the cache for this corpus content, tokenizer and token cap lives.

    The name holds the tokenizer's config, and the cache there the vocabulary fitted on this
    corpus. A tokenizer fitted elsewhere (a checkpoint's, for llm.evaluate or llm.finetune)
    shares that folder only when its vocabulary is the one cached there; otherwise it gets a
    folder of its own, so ids are never read back with another vocabulary.
    """
    cap = f"-max{int(max_tokens)}" if max_tokens else ""
    checksum = checksum or corpus.checksum()  # one pass over a big corpus is enough
    folder = Path(cache_root) / f"{checksum[:12]}-{tokenizer.identity()}{cap}"
    if tokenizer.needs_fit:
        return folder
    state = json.loads(json.dumps(tokenizer.to_dict()))  # as tokenizer.json holds it
    try:
        cached = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = None
    if cached == state or (cached is None and not _fits(tokenizer)):
        return folder
    return folder.with_name(f"{folder.name}-{short_hash(state)}")


def _fits(tokenizer: Any) -> bool:
    """Whether this kind of tokenizer learns its vocabulary (char, trained BPE) at all."""
    return type(tokenizer).needs_fit is not Tokenizer.needs_fit


def _tokenizer_kind(tokenizer: Any) -> str:
    with contextlib.suppress(Exception):
        kind = tokenizer.to_dict().get("kind") or tokenizer.to_dict().get("type")
        if kind:
            return str(kind)
    return type(tokenizer).__name__


def check_cache(folder: str | os.PathLike[str]) -> str | None:
    """Why the cache at ``folder`` can't be used (a short reason), or None when it is valid.

    meta.json is checked against the data: its dtype against its vocab size, each shard's
    name (inside ``folder``), size against its count and ids against the vocab size
    (:func:`~llm.data.shards.shard_problem`), the counts against the total, and tokenizer.json
    against it.
    """
    from llm.tokenizers import tokenizer_from_dict

    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return "no meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("version") != CACHE_VERSION:
            return f"cache version {meta.get('version')} != {CACHE_VERSION}"
        dtype, vocab = np.dtype(meta["dtype"]), int(meta["vocab_size"])
        shards = [(s["file"], int(s["tokens"])) for s in meta["shards"]]
        total = int(meta["total"])
        identity, eot = meta["tokenizer"]["identity"], meta["eot_id"]
    except (ValueError, KeyError, TypeError) as e:
        return f"bad meta.json ({e!r})"
    if dtype != token_dtype(vocab):
        want = token_dtype(vocab)
        return f"meta.json's dtype {dtype} is not the one for vocab_size {vocab} ({want})"
    for name, count in shards:
        problem = shard_problem(folder, name, count, dtype, vocab, "meta.json")
        if problem is not None:
            return problem
    if sum(c for _, c in shards) != total or total <= 0:
        return f"the shards hold {sum(c for _, c in shards)} tokens, meta.json's total is {total}"
    try:
        tok = tokenizer_from_dict(json.loads((folder / "tokenizer.json").read_text("utf-8")))
        theirs = (tok.identity(), tok.vocab_size, tok.eot_id)
    except Exception as e:  # any way a damaged file can fail to load
        return f"bad tokenizer.json ({e!r})"
    if theirs != (identity, vocab, eot):
        return (
            f"tokenizer.json (identity, vocab_size, eot_id) = {theirs} disagrees with meta.json's "
            f"{(identity, vocab, eot)}"
        )
    return None


def ensure_token_cache(
    corpus: Corpus,
    tokenizer: Any,
    cache_root: str | os.PathLike[str],
    *,
    workers: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    max_tokens: int | None = None,
) -> tuple[Path, bool]:
    """Like :func:`build_token_cache` but also says whether it was built (True) or reused.

    One process builds a given cache at a time (a file lock): another one waits, then reuses
    it. A folder whose build was killed is resumed; an invalid cache is rebuilt, the reason
    logged. SIGINT or SIGTERM during the build raises :class:`BuildInterrupted` (a
    KeyboardInterrupt) whose message says what was kept, once workers and temp files are gone.
    """
    checksum = corpus.checksum()
    folder = cache_folder(corpus, tokenizer, cache_root, max_tokens, checksum)
    if check_cache(folder) is None:
        log.info("reusing token cache %s", folder)
        return folder, False
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another process is building %s: waiting for it", folder)
        lock.acquire()
    try:
        reason = check_cache(folder)
        if reason is None:
            log.info("reusing token cache %s, built by another process", folder)
            return folder, False
        if (folder / "meta.json").exists():
            log.warning("rebuilding token cache %s: %s", folder, reason)
        with signals_raise():
            _build(corpus, checksum, tokenizer, folder, workers, shard_tokens, max_tokens)
    except BuildInterrupted as e:
        raise BuildInterrupted(
            f"token cache build interrupted by {e}: {recorded_shards(folder)} finished shards "
            f"kept in {folder}, no temp files left; run the same command again to resume",
            e.signum,
        ) from None
    finally:
        lock.release()
    return folder, True


def build_token_cache(
    corpus: Corpus,
    tokenizer: Any,
    cache_root: str | os.PathLike[str],
    *,
    workers: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    max_tokens: int | None = None,
) -> Path:
    """Tokenize ``corpus`` once (fitting the tokenizer first if it needs it); reuse a valid cache.

    ``workers`` processes encode (None: all cores; the ids do not depend on it); the stream is
    written as shards of ``shard_tokens`` ids; ``max_tokens`` caps the tokens taken.
    """
    return ensure_token_cache(
        corpus,
        tokenizer,
        cache_root,
        workers=workers,
        shard_tokens=shard_tokens,
        max_tokens=max_tokens,
    )[0]


def _fitted(corpus: Corpus, tokenizer: Any, folder: Path) -> Any:
    """The tokenizer to encode with: fitted now, or as an interrupted build fitted and saved."""
    from llm.tokenizers import load_tokenizer

    if not any(text for _, text in corpus.iter_blocks()):  # reads up to the first text
        raise ValueError(f"corpus {corpus.name!r} at {corpus.path} is empty: it contains no text")
    if not getattr(tokenizer, "needs_fit", False):
        tokenizer.save(folder / "tokenizer.json")
        return tokenizer
    with contextlib.suppress(Exception):
        saved = load_tokenizer(folder / "tokenizer.json")
        if saved.identity() == tokenizer.identity() and not saved.needs_fit:
            log.info("using the tokenizer an interrupted build fitted: %s", folder)
            return saved
    log.info("fitting %s on %s", type(tokenizer).__name__, corpus.name)
    tokenizer.fit(corpus.iter_documents())
    tokenizer.save(folder / "tokenizer.json")
    return tokenizer


def _build(
    corpus: Corpus,
    checksum: str,
    tokenizer: Any,
    folder: Path,
    workers: int | None,
    shard_tokens: int,
    max_tokens: int | None,
) -> None:
    t0 = time.perf_counter()
    with contextlib.suppress(FileNotFoundError):
        (folder / "meta.json").unlink()  # invalid from now on, whatever happens next
    for old in ("train.bin", "val.bin"):  # a version-1 cache's split files
        with contextlib.suppress(FileNotFoundError):
            (folder / old).unlink()
    removed = remove_temp_files(folder)
    if removed:
        log.info("removed the temp files of an interrupted build: %s", ", ".join(removed))
    tokenizer = _fitted(corpus, tokenizer, folder)
    vocab, eot = int(tokenizer.vocab_size), tokenizer.eot_id
    dtype = token_dtype(vocab)
    what = f"tokenizer {tokenizer.identity()!r} on corpus {corpus.name!r} ({corpus.path})"
    encoder = Encoder(tokenizer, vocab, eot, dtype, what)
    key = {
        "version": CACHE_VERSION,
        "corpus": checksum,
        "tokenizer": short_hash(tokenizer.to_dict()),
        "vocab_size": vocab,
        "eot_id": eot,
        "dtype": dtype.name,
        "shard_tokens": int(shard_tokens),
        "max_tokens": max_tokens,
        "chunk_chars": chunking.CHUNK_CHARS,
    }
    workers = default_workers() if workers is None else max(1, int(workers))
    done = write_shards(folder, corpus, encoder, key, shard_tokens, max_tokens, workers)
    seconds = time.perf_counter() - t0
    meta = {
        "version": CACHE_VERSION,
        "tokenizer": {"identity": tokenizer.identity(), "kind": _tokenizer_kind(tokenizer)},
        "vocab_size": vocab,
        "eot_id": eot,
        "dtype": dtype.name,
        "total": done["total"],
        "shard_tokens": int(shard_tokens),
        "max_tokens": max_tokens,
        "shards": done["shards"],
        "text_bytes": done["text_bytes"],
        "corpus": {"name": corpus.name, "path": str(corpus.path), "checksum": checksum},
        "workers": workers,
        "seconds": round(seconds, 3),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(folder / "meta.json", meta)  # last: its presence marks the cache valid
    log.info(
        "built token cache %s: %d tokens in %d shards, %.1f MB of text in %.1fs",
        folder,
        done["total"],
        len(done["shards"]),
        done["text_bytes"] / 1e6,
        seconds,
    )


def load_token_cache(
    folder: str | os.PathLike[str], val_fraction: float = 0.1
) -> tuple[TokenShards, TokenShards, dict[str, Any], Any]:
    """Memory-map a valid cache: (train ids, val ids, meta, fitted tokenizer).

    The shards are read as one stream (a window may span two shards); val is its last
    ``val_fraction``, train the rest.
    """
    from llm.tokenizers import load_tokenizer

    folder = Path(folder)
    reason = check_cache(folder)
    if reason is not None:
        raise ValueError(
            f"token cache {folder} is not usable ({reason}); run prepare to rebuild it"
        )
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    files = [confined(folder, s["file"], "meta.json's shard file") for s in meta["shards"]]
    stream = TokenShards(files, [s["tokens"] for s in meta["shards"]], meta["dtype"])
    n_train, _ = split_counts(len(stream), val_fraction)
    train, val = stream.view(0, n_train), stream.view(n_train, len(stream))
    return train, val, meta, load_tokenizer(folder / "tokenizer.json")
