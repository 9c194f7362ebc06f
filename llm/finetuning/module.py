"""Finetuning LightningModules' shared parts: LoRA from plain config and parameter counts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from llm.finetuning.lora import apply_lora, count_params
from llm.training.module import GPTLitModule, plain


def lora_config(cfg: Any) -> dict[str, Any] | None:
    """`lora` block (Hydra or dict) -> plain dict for hparams, or None when disabled."""
    cfg = plain(cfg) if cfg is not None else None
    if not cfg or not cfg.get("enabled", True):
        return None
    return {
        "r": int(cfg.get("r", 8)),
        "alpha": float(cfg.get("alpha", 16.0)),
        "dropout": float(cfg.get("dropout", 0.0)),
        "targets": [str(t) for t in cfg.get("targets", [])],
    }


def add_lora(model: nn.Module, lora: dict[str, Any] | None) -> list[str]:
    """Apply `lora_config` output to `model` (no-op for None)."""
    if not lora:
        return []
    return apply_lora(model, lora["r"], lora["alpha"], lora["dropout"], lora["targets"])


def log_param_counts(module: L.LightningModule, loggers: Sequence[Any] = ()) -> dict[str, int]:
    """Log trainable / total parameters (console + loggers): LoRA should train ~1% or less."""
    counts = {
        "params/trainable": count_params(module, trainable=True),
        "params/total": count_params(module),
    }
    rank_zero_info(
        f"trainable parameters: {counts['params/trainable']:,} of {counts['params/total']:,} "
        f"({100 * counts['params/trainable'] / max(counts['params/total'], 1):.2f}%)"
    )
    for logger in loggers:
        logger.log_metrics({k: float(v) for k, v in counts.items()}, step=0)
    return counts


class LoRAGPTModule(GPTLitModule):
    """GPTLitModule with LoRA adapters: next-token loss (text, instruct), only adapters train.

    Without LoRA the plain GPTLitModule is used instead. `llm.generate` / `llm.evaluate` load
    either kind (`llm.checkpoint` picks this class when the hparams hold `lora`);
    `llm.finetuning.export` merges the adapters into plain GPT weights.
    """

    def __init__(
        self,
        model: dict[str, Any],
        tokenizer: dict[str, Any] | None = None,
        optim: dict[str, Any] | None = None,
        compile: bool = False,
        sample: dict[str, Any] | None = None,
        lora: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model, tokenizer, optim, compile, sample)
        self.hparams["lora"] = plain(lora)
        add_lora(self.model, lora)


def lm_module(
    model: dict[str, Any],
    tokenizer: dict[str, Any] | None,
    optim: dict[str, Any],
    compile: bool = False,
    sample: dict[str, Any] | None = None,
    lora: dict[str, Any] | None = None,
) -> GPTLitModule:
    """Plain GPTLitModule without LoRA (checkpoint == pretraining's), else LoRAGPTModule."""
    if lora:
        return LoRAGPTModule(model, tokenizer, optim, compile, sample, lora)
    return GPTLitModule(model, tokenizer, optim, compile, sample)
