"""``llm finetune task=<text|classify|instruct> init=<checkpoint | Hugging Face folder>``.

The same stack as pretraining (trainer, logger and callback configs, checkpoints, overrides,
sweeps). ``finetune(cfg)`` is what tests call; ``main`` returns the best validation loss so
``-m`` sweepers can minimise it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

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

TASKS = ("text", "classify", "instruct")
log = logging.getLogger("llm")
# what to lower when the model and a batch cannot fit: the weights' keys, the batch's
ADVICE = (
    "finetune a smaller init= model (lora=default keeps no gradients or optimizer state for "
    "the frozen weights)",
    "lower data.batch_size (or block_size=, data.max_length: the tokens in each sequence)",
)


def validate(cfg: DictConfig) -> None:
    """Fail before loading weights on settings that cannot work."""
    name = cfg.get("task", {}).get("name")
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; use task=<{'|'.join(TASKS)}>")
    if not cfg.get("init"):
        raise ValueError(
            "init= is required: a llm checkpoint (.ckpt), a Hugging Face model folder, or a "
            "hub name such as init=gpt2"
        )
    check_run(cfg)
    lora_settings(cfg)  # lora.* named now, not as a NaN loss after the weights are loaded
    if "path" in cfg.data.keys():  # noqa: SIM118 - `in cfg.data` is False for a `???`
        _ = cfg.data.path  # a `???` left unset raises here, naming data.path, before any load


def lora_settings(cfg: DictConfig) -> dict[str, Any] | None:
    """The ``lora`` group as checked plain settings (None: full finetuning)."""
    from llm.model.lora import lora_config

    return lora_config(OmegaConf.to_container(cfg.lora) if cfg.get("lora") else None)


def _tokenizer(cfg: DictConfig, init: Any) -> Any:
    """The init's own tokenizer (a checkpoint's, a Hugging Face folder's), else cfg.tokenizer."""
    import hydra

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
            f"the tokenizer's vocab_size {tok.vocab_size} > the model's "
            f"{init.model['vocab_size']}: tokenizer={cfg.tokenizer.get('_target_')} does not "
            f"match init={init.source}"
        )
    return tok


def build(cfg: DictConfig, init: Any, tokenizer: Any) -> tuple[Any, Any]:
    """The task's LightningModule (init weights loaded) and DataModule."""
    import hydra

    from llm.initial_weights import load_base_weights
    from llm.training.module import GPTLitModule

    task = cfg.task.name
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    lora = lora_settings(cfg)
    data = cfg.data.copy()
    with open_dict(data):
        data.block_size = int(init.model["block_size"])
    dm = hydra.utils.instantiate(data, tokenizer=tokenizer)
    dm.prepare_data()
    check_memory(cfg, init.model, dm, ADVICE, *_memory_shape(cfg, init.model, lora, dm))
    common = {
        "model": init.model,
        "tokenizer": dm.tokenizer.to_dict(),
        "optim": optim,
        "compile": bool(cfg.get("compile", False)),
        "lora": lora,
    }
    module: Any
    if task == "classify":
        from llm.finetuning.classify import ClassifierModule

        module = ClassifierModule(
            **common,
            labels=dm.labels,
            max_length=dm.max_length,
            trainable_layers=cfg.task.get("trainable_layers"),
        )
    else:
        module = GPTLitModule(
            **common,
            sample=sample_settings(cfg) if task == "text" else None,
            template="alpaca" if task == "instruct" else None,  # how llm chat renders prompts
        )
    load_base_weights(module.model, init.state_dict)
    return module, dm


def _memory_shape(
    cfg: DictConfig, model: dict[str, Any], lora: dict[str, Any] | None, dm: Any
) -> tuple[float, int | None]:
    """(share of the weights that train, logits' width) for the memory check: LoRA's adapters
    are small; a classifier's logits are one per label."""
    layers = cfg.task.get("trainable_layers")
    share = 0.0 if lora else 1.0 if layers is None else int(layers) / int(model["n_layer"])
    labels = getattr(dm, "labels", None) if cfg.task.name == "classify" else None
    return share, len(labels) if labels else None


def finetune(cfg: DictConfig) -> dict[str, Any]:
    """Fit as configured; returns best val loss, checkpoint paths, counts and task outputs."""
    import lightning as L

    from llm.checkpoint import read_checkpoint
    from llm.cli.spawned import bring_back
    from llm.initial_weights import load_init
    from llm.model.lora import count_params

    started = time.perf_counter()
    validate(cfg)
    quiet_libraries()
    announce(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    block_size = cfg.get("block_size")
    init = load_init(
        str(cfg.init),
        block_size=None if block_size is None else int(block_size),
        dropout=cfg.get("dropout"),
    )
    tokenizer = _tokenizer(cfg, init)
    module, dm = build(cfg, init, tokenizer)
    counts = {
        "params/trainable": count_params(module, trainable=True),
        "params/total": count_params(module),
    }

    pruning = sweep_pruning()
    trainer, loggers = build_trainer(cfg, [pruning] if pruning else [])
    if cfg.get("ckpt_path"):
        from llm.checkpoint import check_resumable

        check_resumable(cfg.ckpt_path, module, int(cfg.trainer.max_steps))
    for logger in loggers:
        logger.log_metrics({k: float(v) for k, v in counts.items()}, step=0)
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
    params = {
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "model": init.model,
        "optim": module.hparams["optim"],
        "lora": module.hparams["lora"] or "none",
        "data": {
            k: v
            for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()  # type: ignore[union-attr]
            if k != "corpus"
        },
        "seed": int(cfg.seed),
        "trainer": {"max_steps": int(cfg.trainer.max_steps)},
    }
    metrics = end_metrics(trainer, module)
    if "test" in result:
        from llm.training.board import END

        metrics.update({f"{END}{k.replace('/', '_')}": v for k, v in result["test"].items()})
    log_hparams(trainer, loggers, hparams(cfg, params), metrics)
    end_of_run(cfg, trainer, module, time.perf_counter() - started, outcome_lines(result))
    end_sweep_job(pruning, result["shutdown"])
    return result


def outcome_lines(result: dict[str, Any]) -> list[str]:
    """What a finetune adds to the run summary: trained share, accuracies, responses."""
    total, trainable = result["params/total"], result["params/trainable"]
    lines = [f"Trained:         {trainable:,} of {total:,} parameters ({trainable / total:.2%})"]
    if "val/acc" in result["metrics"]:
        lines.append(f"val/acc:         {result['metrics']['val/acc']:.4f}")
    lines += [f"{k + ':':<16} {v:.4f}" for k, v in (result.get("test") or {}).items()]
    if result.get("responses_path"):
        lines.append(f"Responses:       {result['responses_path']}")
    return lines


@hydra_app("finetune")
def main(cfg: DictConfig) -> float:
    """The Hydra app; the return value is what ``-m`` sweepers optimise (NaN: no val loss)."""
    with run_folder_lock(cfg):
        result = finetune(cfg)
    if result["shutdown"] is not None:
        raise result["shutdown"]
    return result["best_val_loss"]
