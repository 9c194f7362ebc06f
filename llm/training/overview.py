"""One line about the model as fitting starts, instead of Lightning's module table."""

from __future__ import annotations

import logging

import lightning as L

log = logging.getLogger("llm")


class ModelOverview(L.Callback):
    """One line about the model at the start of fitting, instead of Lightning's module table:
    parameters (all, trainable, without embeddings), shape and training FLOPs per token."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            log.info(overview(pl_module))


def overview(pl_module: L.LightningModule) -> str:
    model, c = pl_module.model, pl_module.model.config
    total = sum(p.numel() for p in pl_module.parameters())
    trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
    kv = f" ({c.n_kv_head} kv)" if c.n_kv_head != c.n_head else ""
    return (
        f"model: {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable, "
        f"{model.num_params(non_embedding=True) / 1e6:.2f}M without embeddings); "
        f"{c.n_layer} layers x {c.n_head} heads{kv} x {c.n_embd}, block {c.block_size}, "
        f"vocab {c.vocab_size}; {model.flops_per_token() / 1e6:.1f}M training FLOPs/token"
    )
