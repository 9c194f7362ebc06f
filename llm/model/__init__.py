"""A GPT-2 style language model in plain PyTorch, built one component at a time."""

from llm.model.attention import CausalSelfAttention, MultiHeadAttention, SelfAttention
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
    "CausalSelfAttention",
    "Embeddings",
    "GPTConfig",
    "KVCache",
    "LayerKVCache",
    "MultiHeadAttention",
    "RotaryEmbedding",
    "SelfAttention",
    "filter_logits",
    "sample_next",
    "sinusoidal_table",
]
