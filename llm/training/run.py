"""One fit for every training task: check, seed, build, assemble the Trainer, fit (or resume),
log the hyperparameters and end figures. A task says only what is its own (`Task`): how to check
its settings, what module and data it trains, and what it does once the fit is over.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from llm.training.trainer import (
    best_val_loss,
    build_trainer,
    check_memory,
    check_run,
    checkpoint_paths,
    end_metrics,
    hparams,
    log_hparams,
    sharded,
    shutdown_of,
)

log = logging.getLogger("llm")


@dataclass
class Built:
    """What a task trains: its LightningModule and DataModule, and the hyperparameters HPARAMS
    lists beyond the command line's (the model as built, the data as read, ...)."""

    module: Any
    datamodule: Any
    params: dict[str, Any] = field(default_factory=dict)


class Task:
    """A training task. Subclasses write `build` and, where they need them, the other hooks;
    `fit` runs them in order. ``advice``: what to lower when the weights, resp. one batch, do
    not fit the device (the memory check's message)."""

    name = "task"
    advice = (
        "lower model.n_embd or model.n_layer",
        "lower data.batch_size (or model.block_size, the tokens in each sequence)",
    )

    def validate(self, cfg: DictConfig) -> None:
        """Refuse settings that cannot train, before any data is read or weight loaded."""
        check_run(cfg)

    def build(self, cfg: DictConfig) -> Built:
        raise NotImplementedError

    def check_memory(
        self,
        cfg: DictConfig,
        model: dict[str, Any],
        datamodule: Any,
        trainable: float = 1.0,
        outputs: int | None = None,
    ) -> None:
        """For `build`, before the module exists: refuse weights and a batch that clearly
        exceed the training device (``trainable``: the share of weights that train;
        ``outputs``: the logits' width where it is not the vocabulary's)."""
        check_memory(cfg, model, datamodule, self.advice, trainable, outputs)

    def before_fit(self, built: Built, trainer: Any, loggers: list[Any]) -> None:
        """After the Trainer is assembled, before the first step."""

    def after_fit(self, cfg: DictConfig, built: Built, trainer: Any, result: dict) -> None:
        """Once the fit is over (every rank): add the task's outputs to ``result``; an entry
        ``end_metrics`` (tag: value) joins HPARAMS' figures."""

    def outcome_lines(self, result: dict[str, Any]) -> list[str]:
        """What the task adds to the run's summary."""
        return []


def fit(
    cfg: DictConfig,
    task: Task,
    callbacks: list[Any] | None = None,
    started: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Fit ``task`` as ``cfg`` says; returns best val loss, checkpoint paths, trainer, module,
    datamodule, the last metrics, how it stopped (``shutdown``: an interrupt) and the task's
    outputs. ``callbacks`` join the configured ones; ``started`` runs once the settings pass."""
    import lightning as L

    from llm.training.spawned import bring_back

    task.validate(cfg)
    if started is not None:
        started()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    resume_requeued(cfg)
    built = task.build(cfg)
    module, dm = built.module, built.datamodule
    trainer, loggers = build_trainer(cfg, callbacks)
    if cfg.get("ckpt_path"):
        from llm.checkpoint import check_resumable

        check_resumable(cfg.ckpt_path, module, int(cfg.trainer.max_steps), sharded(cfg.trainer))
    task.before_fit(built, trainer, loggers)
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    bring_back(trainer, module)  # what a spawned rank 0 knew (ddp_spawn); no-op otherwise

    best_path, last_path = checkpoint_paths(trainer)
    result: dict[str, Any] = {
        "best_val_loss": best_val_loss(trainer, module),
        "best_model_path": best_path,
        "last_model_path": last_path,
        "trainer": trainer,
        "module": module,
        "datamodule": dm,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},  # last train/val
        "shutdown": shutdown_of(trainer),
    }
    task.after_fit(cfg, built, trainer, result)
    params = {
        **built.params,
        "optim": module.hparams["optim"],
        "seed": int(cfg.seed),
        "trainer": {"max_steps": int(cfg.trainer.max_steps)},
    }
    metrics = {**end_metrics(trainer, module), **result.pop("end_metrics", {})}
    log_hparams(trainer, loggers, hparams(cfg, params), metrics)
    return result


def resume_requeued(cfg: DictConfig) -> None:
    """A requeued SLURM job (no ``ckpt_path``) resumes from the checkpoint Lightning's
    auto-requeue saved in its run folder, as Lightning would by itself, but named here so the
    run resumes as from any checkpoint (its checks, curves purged from its step, its summary)."""
    from llm.training.cluster import requeued_checkpoint

    folder = cfg.trainer.get("default_root_dir")
    if cfg.get("ckpt_path") or not folder or "ckpt_path" not in cfg:
        return
    found = requeued_checkpoint(folder)
    if found is not None:
        log.info("resuming the requeued SLURM job from %s", found)
        cfg.ckpt_path = found


def data_params(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.data`` as HPARAMS lists it (the corpus object aside)."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(data, dict)
    return {k: v for k, v in data.items() if k != "corpus"}
