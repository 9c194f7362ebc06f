"""A GPT-2 style language model in plain PyTorch, built one component at a time.

The package exports what the GPT is made of; the teaching steps before its attention
(``SelfAttention``, ``CausalSelfAttention``) stay in :mod:`llm.model.attention`, so
``MultiHeadAttention`` is the one attention class found here.
"""

from llm.model.attention import MultiHeadAttention
from llm.model.block import MLP, Block
from llm.model.config import ATTN_IMPLS, POS_ENCODINGS, GPTConfig
from llm.model.embeddings import Embeddings, RotaryEmbedding, sinusoidal_table
from llm.model.generation import filter_logits, sample_next
from llm.model.gpt import GPT
from llm.model.kv_cache import KVCache, LayerKVCache

__all__ = [
    "ATTN_IMPLS",
    "GPT",
    "MLP",
    "POS_ENCODINGS",
    "Block",
    "Embeddings",
    "GPTConfig",
    "KVCache",
    "LayerKVCache",
    "MultiHeadAttention",
    "RotaryEmbedding",
    "filter_logits",
    "sample_next",
    "sinusoidal_table",
]
