"""Head and layer ablation: the loss with each head zeroed in turn, and with each block removed,
so a learner finds the parts of the model the loss depends on."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from llm.model import GPT

Batches = Iterable[tuple[Tensor, Tensor]]


@torch.no_grad()
def masked_loss(
    model: GPT,
    batches: Batches,
    head_mask: Tensor | None = None,
    edit: Callable[[int, Tensor], Tensor] | None = None,
) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over ``batches`` of (inputs, targets) (targets -100
    are skipped) and the count of tokens scored, with heads masked (``GPT.residual_stream``);
    unmasked it is ``llm evaluate``'s loss on the same batches."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device).long(), y.to(device).long()
        logits = model.unembed(model.residual_stream(x, edit, head_mask)[-1])
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)).float(), y.reshape(-1), ignore_index=-100
        )
        n = int((y != -100).sum())
        total += float(loss) * n
        count += n
    if count == 0:
        raise ValueError("no tokens to score: the text needs at least two tokens")
    return total / count, count


def skip_block(layer: int) -> Callable[[int, Tensor], Tensor]:
    """A residual-stream edit that removes block ``layer`` (attention and MLP): the stream after
    it is the stream before it."""
    before: list[Tensor] = []

    def edit(point: int, x: Tensor) -> Tensor:
        if point == layer:
            before.append(x)
        return before[-1] if point == layer + 1 else x

    return edit


def prompt_batches(ids: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    """The prompt as one batch: each token predicts the next."""
    if len(ids) < 2:
        raise ValueError("the prompt is one token: there is no next token to score")
    x = torch.tensor([list(ids)], dtype=torch.long)
    return [(x[:, :-1], x[:, 1:])]


def head_ablation(model: GPT, batches: Sequence[tuple[Tensor, Tensor]]) -> dict:
    """``heads[layer][head]``: the loss with that head's output zeroed; ``layers[layer]``: with
    every head of the layer zeroed; ``blocks[layer]``: with the whole block removed; ``base``:
    nothing removed. ``increase``: heads minus base, what the heat map shows."""
    c = model.config
    ones = torch.ones(c.n_layer, c.n_head, device=next(model.parameters()).device)
    base, tokens = masked_loss(model, batches)

    def without(layer: int, head: int | None) -> float:
        mask = ones.clone()
        mask[layer, slice(None) if head is None else head] = 0.0
        return masked_loss(model, batches, mask)[0]

    heads = [[without(layer, h) for h in range(c.n_head)] for layer in range(c.n_layer)]
    return {
        "view": "ablation",
        "tokens_scored": tokens,
        "base": base,
        "heads": heads,
        "increase": [[loss - base for loss in row] for row in heads],
        "layers": [without(layer, None) for layer in range(c.n_layer)],
        "blocks": [masked_loss(model, batches, edit=skip_block(i))[0] for i in range(c.n_layer)],
    }
