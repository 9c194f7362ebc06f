"""Attention, built up in three steps: plain self-attention, causal, then multi-head."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from llm.model.embeddings import RotaryEmbedding
    from llm.model.generation import LayerKVCache


class SelfAttention(nn.Module):
    """Every token attends to every token: softmax(q k^T / sqrt(d_k)) v, no mask."""

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False) -> None:
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., T, d_in) -> (..., T, d_out)."""
        q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)
        scores = q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))
        return torch.softmax(scores, dim=-1) @ v


class CausalSelfAttention(SelfAttention):
    """Self-attention that cannot look ahead, so it can be trained on next-token prediction."""

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, qkv_bias: bool = False
    ) -> None:
        super().__init__(d_in, d_out, qkv_bias)
        self.dropout = nn.Dropout(dropout)
        # A buffer (not a parameter) so it follows .to(device) but is never trained.
        mask = torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., T, d_in) with T <= context_length -> (..., T, d_out)."""
        T = x.size(-2)
        q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)
        scores = q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))
        scores = scores.masked_fill(self.mask[:T, :T], float("-inf"))
        return self.dropout(torch.softmax(scores, dim=-1)) @ v


class MultiHeadAttention(nn.Module):
    """Causal multi-head attention with a fused qkv projection, as in GPT-2 and nanoGPT.

    `sdpa` uses PyTorch's fused kernel (flash/memory-efficient when available); `manual`
    writes the masked softmax out and is the reference the tests compare against.
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        block_size: int,
        dropout: float = 0.0,
        bias: bool = True,
        attn_impl: str = "sdpa",
        rope: RotaryEmbedding | None = None,
    ) -> None:
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
        if attn_impl not in ("sdpa", "manual"):
            raise ValueError(f"unknown attn_impl={attn_impl!r}; choose one of ['sdpa', 'manual']")
        self.n_head, self.n_embd, self.attn_impl = n_head, n_embd, attn_impl
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.rope = rope
        causal = torch.tril(torch.ones(block_size, block_size, dtype=torch.bool))
        self.register_buffer("causal", causal, persistent=False)

    def _qkv(self, x: Tensor, cache: LayerKVCache | None) -> tuple[Tensor, Tensor, Tensor, int]:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        past = cache.length if cache is not None else 0
        if self.rope is not None:
            q, k = self.rope(q, offset=past), self.rope(k, offset=past)
        if cache is not None:
            k, v = cache.append(k, v)
        return q, k, v, past

    def _mask(self, past: int, T: int) -> Tensor:
        """Query i (absolute position past + i) may see keys 0..past + i."""
        return self.causal[past : past + T, : past + T]

    def _weights(self, q: Tensor, k: Tensor, past: int) -> Tensor:
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        att = att.masked_fill(~self._mask(past, q.size(-2)), float("-inf"))
        return torch.softmax(att, dim=-1)

    def forward(self, x: Tensor, cache: LayerKVCache | None = None) -> Tensor:
        """x: (B, T, C); with a cache, x holds only the new tokens and k/v are appended."""
        B, T, C = x.shape
        q, k, v, past = self._qkv(x, cache)
        if self.attn_impl == "sdpa":
            dropout_p = self.dropout if self.training else 0.0
            if past == 0:  # plain causal prefix, the kernel builds the mask itself
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1)
            elif T == 1:  # one new token sees the whole cache
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            else:  # several new tokens after a cache: is_causal would align the mask wrongly
                mask = self._mask(past, T)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        else:
            y = self.attn_dropout(self._weights(q, k, past)) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    @torch.no_grad()
    def attention_weights(self, x: Tensor) -> Tensor:
        """Softmax weights (B, n_head, T, T) for inspection; always the manual path, no dropout."""
        q, k, _, past = self._qkv(x, None)
        return self._weights(q, k, past)
