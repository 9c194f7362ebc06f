"""Pretrain a GPT: `python -m llm.train [experiment=...] [key=value ...]`.

`train(cfg)` does the work and is what tests call; `main` is the Hydra entry point and
returns the best validation loss so sweepers (Optuna) can minimise it.
"""

from __future__ import annotations

import math
import os
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from llm.training.callbacks import GracefulShutdown
from llm.training.module import GPTLitModule


def _instantiate_dict(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a `name: {_target_: ...}` mapping, skipping nulls."""
    if not cfg:
        return []
    return [
        hydra.utils.instantiate(c)
        for c in cfg.values()
        if isinstance(c, DictConfig) and "_target_" in c
    ]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}/"))
        elif isinstance(v, list | tuple):
            out[key] = str(v)
        elif v is None or isinstance(v, bool | int | float | str):
            out[key] = "None" if v is None else v
        else:
            out[key] = str(v)
    return out


def validate(cfg: DictConfig) -> None:
    """Fail fast, before any data is tokenized, on settings that cannot train."""
    max_steps = cfg.trainer.get("max_steps")
    if max_steps is None or int(max_steps) <= 0:
        raise ValueError(
            f"trainer.max_steps must be > 0 (got {max_steps}): pretraining is step-based, "
            "e.g. trainer.max_steps=2000"
        )
    data_bs = cfg.get("data", {}).get("block_size")
    if data_bs is not None and int(data_bs) > int(cfg.model.block_size):
        raise ValueError(
            f"data.block_size={data_bs} > model.block_size={cfg.model.block_size}: the model "
            "cannot attend over longer sequences than its position table; lower data.block_size "
            "or raise model.block_size"
        )
    _check_multirun_strategy(cfg)


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _check_multirun_strategy(cfg: DictConfig) -> None:
    """Lightning's ddp/fsdp re-run this script per rank, which would re-run the whole sweep."""
    if not _is_multirun():
        return
    strategy = cfg.trainer.get("strategy")
    if isinstance(strategy, DictConfig):
        strategy = strategy.get("_target_")
    name = str(strategy or "").lower()
    if any(k in name for k in ("ddp", "fsdp", "deepspeed")) and "spawn" not in name:
        raise ValueError(
            f"trainer.strategy={strategy} cannot run under --multirun: it launches this script "
            "again for every rank, which would start the sweep again. Sweep with a "
            "single-process trainer (trainer=cpu or trainer=gpu) or trainer=ddp_cpu "
            "(ddp_spawn), or run the multi-GPU job without -m"
        )


def sample_settings(cfg: DictConfig) -> dict[str, Any] | None:
    """`callbacks.sample_text` as plain settings, kept in checkpoints for later generation."""
    sample = (cfg.get("callbacks") or {}).get("sample_text")
    if not sample:
        return None
    settings = OmegaConf.to_container(sample, resolve=True)
    return {k: v for k, v in settings.items() if k != "_target_"}


def build_trainer(
    cfg: DictConfig, extra_callbacks: list[L.Callback] | None = None
) -> tuple[L.Trainer, list[Any], list[Any]]:
    """The Trainer of `cfg.trainer` with the configured loggers and callbacks (and `extra`)."""
    loggers = _instantiate_dict(cfg.get("logger"))
    callbacks = _instantiate_dict(cfg.get("callbacks") or {})
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses both at once
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    callbacks += extra_callbacks or []
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks
    )
    return trainer, loggers, callbacks


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit a GPT as configured; returns best val loss, checkpoint paths and the trainer."""
    validate(cfg)
    L.seed_everything(cfg.seed, workers=True)

    tokenizer = hydra.utils.instantiate(cfg.tokenizer)
    dm = hydra.utils.instantiate(cfg.data, tokenizer=tokenizer)
    dm.prepare_data()

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model_cfg, dict)
    model_cfg.pop("_target_", None)
    model_cfg["vocab_size"] = int(dm.vocab_size)
    optim_cfg = OmegaConf.to_container(cfg.optim, resolve=True)
    assert isinstance(optim_cfg, dict)
    module = GPTLitModule(
        model=model_cfg,
        tokenizer=dm.tokenizer.to_dict(),
        optim=optim_cfg,
        compile=bool(cfg.get("compile", False)),
        sample=sample_settings(cfg),
    )

    pruning = sweep_pruning()
    trainer, loggers, callbacks = build_trainer(cfg, [pruning] if pruning else [])
    if cfg.get("ckpt_path"):
        from llm.checkpoint import check_resumable

        check_resumable(cfg.ckpt_path, module)
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))

    best = _best_val_loss(trainer)
    if loggers and trainer.is_global_zero:
        params = _flatten(
            {
                "model": model_cfg,
                "optim": optim_cfg,
                "data": {
                    k: v
                    for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
                    if k != "_target_"
                },
                "tokenizer": str(cfg.tokenizer.get("_target_")),
                "seed": int(cfg.seed),
                "max_steps": int(cfg.trainer.max_steps),
            }
        )
        for logger in loggers:
            logger.log_hyperparams(params, {"hp/best_val_loss": best})
            logger.finalize("success")
    end_sweep_job(pruning, callbacks)  # after logging: pruned trials show in HPARAMS too
    ckpt = trainer.checkpoint_callback
    return {
        "best_val_loss": best,
        "best_model_path": getattr(ckpt, "best_model_path", "") or None,
        "last_model_path": getattr(ckpt, "last_model_path", "") or None,
        "trainer": trainer,
        "module": module,
    }


def sweep_pruning() -> L.Callback | None:
    """The pruning callback of this job's Optuna trial (`-m hparams_search=...`), else None."""
    if not os.environ.get("LLM_OPTUNA_TRIAL"):  # plain runs do not import optuna
        return None
    from llm.sweep import pruning_callback_from_env

    return pruning_callback_from_env()


def end_sweep_job(pruning: Any, callbacks: list[Any]) -> None:
    """Tell the sweeper how this job ended: pruned (`optuna.TrialPruned`) or interrupted.

    Ctrl-C/SIGTERM stops a job cleanly; under a sweep the sweep must stop too, not go on to
    the next job (an Optuna trial is then recorded as interrupted, not as a result).
    """
    if pruning is not None:
        pruning.check_pruned()
    stopped = any(isinstance(c, GracefulShutdown) and c.signum is not None for c in callbacks)
    if stopped and (pruning is not None or _is_multirun()):
        raise KeyboardInterrupt("training was interrupted: stopping the sweep")


def _best_val_loss(trainer: L.Trainer) -> float:
    ckpt = trainer.checkpoint_callback
    score = getattr(ckpt, "best_model_score", None)
    if score is None:
        score = trainer.callback_metrics.get("val/loss")
    return float(score) if score is not None else math.nan


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; the return value is what `--multirun` sweepers optimise."""
    return train(cfg)["best_val_loss"]


if __name__ == "__main__":
    main()
