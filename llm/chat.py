"""A multi-turn conversation with a language model that keeps its KV cache between turns.

Each turn renders the whole conversation with the checkpoint's template (:mod:`llm.prompts`)
but runs only what is new through the model: the text past what the cache already holds (the
new user turn, plus the previous reply's last token, sampled but not yet run). When the
conversation outgrows the context, the oldest exchanges are dropped and the rest is prefilled
again, with a note. The CLI is ``llm chat``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from llm.inference import IncrementalDecoder
from llm.model import GPT, KVCache
from llm.model.generation import generate_stream
from llm.prompts import Message, chat_template_source, check_template, render
from llm.tokenizers import Tokenizer

log = logging.getLogger(__name__)


class TurnRefused(ValueError):
    """A user turn the tokenizer cannot encode (a character a char vocabulary lacks): the
    conversation is left as it was, so the session can go on."""


class ChatSession:
    """The conversation so far (messages, their token ids, the KV cache over them) and the
    sampling settings; :meth:`send` streams a reply.

    ``prefilled`` counts, per turn, the tokens run through the model before its reply's first
    token was sampled. ``reserve`` tokens of context are kept free for each reply (default:
    max_new_tokens, at most half the context); a reply stops at end-of-text, at
    max_new_tokens, or where the context is full.
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
        self.template = check_template(template)
        if system and template != "chat":
            raise ValueError(f"system= needs template=chat; this session's is {template!r}")
        if template == "chat":
            chat_template_source(tokenizer)  # refuse a tokenizer without one now, not at turn 1
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
        self.text: str | None = ""  # the text those ids stand for (None: unknown, re-render)
        self.cache.reset()
        self.generator: torch.Generator | None = None
        if self.seed is not None:
            self.generator = torch.Generator(device=self.device).manual_seed(self.seed)

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def send(self, user: str) -> Iterator[str]:
        """The reply to ``user``, piece by piece as it is sampled (end-of-text not shown).

        Stopping early (closing the iterator, Ctrl-C) keeps what was sampled as the reply.
        """
        self._append_turn(user)
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
        """Add the user's message and its tokens, dropping the oldest exchanges to fit."""
        self.messages.append({"role": "user", "content": user})
        try:
            full = render(self.template, self.messages, self.tokenizer)
        except Exception:
            self.messages.pop()  # the conversation stays as it was
            raise
        # only the new text, unless the template rewrote earlier turns (or the text is unknown)
        extends = self.text is not None and full.startswith(self.text)
        try:
            ids = self.tokenizer.encode(full[len(self.text or "") :] if extends else full)
        except ValueError as e:
            self.messages.pop()
            raise TurnRefused(f"the tokenizer cannot read this line: {e}") from e
        if extends:
            self.ids += ids
        else:
            self.ids = ids
            self.cache.reset()
        self.text = full
        dropped = 0
        while len(self.ids) + self.reserve > self.block_size and self._drop_oldest():
            dropped += 1
        if dropped:
            self.notify(
                f"the conversation outgrew the {self.block_size}-token context: dropped the "
                f"oldest {dropped} exchange(s) and read the rest again"
            )
        if len(self.ids) + self.reserve > self.block_size:
            keep = self.block_size - self.reserve
            self.notify(
                f"this turn alone is {len(self.ids)} tokens; the context holds "
                f"{self.block_size} with {self.reserve} kept for the reply: kept its last {keep}"
            )
            self.ids, self.text = self.ids[-keep:], None
            self.cache.reset()
        if not self.ids:  # a base model and nothing typed: start from a document boundary
            if self.tokenizer.eot_id is None:
                raise ValueError("nothing to continue and the tokenizer has no end-of-text token")
            self.ids = [self.tokenizer.eot_id]

    def _drop_oldest(self) -> bool:
        """Drop the first exchange (user message and reply) and re-render; False if none left."""
        first = next(i for i, m in enumerate(self.messages) if m["role"] != "system")
        if first == len(self.messages) - 1:  # only the current user message is left
            return False
        end = first + 1
        while end < len(self.messages) - 1 and self.messages[end]["role"] != "user":
            end += 1
        del self.messages[first:end]
        self.text = render(self.template, self.messages, self.tokenizer)
        self.ids = self.tokenizer.encode(self.text)
        self.cache.reset()
        return True

    def _append_reply(self, reply: list[int], ended: bool) -> None:
        content = self.tokenizer.decode(reply[:-1] if ended else reply)
        message: Message = {"role": "assistant", "content": content}
        if ended:
            message["ended"] = True  # the base template keeps the end-of-text it stopped on
        self.messages.append(message)
        self.ids += reply
        if self.text is not None:
            self.text += self.tokenizer.decode(reply)
