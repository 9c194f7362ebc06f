"""A check for the GPU path: the training step never waits on the host.

``torch.cuda.set_sync_debug_mode("error")`` turns any host-device synchronisation (``.item()``,
``float(tensor)``, a device-to-host copy, ``nonzero``) into an error. :class:`NoSyncCheck` sets it
around the steps that log nothing (logging steps read the loss on the host by design) once
compilation and warm-up are over, so one forbidden sync anywhere in the step fails the run.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class NoSyncCheck(L.Callback):
    """Error on any host-device sync inside training steps ``warmup_steps`` onwards (CUDA)."""

    def __init__(self, warmup_steps: int = 5) -> None:
        self.warmup_steps = int(warmup_steps)
        self.checked_steps = 0

    def _armed(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        if pl_module.device.type != "cuda" or trainer.global_step < self.warmup_steps:
            return False
        every = max(int(trainer.log_every_n_steps), 1)
        return trainer.global_step % every != 0  # a logging step reads the loss: not checked

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._armed(trainer, pl_module):
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        if torch.cuda.is_available() and torch.cuda.get_sync_debug_mode() != 0:
            torch.cuda.set_sync_debug_mode("default")
            self.checked_steps += 1
