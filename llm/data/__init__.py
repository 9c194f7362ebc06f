"""Data layer: corpora -> token cache (shards of ids) -> sliding-window datasets -> DataModule."""

from typing import Any

from llm.data.cache import (
    build_token_cache,
    cache_folder,
    check_cache,
    ensure_token_cache,
    load_token_cache,
    split_counts,
    split_text,
    token_dtype,
)
from llm.data.corpus import Corpus, HFDataset, TextFiles, TinyShakespeare, read_utf8
from llm.data.encoding import TokenIdError
from llm.data.pretokenize import BuildInterrupted
from llm.data.shards import TokenShards

__all__ = [
    "BuildInterrupted",
    "Corpus",
    "HFDataset",
    "SlidingWindowDataset",
    "TextDataModule",
    "TextFiles",
    "TinyShakespeare",
    "TokenIdError",
    "TokenShards",
    "build_token_cache",
    "cache_folder",
    "check_cache",
    "ensure_token_cache",
    "load_token_cache",
    "read_utf8",
    "split_counts",
    "split_text",
    "token_dtype",
]


def __getattr__(name: str) -> Any:
    """Import torch/lightning lazily: ``llm prepare`` and the cache don't need them (~10 s)."""
    if name == "TextDataModule":
        from llm.data.datamodule import TextDataModule

        return TextDataModule
    if name == "SlidingWindowDataset":
        from llm.data.dataset import SlidingWindowDataset

        return SlidingWindowDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
