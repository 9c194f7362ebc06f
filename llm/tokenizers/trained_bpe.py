"""Byte-level BPE trained on the corpus with rustbpe, encoded/decoded with tiktoken.

Same recipe as karpathy's nanochat: rustbpe learns the merges fast (parallel Rust), and a
``tiktoken.Encoding`` built from the resulting mergeable ranks does fast inference.
``vocab_size`` is the TOTAL vocabulary: 256 byte tokens + merges + special tokens.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterable, Iterator, Sequence

import tiktoken

from llm.tokenizers.base import EOT, checked_specials, short_hash, special_regex
from llm.tokenizers.tiktoken_bpe import EncodingBacked

log = logging.getLogger(__name__)

# GPT-4 (cl100k_base) pre-tokenisation split pattern.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
    r"""\s*[\r\n]|\s+(?!\S)|\s+"""
)


class BPETokenizer(EncodingBacked):
    """Byte-level BPE; ids 0..len(ranks)-1 are mergeable tokens, specials follow them."""

    kind = "bpe"

    def __init__(
        self,
        vocab_size: int = 4096,
        special_tokens: Sequence[str] = (EOT,),
        pattern: str | None = None,
    ):
        specials = checked_specials(special_tokens)
        vocab_size = int(vocab_size)
        if vocab_size < 256 + len(specials):
            raise ValueError(
                f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least 256 byte "
                f"tokens + {len(specials)} special tokens = {256 + len(specials)}"
            )
        self.requested_vocab_size = vocab_size
        self._specials = specials
        self.pattern = str(pattern) if pattern is not None else GPT4_SPLIT_PATTERN
        self._ranks: dict[bytes, int] | None = None
        self._enc: tiktoken.Encoding | None = None

    # ----------------------------------------------------------------- fitting
    @property
    def needs_fit(self) -> bool:
        return self._ranks is None

    def fit(self, texts: Iterable[str]) -> None:
        """Train merges with rustbpe; specials are cut out of the text so they never merge."""
        import rustbpe

        if isinstance(texts, str):
            texts = [texts]
        regex = special_regex(self._specials)

        def stream() -> Iterator[str]:
            for t in texts:
                if regex is None:
                    yield t
                else:
                    yield from (p for i, p in enumerate(regex.split(t)) if i % 2 == 0 and p)

        trainer = rustbpe.Tokenizer()
        n_mergeable = self.requested_vocab_size - len(self._specials)
        trainer.train_from_iterator(stream(), n_mergeable, buffer_size=8192, pattern=self.pattern)
        self._set_ranks({bytes(b): int(r) for b, r in trainer.get_mergeable_ranks()})
        if self.vocab_size < self.requested_vocab_size:
            log.warning(
                "corpus only supports %d of the requested %d tokens (ran out of merges)",
                self.vocab_size,
                self.requested_vocab_size,
            )

    def _set_ranks(self, ranks: dict[bytes, int]) -> None:
        self._ranks = ranks
        self._enc = None

    def _require_fit(self) -> None:
        if self._ranks is None:
            raise RuntimeError(
                "BPETokenizer is not trained yet: call tokenizer.fit(texts) on the corpus first "
                "(or run `llm prepare` to build the token cache)"
            )

    @property
    def encoding(self) -> tiktoken.Encoding:
        """tiktoken Encoding over the learned ranks (built on first use)."""
        self._require_fit()
        if self._enc is None:
            assert self._ranks is not None
            n = len(self._ranks)
            self._enc = tiktoken.Encoding(
                name=f"bpe{self.requested_vocab_size}-{self.identity()}",
                pat_str=self.pattern,
                mergeable_ranks=self._ranks,
                special_tokens={s: n + i for i, s in enumerate(self._specials)},
            )
        return self._enc

    # -------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """Actual size once trained (smaller than requested if the corpus ran out of merges)."""
        if self._ranks is None:
            return self.requested_vocab_size
        return len(self._ranks) + len(self._specials)

    @property
    def special_tokens(self) -> dict[str, int]:
        n = (
            len(self._ranks)
            if self._ranks is not None
            else self.requested_vocab_size - len(self._specials)
        )
        return {s: n + i for i, s in enumerate(self._specials)}

    def identity(self) -> str:
        h = short_hash({"pattern": self.pattern, "special_tokens": self._specials})
        return f"bpe{self.requested_vocab_size}-{h}"

    def to_dict(self) -> dict:
        ranks = None
        if self._ranks is not None:
            ranks = [
                [base64.b64encode(b).decode("ascii"), r]
                for b, r in sorted(self._ranks.items(), key=lambda kv: kv[1])
            ]
        return {
            "kind": self.kind,
            "vocab_size": self.requested_vocab_size,
            "special_tokens": list(self._specials),
            "pattern": self.pattern,
            "mergeable_ranks": ranks,
        }

    @classmethod
    def from_dict(cls, d: dict) -> BPETokenizer:
        tok = cls(
            vocab_size=d["vocab_size"],
            special_tokens=d.get("special_tokens", [EOT]),
            pattern=d.get("pattern"),
        )
        if d.get("mergeable_ranks") is not None:
            tok._set_ranks({base64.b64decode(b): int(r) for b, r in d["mergeable_ranks"]})
        return tok
