"""Spawn-based strategies (``trainer.strategy=ddp_spawn``, the one a ``-m`` sweep can use on
several processes) train in fresh interpreters: without this, their lines would miss the console
and the run log, and the run's state (steps, validations, throughput, last checkpoint) would stay
in them, leaving the summary and HPARAMS of the launching process empty."""

from __future__ import annotations

import json
import logging
import logging.config
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

_KEY = "_spawned/state"  # a callback metric: the one channel Lightning brings back from rank 0


class SpawnedRanks(L.Callback):
    """In each spawned rank: the run's logging and quiet libraries; on rank 0 at the end: the
    run's state, handed back to the launching process (see :func:`bring_back`)."""

    def __init__(self, logging_config: dict[str, Any] | None) -> None:
        self.logging_config = logging_config

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from llm.cli.app import quiet_libraries

        if self.logging_config and not logging.getLogger().handlers:  # a fresh interpreter
            config = json.loads(json.dumps(self.logging_config))
            for handler in config.get("handlers", {}).values():
                if "filename" in handler:
                    handler["mode"] = "a"  # the launching process already wrote its lines
            logging.config.dictConfig(config)
            if trainer.global_rank != 0:
                logging.getLogger().setLevel(logging.WARNING)
        quiet_libraries()

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        ckpt = trainer.checkpoint_callback
        state = {
            "step": trainer.global_step,
            "val_history": pl_module.val_history,
            "train_tokens": pl_module.train_tokens,
            "train_seconds": pl_module._clock.get("train", 0.0),
            "last_model_path": getattr(ckpt, "last_model_path", "") or "",
        }
        data = json.dumps(state).encode()
        trainer.callback_metrics[_KEY] = torch.tensor(list(data), dtype=torch.uint8)


def bring_back(trainer: Any, module: Any) -> None:
    """Restore in the launching process what :class:`SpawnedRanks` sent from rank 0."""
    encoded = trainer.callback_metrics.pop(_KEY, None)
    if encoded is None:
        return
    state = json.loads(bytes(encoded.tolist()).decode())
    module.val_history = [(int(step), metrics) for step, metrics in state["val_history"]]
    module.train_tokens = state["train_tokens"]
    module._clock = {"train": state["train_seconds"]}
    progress = trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress
    progress.optimizer.step.total.completed = state["step"]  # trainer.global_step
    if trainer.checkpoint_callback is not None:
        trainer.checkpoint_callback.last_model_path = state["last_model_path"]


def spawned_ranks(trainer_cfg: Any) -> list[SpawnedRanks]:
    """The callback for a spawn-based strategy (none otherwise), with this job's logging."""
    from hydra.core.hydra_config import HydraConfig

    from llm.cli.sweep import strategy_name

    name = strategy_name(trainer_cfg)
    if not any(k in name for k in ("spawn", "fork", "notebook")):
        return []
    config = None
    if HydraConfig.initialized():
        config = OmegaConf.to_container(HydraConfig.get().job_logging, resolve=True)
    return [SpawnedRanks(config)]  # type: ignore[arg-type]
