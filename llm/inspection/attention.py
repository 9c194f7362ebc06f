"""Attention weights of every head of every layer on a prompt."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llm.inspection.tokens import as_batch, labels
from llm.model import GPT
from llm.tokenizers import Tokenizer


@torch.no_grad()
def attention(model: GPT, tokenizer: Tokenizer, ids: Sequence[int]) -> dict:
    """``maps[layer][head][query][key]``: how much each query position attends to each key."""
    idx = as_batch(model, ids)
    maps = [
        model.attention_maps(idx, layer)[0].float().cpu().tolist()
        for layer in range(model.config.n_layer)
    ]
    return {"view": "attention", "tokens": labels(tokenizer, ids), "ids": list(ids), "maps": maps}
