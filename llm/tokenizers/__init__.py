"""Tokenizers: char-level, tiktoken encodings, corpus-trained byte-level BPE, and Hugging Face
tokenizer.json files."""

from llm.tokenizers.base import Tokenizer
from llm.tokenizers.char import CharTokenizer
from llm.tokenizers.hf import HFTokenizer
from llm.tokenizers.registry import load_tokenizer, tokenizer_from_dict
from llm.tokenizers.tiktoken_bpe import TiktokenTokenizer
from llm.tokenizers.trained_bpe import BPETokenizer

__all__ = [
    "BPETokenizer",
    "CharTokenizer",
    "HFTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "tokenizer_from_dict",
]
