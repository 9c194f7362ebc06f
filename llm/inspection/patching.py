"""Activation patching (causal tracing; Meng et al. 2022, Wang et al. 2022): run the corrupt
prompt, put back the clean run's residual stream at one layer and position, and see how much of
the clean answer returns."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from llm.inspection.tokens import as_batch, labels, point_names
from llm.model import GPT
from llm.tokenizers import Tokenizer


@torch.no_grad()
def logit_diff(
    model: GPT,
    idx: Tensor,
    answer: int,
    wrong: int,
    patch: tuple[list[Tensor], int, Sequence[int]] | None = None,
) -> float:
    """logit(answer) - logit(wrong) at the last position of ``idx`` (1, T). ``patch``: (a clean
    run's residual stream, a point of it, positions) replaces this run's stream there."""
    edit = None
    if patch is not None:
        clean, point, positions = patch
        where = list(positions)

        def edit(i: int, x: Tensor) -> Tensor:
            if i != point:
                return x
            x = x.clone()
            x[:, where] = clean[point][:, where]
            return x

    last = model.unembed(model.residual_stream(idx, edit)[-1][:, -1])[0].float()
    return float(last[answer] - last[wrong])


@torch.no_grad()
def activation_patching(
    model: GPT,
    tokenizer: Tokenizer,
    clean_ids: Sequence[int],
    corrupt_ids: Sequence[int],
    answer: int,
    wrong: int,
) -> dict:
    """``effect[point][position]``: the logit difference answer - wrong of the corrupt run with
    the clean stream patched in at that point and position, scaled so the clean run is 1 and the
    corrupt one 0."""
    if len(clean_ids) != len(corrupt_ids):
        raise ValueError(
            f"prompt= and corrupt= must be the same number of tokens to patch position by "
            f"position; they are {len(clean_ids)} and {len(corrupt_ids)}"
        )
    model.eval()
    clean_idx, corrupt_idx = as_batch(model, clean_ids), as_batch(model, corrupt_ids)
    clean = model.residual_stream(clean_idx)
    clean_diff = logit_diff(model, clean_idx, answer, wrong)
    corrupt_diff = logit_diff(model, corrupt_idx, answer, wrong)
    gap = clean_diff - corrupt_diff
    if gap == 0.0:
        raise ValueError(
            "the two prompts give answer and wrong the same logit difference: there is no "
            "difference to trace; choose prompts (or answers) the model tells apart"
        )
    effect = [
        [
            (logit_diff(model, corrupt_idx, answer, wrong, (clean, point, [t])) - corrupt_diff)
            / gap
            + 0.0  # no -0.0 where the gap is negative
            for t in range(len(clean_ids))
        ]
        for point in range(model.config.n_layer + 1)
    ]
    return {
        "view": "patching",
        "tokens": labels(tokenizer, clean_ids),
        "corrupt_tokens": labels(tokenizer, corrupt_ids),
        "points": point_names(model.config.n_layer),
        "answer": labels(tokenizer, [answer])[0],
        "wrong": labels(tokenizer, [wrong])[0],
        "clean_diff": clean_diff,
        "corrupt_diff": corrupt_diff,
        "effect": effect,
    }
