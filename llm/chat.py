"""A multi-turn conversation with a language model that keeps its KV cache between turns.

Each turn renders the whole conversation with the checkpoint's template (:mod:`llm.prompts`)
but runs only what is new through the model: the text past what the cache already holds (the
new user turn, plus the previous reply's last token, sampled but not yet run). When the
conversation outgrows the context, whole earliest exchanges are dropped (:func:`fit_turns`; a
turn is never cut) and the rest is prefilled again, with a note the first time. The CLI is
``llm chat``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from llm.inference import IncrementalDecoder
from llm.model import GPT, KVCache
from llm.model.generation import generate_stream
from llm.prompts import Message, check_template, render
from llm.tokenizers import Tokenizer

log = logging.getLogger(__name__)


class TurnRefused(ValueError):
    """A user turn the tokenizer cannot encode (a character a char vocabulary lacks): the
    conversation is left as it was, so the session can go on."""


def fit_turns(
    template: str | None, messages: list[Message], tokenizer: Tokenizer, room: int
) -> tuple[list[Message], str, list[int]]:
    """The latest whole turns of ``messages`` (ending with a user message) that fit in ``room``
    tokens, with their text and ids: earliest exchanges (a user message and its reply) are
    dropped whole, so the prompt starts at a turn boundary, never inside a turn; a system
    message is kept. TurnRefused when the last user message alone does not fit.
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    starts = [i for i, m in enumerate(messages) if m["role"] == "user"]
    for start in starts:
        kept = system + messages[start:]
        text = render(template, kept, tokenizer)
        ids = tokenizer.encode(text)
        if len(ids) <= room:
            return kept, text, ids
    raise TurnRefused(
        f"this turn is {len(ids)} tokens once rendered; the context has room for {room} beside "
        "what it keeps for the reply: shorten the turn, or lower max_new_tokens"
    )


class ChatSession:
    """The conversation so far (messages, their token ids, the KV cache over them) and the
    sampling settings; :meth:`send` streams a reply.

    ``prefilled`` counts, per turn, the tokens run through the model before its reply's first
    token was sampled. ``reserve`` tokens of context are kept free for each reply (default:
    max_new_tokens, at most half the context); a reply stops at end-of-text, at
    max_new_tokens, or where the context is full. ``notify`` gets the notes: the first time a
    conversation drops turns to fit (once: after that it keeps dropping them silently).
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        template: str | None = None,
        system: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int | None = 200,
        top_p: float | None = None,
        seed: int | None = None,
        reserve: int | None = None,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = check_template(template, tokenizer=tokenizer)  # not at turn 1
        if system and template != "chat":
            raise ValueError(f"system= needs template=chat; this session's is {template!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.system = system
        self.sampling: dict[str, Any] = {
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
        }
        self.max_new_tokens = max_new_tokens
        block = model.config.block_size
        self.reserve = min(max_new_tokens, block // 2) if reserve is None else int(reserve)
        if not 1 <= self.reserve < block:
            raise ValueError(f"reserve must be in [1, block_size={block}), got {reserve}")
        self.seed = seed
        self.notify = notify or log.warning
        self.device = next(model.parameters()).device
        self.cache = KVCache(model.config.n_layer, model.config.sliding_window)
        self.prefilled: list[int] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays) and restart the seed's stream."""
        self.messages: list[Message] = []
        if self.system:
            self.messages.append({"role": "system", "content": self.system})
        self.ids: list[int] = []  # the conversation's tokens; the cache holds a prefix of them
        self.text = ""  # the text those ids stand for
        self.dropped = 0  # earlier messages dropped to fit the context
        self.cache.reset()
        self.generator: torch.Generator | None = None
        if self.seed is not None:
            self.generator = torch.Generator(device=self.device).manual_seed(self.seed)

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def send(self, user: str) -> Iterator[str]:
        """The reply to ``user``, piece by piece as it is sampled (end-of-text not shown).

        The turn is taken at the call (a turn the tokenizer or the context cannot take raises
        TurnRefused then, the conversation as it was); the reply is sampled as it is iterated.
        Stopping early (closing the iterator, Ctrl-C) keeps what was sampled as the reply.
        """
        self._append_turn(user)
        return self._reply()

    def _reply(self) -> Iterator[str]:
        budget = min(self.max_new_tokens, self.block_size - len(self.ids))
        idx = torch.tensor([self.ids], dtype=torch.long, device=self.device)
        self.prefilled.append(len(self.ids) - self.cache.length)
        eot = self.tokenizer.eot_id
        stream = generate_stream(
            self.model, idx, budget, stop_token=eot, generator=self.generator, cache=self.cache,
            **self.sampling,
        )  # fmt: skip
        decoder = IncrementalDecoder(self.tokenizer, context=self.ids)
        reply: list[int] = []
        finished = False
        try:
            for tok in stream:
                t = int(tok)
                reply.append(t)
                if t == eot:
                    break
                piece = decoder.push([t])
                if piece:
                    yield piece
            rest = decoder.flush()
            if rest:
                yield rest
            finished = True
        finally:
            stream.close()
            if not finished:  # interrupted, maybe inside a forward pass: the cache may be torn
                self.cache.reset()
            self._append_reply(reply, ended=bool(reply) and reply[-1] == eot)

    def _append_turn(self, user: str) -> None:
        """Add the user's message and its tokens, dropping the earliest whole turns to fit."""
        messages = [*self.messages, {"role": "user", "content": user}]
        full = render(self.template, messages, self.tokenizer)
        # only the new text, unless the template rewrote earlier turns
        extends = full.startswith(self.text)
        try:
            new = self.tokenizer.encode(full[len(self.text) :] if extends else full)
        except ValueError as e:
            raise TurnRefused(f"the tokenizer cannot read this line: {e}") from e
        ids = self.ids + new if extends else new
        room = self.block_size - self.reserve
        if len(ids) > room:
            kept, full, ids = fit_turns(self.template, messages, self.tokenizer, room)
            extends = False
            if not self.dropped and len(kept) < len(messages):
                self.notify(
                    f"context full: dropped the earliest turns (the context holds "
                    f"{self.block_size} tokens, {self.reserve} of them kept for the reply); "
                    "later turns are dropped without a note"
                )
            self.dropped += len(messages) - len(kept)
            messages = kept
        if not extends:
            self.cache.reset()
        if not ids:  # a base model and nothing typed: start from a document boundary
            if self.tokenizer.eot_id is None:
                raise ValueError("nothing to continue and the tokenizer has no end-of-text token")
            ids = [self.tokenizer.eot_id]
        self.messages, self.ids, self.text = messages, ids, full

    def _append_reply(self, reply: list[int], ended: bool) -> None:
        content = self.tokenizer.decode(reply[:-1] if ended else reply)
        message: Message = {"role": "assistant", "content": content}
        if ended:
            message["ended"] = True  # the base template keeps the end-of-text it stopped on
        self.messages.append(message)
        self.ids += reply
        self.text += self.tokenizer.decode(reply)
