"""Finetune a GPT: `python -m llm.finetune task=<text|classify|instruct> init=<ckpt | HF GPT-2>`.

Same stack as pretraining (LightningModule, trainer/logger/callback configs, checkpoints,
Hydra overrides and sweeps). `finetune(cfg)` is what tests call; `main` returns the best
validation loss so `--multirun` sweepers can minimise it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, open_dict

from llm.checkpoint import read_checkpoint
from llm.finetuning.init import InitWeights, load_base_weights, load_init
from llm.finetuning.module import lm_module, log_param_counts, lora_config
from llm.train import (
    _best_val_loss,
    _flatten,
    build_trainer,
    end_sweep_job,
    sample_settings,
    sweep_pruning,
)
from llm.training.module import plain

TASKS = ("text", "classify", "instruct")


def validate(cfg: DictConfig) -> None:
    """Fail before loading weights on settings that cannot work."""
    name = cfg.get("task", {}).get("name")
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; use task=<{'|'.join(TASKS)}>")
    if not cfg.get("init"):
        raise ValueError(
            "init= is required: a llm.train checkpoint (.ckpt) or a Hugging Face GPT-2 "
            "directory / name, e.g. init=gpt2"
        )
    max_steps = cfg.trainer.get("max_steps")
    if max_steps is None or int(max_steps) <= 0:
        raise ValueError(f"trainer.max_steps must be > 0 (got {max_steps})")


def _tokenizer(cfg: DictConfig, init: InitWeights) -> Any:
    """The checkpoint's own tokenizer, else `cfg.tokenizer` (GPT-2 BPE for HF weights)."""
    from llm.tokenizers import tokenizer_from_dict

    if init.tokenizer:
        tok = tokenizer_from_dict(init.tokenizer)
    else:
        tok = hydra.utils.instantiate(cfg.tokenizer)
        if tok.needs_fit:
            raise ValueError(
                f"tokenizer {type(tok).__name__} must be fitted, but {init.source} carries no "
                "tokenizer; use a pretrained one (tokenizer=gpt2)"
            )
    if tok.vocab_size > init.model["vocab_size"]:
        raise ValueError(
            f"tokenizer vocab {tok.vocab_size} > model vocab {init.model['vocab_size']}: "
            f"the tokenizer does not match {init.source}"
        )
    return tok


def _data_cfg(cfg: DictConfig, block_size: int) -> DictConfig:
    """cfg.data with block_size set from the (possibly cropped) init model."""
    data = cfg.data.copy()
    with open_dict(data):
        data.block_size = block_size
    return data


def build(cfg: DictConfig, init: InitWeights, tokenizer: Any) -> tuple[L.LightningModule, Any]:
    """The task's LightningModule (init weights loaded) and DataModule."""
    task = cfg.task.name
    optim = plain(cfg.optim)
    lora = lora_config(cfg.get("lora"))
    compile = bool(cfg.get("compile", False))
    dm = hydra.utils.instantiate(_data_cfg(cfg, int(init.model["block_size"])), tokenizer=tokenizer)
    dm.prepare_data()
    module: L.LightningModule
    if task == "text":
        sample = sample_settings(cfg)
        module = lm_module(init.model, dm.tokenizer.to_dict(), optim, compile, sample, lora)
    elif task == "instruct":
        module = lm_module(init.model, tokenizer.to_dict(), optim, compile, None, lora)
    else:
        from llm.finetuning.classify import ClassifierModule

        module = ClassifierModule(
            init.model,
            tokenizer.to_dict(),
            optim,
            compile,
            labels=dm.labels,
            max_length=dm.max_length,
            trainable_layers=cfg.task.get("trainable_layers"),
            lora=lora,
        )
    load_base_weights(module.model, init.state_dict)
    return module, dm


def finetune(cfg: DictConfig) -> dict[str, Any]:
    """Fit as configured; returns best val loss, checkpoint paths, counts and task outputs."""
    validate(cfg)
    L.seed_everything(cfg.seed, workers=True)
    block_size = cfg.get("block_size")
    init = load_init(
        str(cfg.init),
        block_size=None if block_size is None else int(block_size),
        dropout=cfg.get("dropout"),
    )
    tokenizer = _tokenizer(cfg, init)
    module, dm = build(cfg, init, tokenizer)

    pruning = sweep_pruning()
    trainer, loggers, callbacks = build_trainer(cfg, [pruning] if pruning else [])
    counts = log_param_counts(module, loggers)
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))

    ckpt = trainer.checkpoint_callback
    best_path = getattr(ckpt, "best_model_path", "") or None
    last_path = getattr(ckpt, "last_model_path", "") or None
    result: dict[str, Any] = {
        "best_val_loss": _best_val_loss(trainer),
        "best_model_path": best_path,
        "last_model_path": last_path,
        "trainer": trainer,
        "module": module,
        "datamodule": dm,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},  # last train/val
        **counts,
    }
    if best_path:  # test accuracy and responses come from the best weights (every rank)
        module.load_state_dict(read_checkpoint(best_path)["state_dict"])
    if cfg.task.name == "classify" and dm.splits.get("test"):
        result["test"] = trainer.test(module, datamodule=dm, verbose=False)[0]
    if cfg.task.name == "instruct" and trainer.is_global_zero:
        from llm.finetuning.instruct import save_responses

        saved = best_path or last_path
        folder = Path(saved).parent if saved else Path(cfg.output_dir)
        result["responses_path"] = save_responses(
            module,
            dm.records["val"],
            folder / "responses.json",
            max_new_tokens=int(cfg.task.get("max_new_tokens", 256)),
        )
    _log_hparams(cfg, init, loggers, result)
    end_sweep_job(pruning, callbacks)
    return result


def _log_hparams(
    cfg: DictConfig, init: InitWeights, loggers: list[Any], result: dict[str, Any]
) -> None:
    if not loggers or not result["trainer"].is_global_zero:
        return
    params = _flatten(
        {
            "task": plain(cfg.task),
            "init": str(cfg.init),
            "model": init.model,
            "optim": plain(cfg.optim),
            "lora": lora_config(cfg.get("lora")) or "none",
            "data": {k: v for k, v in plain(cfg.data).items() if k not in ("_target_", "corpus")},
            "seed": int(cfg.seed),
            "max_steps": int(cfg.trainer.max_steps),
        }
    )
    metrics = {"hp/best_val_loss": result["best_val_loss"]}
    if "test" in result:
        metrics.update({f"hp/{k.replace('/', '_')}": v for k, v in result["test"].items()})
    for logger in loggers:
        logger.log_hyperparams(params, metrics)
        logger.finalize("success")


@hydra.main(version_base="1.3", config_path="../conf", config_name="finetune")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; the return value is what `--multirun` sweepers optimise."""
    result = finetune(cfg)
    if result["trainer"].is_global_zero:
        print(summary(result), flush=True)
    best = result["best_val_loss"]
    return best if math.isfinite(best) else float("inf")


def summary(result: dict[str, Any]) -> str:
    """What a finished run produced, one item per line (printed by the CLI)."""
    lines = [
        f"best val/loss: {result['best_val_loss']:.4f}",
        f"trainable parameters: {result['params/trainable']:,} of {result['params/total']:,}",
        f"best checkpoint: {result['best_model_path']}",
        f"last checkpoint: {result['last_model_path']}",
    ]
    if "val/acc" in result["metrics"]:
        lines.append(f"val/acc: {result['metrics']['val/acc']:.4f}")
    lines += [f"{k}: {v:.4f}" for k, v in (result.get("test") or {}).items()]
    if result.get("responses_path"):
        lines.append(f"responses: {result['responses_path']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
