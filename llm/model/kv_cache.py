"""The KV cache: each block's keys and values of the tokens seen so far, so sampling runs only
the new token through the model. Plain tensors, nothing above torch (attention appends to it,
generation and chat own it)."""

from __future__ import annotations

import torch
from torch import Tensor

_MIN_CAPACITY = 64  # tokens a fresh buffer holds at least, so the first steps do not regrow it


class LayerKVCache:
    """Keys and values of the tokens seen so far, so each step only runs the new token.

    Only the key/value heads are stored (n_kv_head of them: grouped-query attention shrinks the
    cache too); with a sliding window only the last window - 1 tokens are kept, as no later
    token can see further back.

    The tokens live in a buffer with room to spare, written in place, so a step copies its own
    keys and values rather than the whole past (``torch.cat`` per step made each token cost
    O(length)). When the buffer is full the kept tokens move to its front (a window drops the
    old ones) and it doubles if that frees too little, never past ``capacity`` when one is
    given (generation gives block_size, which no sequence outgrows). Under autograd it
    concatenates instead: an in-place write would change a tensor backward still needs.
    """

    def __init__(self, window: int | None = None, capacity: int | None = None) -> None:
        self.window = window
        self.capacity = capacity
        self.length = 0  # tokens seen, the next token's position (kept ones may be fewer)
        self._k: Tensor | None = None  # (B, n_kv_head, room, hs)
        self._v: Tensor | None = None
        self._start = self._end = 0  # the kept tokens are _k[..., _start:_end, :]

    @property
    def k(self) -> Tensor | None:
        """The kept keys (B, n_kv_head, kept, hs), or None before the first append."""
        return None if self._k is None else self._k[..., self._start : self._end, :]

    @property
    def v(self) -> Tensor | None:
        """The kept values, as ``k``."""
        return None if self._v is None else self._v[..., self._start : self._end, :]

    @property
    def kept(self) -> int:
        """How many past tokens the next step's attention sees from this cache."""
        return self._end - self._start

    def reset(self) -> None:
        """Forget every token; the buffer goes too (the next batch may have another shape)."""
        self._k = self._v = None
        self._start = self._end = self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v: (B, n_kv_head, T_new, hs); returns the kept past + new, (B, n_kv_head, T_k, hs)."""
        T = k.size(-2)
        self.length += T
        if k.requires_grad or v.requires_grad or (self._k is not None and self._k.requires_grad):
            past_k, past_v = self.k, self.v
            if past_k is not None and past_v is not None:
                k, v = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
            self._k, self._v, self._start, self._end = k, v, 0, k.size(-2)
        else:
            self._reserve(k, v)
            assert self._k is not None and self._v is not None
            self._k[..., self._end : self._end + T, :] = k
            self._v[..., self._end : self._end + T, :] = v
            self._end += T
        k_all = self._k[..., self._start : self._end, :]
        v_all = self._v[..., self._start : self._end, :]
        if self.window is not None:  # no later token sees further back than window - 1
            self._start = max(self._start, self._end - (self.window - 1))
        return k_all, v_all

    def _reserve(self, k: Tensor, v: Tensor) -> None:
        """Room after the kept tokens for k and v's: the kept ones move to the front of the
        buffer, or of a new one where that would leave less than half of it free."""
        T = k.size(-2)
        if self._k is not None:
            if k.shape[:-2] != self._k.shape[:-2] or k.size(-1) != self._k.size(-1):
                raise ValueError(
                    f"keys of shape {tuple(k.shape)} do not fit a cache of "
                    f"{tuple(self._k.shape[:-2])} x tokens x {self._k.size(-1)}: reset it first"
                )
            if self._end + T <= self._k.size(-2):
                return
        past_k, past_v, kept = self.k, self.v, self.kept
        if self._k is None or 2 * (kept + T) > self._k.size(-2):
            room = max(2 * (kept + T), _MIN_CAPACITY)
            if self.capacity is not None:
                room = max(min(room, self.capacity), kept + T)
            self._k = k.new_empty((*k.shape[:-2], room, k.size(-1)))
            self._v = v.new_empty((*v.shape[:-2], room, v.size(-1)))
        elif past_k is not None and past_v is not None:  # within one buffer: ranges may overlap
            past_k, past_v = past_k.clone(), past_v.clone()
        if past_k is not None and past_v is not None:
            self._k[..., :kept, :] = past_k
            self._v[..., :kept, :] = past_v
        self._start, self._end = 0, kept


class KVCache(list):
    """One LayerKVCache per transformer block."""

    def __init__(
        self, n_layer: int, window: int | None = None, capacity: int | None = None
    ) -> None:
        super().__init__(LayerKVCache(window, capacity) for _ in range(n_layer))

    @property
    def length(self) -> int:
        return self[0].length if self else 0

    @property
    def kept(self) -> int:
        """Past tokens each layer's attention sees (the same in every layer)."""
        return self[0].kept if self else 0

    def reset(self) -> None:
        """Forget every token (the same object, so whoever holds it sees the change)."""
        for layer in self:
            layer.reset()
