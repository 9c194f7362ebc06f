"""Text in, text out: a checkpoint's model and tokenizer sampling a continuation, whole or
streamed as it is sampled.

The CLI is ``llm generate``; the token-level sampling (KV cache, top-k, top-p) is
:mod:`llm.model.generation`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from llm.model import GPT
from llm.model.generation import generate_stream
from llm.tokenizers import Tokenizer

# A UTF-8 character is at most 4 bytes, so a partial one spans at most 4 tokens: text that still
# ends in U+FFFD after that many is taken as the model's own invalid bytes and printed as it is.
_MAX_PENDING = 4


class IncrementalDecoder:
    """Ids in, text out as soon as it is complete: a character whose bytes are split across
    byte-level BPE tokens is held back until its last byte arrives, never shown as U+FFFD.

    Decodes a short window (the previous piece and the new ids) rather than everything so far,
    so a long stream costs linear time; the previous piece gives tokenizers that drop a leading
    space at the start of a text (sentencepiece-style) the context to keep it. This is how vLLM
    and Hugging Face's TextStreamer detokenize incrementally.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        """``context``: the prompt's ids (its last few are kept), so that the first piece is
        decoded after them as the rest will be."""
        self.tokenizer = tokenizer
        self.ids: list[int] = [int(i) for i in list(context)[-_MAX_PENDING:]]
        self._prefix = 0  # ids[_prefix:_read] were printed last: context for the next piece
        self._read = len(self.ids)  # ids before this are printed (or were the prompt)

    def push(self, ids: Sequence[int]) -> str:
        """The text that ``ids`` complete (may be empty while a character is incomplete)."""
        self.ids.extend(int(i) for i in ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (the end of the stream)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self.ids):
            return ""
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read])
        text = decode(self.ids[self._prefix :])
        if not final and text.endswith("\ufffd") and len(self.ids) - self._read < _MAX_PENDING:
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        if text.startswith(before):
            return text[len(before) :]
        return text[len(before.rstrip("\ufffd")) :]  # more bytes completed a forced U+FFFD


class TextStream:
    """The text of a sampled continuation, piece by piece as tokens come; counts the tokens and
    the seconds since sampling began, for a tokens/s line (also after an interruption)."""

    def __init__(
        self, tokens: Iterator[torch.Tensor], tokenizer: Tokenizer, context: Sequence[int] = ()
    ) -> None:
        self._tokens = tokens
        self.decoder = IncrementalDecoder(tokenizer, context)
        self.count = 0
        self._start: float | None = None
        self._end: float | None = None

    def __iter__(self) -> Iterator[str]:
        self._start = time.perf_counter()
        try:
            for tok in self._tokens:
                self.count += 1
                piece = self.decoder.push(tok[0].tolist())
                if piece:
                    yield piece
            rest = self.decoder.flush()
            if rest:
                yield rest
        finally:
            self._end = time.perf_counter()

    @property
    def seconds(self) -> float:
        if self._start is None:
            return 0.0
        return (self._end or time.perf_counter()) - self._start

    def rate(self) -> str:
        """``20 tokens in 0.12 s (166.7 tokens/s)``."""
        s = self.seconds
        per_s = self.count / s if s > 0 else 0.0
        return f"{self.count} tokens in {s:.2f} s ({per_s:.1f} tokens/s)"


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's ids; an empty prompt starts from the end-of-text token, as a document
    boundary is what the model saw before new text."""
    ids = tokenizer.encode(prompt)
    if not ids:
        if tokenizer.eot_id is None:
            raise ValueError(
                "empty prompt and the tokenizer has no end-of-text token to start from"
            )
        ids = [tokenizer.eot_id]
    return ids


def stream_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float | None = None,
    seed: int | None = None,
) -> TextStream:
    """The continuation of ``prompt`` (not the prompt itself), piece by piece as it is sampled:
    the same tokens as :func:`generate_text` for the same seed."""
    model.eval()
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompt)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    tokens = generate_stream(
        model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
    )
    return TextStream(tokens, tokenizer, context=ids)


@torch.no_grad()
def generate_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float | None = None,
    seed: int | None = None,
) -> str:
    """Prompt + sampled continuation, decoded with the checkpoint's own tokenizer.

    A fixed seed gives the same text every call (on the same device).
    """
    ids = prompt_ids(tokenizer, prompt)
    model.eval()
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out = model.generate(
        idx,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
    )
    new = out[0, idx.size(1) :].tolist()
    return prompt + tokenizer.decode(new)
