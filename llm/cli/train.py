"""``llm train``: pretrain a GPT as the composed config says.

``train(cfg)`` does the work and is what tests call; ``main`` is the Hydra app and returns the
best validation loss, which ``-m`` sweepers (Optuna) minimise.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from llm.cli.app import hydra_app
from llm.cli.runs import run_task
from llm.training.trainer import run_folder_lock


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit a GPT as configured; returns best val loss, checkpoint paths, trainer and module."""
    from llm.training.pretrain import Pretrain

    return run_task(cfg, Pretrain())


@hydra_app("train")
def main(cfg: DictConfig) -> float:
    """The Hydra app; the return value is what ``-m`` sweepers optimise (NaN: no val loss)."""
    with run_folder_lock(cfg):
        result = train(cfg)
    if result["shutdown"] is not None:
        raise result["shutdown"]
    return result["best_val_loss"]
