"""Text in, text out: a checkpoint's model and tokenizer sampling a continuation.

The CLI is ``llm generate``; the token-level sampling (KV cache, top-k, top-p) is
:mod:`llm.model.generation`.
"""

from __future__ import annotations

import torch

from llm.model import GPT
from llm.tokenizers import Tokenizer


@torch.no_grad()
def generate_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float | None = None,
    seed: int | None = None,
) -> str:
    """Prompt + sampled continuation, decoded with the checkpoint's own tokenizer.

    A fixed seed gives the same text every call (on the same device). An empty prompt starts
    from the end-of-text token, as a document boundary is what the model saw before new text.
    """
    tok = tokenizer
    ids = tok.encode(prompt)
    if not ids:
        if tok.eot_id is None:
            raise ValueError(
                "empty prompt and the tokenizer has no end-of-text token to start from"
            )
        ids = [tok.eot_id]
    model.eval()
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out = model.generate(
        idx,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
    )
    new = out[0, idx.size(1) :].tolist()
    return prompt + tok.decode(new)
