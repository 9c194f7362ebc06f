"""Validation loss / perplexity / bits-per-character of a checkpoint.

`python -m llm.evaluate ckpt_path=... [data=... data.path=...]`. The checkpoint does not
record its corpus, so the data config says which one; its tokenizer must match the model's.
"""

from __future__ import annotations

import math
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from llm.training.module import GPTLitModule


def _check_tokenizer(module: GPTLitModule, datamodule: Any) -> None:
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
    _check_tokenizer(module, datamodule)
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


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> dict[str, float]:
    """Hydra entry point: build the data with the checkpoint's tokenizer and print metrics."""
    from llm.checkpoint import load_checkpoint
    from llm.generate import resolve_device
    from llm.tokenizers import tokenizer_from_dict

    if cfg.limit_batches is not None and int(cfg.limit_batches) < 1:
        raise ValueError(
            f"limit_batches must be >= 1 (null: the whole split), got {cfg.limit_batches}"
        )
    module = load_checkpoint(cfg.ckpt_path, map_location=resolve_device(str(cfg.device)))
    if cfg.data.get("block_size") is None:
        cfg.data.block_size = int(module.config.block_size)
    tokenizer = tokenizer_from_dict(module.hparams["tokenizer"])
    dm = hydra.utils.instantiate(cfg.data, tokenizer=tokenizer)
    limit = None if cfg.limit_batches is None else int(cfg.limit_batches)
    metrics = evaluate(module, dm, limit_batches=limit)
    print(f"val_loss: {metrics['val_loss']:.4f}")
    print(f"perplexity: {metrics['ppl']:.4f}")
    if "bpc" in metrics:
        print(f"bits_per_char: {metrics['bpc']:.4f}")
    print(f"tokens: {int(metrics['tokens'])}")
    return metrics


if __name__ == "__main__":
    main()
