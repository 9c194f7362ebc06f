"""One transformer block: pre-norm attention and MLP, each inside a residual connection."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from llm.model.attention import MultiHeadAttention
from llm.model.config import GPTConfig

if TYPE_CHECKING:
    from llm.model.embeddings import RotaryEmbedding
    from llm.model.kv_cache import LayerKVCache


def make_norm(config: GPTConfig) -> nn.Module:
    """LayerNorm (GPT-2) or RMSNorm (Llama, Qwen: no mean, no bias, a little cheaper)."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class ReLU2(nn.Module):
    """relu(x)^2 (Primer; modded-nanogpt's speedrun MLP)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x).square()


class SwiGLU(nn.Module):
    """silu(gate) * up (Shazeer 2020; Llama, Qwen): c_fc holds gate and up side by side."""

    def forward(self, x: Tensor) -> Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


ACTIVATIONS = {"gelu": partial(nn.GELU, approximate="tanh"), "relu2": ReLU2, "swiglu": SwiGLU}


class MLP(nn.Module):
    """Position-wise expansion to `config.mlp_hidden` and back.

    gelu is tanh-GELU because GPT-2 ("gelu_new") was trained with it.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        width = config.mlp_hidden
        gated = config.mlp == "swiglu"
        self.c_fc = nn.Linear(config.n_embd, 2 * width if gated else width, bias=config.bias)
        self.act = ACTIVATIONS[config.mlp]()
        self.c_proj = nn.Linear(width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm (GPT-2) keeps an identity path from input to output, which trains stably deep."""

    def __init__(self, config: GPTConfig, rope: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = MultiHeadAttention(config, rope)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        cache: LayerKVCache | None = None,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
        head_mask: Tensor | None = None,
    ) -> Tensor:
        """``mask``: the attention mask every block of the forward shares (see
        MultiHeadAttention.attend); None builds it where it is needed. ``positions``: each
        row's own (a padded batch), else they follow the cache. ``head_mask``: see
        MultiHeadAttention.forward."""
        x = x + self.attn(self.ln_1(x), cache, mask, positions, head_mask)
        return x + self.mlp(self.ln_2(x))
