"""``llm evaluate ckpt_path=... [data=... data.path=...]``: val loss, perplexity, bits per char;
with ``harness.tasks=[...]``, EleutherAI's lm-evaluation-harness benchmarks instead.

The checkpoint does not record its corpus, so the data config says which one (tiny shakespeare
by default); the checkpoint's own tokenizer encodes it. ``init=<Hugging Face folder>`` evaluates
Hugging Face weights loaded into our model in place of a checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from llm import checks
from llm.cli.app import beside_model, hydra_app, load_model_source, model_source, resolve_device


def _tasks(cfg: DictConfig) -> list[str]:
    tasks = cfg.harness.tasks
    if tasks is None:
        return []
    listed = OmegaConf.to_container(tasks) if OmegaConf.is_list(tasks) else [tasks]
    names = [str(t) for t in listed]  # type: ignore[union-attr]
    if not names or not all(names):
        raise ValueError(
            f"harness.tasks must name tasks, e.g. harness.tasks=[hellaswag], got {tasks}"
        )
    return names


def _output_dir(cfg: DictConfig, key: str, value: str) -> Path:
    """harness.output_dir, else the checkpoint's run folder's eval/ (or the init folder's)."""
    if cfg.harness.output_dir is not None:
        return Path(str(cfg.harness.output_dir))
    return beside_model(key, value, "eval", "harness.output_dir")


def harness(cfg: DictConfig, key: str, value: str, tasks: list[str]) -> dict[str, Any]:
    """Run the harness's tasks, print its table, write its results JSON; return the results."""
    from llm.evaluation.harness import (
        HarnessLM,
        evaluate_harness,
        results_path,
        results_table,
        save_results,
    )

    h = cfg.harness
    out = _output_dir(cfg, key, value)
    device = resolve_device(str(cfg.device))
    lm = load_model_source(key, value, device)
    model = HarnessLM(lm.model, lm.tokenizer, int(h.batch_size), int(h.max_gen_toks))
    limit = None if h.limit is None else int(h.limit)
    if limit is not None and limit < 1:
        raise ValueError(f"harness.limit must be >= 1 (null: every document), got {h.limit}")
    results = evaluate_harness(
        model,
        tasks,
        include_path=None if h.include_path is None else str(h.include_path),
        limit=limit,
        num_fewshot=None if h.num_fewshot is None else int(h.num_fewshot),
        bootstrap_iters=int(h.bootstrap_iters),
        seed=int(h.seed),
    )
    results["llm"] = {key: value, "tasks": tasks, "limit": limit, "device": str(device)}
    path = save_results(results, results_path(out, tasks))
    print(results_table(results))
    print(f"results: {path}")
    return results


@hydra_app("evaluate")
def main(cfg: DictConfig) -> dict[str, Any]:
    """The harness's benchmarks if harness.tasks is set, else the val-loss metrics."""
    key, value = model_source(cfg)
    tasks = _tasks(cfg)
    if tasks:
        return harness(cfg, key, value, tasks)
    return loss(cfg, key, value)


def loss(cfg: DictConfig, key: str, value: str) -> dict[str, float]:
    """Build the data with the model's tokenizer and print the metrics."""
    import hydra

    from llm.evaluation.loss import evaluate
    from llm.tokenizers import tokenizer_from_dict

    checks.integer("limit_batches", cfg.limit_batches, minimum=1, nullable=True, example=20)
    checks.data_path(cfg.data)
    module = _module(key, value, resolve_device(str(cfg.device)))
    data = cfg.data.copy()
    with open_dict(data):
        if data.get("block_size") is None:
            data.block_size = int(module.config.block_size)
    tokenizer = tokenizer_from_dict(module.hparams["tokenizer"])
    dm = hydra.utils.instantiate(data, tokenizer=tokenizer)
    limit = None if cfg.limit_batches is None else int(cfg.limit_batches)
    metrics = evaluate(module, dm, limit_batches=limit)
    print(f"{'checkpoint' if key == 'ckpt_path' else 'init'}: {value}")
    print(f"split: {split_text(cfg, dm)}")
    print(f"tokens: {int(metrics['tokens'])} scored ({scored_text(limit, dm)})")
    print(f"val_loss: {metrics['val_loss']:.4f}")
    print(f"perplexity: {metrics['ppl']:.4f}")
    if "bpc" in metrics:
        print(f"bits_per_char: {metrics['bpc']:.4f}")
    return metrics


def split_text(cfg: DictConfig, dm: Any) -> str:
    """Which tokens were scored: the data's validation split (its last ``val_fraction``, as in
    training), of which corpus and its token cache."""
    from hydra.core.hydra_config import HydraConfig

    source = cfg.data.get("path")
    if source is None and HydraConfig.initialized():
        source = f"data={HydraConfig.get().runtime.choices.get('data')}"
    fraction = float(getattr(dm, "val_fraction", 0.0))
    cache = getattr(dm, "cache_path", None)
    where = f", token cache {cache}" if cache else ""
    return f"validation, the last {fraction:.0%} of {source} (data.val_fraction={fraction}){where}"


def scored_text(limit: int | None, dm: Any) -> str:
    """Whether the whole split was scored or its first ``limit_batches`` batches."""
    windows = len(getattr(dm, "val_dataset", None) or [])
    if limit is None:
        return f"the whole split, {windows} windows of {dm.block_size} tokens"
    return f"the first {limit} batches of {dm.batch_size} windows, limit_batches={limit}"


def _module(key: str, value: str, device: Any) -> Any:
    """The checkpoint's LightningModule, or one holding init='s weights and tokenizer."""
    if key == "ckpt_path":
        from llm.checkpoint import load_checkpoint

        return load_checkpoint(value, device, kind="lm")
    from llm.initial_weights import init_language_model
    from llm.training.module import GPTLitModule

    lm = init_language_model(value)
    module = GPTLitModule(model=lm.model.config.to_dict(), tokenizer=lm.tokenizer.to_dict())
    module.model.load_state_dict(lm.model.state_dict())
    return module.to(device).eval()
