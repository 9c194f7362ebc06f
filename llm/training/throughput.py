"""Training throughput: tokens/s (and MFU on GPUs whose peak Lightning knows), as a callback.

One definition, printed the same in the summary, the log, HPARAMS and ``llm report``: the
tokens of every rank's training batches over the wall time of training, validation and its
callbacks excluded. The curve ``train/tokens_per_sec`` is the same ratio over the steps since the
previous logging step.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


def peak_flops(device: torch.device, precision: Any) -> float | None:
    """The device's peak FLOP/s at this precision, where Lightning knows it (CUDA GPUs), for MFU.

    None elsewhere or for an unknown GPU: MFU is then left out, tokens/s is still logged.
    """
    if device.type != "cuda":
        return None
    try:
        from lightning.fabric.utilities.throughput import get_available_flops

        dtype = torch.bfloat16 if "bf16" in str(precision) else torch.float32
        return get_available_flops(device, dtype)
    except Exception:
        return None


def batch_tokens(batch: Any) -> int:
    """The tokens of a batch: its first tensor's elements (ids, or windows of ids)."""
    first = batch[0] if isinstance(batch, list | tuple) else batch
    if isinstance(first, dict):
        first = next(iter(first.values()))
    return int(first.numel()) if isinstance(first, torch.Tensor) else 0


class Throughput(L.Callback):
    """Counts training tokens and training time; logs tokens/s (and MFU) at logging steps.

    The clock runs from one training batch's end to the next (a step: forward, backward,
    update, next batch); a validation in between is not training time, so the window and the
    clock skip it rather than restarting.
    """

    def __init__(self) -> None:
        self.tokens = 0  # over the run (this process), every rank's batches counted
        self.seconds = 0.0
        self._mark: float | None = None
        self._window: tuple[float, int] | None = None  # (start, tokens since)
        self._peak: float | None = None
        self._flops_per_token: float | None = None
        self._world = 1
        self._step = -1  # the optimizer step the last batch ended (accumulation: several)
        self._paused: float | None = None
        self._estimate: Any = None

    @property
    def has_mfu(self) -> bool:
        return self._peak is not None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        precision = trainer.precision
        policy = getattr(trainer.strategy, "policy", None)  # FSDP2's mixed precision (trainer=fsdp)
        if getattr(policy, "param_dtype", None) == torch.bfloat16:
            precision = "bf16-mixed"
        self._peak = peak_flops(pl_module.device, precision)
        self._world = trainer.world_size
        self._mark, self._window = time.perf_counter(), None
        model = getattr(pl_module, "model", None)
        self._estimate = getattr(model, "estimate_mfu", None)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        now = time.perf_counter()
        tokens = batch_tokens(batch) * self._world
        if self._mark is not None:
            self.seconds += now - self._mark
            self.tokens += tokens
        self._mark = now
        if self._window is None:  # the first step's time is compile and warm-up
            self._window = (now, 0)
            return
        start, counted = self._window
        self._window = (start, counted + tokens)
        step = trainer.global_step - 1  # the step this batch took (the counter has moved on)
        stepped, self._step = step != self._step, step
        if not stepped or step % max(trainer.log_every_n_steps, 1) != 0:
            return
        start, counted = self._window
        self._window = (now, 0)
        tps = counted / max(now - start, 1e-9)
        metrics = {"train/tokens_per_sec": tps}
        mfu = self.mfu(tps)
        if mfu is not None:
            metrics["train/mfu"] = mfu
        for key, value in metrics.items():  # the progress bar shows tokens/s
            shown = key == "train/tokens_per_sec"
            pl_module.log(key, value, prog_bar=shown, logger=False, on_step=True)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._paused = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._paused is None:
            return
        spent, self._paused = time.perf_counter() - self._paused, None
        if self._mark is not None:
            self._mark += spent
        if self._window is not None:
            self._window = (self._window[0] + spent, self._window[1])

    def tokens_per_second(self) -> float | None:
        """Tokens/s over the run's training time so far (None before a step was timed)."""
        return self.tokens / self.seconds if self.seconds > 0 else None

    def mfu(self, tokens_per_second: float) -> float | None:
        """Model FLOPs utilisation at this many tokens/s (all ranks), where the peak is known."""
        if not self._peak or self._estimate is None:
            return None
        return float(self._estimate(tokens_per_second / self._world, self._peak))

    def state_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens = int(state_dict.get("tokens", 0))
        self.seconds = float(state_dict.get("seconds", 0.0))


def throughput_of(trainer: Any) -> Throughput | None:
    """The run's Throughput callback, if it has one."""
    return next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)
