"""What the training verbs (``llm train``, ``llm finetune``) share: the step checks, the
Trainer with its loggers and callbacks, the hyperparameters logged, the end-of-run summary."""

from __future__ import annotations

import math
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from llm.cli.sweep import check_multirun_strategy


def check_steps(cfg: DictConfig) -> None:
    """Fail fast, before any data is read, on step settings that cannot train."""
    max_steps = cfg.trainer.get("max_steps")
    if max_steps is None or int(max_steps) <= 0:
        raise ValueError(
            f"trainer.max_steps must be > 0 (got {max_steps}): training is step-based, "
            "e.g. trainer.max_steps=2000"
        )
    check_multirun_strategy(cfg)


def instantiate_all(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a ``name: {_target_: ...}`` mapping, skipping nulls."""
    if not cfg:
        return []
    return [
        hydra.utils.instantiate(c)
        for c in cfg.values()
        if isinstance(c, DictConfig) and "_target_" in c
    ]


def sample_settings(cfg: DictConfig) -> dict[str, Any] | None:
    """``callbacks.sample_text`` as plain settings, kept in checkpoints for later generation."""
    sample = (cfg.get("callbacks") or {}).get("sample_text")
    if not sample:
        return None
    settings = OmegaConf.to_container(sample, resolve=True)
    assert isinstance(settings, dict)
    return {k: v for k, v in settings.items() if k != "_target_"}


def build_trainer(cfg: DictConfig, extra_callbacks: list[Any] | None = None) -> tuple[Any, list]:
    """The Trainer of ``cfg.trainer`` with the configured loggers and callbacks (and extra)."""
    from lightning.pytorch.callbacks import ProgressBar

    loggers = instantiate_all(cfg.get("logger"))
    callbacks = instantiate_all(cfg.get("callbacks") or {})
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses both at once
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    callbacks += extra_callbacks or []
    trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    return trainer, loggers


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``a/b: value`` with plain values, as TensorBoard's HPARAMS wants."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}/"))
        elif v is None:
            out[key] = "None"
        elif isinstance(v, bool | int | float | str):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def log_hparams(trainer: Any, loggers: list[Any], params: dict[str, Any], metrics: dict) -> None:
    """Hyperparameters and end-of-run metrics to every logger (rank zero), then close them."""
    if not loggers or not trainer.is_global_zero:
        return
    flat = flatten(params)
    for logger in loggers:
        logger.log_hyperparams(flat, metrics)
        logger.finalize("success")


def best_val_loss(trainer: Any) -> float:
    """The checkpoint callback's best val/loss (else the last logged one, else NaN)."""
    ckpt = trainer.checkpoint_callback
    score = getattr(ckpt, "best_model_score", None)
    if score is None:
        score = trainer.callback_metrics.get("val/loss")
    return float(score) if score is not None else math.nan


def checkpoint_paths(trainer: Any) -> tuple[str | None, str | None]:
    """(best, last) checkpoint paths of the run, None where none was written."""
    ckpt = trainer.checkpoint_callback
    best = getattr(ckpt, "best_model_path", "") or None
    last = getattr(ckpt, "last_model_path", "") or None
    return best, last


def is_stopped(callbacks: list[Any]) -> bool:
    """Whether a signal stopped the run (the GracefulShutdown callback caught one)."""
    from llm.training.callbacks import GracefulShutdown

    return any(isinstance(c, GracefulShutdown) and c.signum is not None for c in callbacks)
