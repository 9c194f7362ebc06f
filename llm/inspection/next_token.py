"""The next-token view: at each position, what the model expected next against what came."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llm.inspection.tokens import as_batch, labels, token_entry
from llm.model import GPT
from llm.tokenizers import Tokenizer


@torch.no_grad()
def next_token(model: GPT, tokenizer: Tokenizer, ids: Sequence[int], k: int = 5) -> dict:
    """The top ``k`` next tokens with their probabilities after each prefix of ``ids``, and the
    probability and rank (1: the model's first choice) of the token that came next."""
    model.eval()
    probs = torch.softmax(model(as_batch(model, ids))[0][0].float(), dim=-1).cpu()  # (T, V)
    top = probs.topk(min(k, probs.size(-1)))
    tokens = labels(tokenizer, ids)
    positions = []
    for t in range(len(ids)):
        entry: dict = {
            "position": t,
            "token": tokens[t],
            "top": [
                token_entry(tokenizer, int(i), float(p))
                for p, i in zip(top.values[t], top.indices[t], strict=True)
            ],
        }
        if t + 1 < len(ids):
            came = ids[t + 1]
            p = probs[t, came]
            rank = int((probs[t] > p).sum()) + 1
            entry["next"] = {**token_entry(tokenizer, came, float(p)), "rank": rank}
        positions.append(entry)
    return {
        "view": "next_token",
        "tokens": tokens,
        "ids": list(ids),
        "k": k,
        "positions": positions,
    }
