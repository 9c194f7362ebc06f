"""``llm rl init=<checkpoint> reward=<name>``: reinforcement learning with a verifiable reward
(GRPO), which is ``llm finetune task=grpo`` with its runs in ``logs/rl/runs/``."""

from __future__ import annotations

from omegaconf import DictConfig

from llm.cli.app import hydra_app
from llm.cli.finetune import finetune
from llm.training.trainer import run_folder_lock


@hydra_app("rl")
def main(cfg: DictConfig) -> float:
    """The Hydra app; returns the best val loss (minus the best held-out mean reward)."""
    with run_folder_lock(cfg):
        result = finetune(cfg)
    if result["shutdown"] is not None:
        raise result["shutdown"]
    return result["best_val_loss"]
