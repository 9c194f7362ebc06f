"""The weights a run starts from (``init=``): a llm checkpoint or Hugging Face weights (GPT-2,
Llama, Qwen3), for finetuning, evaluating and sampling.

Both paths end as (GPTConfig fields, GPT state dict, tokenizer dict or None), so the task
modules are built from plain config and the weights are copied in afterwards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llm import memory
from llm.checkpoint import LanguageModel, read_checkpoint

_HINT = (
    "init= takes a llm checkpoint (.../checkpoints/last.ckpt), a Hugging Face GPT-2, "
    "Llama or Qwen3 directory (config.json + model.safetensors) or a hub name such as gpt2"
)


@dataclass
class InitWeights:
    """What a finetune starts from; `tokenizer` is None for Hugging Face GPT-2 weights (and for
    a Llama / Qwen3 folder without tokenizer.json): the configured tokenizer is used then."""

    model: dict[str, Any]
    state_dict: dict[str, Tensor]
    tokenizer: dict[str, Any] | None
    source: str
    template: str | None = None  # how the weights want prompts rendered (llm.prompts)


def _looks_like_path(init: str) -> bool:
    return init.endswith(".ckpt") or os.sep in init or init.startswith(".")


def load_init(
    init: str | os.PathLike[str], block_size: int | None = None, dropout: float | None = None
) -> InitWeights:
    """Read `init`; crop the position table to `block_size` when it is smaller."""
    init = str(init)
    path = Path(init).expanduser()
    if path.is_file():
        weights = _from_checkpoint(path)
    elif path.is_dir() or not _looks_like_path(init):
        weights = _from_hf(init)
    else:
        raise FileNotFoundError(f"init={init!r} does not exist; {_HINT}")
    if dropout is not None:
        weights.model["dropout"] = float(dropout)
    if block_size is not None:
        crop_state_dict(weights, int(block_size))
    return weights


def _from_checkpoint(path: Path) -> InitWeights:
    raw = read_checkpoint(path, key="init")
    hp = raw["hyper_parameters"]
    if hp.get("lora"):
        raise ValueError(
            f"init={path} holds LoRA adapters; merge them first: "
            f"llm export ckpt_path={path} out=merged.ckpt"
        )
    sd = {
        k.removeprefix("model."): v for k, v in raw["state_dict"].items() if k.startswith("model.")
    }
    return InitWeights(dict(hp["model"]), sd, hp.get("tokenizer"), str(path), hp.get("template"))


def _from_hf(name_or_dir: str) -> InitWeights:
    """Llama and Qwen3 bring their folder's tokenizer.json; GPT-2's vocabulary is tiktoken's
    gpt2 encoding, which the configured tokenizer (tokenizer=gpt2) already is."""
    from llm.model import GPT, hf
    from llm.tokenizers import HFTokenizer

    model = GPT.from_pretrained(name_or_dir, check=memory.check_pretrained_fits)
    folder = hf.resolve(name_or_dir)
    tokenizer, template = None, None
    if hf.architecture(model.config) != "gpt2" and (folder / "tokenizer.json").is_file():
        hf_tokenizer = HFTokenizer(folder)
        tokenizer = hf_tokenizer.to_dict()
        template = "chat" if getattr(hf_tokenizer, "chat_template", None) else None
    config = model.config.to_dict()
    return InitWeights(config, model.state_dict(), tokenizer, str(name_or_dir), template)


def crop_state_dict(weights: InitWeights, block_size: int) -> None:
    """Shrink the context with GPT.crop_block_size, on a model that holds the loaded tensors
    themselves (built on the meta device, then assigned: nothing is allocated or copied)."""
    from llm.model import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig(**weights.model))
    model.load_state_dict(weights.state_dict, assign=True)
    model.crop_block_size(block_size)
    weights.model["block_size"] = block_size
    weights.state_dict = model.state_dict()


def load_base_weights(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Copy pretrained weights into a (possibly LoRA-wrapped) GPT; only lora_* may be missing."""
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.rsplit(".", 1)[-1].startswith("lora_")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"init weights do not fit the model: missing {missing[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]}"
        )


def init_language_model(
    init: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> LanguageModel:
    """``init=`` (a checkpoint, a Hugging Face folder or hub name) as a model and tokenizer to
    evaluate or sample, in eval mode.

    GPT-2 weights read text with tiktoken's gpt2 encoding (the same vocabulary as its
    tokenizer.json); Llama and Qwen3 need their folder's tokenizer.json.
    """
    from llm.model import GPT, GPTConfig, hf
    from llm.tokenizers import TiktokenTokenizer, tokenizer_from_dict

    weights = load_init(init)
    config = GPTConfig(**weights.model)
    try:
        gpt2 = hf.architecture(config) == "gpt2"
    except ValueError:  # none of the Hugging Face architectures
        gpt2 = False
    if weights.tokenizer is not None:
        tokenizer = tokenizer_from_dict(weights.tokenizer)
    elif gpt2:
        tokenizer = TiktokenTokenizer("gpt2")
    else:
        raise ValueError(
            f"init={init} has no tokenizer.json beside its weights: put the model's "
            "tokenizer.json in that folder"
        )
    model = GPT(config)
    model.load_state_dict(weights.state_dict)
    model.to(map_location).eval()
    return LanguageModel(model, tokenizer, {"model": weights.model, "template": None})
