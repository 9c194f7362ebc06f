"""``llm evaluate ckpt_path=... [data=... data.path=...]``: val loss, perplexity, bits per char.

The checkpoint does not record its corpus, so the data config says which one (tiny shakespeare
by default); the checkpoint's own tokenizer encodes it.
"""

from __future__ import annotations

from omegaconf import DictConfig, open_dict

from llm import checks
from llm.cli.app import hydra_app, resolve_device


@hydra_app("evaluate")
def main(cfg: DictConfig) -> dict[str, float]:
    """Build the data with the checkpoint's tokenizer and print the metrics."""
    import hydra

    from llm.checkpoint import load_checkpoint
    from llm.evaluation.loss import evaluate
    from llm.tokenizers import tokenizer_from_dict

    checks.integer("limit_batches", cfg.limit_batches, minimum=1, nullable=True, example=20)
    module = load_checkpoint(cfg.ckpt_path, resolve_device(str(cfg.device)), kind="lm")
    data = cfg.data.copy()
    with open_dict(data):
        if data.get("block_size") is None:
            data.block_size = int(module.config.block_size)
    tokenizer = tokenizer_from_dict(module.hparams["tokenizer"])
    dm = hydra.utils.instantiate(data, tokenizer=tokenizer)
    limit = None if cfg.limit_batches is None else int(cfg.limit_batches)
    metrics = evaluate(module, dm, limit_batches=limit)
    print(f"val_loss: {metrics['val_loss']:.4f}")
    print(f"perplexity: {metrics['ppl']:.4f}")
    if "bpc" in metrics:
        print(f"bits_per_char: {metrics['bpc']:.4f}")
    print(f"tokens: {int(metrics['tokens'])}")
    return metrics
