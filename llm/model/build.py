"""A GPT from a checkpoint's plain ``model`` hyperparameters (LoRA adapters added when set): the
one place a saved run's model is rebuilt, by training tasks and by the light loaders alike."""

from __future__ import annotations

from typing import Any

from llm.model.config import GPTConfig
from llm.model.gpt import GPT


def build_model(model: dict[str, Any], lora: dict[str, Any] | None = None) -> GPT:
    """The GPT of ``model`` (`GPTConfig` fields), with LoRA adapters when ``lora`` is set."""
    gpt = GPT(GPTConfig(**model))
    if lora:
        from llm.model.lora import apply_lora

        apply_lora(gpt, lora["r"], lora["alpha"], lora["dropout"], lora["targets"])
    return gpt
