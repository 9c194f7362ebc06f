"""The logit lens (nostalgebraist 2020): each point of the residual stream read out through the
final norm and the LM head, as if the model stopped there."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llm.inspection.tokens import as_batch, labels, point_names, token_entry
from llm.model import GPT
from llm.tokenizers import Tokenizer


@torch.no_grad()
def logit_lens(model: GPT, tokenizer: Tokenizer, ids: Sequence[int], k: int = 1) -> dict:
    """``top[point][position]``: the ``k`` likeliest next tokens when the stream at that point
    (the embeddings, then each block's output) is unembedded; the last point is the model's own
    output. ``next[point][position]``: the probability of the token that came next."""
    model.eval()
    idx = as_batch(model, ids)
    top, came = [], []
    following = torch.tensor(list(ids[1:]), dtype=torch.long)
    for x in model.residual_stream(idx):  # one point at a time: (T, V) each, not n_layer of them
        probs = torch.softmax(model.unembed(x)[0].float(), dim=-1).cpu()
        best = probs.topk(min(k, probs.size(-1)))
        top.append(
            [
                [token_entry(tokenizer, int(i), float(p)) for p, i in zip(ps, js, strict=True)]
                for ps, js in zip(best.values, best.indices, strict=True)
            ]
        )
        came.append(probs[:-1].gather(1, following.unsqueeze(1)).squeeze(1).tolist())
    return {
        "view": "logit_lens",
        "tokens": labels(tokenizer, ids),
        "ids": list(ids),
        "points": point_names(model.config.n_layer),
        "k": k,
        "top": top,
        "next": came,
    }
