"""Load a GPTLitModule from a Lightning checkpoint, with errors that say what to do.

`load_from_checkpoint` alone fails with opaque tracebacks on a wrong path, a truncated file
or somebody else's .ckpt; the CLIs (`llm.generate`, `llm.evaluate`) go through here instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from llm.training.module import GPTLitModule

_HINT = "training runs write logs/train/runs/<date>/checkpoints/last.ckpt"


def read_checkpoint(
    path: str | os.PathLike[str], not_found: str = "checkpoint not found", hint: str = _HINT
) -> Any:
    """The raw contents (weights_only), with errors that name the file and where runs write.

    Memory-mapped: callers mostly want the hyper_parameters before Lightning loads the file
    again, so the tensors are not read twice.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{not_found}: {path} ({hint})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, garbage bytes, pickled non-allowlisted objects
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> GPTLitModule:
    """Rebuild model + tokenizer from a checkpoint written by `llm.train` (weights_only load)."""
    path = Path(path)
    raw = read_checkpoint(path)
    hparams = raw.get("hyper_parameters") if isinstance(raw, dict) else None
    missing = [
        k for k in ("model", "tokenizer") if not (isinstance(hparams, dict) and k in hparams)
    ]
    if missing or "state_dict" not in raw:
        what = ", ".join(f"hyper_parameters.{k}" for k in missing) or "state_dict"
        raise ValueError(f"{path} is not a llm.train checkpoint (missing {what}); {_HINT}")
    del raw
    if "labels" in hparams:
        raise ValueError(
            f"{path} is a classifier (labels {hparams['labels']}), not a language model: "
            f'use python -m llm.classify ckpt_path={path} text="..."'
        )
    from llm.finetuning.checkpoint import module_class  # LoRA adapters: used unmerged

    cls: type[GPTLitModule] = module_class(hparams)
    module = cls.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    module.eval()
    return module


# GPTConfig fields that fix parameter shapes; dropout and attn_impl may change on resume
_SHAPE_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "pos_encoding")


def check_resumable(path: str | os.PathLike[str], module: GPTLitModule) -> None:
    """Refuse, before Lightning's opaque size-mismatch traceback, to resume another model.

    Resuming needs the same architecture and the same tokenizer (same ids for the same text);
    the error names every field that differs and what to do about it.
    """
    path = Path(path)
    raw = read_checkpoint(path, not_found="ckpt_path not found")
    hp = raw.get("hyper_parameters") if isinstance(raw, dict) else None
    if not isinstance(hp, dict) or "model" not in hp:
        raise ValueError(f"{path} is not a llm.train checkpoint (no hyper_parameters.model)")
    ours = module.hparams["model"]
    diffs = [
        f"model.{k}: checkpoint {hp['model'].get(k)!r}, this run {ours.get(k)!r}"
        for k in _SHAPE_KEYS
        if hp["model"].get(k) != ours.get(k)
    ]
    if hp.get("tokenizer") != module.hparams["tokenizer"]:
        theirs, mine = hp.get("tokenizer") or {}, module.hparams["tokenizer"] or {}
        diffs.append(
            f"tokenizer: checkpoint {theirs.get('kind')!r} ({theirs.get('name', '')}), "
            f"this run {mine.get('kind')!r} ({mine.get('name', '')}) or a different vocabulary"
        )
    if diffs:
        raise ValueError(
            f"cannot resume from {path}: it holds a different model or tokenizer:\n  "
            + "\n  ".join(diffs)
            + "\nResume with the overrides the checkpoint was trained with (its run folder's "
            ".hydra/overrides.yaml), or start a new run without ckpt_path"
        )
