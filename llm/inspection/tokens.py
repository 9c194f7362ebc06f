"""Text in, token ids and their labels out: what every view starts from."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from llm.inference import prompt_ids
from llm.model import GPT
from llm.tokenizers import Tokenizer


def encode(model: GPT, tokenizer: Tokenizer, text: str, key: str = "prompt") -> list[int]:
    """``text``'s ids, refused (naming ``key``) when they do not fit the model's context."""
    ids = prompt_ids(tokenizer, text)
    if len(ids) > model.config.block_size:
        raise ValueError(
            f"{key}= is {len(ids)} tokens, more than the model's context "
            f"(block_size {model.config.block_size}); shorten it"
        )
    return ids


def single_token(tokenizer: Tokenizer, text: str, key: str) -> int:
    """The one token ``text`` encodes to (an answer of activation patching)."""
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        shown = " + ".join(repr(p) for p in tokenizer.pieces(ids)) or "no token"
        raise ValueError(
            f"{key}={text!r} must be one token, it is {shown}; a word usually needs its "
            f"leading space ({key}=' {text.strip()}') with a BPE tokenizer, one character "
            "with a char one"
        )
    return ids[0]


def labels(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's own text, for axes and tables."""
    return list(tokenizer.pieces(list(ids)))


def token_entry(tokenizer: Tokenizer, token_id: int, prob: float) -> dict:
    """One token of a top-k list: its id, its text and its probability."""
    return {"id": token_id, "token": tokenizer.pieces([token_id])[0], "prob": prob}


def point_names(n_layer: int) -> list[str]:
    """The residual stream's n_layer + 1 points (GPT.residual_stream): the embeddings, then the
    output of each block (0-based, as the attention views number layers)."""
    return ["embeddings", *(f"block {i}" for i in range(n_layer))]


def as_batch(model: GPT, ids: Sequence[int]) -> Tensor:
    """(1, T) ids on the model's device."""
    return torch.tensor([list(ids)], dtype=torch.long, device=next(model.parameters()).device)
