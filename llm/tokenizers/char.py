"""Character-level tokenizer: one id per distinct corpus character, plus special tokens."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from llm.tokenizers.base import EOT, Tokenizer, checked_specials, short_hash, special_regex


class CharTokenizer(Tokenizer):
    """Ids 0..n-1 are the sorted corpus characters; specials (then unk) follow them."""

    kind = "char"

    def __init__(self, special_tokens: Sequence[str] = (EOT,), unk_token: str | None = None):
        specials = checked_specials(special_tokens, unk_token)
        if unk_token is not None and unk_token not in specials:
            specials.append(str(unk_token))
        self._specials = specials
        self._config_specials = [str(s) for s in special_tokens]
        self.unk_token = unk_token
        self._regex = special_regex(specials)
        self._chars: list[str] | None = None
        self._lut: np.ndarray | None = None

    # ----------------------------------------------------------------- fitting
    @property
    def needs_fit(self) -> bool:
        return self._chars is None

    def fit(self, texts: Iterable[str]) -> None:
        """Collect the corpus alphabet chunk by chunk, so corpora need not fit in memory."""
        if isinstance(texts, str):
            texts = [texts]
        seen: set[str] = set()
        for chunk in texts:
            if self._regex is not None:
                chunk = self._regex.sub("", chunk)
            seen.update(chunk)
        self._set_chars(sorted(seen))

    def _set_chars(self, chars: list[str]) -> None:
        for c in chars:
            if len(c) != 1:
                raise ValueError(f"vocabulary entries must be single characters, got {c!r}")
        self._chars = list(chars)
        cps = np.array([ord(c) for c in chars], dtype=np.int64)
        size = int(cps.max()) + 2 if len(cps) else 1
        lut = np.full(size, -1, dtype=np.int64)  # last slot is always -1: catches cp >= size-1
        lut[cps] = np.arange(len(cps), dtype=np.int64)
        self._lut = lut
        self._itos = self._chars + self._specials
        self._special_ids = {s: len(self._chars) + i for i, s in enumerate(self._specials)}

    def _require_fit(self) -> None:
        if self._chars is None:
            raise RuntimeError(
                "CharTokenizer has no vocabulary yet: call tokenizer.fit(texts) on the corpus "
                "first (or run `llm prepare` to build the token cache)"
            )

    # ---------------------------------------------------------------- encoding
    def _encode_plain(self, text: str, offset: int) -> np.ndarray:
        assert self._lut is not None
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = self._lut[np.minimum(cps, np.uint32(len(self._lut) - 1))]
        if len(ids) and ids.min() < 0:
            bad = ids < 0
            if self.unk_token is None:
                pos = int(np.argmax(bad))
                raise ValueError(
                    f"unknown character {text[pos]!r} at position {offset + pos}: not in the "
                    f"fitted vocabulary (configure unk_token to map unknown characters)"
                )
            ids[bad] = self._special_ids[self.unk_token]
        return ids

    def encode_to_array(self, text: str) -> np.ndarray:
        self._require_fit()
        if self._regex is None or not any(s in text for s in self._specials):
            return self._encode_plain(text, 0)
        parts: list[np.ndarray] = []
        offset = 0
        for i, seg in enumerate(self._regex.split(text)):
            if i % 2:  # odd entries are the captured specials
                parts.append(np.array([self._special_ids[seg]], dtype=np.int64))
            elif seg:
                parts.append(self._encode_plain(seg, offset))
            offset += len(seg)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        return self.encode_to_array(text).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.pieces(ids))

    def pieces(self, ids: Sequence[int]) -> list[str]:
        self._require_fit()
        itos = self._itos
        n = len(itos)
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise ValueError(f"id {i} out of range for vocab_size {n}")
            out.append(itos[i])
        return out

    # -------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        return len(self._chars or []) + len(self._specials)

    @property
    def special_tokens(self) -> dict[str, int]:
        n = len(self._chars or [])
        return {s: n + i for i, s in enumerate(self._specials)}

    @property
    def chars(self) -> list[str]:
        """The fitted alphabet (sorted), empty before fit."""
        return list(self._chars or [])

    def identity(self) -> str:
        return "char-" + short_hash({"special_tokens": self._specials, "unk": self.unk_token})

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "special_tokens": list(self._config_specials),
            "unk_token": self.unk_token,
            "chars": list(self._chars) if self._chars is not None else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        tok = cls(special_tokens=d.get("special_tokens", [EOT]), unk_token=d.get("unk_token"))
        if d.get("chars") is not None:
            tok._set_chars(list(d["chars"]))
        return tok
