"""One transformer block: pre-LayerNorm attention and MLP, each inside a residual connection."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from llm.model.attention import MultiHeadAttention
from llm.model.config import GPTConfig

if TYPE_CHECKING:
    from llm.model.embeddings import RotaryEmbedding
    from llm.model.generation import LayerKVCache


class MLP(nn.Module):
    """Position-wise 4x expansion; tanh-GELU because GPT-2 ("gelu_new") was trained with it."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN (GPT-2) keeps an identity path from input to output, which trains stably deep."""

    def __init__(self, config: GPTConfig, rope: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = MultiHeadAttention(config, rope)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cache: LayerKVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))
