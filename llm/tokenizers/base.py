"""Common tokenizer interface shared by the char, tiktoken and trained-BPE tokenizers."""

from __future__ import annotations

import abc
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from llm.io import atomic_write_json

EOT = "<|endoftext|>"


def short_hash(obj: Any) -> str:
    """8 hex chars of a stable hash, so configs map to short cache-folder names."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=True).encode()
    return hashlib.sha256(blob).hexdigest()[:8]


def checked_specials(special_tokens: Iterable[str], unk_token: str | None = None) -> list[str]:
    """The specials as deduplicated strings, in order; an empty one is refused.

    An empty token matches between every pair of characters: char encoding would put its id
    everywhere and BPE encoding would never finish, so it must fail here, at construction.
    """
    specials = list(dict.fromkeys(str(s) for s in special_tokens))
    if "" in specials:
        raise ValueError(
            f"special tokens must be non-empty strings, got special_tokens={specials!r}: "
            f"remove the empty entry or name it (e.g. '<|pad|>')"
        )
    if unk_token is not None and str(unk_token) == "":
        raise ValueError(
            "special tokens must be non-empty strings, got unk_token='': name it "
            "(e.g. '<|unk|>') or set unk_token=None to raise on unknown characters"
        )
    return specials


def special_regex(specials: Iterable[str]) -> re.Pattern[str] | None:
    """Capturing regex over the specials (longest first so overlapping names split correctly)."""
    toks = sorted(set(specials), key=len, reverse=True)
    if not toks:
        return None
    return re.compile("(" + "|".join(re.escape(t) for t in toks) + ")")


class Tokenizer(abc.ABC):
    """Text <-> ids; fitted state is plain data so it fits in checkpoints and tokenizer.json."""

    kind: str = ""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; special tokens written in the text become their special ids."""

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        """Encode many texts (subclasses may parallelise)."""
        return [self.encode(t) for t in texts]

    def encode_to_array(self, text: str) -> np.ndarray:
        """1-D int64 ids; the token cache's fast path avoids Python lists where it can."""
        return np.asarray(self.encode(text), dtype=np.int64)

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the model's embedding needs (all ids are < vocab_size)."""

    @property
    @abc.abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """Special token text -> id."""

    @property
    def eot_id(self) -> int | None:
        """Id of <|endoftext|>, used as document separator, or None."""
        return self.special_tokens.get(EOT)

    @property
    def needs_fit(self) -> bool:
        """True until a trainable tokenizer has seen its corpus."""
        return False

    def fit(self, texts: Iterable[str]) -> None:  # noqa: B027 - deliberately a no-op default
        """Learn the vocabulary from ``texts``; pretrained tokenizers ignore it."""

    @abc.abstractmethod
    def identity(self) -> str:
        """Short filesystem-safe id of the config (not the fitted state) for cache folder names."""

    @abc.abstractmethod
    def to_dict(self) -> dict:
        """Full state as plain str/int/list/dict, loadable with torch weights_only=True."""

    @abc.abstractmethod
    def pieces(self, ids: Sequence[int]) -> list[str]:
        """Text of each token, for display (invalid UTF-8 shown as U+FFFD)."""

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write to_dict as JSON atomically, so a crash never leaves a half-written file."""
        atomic_write_json(path, self.to_dict(), indent=None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.identity()})"
