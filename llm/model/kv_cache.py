"""The KV cache: each block's keys and values of the tokens seen so far, so sampling runs only
the new token through the model. Plain tensors, nothing above torch (attention appends to it,
generation and chat own it)."""

from __future__ import annotations

import torch
from torch import Tensor


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
