"""Hugging Face checkpoints <-> our GPTConfig and state_dict: GPT-2, Llama and Qwen3.

A pure converter: it reads and writes config.json + safetensors and renames and reshapes
tensors; it never builds a model (GPT.from_pretrained and GPT.save_pretrained do).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llm.io import atomic_path, atomic_write_json, confined, read_json
from llm.model.config import LLAMA3_SCALING, GPTConfig

HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# GPT-2 stores these as Conv1D, i.e. (in, out): the transpose of nn.Linear's weight.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# What each Hugging Face architecture fixes in our config (save_pretrained picks the one that
# fits); Qwen3 is Llama with RMSNorm on queries and keys and without biases.
_GPT2 = {
    "pos_encoding": "learned",
    "norm": "layernorm",
    "mlp": "gelu",
    "qk_norm": False,
    "bias": True,
    "tie_weights": True,
    "logit_softcap": None,
    "sliding_window": None,
}
_LLAMA = {
    "pos_encoding": "rope",
    "norm": "rmsnorm",
    "mlp": "swiglu",
    "qk_norm": False,
    "logit_softcap": None,
    "sliding_window": None,
}
_QWEN3 = {**_LLAMA, "qk_norm": True, "bias": False, "sliding_window": "any"}
ARCHITECTURES = {
    "gpt2": ("GPT2LMHeadModel", _GPT2),
    "llama": ("LlamaForCausalLM", _LLAMA),
    "qwen3": ("Qwen3ForCausalLM", _QWEN3),
}


# --- files -------------------------------------------------------------------------------------


def resolve(name_or_dir: str | Path) -> Path:
    """A local checkpoint folder: `name_or_dir` itself, or a hub download of it."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id=str(name_or_dir),
            allow_patterns=["*.json", "*.safetensors", "pytorch_model.bin", "*.jinja"],
        )
    except Exception as e:
        raise OSError(
            f"{str(name_or_dir)!r} is not a local directory and could not be fetched from the "
            f"Hugging Face Hub ({type(e).__name__}: {e}). If offline, pass a local directory "
            "containing config.json and model.safetensors or pytorch_model.bin "
            f"(hub names: {', '.join(HUB_NAMES)})"
        ) from e
    return Path(local)


SAFETENSORS_HINT = (
    "convert it with transformers where you trust it: "
    "model.save_pretrained(dir, safe_serialization=True)"
)


def read_tensors(path: Path) -> dict[str, Tensor]:
    """model.safetensors, its shards (model.safetensors.index.json) or pytorch_model.bin.

    A shard name in the index must name a file in ``path`` (never ``../``, an absolute path);
    pytorch_model.bin is read only when it holds plain tensors (torch's weights_only loader),
    never as a pickle that could run code.
    """
    if (path / "model.safetensors").exists():
        return _load_safetensors(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    if index.exists():
        return {k: v for shard in index_shards(index) for k, v in _load_safetensors(shard).items()}
    if (path / "pytorch_model.bin").exists():
        return _load_bin(path / "pytorch_model.bin")
    raise FileNotFoundError(
        f"{path} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def index_shards(index: Path) -> list[Path]:
    """The shard files model.safetensors.index.json maps tensors to, each inside its folder.

    Links are not followed for the check: a hub snapshot's files all link into ../../blobs/.
    """
    weight_map = read_json(index).get("weight_map") if index.is_file() else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no weight_map of tensor names to shard files")
    files = {}
    for tensor, name in weight_map.items():
        files[name] = confined(
            index.parent, name, f"{index}: weight_map[{tensor!r}] =", follow_links=False
        )
    return [files[name] for name in sorted(files)]


def _load_safetensors(file: Path) -> dict[str, Tensor]:
    """A safetensors file's tensors; a damaged one names the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist (its folder's weights are incomplete)")
    try:
        return load_file(file)
    except SafetensorError as e:
        raise ValueError(f"{file} is not a readable safetensors file ({e})") from e


def _load_bin(file: Path) -> dict[str, Tensor]:
    """pytorch_model.bin of plain tensors; any other pickle is refused, not unpickled."""
    import pickle

    try:
        tensors = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message would advise an unsafe load
        raise ValueError(
            f"{file} is a pickle of more than plain tensors, and pickles can run code: only "
            f"safetensors files (and a pytorch_model.bin of plain tensors) are read; "
            f"{SAFETENSORS_HINT}"
        ) from e
    except Exception as e:  # truncated, random bytes
        raise ValueError(
            f"{file} is not a readable pytorch_model.bin ({type(e).__name__}); {SAFETENSORS_HINT}"
        ) from e
    if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
        raise ValueError(f"{file} does not hold a state dict of tensors; {SAFETENSORS_HINT}")
    return tensors


def read_config(path: Path) -> dict[str, Any]:
    """A model folder's config.json, with an error that says what the folder lacks."""
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"{path} has no config.json: a Hugging Face model folder holds config.json and "
            "model.safetensors (as transformers' save_pretrained writes it)"
        )
    hf = read_json(file)
    if not isinstance(hf, dict):
        raise ValueError(f"{file} is not a Hugging Face config (a JSON object)")
    return hf


def load(
    name_or_dir: str | Path, check: Callable[[GPTConfig, Path], None] | None = None
) -> tuple[GPTConfig, dict[str, Tensor]]:
    """The checkpoint's config and its weights under our names; by config.json's model_type.

    ``check(config, folder)`` runs before any weight is read (the caller's memory check, say).
    """
    path = resolve(name_or_dir)
    hf = read_config(path)
    kind = hf.get("model_type", "gpt2")
    if not isinstance(kind, str) or kind not in ARCHITECTURES:
        raise ValueError(
            f"{path} holds a {kind!r} model; loadable model_types: {sorted(ARCHITECTURES)}"
        )
    try:
        config = _gpt2_config(hf) if kind == "gpt2" else _llama_config(hf)
    except KeyError as e:
        raise ValueError(f"{path / 'config.json'} lacks {e} (needed for a {kind} model)") from e
    if check is not None:
        check(config, path)
    tensors = read_tensors(path)
    if kind == "gpt2":
        return config, _gpt2_from_hf(tensors, path)
    return config, _llama_from_hf(tensors, config, path)


def save(config: GPTConfig, state_dict: dict[str, Tensor], directory: str | Path) -> Path:
    """Write config.json + model.safetensors that transformers loads with the architecture that
    fits the config (GPT-2, Llama or Qwen3); a config none of them can express is refused."""
    from safetensors.torch import save_file

    kind = architecture(config)
    if kind == "gpt2":
        hf_config, tensors = _gpt2_to_hf_config(config), _gpt2_to_hf(state_dict)
    else:
        hf_config, tensors = _llama_to_hf_config(config, kind), _llama_to_hf(state_dict, config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / "config.json", hf_config)
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file({k: _plain(v) for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    return directory


def architecture(config: GPTConfig) -> str:
    """The Hugging Face model_type whose architecture the config matches, else a ValueError
    that names, for each, the model.<key> settings that differ."""
    misses = {}
    for kind, (_, fixed) in ARCHITECTURES.items():
        miss = [
            f"model.{k}={getattr(config, k)!r} (needs {v!r})"
            for k, v in fixed.items()
            if v != "any" and getattr(config, k) != v
        ]
        if config.n_embd % config.n_head:  # transformers' configs require it
            miss.append(f"model.n_embd={config.n_embd} (needs a multiple of n_head)")
        if kind == "gpt2" and config.n_kv_head != config.n_head:
            miss.append(f"model.n_kv_head={config.n_kv_head} (needs null: n_head)")
        if kind == "gpt2" and config.head_dim * config.n_head != config.n_embd:
            miss.append(f"model.head_dim={config.head_dim} (needs null: n_embd / n_head)")
        if kind == "gpt2" and config.mlp_hidden != 4 * config.n_embd:
            miss.append(f"model.mlp_hidden={config.mlp_hidden} (needs null: 4 * n_embd)")
        if not miss:
            return kind
        misses[kind] = miss
    raise ValueError(
        "this model cannot be saved as a Hugging Face checkpoint: only GPT-2 shaped models, "
        "Llama or Qwen3 can be; it differs from\n"
        + "\n".join(f"  {ARCHITECTURES[k][0]} in: {', '.join(m)}" for k, m in misses.items())
    )


def _plain(t: Tensor) -> Tensor:
    """A contiguous CPU copy: safetensors refuses views and tensors that share storage."""
    return t.detach().cpu().clone(memory_format=torch.contiguous_format)


# --- GPT-2 -------------------------------------------------------------------------------------


def _gpt2_config(hf: dict[str, Any]) -> GPTConfig:
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        **_GPT2,
    )


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


def _gpt2_to_hf(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    return {
        "transformer." + name.removeprefix("embed."): value.t() if name.endswith(_CONV1D) else value
        for name, value in state_dict.items()
        if name != "lm_head.weight"  # tied to wte; transformers re-ties it on load
    }


def _gpt2_to_hf_config(c: GPTConfig) -> dict[str, Any]:
    return {
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
        "layer_norm_epsilon": c.norm_eps,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
    }


# --- Llama and Qwen3 ---------------------------------------------------------------------------


def _llama_config(hf: dict[str, Any]) -> GPTConfig:
    """Llama / Qwen3 config.json -> GPTConfig; refuses what our model cannot reproduce."""
    kind = hf["model_type"]
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (Llama's is silu)")
    attention_bias = bool(hf.get("attention_bias", False))
    mlp_bias = bool(hf.get("mlp_bias", False)) if kind == "llama" else False
    if attention_bias != mlp_bias:
        raise ValueError(
            f"attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported: "
            "model.bias is one switch for every projection"
        )
    # transformers 5 writes rope_parameters; older config.json files rope_theta + rope_scaling
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"RoPE type {rope_type!r} is not supported (default and llama3 are)")
    scaling = None
    if rope_type == "llama3":
        scaling = {"rope_type": "llama3", **{k: rope[k] for k in LLAMA3_SCALING}}
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf["max_position_embeddings"],
        n_layer=hf["num_hidden_layers"],
        n_head=heads,
        n_embd=hidden,
        dropout=float(hf.get("attention_dropout") or 0.0),
        bias=attention_bias,
        tie_weights=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp_hidden=hf["intermediate_size"],
        n_kv_head=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_scaling=scaling,
        sliding_window=_qwen3_window(hf) if kind == "qwen3" else None,
        **{k: v for k, v in ARCHITECTURES[kind][1].items() if k not in ("bias", "sliding_window")},
    )


def _qwen3_window(hf: dict[str, Any]) -> int | None:
    """Qwen3 may slide the window in its top layers only; we have one window for all."""
    if not hf.get("use_sliding_window"):
        return None
    n, first = hf["num_hidden_layers"], hf.get("max_window_layers", 0)
    layers = hf.get("layer_types") or ["full" if i < first else "sliding" for i in range(n)]
    if any(not t.startswith("sliding") for t in layers):
        raise ValueError("a Qwen3 model with sliding windows in only some layers is not supported")
    return int(hf["sliding_window"])


def _llama_to_hf_config(c: GPTConfig, kind: str) -> dict[str, Any]:
    hf = {
        "architectures": [ARCHITECTURES[kind][0]],
        "model_type": kind,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.block_size,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head,
        "head_dim": c.head_dim,
        "hidden_size": c.n_embd,
        "intermediate_size": c.mlp_hidden,
        "hidden_act": "silu",
        "rms_norm_eps": c.norm_eps,
        "tie_word_embeddings": c.tie_weights,
        "attention_bias": c.bias,
        "attention_dropout": c.dropout,
        "initializer_range": 0.02,
        # the long-standing keys, read by transformers 4 and 5 alike
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling,
    }
    if kind == "llama":
        hf["mlp_bias"] = c.bias
    else:  # Qwen3: every layer slides or none does
        window = c.sliding_window
        hf["use_sliding_window"] = window is not None
        hf["sliding_window"] = window
        hf["max_window_layers"] = 0 if window is not None else c.n_layer
        hf["layer_types"] = ["sliding_attention" if window else "full_attention"] * c.n_layer
    return hf


def _rope_rows(w: Tensor, head_dim: int, to_hf: bool) -> Tensor:
    """Reorder the query/key rows of each head between the two RoPE layouts.

    Hugging Face's Llama and Qwen3 rotate dims (i, i + hs/2) together ("rotate half"); our
    RotaryEmbedding rotates (2i, 2i + 1) (interleaved, as RoFormer and Meta's original code).
    Permuting the projection rows (and q/k norm gains) converts one into the other, which leaves
    our RoPE, and every checkpoint trained with it, unchanged.
    """
    half = head_dim // 2
    order = torch.arange(head_dim).view(*((half, 2) if to_hf else (2, half))).t().flatten()
    return w.reshape(-1, head_dim, *w.shape[1:])[:, order].reshape(w.shape)


def _llama_pairs(c: GPTConfig) -> list[tuple[str, list[tuple[str, int, bool]]]]:
    """(our name, its Hugging Face parts: (name, rows, rope-layout rows)), in order: a fused
    tensor of ours is its parts concatenated on dim 0 (c_attn = q|k|v, c_fc = gate|up)."""
    hs, q, kv, width = c.head_dim, c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.mlp_hidden
    pairs = [
        ("embed.wte.weight", [("model.embed_tokens.weight", c.vocab_size, False)]),
        ("ln_f.weight", [("model.norm.weight", c.n_embd, False)]),
    ]
    if not c.tie_weights:
        pairs.append(("lm_head.weight", [("lm_head.weight", c.vocab_size, False)]))
    for i in range(c.n_layer):
        ours, hf = f"h.{i}.", f"model.layers.{i}."
        pairs += [
            (ours + "ln_1.weight", [(hf + "input_layernorm.weight", c.n_embd, False)]),
            (ours + "ln_2.weight", [(hf + "post_attention_layernorm.weight", c.n_embd, False)]),
        ]
        for kind in ("weight", "bias") if c.bias else ("weight",):
            attn, mlp = f"{hf}self_attn.", f"{hf}mlp."
            pairs += [
                (
                    f"{ours}attn.c_attn.{kind}",
                    [
                        (f"{attn}q_proj.{kind}", q, True),
                        (f"{attn}k_proj.{kind}", kv, True),
                        (f"{attn}v_proj.{kind}", kv, False),
                    ],
                ),
                (f"{ours}attn.c_proj.{kind}", [(f"{attn}o_proj.{kind}", c.n_embd, False)]),
                (
                    f"{ours}mlp.c_fc.{kind}",
                    [
                        (f"{mlp}gate_proj.{kind}", width, False),
                        (f"{mlp}up_proj.{kind}", width, False),
                    ],
                ),
                (f"{ours}mlp.c_proj.{kind}", [(f"{mlp}down_proj.{kind}", c.n_embd, False)]),
            ]
        if c.qk_norm:
            pairs += [
                (ours + "attn.q_norm.weight", [(hf + "self_attn.q_norm.weight", hs, True)]),
                (ours + "attn.k_norm.weight", [(hf + "self_attn.k_norm.weight", hs, True)]),
            ]
    return pairs


def _llama_from_hf(tensors: dict[str, Tensor], c: GPTConfig, path: Path) -> dict[str, Tensor]:
    used = {k for k in tensors if k.endswith("rotary_emb.inv_freq")}  # derived, not weights
    ours: dict[str, Tensor] = {}
    for name, parts in _llama_pairs(c):
        missing = [p for p, _, _ in parts if p not in tensors]
        if missing:
            raise KeyError(f"{path} lacks {missing} (needed for {name})")
        used.update(p for p, _, _ in parts)
        ours[name] = torch.cat(
            [
                _rope_rows(tensors[p], c.head_dim, False) if rope else tensors[p]
                for p, _, rope in parts
            ]
        )
    if c.tie_weights:
        used.add("lm_head.weight")  # some tied checkpoints store the copy anyway
        ours["lm_head.weight"] = ours["embed.wte.weight"]
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise KeyError(f"{path} holds weights this config has no place for: {unexpected[:5]}")
    return ours


def _llama_to_hf(state_dict: dict[str, Tensor], c: GPTConfig) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, parts in _llama_pairs(c):
        pieces = state_dict[name].split([rows for _, rows, _ in parts])
        for (p, _, rope), t in zip(parts, pieces, strict=True):
            out[p] = _rope_rows(t, c.head_dim, True) if rope else t
    return out
