"""The page's inspect view: :mod:`llm.inspection`'s next-token view, logit lens and attention of
one token sequence, cut to its last tokens so the answer stays small whatever the context.

The model reads every token; only the last ``last`` positions are reported (``offset`` is the
first one shown), and attention only over the last ``attention_last`` queries and keys (a head's
map is T x T), its weights rounded to 5 decimals.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llm import inspection
from llm.model import GPT
from llm.tokenizers import Tokenizer


def inspect_ids(
    model: GPT,
    tokenizer: Tokenizer,
    ids: Sequence[int],
    top_k: int = 5,
    last: int = 64,
    attention_last: int = 32,
) -> dict[str, Any]:
    """The three views of ``ids`` (at most the model's context), for the last ``last``
    positions; ``attention_last`` 0 leaves attention out. Run it where the model may be used
    (the engine's thread: :meth:`llm.serving.engine.Engine.call`)."""
    offset = max(0, len(ids) - last)
    nxt = inspection.next_token(model, tokenizer, ids, top_k)
    lens = inspection.logit_lens(model, tokenizer, ids, 1)
    out: dict[str, Any] = {
        "offset": offset,
        "tokens": nxt["tokens"][offset:],
        "ids": list(ids[offset:]),
        "next_token": {"k": top_k, "positions": nxt["positions"][offset:]},
        "lens": {
            "points": lens["points"],
            "top": [[row[0] for row in point[offset:]] for point in lens["top"]],
            "next": [point[offset:] for point in lens["next"]],
        },
        "attention": None,
    }
    if attention_last > 0:
        att = inspection.attention(model, tokenizer, ids, last=attention_last)
        maps = [[[[round(w, 5) for w in q] for q in head] for head in layer]
                for layer in att["maps"]]  # fmt: skip
        out["attention"] = {"offset": att["offset"], "tokens": att["tokens"], "maps": maps}
    return out
