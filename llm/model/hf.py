"""Hugging Face checkpoints <-> our GPTConfig and state_dict, so pretrained weights load here.

A pure converter: it reads and writes config.json + safetensors and renames and reshapes
tensors; it never builds a model (GPT.from_pretrained and GPT.save_pretrained do).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from llm.io import atomic_path, atomic_write_json
from llm.model.config import GPTConfig

HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# GPT-2 stores these as Conv1D, i.e. (in, out): the transpose of nn.Linear's weight.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def resolve(name_or_dir: str | Path) -> Path:
    """A local checkpoint folder: `name_or_dir` itself, or a hub download of it."""
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


def read_tensors(path: Path) -> dict[str, Tensor]:
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(path / "model.safetensors")
    if (path / "pytorch_model.bin").exists():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path} has neither model.safetensors nor pytorch_model.bin")


def load(name_or_dir: str | Path) -> tuple[GPTConfig, dict[str, Tensor]]:
    """The checkpoint's config and its weights under our names."""
    path = resolve(name_or_dir)
    hf = json.loads((path / "config.json").read_text())
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{path} holds a {hf['model_type']!r} model, not GPT-2")
    n_positions = hf.get("n_positions", hf.get("n_ctx", 1024))
    config = GPTConfig(
        vocab_size=hf["vocab_size"],
        block_size=n_positions,
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        bias=True,
        pos_encoding="learned",
        tie_weights=True,
    )
    return config, _gpt2_from_hf(read_tensors(path), path)


def _gpt2_from_hf(tensors: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    ours: dict[str, Tensor] = {}
    for key, value in tensors.items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers in old checkpoints, not weights
        if key.startswith(("wte.", "wpe.")):
            key = "embed." + key
        ours[key] = value.t() if key.endswith(_CONV1D) else value
    if "embed.wte.weight" not in ours:
        raise KeyError(f"{path} holds no GPT-2 token embedding (transformer.wte.weight)")
    ours.setdefault("lm_head.weight", ours["embed.wte.weight"])  # tied, often not saved
    return ours


def save(config: GPTConfig, state_dict: dict[str, Tensor], directory: str | Path) -> Path:
    """Write config.json + model.safetensors that transformers.GPT2LMHeadModel can load."""
    from safetensors.torch import save_file

    c = config
    if not (c.pos_encoding == "learned" and c.bias and c.tie_weights):
        raise ValueError(
            "only GPT-2 shaped models can be exported: need pos_encoding='learned', bias=True, "
            f"tie_weights=True (got {c.pos_encoding!r}, bias={c.bias}, tie_weights={c.tie_weights})"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    for name, value in state_dict.items():
        if name == "lm_head.weight":
            continue  # tied to wte; transformers re-ties it on load
        value = value.t() if name.endswith(_CONV1D) else value
        tensors["transformer." + name.removeprefix("embed.")] = _plain(value)
    hf_config = {
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
    atomic_write_json(directory / "config.json", hf_config)
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    return directory


def _plain(t: Tensor) -> Tensor:
    """A contiguous CPU copy: safetensors refuses views and tensors that share storage."""
    return t.detach().cpu().clone(memory_format=torch.contiguous_format)
