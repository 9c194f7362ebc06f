"""Validation loss, perplexity and bits per character of a model over a whole split.

The CLI is ``llm evaluate``; training logs the same loss on a fixed sample of the split.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from llm.training.module import GPTLitModule


def check_tokenizer(module: GPTLitModule, datamodule: Any) -> None:
    """Ids mean nothing if the cache was tokenized differently from what the model learnt."""
    ours = module.hparams.get("tokenizer")
    theirs = datamodule.tokenizer.to_dict() if datamodule.tokenizer is not None else None
    if ours != theirs:
        raise ValueError(
            f"checkpoint's tokenizer differs from the data's (cache {datamodule.cache_path}); "
            "evaluate on the corpus and tokenizer the model was trained with"
        )


@torch.no_grad()
def evaluate(
    module: GPTLitModule, datamodule: Any, limit_batches: int | None = None
) -> dict[str, float]:
    """Token-weighted mean val loss, its perplexity, and bits/char for char tokenizers.

    Weighting by tokens (not by batch) makes a short last batch count for what it holds.
    """
    datamodule.prepare_data()
    datamodule.setup("validate")
    check_tokenizer(module, datamodule)
    module.eval()
    device = next(module.parameters()).device
    total, count = 0.0, 0
    for i, (x, y) in enumerate(datamodule.val_dataloader()):
        if limit_batches is not None and i >= limit_batches:
            break
        x, y = x.to(device).long(), y.to(device).long()
        _, loss = module.model(x, y)
        assert loss is not None
        n = int((y != -100).sum())
        total += float(loss) * n
        count += n
    if count == 0:
        raise ValueError("the validation split is empty: nothing to evaluate")
    val_loss = total / count
    out = {"val_loss": val_loss, "ppl": math.exp(val_loss), "tokens": float(count)}
    if (module.hparams.get("tokenizer") or {}).get("kind") == "char":
        out["bpc"] = val_loss / math.log(2)  # one token is one character
    return out
