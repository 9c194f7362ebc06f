"""Autoregressive sampling: KV cache, temperature, top-k and nucleus (top-p) filtering."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from llm.model.gpt import GPT


class LayerKVCache:
    """Keys and values of the tokens seen so far, so each step only runs the new token.

    Only the key/value heads are stored (n_kv_head of them: grouped-query attention shrinks the
    cache too); with a sliding window only the last window - 1 tokens are kept, as no later
    token can see further back.
    """

    def __init__(self, window: int | None = None) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.window = window
        self.length = 0  # tokens seen, the next token's position (kept ones may be fewer)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v: (B, n_kv_head, T_new, hs); returns the kept past + new, (B, n_kv_head, T_k, hs)."""
        self.length += k.size(-2)
        if self.k is not None and self.v is not None:
            k, v = torch.cat([self.k, k], dim=-2), torch.cat([self.v, v], dim=-2)
        keep = k.size(-2) if self.window is None else min(k.size(-2), self.window - 1)
        self.k, self.v = k[..., k.size(-2) - keep :, :], v[..., v.size(-2) - keep :, :]
        return k, v


class KVCache(list):
    """One LayerKVCache per transformer block."""

    def __init__(self, n_layer: int, window: int | None = None) -> None:
        super().__init__(LayerKVCache(window) for _ in range(n_layer))

    @property
    def length(self) -> int:
        return self[0].length if self else 0

    def reset(self) -> None:
        """Forget every token (the same object, so whoever holds it sees the change)."""
        for layer in self:
            layer.k = layer.v = None
            layer.length = 0


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest top-p nucleus."""
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token if the tokens before it already cover top_p; the first one always stays.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """logits: (B, V) -> (B, 1) token ids; temperature 0 means greedy."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


def generate_stream(
    model: GPT,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    cache: KVCache | None = None,
) -> Iterator[Tensor]:
    """Yield each sampled token (B, 1) as soon as it is drawn, up to max_new_tokens.

    A generator, so callers can print tokens as they come and stop whenever they like (closing
    it restores the model's mode). temperature 0 is greedy; seed (or generator) makes sampling
    reproducible; once every row has produced stop_token the stream ends (finished rows yield
    stop_token as padding). ``cache``: a KVCache holding the first ``cache.length`` tokens of
    idx (a chat's earlier turns), so only the rest are prefilled; it is extended in place.
    """
    if idx.dim() != 2 or idx.size(1) == 0:
        # The model needs a last position to predict from; an empty prompt has none.
        raise ValueError(
            f"the prompt must hold at least one token, got idx of shape {tuple(idx.shape)} "
            f"(expected (B, T) with T >= 1): for unconditional sampling start from the "
            f"end-of-text token, e.g. torch.tensor([[tokenizer.eot_id]])"
        )
    if cache is not None and not cache.length < idx.size(1):
        raise ValueError(
            f"the cache holds {cache.length} tokens but idx only {idx.size(1)}: idx must be the "
            "whole sequence, ending with at least one token the cache has not seen"
        )
    if generator is None and seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    return _stream(
        model, idx, max_new_tokens, temperature, top_k, top_p, stop_token, use_cache, generator,
        cache,
    )  # fmt: skip


@torch.no_grad()
def _stream(
    model: GPT,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    stop_token: int | None,
    use_cache: bool,
    generator: torch.Generator | None,
    cache: KVCache | None,
) -> Iterator[Tensor]:
    """The sampling loop of generate_stream (its checks run at the call, not at the first next)."""
    block_size = model.config.block_size
    was_training = model.training
    model.eval()
    try:
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = model(idx[:, -block_size:])
            elif cache is None or cache.length == 0 or idx.size(1) > block_size:
                # (Re)prefill: learned positions cannot go past block_size, so past it we crop
                # the context like nanoGPT does, which keeps cached == uncached exactly.
                if cache is None:
                    cache = KVCache(model.config.n_layer, model.config.sliding_window)
                cache.reset()
                logits, _ = model(idx[:, -block_size:], cache=cache)
            else:
                logits, _ = model(idx[:, cache.length :], cache=cache)
            nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            if stop_token is not None:
                nxt = nxt.masked_fill(done.unsqueeze(1), stop_token)  # finished rows keep padding
                done |= nxt.squeeze(1) == stop_token
            idx = torch.cat((idx, nxt), dim=1)
            yield nxt
            if stop_token is not None and bool(done.all()):
                break
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(
    model: GPT,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> Tensor:
    """Sample up to max_new_tokens after idx (B, T); returns (B, T + new).

    generate_stream, collected; stops early once every row has produced stop_token (finished
    rows are padded with it). Also bound as `GPT.generate`.
    """
    stream = generate_stream(
        model, idx, max_new_tokens, temperature, top_k, top_p, stop_token, use_cache,
        generator, seed,
    )  # fmt: skip
    return torch.cat([idx, *stream], dim=1)
