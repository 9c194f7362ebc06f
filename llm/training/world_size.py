"""A checkpoint resumed on another number of processes (2 GPUs to 1, 1 node to 4, ...).

The data's position is kept in global samples (``ResumableOrder``: ``train_samples_consumed``),
so the resumed ranks share out the rest of the same order. Lightning's loop keeps its count in
batches of the world that wrote it, and reads the epoch's end, the accumulation boundaries and
the validation schedule from that count: :class:`WorldSizeChange` recounts it in batches of the
resumed world before the loop is restored.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L

log = logging.getLogger("llm")

_COUNTERS = ("ready", "started", "processed", "completed")


class WorldSizeChange(L.Callback):
    """Recount the checkpoint's train batches for this run's processes and batch size."""

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        dm = trainer.datamodule
        state = checkpoint.get(type(dm).__qualname__) if dm is not None else None
        batch_size = getattr(dm, "batch_size", None)
        if not isinstance(state, dict) or "world_size" not in state or not batch_size:
            return  # not a resumable order, or a checkpoint from before worlds were recorded
        before = int(state["batch_size"]) * int(state["world_size"])  # samples per batch
        now = int(batch_size) * trainer.world_size
        if before == now:
            return
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
        if not progress:
            return
        for part in ("total", "current"):
            for key in _COUNTERS:
                progress[part][key] = int(progress[part][key]) * before // now
        samples = int(state.get("train_samples_consumed", 0))
        if samples % now:
            log.warning(
                "the checkpoint stopped %d samples into the epoch, not a whole number of this "
                "run's batches (%d processes x data.batch_size=%d): the accumulation and "
                "validation schedule of this epoch are counted from the batch before",
                samples,
                trainer.world_size,
                batch_size,
            )
        log.info(
            "resuming %d processes x batch %d on %d x %d: the train order goes on at sample %d",
            int(state["world_size"]),
            int(state["batch_size"]),
            trainer.world_size,
            batch_size,
            samples,
        )
