"""Load any finetune checkpoint (classifier, LoRA LM or plain LM) and merge-and-export LoRA.

The module class is picked from the checkpoint's own hyper_parameters, so one loader serves
`llm.classify`, tests and the exporter; plain LM checkpoints also load with `llm.checkpoint`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from llm.checkpoint import read_checkpoint
from llm.finetuning.lora import lora_state_dict_merged
from llm.io import atomic_open


def _read(path: str | os.PathLike[str]) -> dict[str, Any]:
    hint = "finetune runs write logs/finetune/runs/<date>/checkpoints/last.ckpt"
    raw = read_checkpoint(path, hint=hint)
    if not isinstance(raw, dict) or "state_dict" not in raw or "hyper_parameters" not in raw:
        raise ValueError(f"{path} is not a Lightning checkpoint written by llm.train/finetune")
    return raw


def module_class(hparams: dict[str, Any]) -> type:
    from llm.finetuning.classify import ClassifierModule
    from llm.finetuning.module import LoRAGPTModule
    from llm.training.module import GPTLitModule

    if "labels" in hparams:
        return ClassifierModule
    if hparams.get("lora"):
        return LoRAGPTModule
    return GPTLitModule


def load_finetuned(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """Rebuild the right LightningModule (weights_only load), in eval mode."""
    raw = _read(path)
    cls = module_class(raw["hyper_parameters"])
    del raw
    module = cls.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    return module.eval()


def export_merged(ckpt_path: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Fold LoRA adapters into the base weights and write a checkpoint without LoRA.

    An LM (text / instruct) export has exactly GPTLitModule's hparams, so it loads with
    `llm.checkpoint.load_checkpoint` and `python -m llm.generate`; a classifier export loads
    with `ClassifierModule` (lora=None). Logits are unchanged up to float rounding.
    """
    raw = _read(ckpt_path)
    hp = dict(raw["hyper_parameters"])
    lora = hp.get("lora")
    if not lora:
        raise ValueError(f"{ckpt_path} has no LoRA adapters; it is already a plain checkpoint")
    state = lora_state_dict_merged(raw["state_dict"], float(lora["alpha"]) / int(lora["r"]))
    if "labels" in hp:
        hp["lora"] = None
    else:
        hp.pop("lora")
    merged = {
        "state_dict": state,
        "hyper_parameters": hp,
        "pytorch-lightning_version": raw.get("pytorch-lightning_version", "2.0.0"),
        "global_step": raw.get("global_step", 0),
        "epoch": raw.get("epoch", 0),
    }
    with atomic_open(out, "wb") as f:
        torch.save(merged, f)
    return Path(out)
