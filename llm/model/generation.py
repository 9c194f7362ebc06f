"""Autoregressive sampling: temperature, top-k and nucleus (top-p) filtering, streamed with a KV
cache (:mod:`llm.model.kv_cache`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from llm.model.kv_cache import KVCache

if TYPE_CHECKING:
    from llm.model.gpt import GPT


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


@torch.inference_mode()  # not just no_grad: no view or version tracking per op (~6% a token)
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
            # last_only: the logits of the last position are all a step samples from
            if not use_cache:
                logits, _ = model(idx[:, -block_size:], last_only=True)
            elif cache is None or cache.length == 0 or idx.size(1) > block_size:
                # (Re)prefill: learned positions cannot go past block_size, so past it we crop
                # the context like nanoGPT does, which keeps cached == uncached exactly.
                if cache is None:
                    cache = KVCache(model.config.n_layer, model.config.sliding_window, block_size)
                cache.reset()
                logits, _ = model(idx[:, -block_size:], cache=cache, last_only=True)
            else:
                logits, _ = model(idx[:, cache.length :], cache=cache, last_only=True)
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
