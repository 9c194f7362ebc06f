"""``llm finetune task=<text|classify|instruct> init=<checkpoint | Hugging Face folder>``.

The same stack as pretraining (trainer, logger and callback configs, checkpoints, overrides,
sweeps); the ``task`` group instantiates the task (`llm.finetuning.tasks`). ``finetune(cfg)`` is
what tests call; ``main`` returns the best validation loss so ``-m`` sweepers can minimise it.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from llm.cli.app import hydra_app
from llm.cli.runs import run_task
from llm.training.trainer import run_folder_lock


def finetune(cfg: DictConfig) -> dict[str, Any]:
    """Fit as configured; returns best val loss, checkpoint paths, counts and task outputs."""
    import hydra

    return run_task(cfg, hydra.utils.instantiate(cfg.task))


def finetune_job(cfg: DictConfig) -> float:
    """One job of a finetuning verb (``llm finetune``, ``llm rl``): its best val loss, what
    ``-m`` sweepers optimise (NaN: no val loss)."""
    with run_folder_lock(cfg):
        result = finetune(cfg)
    if result["shutdown"] is not None:
        raise result["shutdown"]
    return result["best_val_loss"]


main = hydra_app("finetune")(finetune_job)
