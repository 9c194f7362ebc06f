"""Pretrained OpenAI BPE encodings (gpt2, cl100k_base, o200k_base, ...) through tiktoken."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tiktoken

from llm.tokenizers.base import Tokenizer


def load_encoding(name: str) -> tiktoken.Encoding:
    """tiktoken.get_encoding with errors that say what to do when offline."""
    names = tiktoken.list_encoding_names()
    if name not in names:
        raise ValueError(f"unknown tiktoken encoding {name!r}; available: {', '.join(names)}")
    try:
        return tiktoken.get_encoding(name)
    except ValueError as e:
        if "Unknown encoding" in str(e):
            raise ValueError(
                f"unknown tiktoken encoding {name!r}; available: {', '.join(names)}"
            ) from e
        raise _offline_error(name, e) from e
    except Exception as e:
        raise _offline_error(name, e) from e


def _offline_error(name: str, e: BaseException) -> RuntimeError:
    return RuntimeError(
        f"could not load tiktoken encoding {name!r} ({type(e).__name__}: {e}). tiktoken downloads "
        f"its BPE files on first use; without network, set TIKTOKEN_CACHE_DIR to a pre-filled "
        f"cache directory (e.g. ../shared/tiktoken_cache)"
    )


class EncodingBacked(Tokenizer):
    """Shared by every tokenizer whose encoding is a `tiktoken.Encoding` (pretrained or trained).

    Subclasses provide the `encoding` property; the Rust object is rebuilt after pickling.
    """

    encoding: tiktoken.Encoding

    def __getstate__(self) -> dict:
        # DataLoader workers / DDP spawn pickle the tokenizer; the Rust Encoding is rebuilt there.
        state = self.__dict__.copy()
        state["_enc"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special="all")

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self.encoding.encode_batch(
            list(texts), num_threads=num_threads, allowed_special="all"
        )

    def encode_to_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode([int(i) for i in ids])

    def pieces(self, ids: Sequence[int]) -> list[str]:
        enc = self.encoding
        return [enc.decode_single_token_bytes(int(i)).decode("utf-8", "replace") for i in ids]


class TiktokenTokenizer(EncodingBacked):
    """Wraps a tiktoken Encoding, loaded lazily so construction and pickling stay cheap."""

    kind = "tiktoken"

    def __init__(self, name: str = "gpt2"):
        names = tiktoken.list_encoding_names()
        if name not in names:
            raise ValueError(f"unknown tiktoken encoding {name!r}; available: {', '.join(names)}")
        self.name = str(name)
        self._enc: tiktoken.Encoding | None = None

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The underlying tiktoken Encoding (loaded on first use)."""
        if self._enc is None:
            self._enc = load_encoding(self.name)
        return self._enc

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def special_tokens(self) -> dict[str, int]:
        enc = self.encoding
        return {s: enc.encode_single_token(s) for s in sorted(enc.special_tokens_set)}

    def identity(self) -> str:
        return self.name

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name}

    @classmethod
    def from_dict(cls, d: dict) -> TiktokenTokenizer:
        return cls(name=d["name"])
