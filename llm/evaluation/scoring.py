"""The log-probability of a continuation given a context: what multiple-choice benchmarks and
perplexity are made of, batched.

The one implementation behind the lm-evaluation-harness adapter (:mod:`llm.evaluation.harness`)
and the training-time benchmark (:mod:`llm.evaluation.multiple_choice`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llm.model import GPT

Pair = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


@dataclass(frozen=True)
class Score:
    """A continuation's summed log-probability, its length in tokens, and whether greedy
    decoding would have produced it token by token."""

    logprob: float
    tokens: int
    greedy: bool


def model_input(context: Sequence[int], continuation: Sequence[int], block_size: int) -> list[int]:
    """What the model reads to score ``continuation``: context + continuation without its last
    token, cropped from the left to the block size (the oldest context goes first)."""
    if not continuation:
        raise ValueError("an empty continuation has nothing to score")
    if len(continuation) > block_size:
        raise ValueError(
            f"a continuation of {len(continuation)} tokens does not fit the model's context of "
            f"{block_size}: its first tokens would have nothing to condition on"
        )
    if not context:
        raise ValueError("a continuation needs at least one context token (e.g. end-of-text)")
    return [*context, *continuation][-(block_size + 1) : -1]


@torch.no_grad()
def score_continuations(model: GPT, pairs: Sequence[Pair], batch_size: int = 16) -> list[Score]:
    """Score every (context, continuation) pair, in the order given.

    Longest first, as lm-evaluation-harness batches: each batch pads to its first row, so similar
    lengths share a batch and running out of memory happens at once if at all. Rows are padded
    on the right, which a causal model never reads back.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    block = model.config.block_size
    device = next(model.parameters()).device
    inputs = [model_input(ctx, cont, block) for ctx, cont in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))
    scores: list[Score | None] = [None] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = len(inputs[rows[0]])
            x = torch.zeros(len(rows), width, dtype=torch.long)
            for r, i in enumerate(rows):
                x[r, : len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
            logits, _ = model(x.to(device))
            for r, i in enumerate(rows):
                cont = torch.tensor(list(pairs[i][1]), dtype=torch.long, device=device)
                end = len(inputs[i])
                logp = F.log_softmax(logits[r, end - len(cont) : end].float(), dim=-1)
                scores[i] = Score(
                    logprob=float(logp.gather(-1, cont[:, None]).sum()),
                    tokens=len(cont),
                    greedy=bool((logp.argmax(-1) == cont).all()),
                )
    finally:
        model.train(was_training)
    return [s for s in scores if s is not None]
