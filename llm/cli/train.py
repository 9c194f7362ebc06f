"""``llm train``: pretrain a GPT as the composed config says.

``train(cfg)`` does the work and is what tests call; ``main`` is the Hydra app and returns the
best validation loss, which ``-m`` sweepers (Optuna) minimise.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from omegaconf import DictConfig, OmegaConf

from llm.cli.app import hydra_app, quiet_libraries
from llm.cli.runs import (
    announce,
    best_val_loss,
    build_trainer,
    check_memory,
    check_run,
    checkpoint_paths,
    end_metrics,
    end_of_run,
    hparams,
    log_hparams,
    run_folder_lock,
    sample_settings,
    shutdown_of,
)
from llm.cli.sweep import end_sweep_job, sweep_pruning

log = logging.getLogger("llm")
# what to lower when the model and a batch cannot fit: the weights' keys, the batch's
ADVICE = (
    "lower model.n_embd or model.n_layer",
    "lower data.batch_size (or model.block_size, the tokens in each sequence)",
)


def validate(cfg: DictConfig) -> None:
    """Fail fast, before any data is tokenized, on settings that cannot train."""
    import hydra

    check_run(cfg)
    hydra.utils.instantiate(cfg.model, vocab_size=1)  # model.* checked (vocab from the data)
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

    from llm.cli.spawned import bring_back
    from llm.training.module import GPTLitModule

    started = time.perf_counter()
    validate(cfg)
    quiet_libraries()
    announce(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    tokenizer = hydra.utils.instantiate(cfg.tokenizer)
    dm = hydra.utils.instantiate(cfg.data, tokenizer=tokenizer)
    dm.prepare_data()

    model = hydra.utils.instantiate(cfg.model, vocab_size=int(dm.vocab_size)).to_dict()
    check_memory(cfg, model, dm, ADVICE)
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
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    bring_back(trainer, module)  # what a spawned rank 0 knew (ddp_spawn); no-op otherwise

    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(data, dict)
    params = {
        "model": model,
        "optim": optim,
        "data": {k: v for k, v in data.items() if k != "corpus"},
        "tokenizer": dm.tokenizer.identity(),
        "seed": int(cfg.seed),
        "trainer": {"max_steps": int(cfg.trainer.max_steps)},
    }
    log_hparams(trainer, loggers, hparams(cfg, params), end_metrics(trainer, module))
    best_path, last_path = checkpoint_paths(trainer)
    result = {
        "best_val_loss": best_val_loss(trainer, module),
        "best_model_path": best_path,
        "last_model_path": last_path,
        "trainer": trainer,
        "module": module,
        "shutdown": shutdown_of(trainer),
    }
    end_of_run(cfg, trainer, module, time.perf_counter() - started)
    end_sweep_job(pruning, result["shutdown"])  # after logging: pruned trials show in HPARAMS
    return result


@hydra_app("train")
def main(cfg: DictConfig) -> float:
    """The Hydra app; the return value is what ``-m`` sweepers optimise (NaN: no val loss)."""
    with run_folder_lock(cfg):
        result = train(cfg)
    if result["shutdown"] is not None:
        raise result["shutdown"]
    return result["best_val_loss"]
