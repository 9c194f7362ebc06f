"""Rebuild any tokenizer from its saved state: the one place that knows every kind."""

from __future__ import annotations

import os

from llm.tokenizers.base import Tokenizer
from llm.tokenizers.char import CharTokenizer
from llm.tokenizers.hf import HFTokenizer
from llm.tokenizers.tiktoken_bpe import TiktokenTokenizer
from llm.tokenizers.trained_bpe import BPETokenizer

KINDS: dict[str, type[Tokenizer]] = {
    CharTokenizer.kind: CharTokenizer,
    TiktokenTokenizer.kind: TiktokenTokenizer,
    BPETokenizer.kind: BPETokenizer,
    HFTokenizer.kind: HFTokenizer,
}


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """Rebuild a tokenizer from ``to_dict`` output (checkpoint or tokenizer.json)."""
    kind = d.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {sorted(KINDS)}")
    return KINDS[kind].from_dict(d)  # type: ignore[attr-defined]


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer saved with ``Tokenizer.save`` (a file that is not JSON is named)."""
    from llm.io import read_json

    return tokenizer_from_dict(read_json(path))
