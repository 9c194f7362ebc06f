"""A GPT from scratch.

tokenizer -> dataset -> embeddings -> attention -> transformer -> training.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {"GPT": "llm.model", "GPTConfig": "llm.model"}


def __getattr__(name: str) -> Any:
    # Lazy so `import llm` does not pull in torch until the model is actually used.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llm' has no attribute {name!r}")
