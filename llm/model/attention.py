"""Attention, built up in three steps: plain self-attention, causal, then multi-head.

Each step has the same two parts, `qkv(x)` (project the input to queries, keys and values) and
`attend(q, k, v)` (mix the values by query-key similarity), and the written-out softmax is one
function, `attention_weights`, shared by all three.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.model.config import GPTConfig

if TYPE_CHECKING:
    from llm.model.embeddings import RotaryEmbedding
    from llm.model.kv_cache import LayerKVCache


def attention_weights(q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d_k)) over the keys; where `mask` is False a query may not look."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


def causal_mask(
    T: int, T_k: int, device: torch.device | None = None, window: int | None = None
) -> Tensor:
    """(T, T_k) bool: the T queries are the last T of the T_k keys' positions; each may see its
    own position and earlier ones, and with a sliding window only the last `window` of those."""
    q = torch.arange(T_k - T, T_k, device=device).unsqueeze(1)
    k = torch.arange(T_k, device=device)
    allowed = k <= q
    return allowed if window is None else allowed & (k > q - window)


def padded_causal_mask(T: int, T_k: int, pad: Tensor) -> Tensor:
    """(B, 1, T, T_k) bool: the causal mask of rows whose first ``pad[b]`` positions are left
    padding, which no query sees; a padding query sees itself (a row of -inf only would give
    NaN), and what it computes is never read."""
    device = pad.device
    q = torch.arange(T_k - T, T_k, device=device).unsqueeze(1)
    k = torch.arange(T_k, device=device)
    real = k.unsqueeze(0) >= pad.unsqueeze(1)  # (B, T_k)
    allowed = (k <= q) & real.unsqueeze(1)  # (B, T, T_k)
    return (allowed | (k == q)).unsqueeze(1)


class SelfAttention(nn.Module):
    """Every token attends to every token: softmax(q k^T / sqrt(d_k)) v, no mask."""

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False) -> None:
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.W_query(x), self.W_key(x), self.W_value(x)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attention_weights(q, k) @ v

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., T, d_in) -> (..., T, d_out)."""
        return self.attend(*self.qkv(x))


class CausalSelfAttention(SelfAttention):
    """Self-attention that cannot look ahead, so it can be trained on next-token prediction."""

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, qkv_bias: bool = False
    ) -> None:
        super().__init__(d_in, d_out, qkv_bias)
        self.dropout = nn.Dropout(dropout)
        # A buffer (not a parameter) so it follows .to(device) but is never trained.
        self.register_buffer("mask", causal_mask(context_length, context_length), persistent=False)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q, k, v: (..., T, d) with T <= context_length."""
        T = q.size(-2)
        return self.dropout(attention_weights(q, k, self.mask[:T, :T])) @ v


class MultiHeadAttention(nn.Module):
    """Causal attention in n_head heads at once, with GPT-2's fused qkv projection (`c_attn`).

    `manual` is the causal step above run per head; `sdpa` is PyTorch's fused kernel for the same
    computation (flash / memory-efficient when available), which the tests check against it.
    With n_kv_head < n_head (grouped-query attention) each key/value head serves a group of
    n_head / n_kv_head query heads, so c_attn and the KV cache shrink; qk_norm RMS-normalises
    each head's queries and keys (Qwen3); sliding_window lets a token see only the last W.
    """

    def __init__(self, config: GPTConfig, rope: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.head_dim
        self.attn_impl, self.window = config.attn_impl, config.sliding_window
        q_width, kv_width = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.split = (q_width, kv_width, kv_width)
        self.c_attn = nn.Linear(config.n_embd, q_width + 2 * kv_width, bias=config.bias)
        self.c_proj = nn.Linear(q_width, config.n_embd, bias=config.bias)
        # None without qk_norm: GPT-2's state_dict keys stay as they were, and a decode step
        # makes no call for nothing
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.rope = rope

    def qkv(
        self, x: Tensor, cache: LayerKVCache | None = None, positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, C) -> q (B, n_head, T, hs) and k, v (B, n_kv_head, T_k, hs), where T_k adds
        the cached tokens' to the T new ones. ``positions`` (B, T): each row's own positions
        (a padded batch), else they follow the cache."""
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.split, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2) for t in (k, v))
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        past = cache.length if cache is not None else 0
        if self.rope is not None:
            q, k = self.rope(q, past, positions), self.rope(k, past, positions)
        if cache is not None:
            k, v = cache.append(k, v)
        return q, k, v

    def mask_for(self, T: int, T_k: int, device: torch.device | None = None) -> Tensor | None:
        """The (T, T_k) mask for T queries after T_k - T cached keys, or None where none is
        needed: a plain causal prefix (sdpa's is_causal) or one query that sees every key.

        Every layer of a GPT has the same, so GPT.hidden_states builds it once per forward.
        """
        # a window that covers every key is no window
        window = self.window if self.window is not None and self.window < T_k else None
        if window is None and (T == 1 or (T_k == T and self.attn_impl == "sdpa")):
            return None
        return causal_mask(T, T_k, device, window)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """q: (B, n_head, T, hs), k/v: (B, n_kv_head, T_k, hs) whose last T positions are q's.

        ``mask``: ``self.mask_for(T, T_k)``, passed in by a caller that shares it between layers;
        None builds it here (what it is for a causal prefix or a single query: no mask).
        """
        T, T_k = q.size(-2), k.size(-2)
        if mask is None:
            mask = self.mask_for(T, T_k, q.device)
        if self.attn_impl == "manual":
            groups = self.n_head // self.n_kv_head  # query head h reads key/value head h // groups
            if groups > 1:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            return self.dropout(attention_weights(q, k, mask)) @ v
        p = self.dropout.p if self.training else 0.0
        gqa = self.n_kv_head != self.n_head
        # Without a mask: a causal prefix (the kernel masks by itself) or one query seeing all;
        # with one: a window, or several new tokens after a cache (is_causal would align the
        # mask to the wrong corner).
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None and T > 1, enable_gqa=gqa
        )

    def forward(
        self,
        x: Tensor,
        cache: LayerKVCache | None = None,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
        head_mask: Tensor | None = None,
    ) -> Tensor:
        """x: (B, T, C); with a cache, x holds only the new tokens and k/v are appended.
        ``mask``: see ``attend``; ``positions``: see ``qkv``. ``head_mask`` (n_head,): each
        head's output is scaled by its entry before the heads are mixed (0 ablates a head:
        interpretability, llm inspect)."""
        B, T, _ = x.shape
        y = self.attend(*self.qkv(x, cache, positions), mask)
        if head_mask is not None:
            y = y * head_mask.to(y.dtype).view(1, -1, 1, 1)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))

    @torch.no_grad()
    def attention_weights(self, x: Tensor) -> Tensor:
        """Softmax weights (B, n_head, T, T) for inspection: the manual path, no dropout."""
        q, k, _ = self.qkv(x)
        k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        mask = causal_mask(q.size(-2), k.size(-2), q.device, self.window)
        return attention_weights(q, k, mask)
