"""Token embeddings plus the three positional encodings a GPTConfig can choose."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


def sinusoidal_table(n_pos: int, dim: int) -> Tensor:
    """The fixed table of "Attention Is All You Need": sin on even dims, cos on odd dims."""
    pos = torch.arange(n_pos, dtype=torch.float32).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_pos, dim)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq[: dim // 2])
    return table


def llama3_scaled(inv_freq: Tensor, scaling: dict[str, Any]) -> Tensor:
    """Llama 3's long-context RoPE: slow frequencies (wavelength past the pretraining context /
    low_freq_factor) divided by `factor`, fast ones kept, a smooth blend in between."""
    factor, old = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, blended)
    return torch.where(wavelen < old / high, inv_freq, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer): rotates q and k so scores depend on offsets only.

    Dims (2i, 2i + 1) rotate together by angle pos * theta^(-2i / head_dim) (the interleaved
    layout of RoFormer and Meta's Llama code; llm.model.hf converts Hugging Face's "rotate half").
    """

    def __init__(
        self,
        head_dim: int,
        max_len: int,
        theta: float = 10000.0,
        scaling: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        if scaling is not None:
            inv_freq = llama3_scaled(inv_freq, scaling)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (T, hs/2)
        # Non-persistent: derived from the config, so never part of a checkpoint.
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def crop(self, max_len: int) -> None:
        self.cos, self.sin = self.cos[:max_len], self.sin[:max_len]

    def forward(self, x: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        """x: (B, n_head, T, hs); positions start at `offset` (the KV-cache length), or are
        each row's own ``positions`` (B, T)."""
        T = x.size(-2)
        if positions is None:
            cos = self.cos[offset : offset + T].to(x.dtype)
            sin = self.sin[offset : offset + T].to(x.dtype)
        else:  # (B, 1, T, hs/2): one row of angles per batch row, shared by the heads
            cos = self.cos[positions].unsqueeze(1).to(x.dtype)
            sin = self.sin[positions].unsqueeze(1).to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Embeddings(nn.Module):
    """Token embedding + additive positions (learned or sinusoidal); rope adds nothing here."""

    def __init__(
        self, vocab_size: int, n_embd: int, block_size: int, pos_encoding: str, dropout: float
    ) -> None:
        super().__init__()
        self.pos_encoding = pos_encoding
        self.wte = nn.Embedding(vocab_size, n_embd)
        if pos_encoding == "learned":
            self.wpe = nn.Embedding(block_size, n_embd)
        elif pos_encoding == "sinusoidal":
            self.register_buffer("pe", sinusoidal_table(block_size, n_embd), persistent=False)
        self.drop = nn.Dropout(dropout)

    def crop(self, block_size: int) -> None:
        """Keep the first block_size positions (see GPT.crop_block_size)."""
        if self.pos_encoding == "learned":
            old = self.wpe.weight
            self.wpe.weight = nn.Parameter(old[:block_size].clone(), old.requires_grad)
            self.wpe.num_embeddings = block_size
        elif self.pos_encoding == "sinusoidal":
            self.pe = self.pe[:block_size]

    def forward(self, idx: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        """Positions start at ``offset``, or are each row's own ``positions`` (B, T)."""
        x = self.wte(idx)
        pos = positions
        if pos is None:
            pos = torch.arange(offset, offset + idx.size(1), device=idx.device)
        if self.pos_encoding == "learned":
            x = x + self.wpe(pos)
        elif self.pos_encoding == "sinusoidal":
            x = x + self.pe[pos].to(x.dtype)
        return self.drop(x)
