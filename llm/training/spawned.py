"""Spawn-based strategies (``trainer.strategy=ddp_spawn``, the one a ``-m`` sweep can use on
several processes) train in fresh interpreters: without this, their lines would miss the console
and the run log, and the run's state (steps, validations, throughput, last checkpoint) would stay
in them, leaving the summary and HPARAMS of the launching process empty."""

from __future__ import annotations

import json
import logging
import logging.config
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

_KEY = "_spawned/state"  # a callback metric: the one channel Lightning brings back from rank 0


class SpawnedRanks(L.Callback):
    """In each spawned rank: the run's logging and quiet libraries; on rank 0 at the end: the
    run's state, handed back to the launching process (see :func:`bring_back`)."""

    def __init__(
        self, logging_config: dict[str, Any] | None, prepare: Callable[[], None] | None = None
    ) -> None:
        self.logging_config = logging_config
        self.prepare = prepare  # what the fresh interpreter runs first (quiet libraries)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.logging_config and not logging.getLogger().handlers:  # a fresh interpreter
            config = json.loads(json.dumps(self.logging_config))
            for handler in config.get("handlers", {}).values():
                if "filename" in handler:
                    handler["mode"] = "a"  # the launching process already wrote its lines
            logging.config.dictConfig(config)
            if trainer.global_rank != 0:
                logging.getLogger().setLevel(logging.WARNING)
        if self.prepare is not None:
            self.prepare()

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        from llm.training.throughput import throughput_of

        ckpt, clock = trainer.checkpoint_callback, throughput_of(trainer)
        state = {
            "step": trainer.global_step,
            "val_history": pl_module.val_history,
            "throughput": clock.state_dict() if clock is not None else None,
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
    from llm.training.throughput import throughput_of

    clock = throughput_of(trainer)
    if clock is not None and state["throughput"] is not None:
        clock.load_state_dict(state["throughput"])
    progress = trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress
    progress.optimizer.step.total.completed = state["step"]  # trainer.global_step
    if trainer.checkpoint_callback is not None:
        trainer.checkpoint_callback.last_model_path = state["last_model_path"]
