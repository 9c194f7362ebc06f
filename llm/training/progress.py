"""What a training run shows while it runs: a progress bar on a terminal, one plain line every N
steps in logs and pipes (no ``\\r`` or escape codes), and a one-line overview of the model."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import ExitStack
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

log = logging.getLogger("llm.progress")


def progress_bar(refresh_rate: int = 10, every_n_steps: int = 50) -> ProgressBar:
    """A tqdm bar where stderr is a terminal, else :class:`PlainProgress` lines."""
    if sys.stderr.isatty():
        return Bar(refresh_rate=refresh_rate, every_n_steps=every_n_steps)
    return PlainProgress(every_n_steps)


class Bar(TQDMProgressBar):
    """Lightning's tqdm bar, with the run's console log lines (``validation at step N: ...``)
    written through ``tqdm.write`` while it shows, so none lands on the bar's own line."""

    def __init__(self, refresh_rate: int = 10, every_n_steps: int = 50) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.every_n_steps = every_n_steps  # the plain lines' interval, if the bar is turned off
        self._redirect: ExitStack | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from tqdm.contrib.logging import logging_redirect_tqdm

        if self._redirect is None:
            self._redirect = ExitStack()
            self._redirect.enter_context(logging_redirect_tqdm())  # the root logger's console

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._redirect is not None:
            self._redirect.close()
            self._redirect = None


def duration(seconds: float) -> str:
    """``1h02m``, ``3m05s``: a run's or an ETA's length."""
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class StepLines(L.Callback):
    """``step 250/2000 (12%)  train/loss 2.4123  13,502 tokens/s  eta 1m52s`` every N steps,
    through logging, so it also lands in the run's log file. A plain callback: it is what a run
    shows when ``trainer.enable_progress_bar=false`` (Lightning then refuses any progress bar)."""

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        self.every_n_steps = max(int(every_n_steps), 1)
        self._enabled = True
        self._start: float | None = None
        self._start_step = 0
        self._last = -1  # under gradient accumulation, each step ends several batches

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """What the progress bar would show (the module's ``prog_bar=True`` values)."""
        return dict(trainer.progress_bar_metrics)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._start_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        step = trainer.global_step
        if not self._enabled or not trainer.is_global_zero or step % self.every_n_steps:
            return
        if step != self._last:
            self._last = step
            log.info(self.line(trainer, pl_module, step))

    def line(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> str:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"]
        metrics = self.get_metrics(trainer, pl_module)
        for key in ("train/loss", "val/loss"):
            if key in metrics:
                parts.append(f"{key} {float(metrics[key]):.4f}")
        if "train/tokens_per_sec" in metrics:
            parts.append(f"{float(metrics['train/tokens_per_sec']):,.0f} tokens/s")
        done = step - self._start_step
        if total and self._start is not None and done > 0:
            rate = (time.perf_counter() - self._start) / done
            parts.append(f"eta {duration(rate * (total - step))}")
        return "  ".join(parts)


class PlainProgress(StepLines, ProgressBar):
    """:class:`StepLines` as the run's progress bar, where stderr is not a terminal."""

    def __init__(self, every_n_steps: int = 50) -> None:
        StepLines.__init__(self, every_n_steps)
        ProgressBar.__init__(self)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return ProgressBar.get_metrics(self, trainer, pl_module)

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True


def lines_without_bar(callbacks: list[Any]) -> list[Any]:
    """``callbacks`` for a Trainer with its progress bar off: each bar (which Lightning would
    refuse) becomes :class:`StepLines` at its interval, so a run still says how it goes."""
    out = []
    for callback in callbacks:
        if isinstance(callback, ProgressBar):
            every = getattr(callback, "every_n_steps", None)
            callback = StepLines(every) if every else None
        if callback is not None:
            out.append(callback)
    return out


class ModelOverview(L.Callback):
    """One line about the model at the start of fitting, instead of Lightning's module table:
    parameters (all, trainable, without embeddings), shape and training FLOPs per token."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            log.info(overview(pl_module))


def overview(pl_module: L.LightningModule) -> str:
    model, c = pl_module.model, pl_module.model.config
    total = sum(p.numel() for p in pl_module.parameters())
    trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
    kv = f" ({c.n_kv_head} kv)" if c.n_kv_head != c.n_head else ""
    return (
        f"model: {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable, "
        f"{model.num_params(non_embedding=True) / 1e6:.2f}M without embeddings); "
        f"{c.n_layer} layers x {c.n_head} heads{kv} x {c.n_embd}, block {c.block_size}, "
        f"vocab {c.vocab_size}; {model.flops_per_token() / 1e6:.1f}M training FLOPs/token"
    )
