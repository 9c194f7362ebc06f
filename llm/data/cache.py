"""Token cache: tokenize a corpus once into flat binary id files that training memory-maps.

Layout of ``cache_root/<corpus checksum[:12]>-<tokenizer identity>/``:
``train.bin`` and ``val.bin`` (raw uint16/uint32 ids), ``tokenizer.json`` (the fitted tokenizer)
and ``meta.json``, written last: a folder without a valid meta is never trusted.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llm.data.corpus import Corpus
from llm.io import atomic_open, atomic_write_json, temp_file_beside
from llm.tokenizers.base import Tokenizer, short_hash, special_regex

log = logging.getLogger(__name__)

CACHE_VERSION = 1
CHUNK_CHARS = 1 << 20  # tokenize at most ~1 MB of text at a time
_COPY_BLOCK = 16 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id: uint16 below 65536, else uint32."""
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


# Places where no GPT-2/cl100k/o200k/BPE pre-token crosses: between a letter and a newline, or
# between a non-space character and a single space that starts a word ("end| word").
_SAFE_CUT = re.compile(r"(?<=[^\W\d_])\n|(?<=\S) (?=[^\W\d_])")


def split_text(
    text: str, max_chars: int = CHUNK_CHARS, specials: Iterable[str] = ()
) -> Iterator[str]:
    """Cut ``text`` into pieces of at most ``max_chars`` where encoding can't tell the difference.

    Each cut is at the last safe place (see ``_SAFE_CUT``) in the window that is not inside one
    of the ``specials`` (a cut there would split a special token into plain text), so encoding
    the pieces one by one gives the same ids as encoding the whole text; without one, a hard
    cut, moved off any special token it would split.
    """
    specials = [s for s in specials if s]
    special = special_regex(specials)
    longest = max((len(s) for s in specials), default=0)
    start, n = 0, len(text)
    while n - start > max_chars:
        end = start + max_chars
        spans = [] if special is None else _spans(special, text, start, end + longest)
        cut = hard = end
        for m in _SAFE_CUT.finditer(text, start + 1, end):
            if not _inside(m.start(), spans):
                cut = m.start()
        if cut == hard:  # no safe place: cut hard, but before (or after) a special token
            for a, b in spans:
                if a < cut < b:
                    cut = a if a > start else b
        yield text[start:cut]
        start = cut
    if start < n:
        yield text[start:]


def _spans(pattern: re.Pattern[str], text: str, start: int, stop: int) -> list[tuple[int, int]]:
    # matches from `start` on suffice: a piece never starts inside a special token
    return [m.span() for m in pattern.finditer(text, start, min(stop, len(text)))]


def _inside(pos: int, spans: list[tuple[int, int]]) -> bool:
    return any(a < pos < b for a, b in spans)


def cache_folder(corpus: Corpus, tokenizer: Any, cache_root: str | os.PathLike[str]) -> Path:
    """Where the cache for this corpus content and tokenizer lives.

    The name holds the tokenizer's config, and the cache there the vocabulary fitted on this
    corpus. A tokenizer fitted elsewhere (a checkpoint's, for llm.evaluate or llm.finetune)
    shares that folder only when its vocabulary is the one cached there; otherwise it gets a
    folder of its own, so ids are never read back with another vocabulary.
    """
    folder = Path(cache_root) / f"{corpus.checksum()[:12]}-{tokenizer.identity()}"
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


def check_cache(folder: str | os.PathLike[str], val_fraction: float | None = None) -> str | None:
    """Why the cache at ``folder`` can't be used (a short reason), or None when it is valid."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return "no meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        itemsize = np.dtype(meta["dtype"]).itemsize
        counts = {s: int(meta["tokens"][s]) for s in ("train", "val")}
    except (ValueError, KeyError, TypeError) as e:
        return f"bad meta.json ({e!r})"
    if meta.get("version") != CACHE_VERSION:
        return f"cache version {meta.get('version')} != {CACHE_VERSION}"
    if val_fraction is not None and abs(float(meta.get("val_fraction", -1)) - val_fraction) > 1e-12:
        return f"val_fraction {meta.get('val_fraction')} != {val_fraction}"
    for split, count in counts.items():
        f = folder / f"{split}.bin"
        if not f.is_file():
            return f"missing {f.name}"
        if f.stat().st_size != count * itemsize:
            return f"{f.name} has {f.stat().st_size} bytes, meta says {count} x {itemsize}"
    tok = folder / "tokenizer.json"
    try:
        json.loads(tok.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"bad tokenizer.json ({e!r})"
    return None


def ensure_token_cache(
    corpus: Corpus,
    tokenizer: Any,
    cache_root: str | os.PathLike[str],
    val_fraction: float = 0.1,
) -> tuple[Path, bool]:
    """Like :func:`build_token_cache` but also says whether it was built (True) or reused."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    folder = cache_folder(corpus, tokenizer, cache_root)
    reason = check_cache(folder, val_fraction)
    if reason is None:
        log.info("reusing token cache %s", folder)
        return folder, False
    if folder.exists():
        log.warning("rebuilding token cache %s: %s", folder, reason)
        with contextlib.suppress(FileNotFoundError):
            (folder / "meta.json").unlink()  # invalid from now on, whatever happens next
    _build(corpus, tokenizer, folder, val_fraction)
    return folder, True


def build_token_cache(
    corpus: Corpus,
    tokenizer: Any,
    cache_root: str | os.PathLike[str],
    val_fraction: float = 0.1,
) -> Path:
    """Tokenize ``corpus`` once (fitting the tokenizer first if it needs it); reuse a valid cache.

    The validation split is the last ``val_fraction`` of the token stream (as nanoGPT does).
    """
    return ensure_token_cache(corpus, tokenizer, cache_root, val_fraction)[0]


def _build(corpus: Corpus, tokenizer: Any, folder: Path, val_fraction: float) -> None:
    t0 = time.perf_counter()
    if not any(doc for doc in corpus.iter_documents()):
        raise ValueError(f"corpus {corpus.name!r} at {corpus.path} is empty: it contains no text")
    if getattr(tokenizer, "needs_fit", False):
        log.info("fitting %s on %s", type(tokenizer).__name__, corpus.name)
        tokenizer.fit(corpus.iter_documents())
    dtype = token_dtype(tokenizer.vocab_size)
    eot = tokenizer.eot_id
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(folder / "train.bin")
    try:
        total = 0
        with os.fdopen(fd, "wb") as out:
            for i, doc in enumerate(corpus.iter_documents()):
                if i > 0 and eot is not None:
                    np.array([eot], dtype=dtype).tofile(out)
                    total += 1
                for piece in split_text(doc, CHUNK_CHARS, tokenizer.special_tokens):
                    ids = np.asarray(tokenizer.encode_to_array(piece))
                    if ids.size and (ids.min() < 0 or ids.max() >= np.iinfo(dtype).max + 1):
                        raise ValueError(f"token id out of range for {dtype}: {ids.max()}")
                    ids.astype(dtype).tofile(out)
                    total += int(ids.size)
        if total == 0:
            raise ValueError(f"corpus {corpus.name!r} at {corpus.path} gave no tokens")
        n_train = int(total * (1.0 - val_fraction))
        n_val = total - n_train
        # val.bin = the tail, copied; train.bin = the head, the tmp file truncated in place.
        with open(tmp, "rb") as src, atomic_open(folder / "val.bin", "wb") as dst:
            src.seek(n_train * dtype.itemsize)
            shutil.copyfileobj(src, dst, _COPY_BLOCK)
        os.truncate(tmp, n_train * dtype.itemsize)
        os.replace(tmp, folder / "train.bin")
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    tokenizer.save(folder / "tokenizer.json")
    seconds = time.perf_counter() - t0
    meta = {
        "version": CACHE_VERSION,
        "tokenizer": {"identity": tokenizer.identity(), "kind": _tokenizer_kind(tokenizer)},
        "vocab_size": int(tokenizer.vocab_size),
        "eot_id": eot,
        "dtype": dtype.name,
        "tokens": {"train": n_train, "val": n_val},
        "total": total,
        "val_fraction": val_fraction,
        "corpus": {"name": corpus.name, "path": str(corpus.path), "checksum": corpus.checksum()},
        "seconds": round(seconds, 3),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(folder / "meta.json", meta)  # last: its presence marks the cache valid
    log.info("built token cache %s: %d tokens in %.1fs", folder, total, seconds)


def _memmap(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    if count == 0:  # numpy cannot mmap an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def load_token_cache(
    folder: str | os.PathLike[str],
) -> tuple[np.ndarray, np.ndarray, dict[str, Any], Any]:
    """Memory-map a valid cache: (train ids, val ids, meta, fitted tokenizer)."""
    from llm.tokenizers import load_tokenizer

    folder = Path(folder)
    reason = check_cache(folder)
    if reason is not None:
        raise ValueError(
            f"token cache {folder} is not usable ({reason}); run prepare to rebuild it"
        )
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    dtype = np.dtype(meta["dtype"])
    train = _memmap(folder / "train.bin", dtype, meta["tokens"]["train"])
    val = _memmap(folder / "val.bin", dtype, meta["tokens"]["val"])
    return train, val, meta, load_tokenizer(folder / "tokenizer.json")
