"""``llm train``: pretrain a GPT as the composed config says.

``train(cfg)`` does the work and is what tests call; ``main`` is the Hydra app and returns the
best validation loss, which ``-m`` sweepers (Optuna) minimise.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from llm.cli.app import hydra_app
from llm.cli.runs import (
    best_val_loss,
    build_trainer,
    check_steps,
    checkpoint_paths,
    is_stopped,
    log_hparams,
    sample_settings,
)
from llm.cli.sweep import end_sweep_job, sweep_pruning


def validate(cfg: DictConfig) -> None:
    """Fail fast, before any data is tokenized, on settings that cannot train."""
    check_steps(cfg)
    data_bs = cfg.get("data", {}).get("block_size")
    if data_bs is not None and int(data_bs) > int(cfg.model.block_size):
        raise ValueError(
            f"data.block_size={data_bs} > model.block_size={cfg.model.block_size}: the model "
            "cannot attend over longer sequences than its position table; lower data.block_size "
            "or raise model.block_size"
        )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit a GPT as configured; returns best val loss, checkpoint paths, trainer and module."""
    import hydra
    import lightning as L

    from llm.training.module import GPTLitModule

    validate(cfg)
    L.seed_everything(cfg.seed, workers=True)
    tokenizer = hydra.utils.instantiate(cfg.tokenizer)
    dm = hydra.utils.instantiate(cfg.data, tokenizer=tokenizer)
    dm.prepare_data()

    model = hydra.utils.instantiate(cfg.model, vocab_size=int(dm.vocab_size)).to_dict()
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    module = GPTLitModule(
        model=model,
        tokenizer=dm.tokenizer.to_dict(),
        optim=optim,
        compile=bool(cfg.get("compile", False)),
        sample=sample_settings(cfg),
    )
    pruning = sweep_pruning()
    trainer, loggers = build_trainer(cfg, [pruning] if pruning else [])
    if cfg.get("ckpt_path"):
        from llm.checkpoint import check_resumable

        check_resumable(cfg.ckpt_path, module, int(cfg.trainer.max_steps))
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))

    best = best_val_loss(trainer)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(data, dict)
    params = {
        "model": model,
        "optim": optim,
        "data": {k: v for k, v in data.items() if k not in ("_target_", "corpus")},
        "tokenizer": str(cfg.tokenizer.get("_target_")),
        "seed": int(cfg.seed),
        "max_steps": int(cfg.trainer.max_steps),
    }
    log_hparams(trainer, loggers, params, {"hp/best_val_loss": best})
    end_sweep_job(pruning, is_stopped(trainer.callbacks))  # after logging: pruned trials too
    best_path, last_path = checkpoint_paths(trainer)
    return {
        "best_val_loss": best,
        "best_model_path": best_path,
        "last_model_path": last_path,
        "trainer": trainer,
        "module": module,
    }


@hydra_app("train")
def main(cfg: DictConfig) -> float:
    """The Hydra app; the return value is what ``-m`` sweepers optimise."""
    return train(cfg)["best_val_loss"]
