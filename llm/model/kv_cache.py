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
        buf_k, buf_v, end = self._k, self._v, self._end + T
        if buf_k is None or buf_v is None or k.requires_grad or buf_k.requires_grad:
            self._concatenate(k, v)
        else:
            if k.size(0) != buf_k.size(0):  # writing into the buffer would broadcast a batch of 1
                raise ValueError(
                    f"keys for a batch of {k.size(0)} do not fit a cache of a batch of "
                    f"{buf_k.size(0)}: reset it first"
                )
            # made under inference mode (sampling) and written to outside it: a normal buffer
            stale = buf_k.is_inference() and not torch.is_inference_mode_enabled()
            if end > buf_k.size(-2) or stale:
                self._make_room(T, anew=stale)
                end = self._end + T
            self._k[..., self._end : end, :] = k  # type: ignore[index]
            self._v[..., self._end : end, :] = v  # type: ignore[index]
            self._end = end
        k_all = self._k[..., self._start : self._end, :]  # type: ignore[index]
        v_all = self._v[..., self._start : self._end, :]  # type: ignore[index]
        if self.window is not None:  # no later token sees further back than window - 1
            self._start = max(self._start, self._end - (self.window - 1))
        return k_all, v_all

    def replace(self, k: Tensor, v: Tensor) -> None:
        """Hold exactly ``k``, ``v`` (B, n_kv_head, T, hs) as the tokens seen so far (a server
        regrouping its batch's rows); a sliding window's dropped tokens cannot be regrouped."""
        if self.window is not None and self.length > self.kept:
            raise ValueError("a sliding-window cache that dropped tokens cannot be regrouped")
        self._k, self._v, self._start, self._end, self.length = k, v, 0, k.size(-2), k.size(-2)
        self._make_room(0, anew=True)

    def _concatenate(self, k: Tensor, v: Tensor) -> None:
        """The first append (copied into a buffer with room), or any under autograd (kept as
        concatenated tensors, which backward can go through)."""
        past_k, past_v = self.k, self.v
        if past_k is not None and past_v is not None:
            k, v = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
        self._k, self._v, self._start, self._end = k, v, 0, k.size(-2)
        if not (k.requires_grad or v.requires_grad):
            self._make_room(0)

    def _make_room(self, T: int, anew: bool = False) -> None:
        """Room after the kept tokens for T more: the kept ones move to the front of the
        buffer, or of a new one where that would leave less than half of it free (or where
        ``anew``)."""
        assert self._k is not None and self._v is not None
        past_k, past_v, kept = self.k, self.v, self.kept
        assert past_k is not None and past_v is not None
        room = self._k.size(-2)
        if anew or 2 * (kept + T) > room or room == kept:
            room = max(2 * (kept + T), _MIN_CAPACITY)
            if self.capacity is not None:
                room = max(min(room, self.capacity), kept + T)
            self._k = past_k.new_empty((*past_k.shape[:-2], room, past_k.size(-1)))
            self._v = past_v.new_empty((*past_v.shape[:-2], room, past_v.size(-1)))
        else:  # moving within one buffer: the ranges may overlap
            past_k, past_v = past_k.clone(), past_v.clone()
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

    # Regrouping the rows of a batch (continuous batching in llm.serving): rows are right-
    # aligned, each row's own tokens end at the last position, what is left of them is padding.

    def select_rows(self, rows: Tensor) -> None:
        """Keep only the batch rows ``rows`` (a 1-D index tensor), in that order."""
        for layer in self:
            assert layer.k is not None and layer.v is not None
            layer.replace(layer.k.index_select(0, rows), layer.v.index_select(0, rows))

    def pad_front(self, n: int) -> None:
        """``n`` more positions before every row's tokens (zeros: padding a mask hides)."""
        if n <= 0:
            return
        for layer in self:
            assert layer.k is not None and layer.v is not None
            k, v = layer.k, layer.v
            zeros = k.new_zeros((*k.shape[:-2], n, k.size(-1)))
            layer.replace(torch.cat([zeros, k], dim=-2), torch.cat([zeros, v], dim=-2))

    def drop_front(self, n: int) -> None:
        """Forget the first ``n`` positions of every row (padding no row needs any more)."""
        if n <= 0:
            return
        for layer in self:
            assert layer.k is not None and layer.v is not None
            layer.replace(layer.k[..., n:, :].clone(), layer.v[..., n:, :].clone())

    def append_rows(self, other: KVCache) -> None:
        """``other``'s rows after this cache's own: both must hold the same number of positions
        (pad the shorter first)."""
        if self.length != other.length:
            raise ValueError(f"caches of {self.length} and {other.length} positions: pad first")
        for mine, theirs in zip(self, other, strict=True):
            assert mine.k is not None and mine.v is not None
            assert theirs.k is not None and theirs.v is not None
            mine.replace(torch.cat([mine.k, theirs.k]), torch.cat([mine.v, theirs.v]))
