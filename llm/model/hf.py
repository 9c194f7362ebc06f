"""Import and export Hugging Face GPT-2 checkpoints, so pretrained weights can be finetuned here."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from llm.io import temp_file_beside
from llm.model.config import GPTConfig

if TYPE_CHECKING:
    from llm.model.gpt import GPT

HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# GPT-2 stores these as Conv1D, i.e. (in, out): the transpose of nn.Linear's weight.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Overrides that do not change any weight's shape (block_size may only shrink: wpe is cropped).
_SAFE_OVERRIDES = ("dropout", "attn_impl", "block_size")


def _resolve(name_or_dir: str | Path) -> Path:
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id=str(name_or_dir),
            allow_patterns=["config.json", "model.safetensors", "pytorch_model.bin"],
        )
    except Exception as e:
        raise OSError(
            f"{str(name_or_dir)!r} is not a local directory and could not be fetched from the "
            f"Hugging Face Hub ({type(e).__name__}: {e}). If offline, pass a local directory "
            "containing config.json and model.safetensors or pytorch_model.bin "
            f"(hub names: {', '.join(HUB_NAMES)})"
        ) from e
    return Path(local)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(path / "model.safetensors")
    if (path / "pytorch_model.bin").exists():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path} has neither model.safetensors nor pytorch_model.bin")


def _hf_to_ours(key: str) -> str | None:
    key = key.removeprefix("transformer.")
    if key.endswith((".attn.bias", ".attn.masked_bias")):
        return None  # causal-mask buffers in old checkpoints, not weights
    if key.startswith(("wte.", "wpe.")):
        return "embed." + key
    return key


def load_gpt2(cls: type[GPT], name_or_dir: str | Path, **overrides: Any) -> GPT:
    """Build a GPT with the checkpoint's shape and copy its weights in."""
    path = _resolve(name_or_dir)
    hf = json.loads((path / "config.json").read_text())
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{path} holds a {hf['model_type']!r} model, not GPT-2")
    bad = sorted(set(overrides) - set(_SAFE_OVERRIDES))
    if bad:
        raise ValueError(f"cannot override {bad} of a pretrained model; allowed: {_SAFE_OVERRIDES}")
    n_positions = hf.get("n_positions", hf.get("n_ctx", 1024))
    if overrides.get("block_size", n_positions) > n_positions:
        raise ValueError(f"block_size can only shrink below the checkpoint's {n_positions}")
    config = GPTConfig(
        vocab_size=hf["vocab_size"],
        block_size=n_positions,
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        bias=True,
        pos_encoding="learned",
        tie_weights=True,
        **{k: v for k, v in overrides.items() if k != "block_size"},
    )
    model = cls(config)
    ours = model.state_dict()
    loaded: dict[str, Tensor] = {}
    for key, value in _read_state_dict(path).items():
        name = _hf_to_ours(key)
        if name is None:
            continue
        if name not in ours:
            raise KeyError(f"unexpected GPT-2 weight {key!r} in {path}")
        loaded[name] = value.t() if name.endswith(_CONV1D) else value
    loaded.setdefault("lm_head.weight", loaded["embed.wte.weight"])  # tied, often not saved
    missing = sorted(set(ours) - set(loaded))
    if missing:
        raise KeyError(f"checkpoint {path} lacks weights: {missing[:5]}")
    for name, value in loaded.items():
        if value.shape != ours[name].shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != {ours[name].shape}")
    model.load_state_dict(loaded)
    if "block_size" in overrides:
        crop_block_size(model, overrides["block_size"])
    return model


def crop_block_size(model: GPT, block_size: int) -> None:
    """Shrink the context window (e.g. 1024 -> 256) to save memory when finetuning."""
    from torch import nn

    model.config.block_size = block_size
    model.embed.wpe.weight = nn.Parameter(model.embed.wpe.weight[:block_size].clone())
    for block in model.h:
        block.attn.causal = block.attn.causal[:block_size, :block_size]


def save_gpt2(model: GPT, directory: str | Path) -> Path:
    """Write config.json + model.safetensors that transformers.GPT2LMHeadModel can load."""
    from safetensors.torch import save_file

    c = model.config
    if not (c.pos_encoding == "learned" and c.bias and c.tie_weights):
        raise ValueError(
            "only GPT-2 shaped models can be exported: need pos_encoding='learned', bias=True, "
            f"tie_weights=True (got {c.pos_encoding!r}, bias={c.bias}, tie_weights={c.tie_weights})"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    for name, value in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to wte; transformers re-ties it on load
        value = value.t() if name.endswith(_CONV1D) else value
        # clone: safetensors refuses tensors that share storage
        tensors["transformer." + name.removeprefix("embed.")] = (
            value.detach().cpu().clone(memory_format=torch.contiguous_format)
        )
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_ctx": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
    }
    _atomic_write(directory / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
    _atomic_write(
        directory / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"})
    )
    return directory


def _atomic_write(target: Path, write: Any) -> None:
    """Write to a temp file in the same directory, then rename: no half-written checkpoints."""
    fd, tmp = temp_file_beside(target)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
