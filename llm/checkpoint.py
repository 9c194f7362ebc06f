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


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> GPTLitModule:
    """Rebuild model + tokenizer from a checkpoint written by `llm.train` (weights_only load)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} ({_HINT})")
    try:
        raw: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, pickled non-allowlisted objects
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    hparams = raw.get("hyper_parameters") if isinstance(raw, dict) else None
    missing = [
        k for k in ("model", "tokenizer") if not (isinstance(hparams, dict) and k in hparams)
    ]
    if missing or "state_dict" not in raw:
        what = ", ".join(f"hyper_parameters.{k}" for k in missing) or "state_dict"
        raise ValueError(f"{path} is not a llm.train checkpoint (missing {what}); {_HINT}")
    del raw
    module = GPTLitModule.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    module.eval()
    return module
