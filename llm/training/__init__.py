"""Pretraining: optimizer and schedule, the LightningModule, and logging callbacks.

`optim` is imported eagerly; the module and callbacks (which need the model and Lightning)
are imported lazily on first attribute access.
"""

from __future__ import annotations

from typing import Any

from llm.training.optim import build_optimizer, build_scheduler, lr_at, param_groups

__all__ = [
    "AttentionHeatmapCallback",
    "GPTLitModule",
    "SampleTextCallback",
    "build_optimizer",
    "build_scheduler",
    "lr_at",
    "param_groups",
]


def __getattr__(name: str) -> Any:
    if name == "GPTLitModule":
        from llm.training.module import GPTLitModule

        return GPTLitModule
    if name in ("SampleTextCallback", "AttentionHeatmapCallback"):
        from llm.training import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'llm.training' has no attribute {name!r}")
