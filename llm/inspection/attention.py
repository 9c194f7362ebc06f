"""Attention weights of every head of every layer on a prompt."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llm.inspection.tokens import as_batch, labels
from llm.model import GPT
from llm.tokenizers import Tokenizer


@torch.no_grad()
def attention(
    model: GPT, tokenizer: Tokenizer, ids: Sequence[int], last: int | None = None
) -> dict:
    """``maps[layer][head][query][key]``: how much each query position attends to each key.

    ``last``: only the last ``last`` queries and keys (the model still reads every token), so a
    long prompt's maps stay small (T x T per head otherwise); ``offset`` is the first shown."""
    idx = as_batch(model, ids)
    offset = 0 if last is None else max(0, len(ids) - last)
    maps = [
        model.attention_maps(idx, layer)[0, :, offset:, offset:].float().cpu().tolist()
        for layer in range(model.config.n_layer)
    ]
    return {
        "view": "attention",
        "tokens": labels(tokenizer, ids[offset:]),
        "ids": list(ids[offset:]),
        "offset": offset,
        "maps": maps,
    }
