"""What the training verbs print: the run's first lines, each sweep job's line, the end-of-run
summary; and `run_task`, the command-line side of a fit (`llm.training.run.fit`)."""

from __future__ import annotations

import logging
import math
import shlex
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from llm.training.trainer import best_val_loss, checkpoint_paths

log = logging.getLogger("llm")


def announce(cfg: DictConfig) -> None:
    """First lines of a run (console and log file): where it goes and what it overrides."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    overrides = " ".join(shlex.quote(str(o)) for o in hydra_cfg.overrides.task) or "(none)"
    log.info("llm %s: %s", cfg.get("task_name", hydra_cfg.job.name), hydra_cfg.runtime.output_dir)
    log.info("overrides: %s", overrides)


def end_of_run(
    cfg: DictConfig, trainer: Any, module: Any, seconds: float, extra: list[str] | None = None
) -> None:
    """Say how the run ended (rank zero): its full :func:`summary`; a ``-m`` sweep's job says one
    line (the summary goes to its log file, and the sweep ends with its best job's)."""
    from llm.cli import sweep
    from llm.cli.app import is_multirun

    if not trainer.is_global_zero:
        return
    text = summary(cfg, trainer, module, extra)
    if not is_multirun():
        log.info("\n%s", text)
        return
    to_log_file("\n" + text)
    folder = Path(str(cfg.get("output_dir") or trainer.default_root_dir)).resolve()
    sweep.job_summaries[str(folder)] = text
    log.info(job_line(best_val_loss(trainer, module), seconds))


def job_line(best: float, seconds: float) -> str:
    """``job 1 (optim.lr=0.003): best val/loss 2.4123 in 0m42s``: one sweep job, one line."""
    from hydra.core.hydra_config import HydraConfig

    from llm.training.progress import duration

    job = HydraConfig.get().job
    overrides = " ".join(str(o) for o in HydraConfig.get().overrides.task) or "no overrides"
    shown = f"best val/loss {best:.4f}" if math.isfinite(best) else "no val/loss"
    return f"job {job.num} ({overrides}): {shown} in {duration(seconds)}"


def to_log_file(text: str) -> None:
    """``text`` into the run's log file only (the root logger's file handlers), not the console."""
    from llm.cli.app import to_log_files

    to_log_files(log.makeRecord(log.name, logging.INFO, __file__, 0, text, None, None))


def summary(cfg: DictConfig, trainer: Any, module: Any, extra: list[str] | None = None) -> str:
    """The end of a run: where it went, how it did, and what to run next."""
    run_dir = cfg.get("output_dir") or trainer.default_root_dir
    history = module.val_history
    lines = [f"Run folder:      {run_dir}"]
    losses = [(m.get("val/loss", math.nan), step) for step, m in history if step > 0]
    best = min(((v, step) for v, step in losses if math.isfinite(v)), default=None)
    if best is not None:
        lines.append(f"Best val/loss:   {best[0]:.4f} at step {best[1]}")
    train_loss = trainer.callback_metrics.get("train/loss")
    final = [f"train {float(train_loss):.4f}"] if train_loss is not None else []
    if history:  # the last validation, with its own step where it is not the last step
        val_step, val = history[-1]
        at = f" at step {val_step}" if val_step != trainer.global_step else ""
        final.append(f"val {val.get('val/loss', math.nan):.4f}{at}")
    if final:
        lines.append(f"Final loss:      {', '.join(final)} (step {trainer.global_step})")
    from llm.checkpoint import is_distributed_checkpoint
    from llm.training.throughput import throughput_of

    clock = throughput_of(trainer)
    tps = clock.tokens_per_second() if clock else None
    if clock and tps:
        mfu = clock.mfu(tps)
        shown = f", MFU {mfu:.1%}" if mfu is not None else ""
        lines.append(f"Throughput:      {tps:,.0f} tokens/s{shown}")
    lines += extra or []
    best_path, last_path = checkpoint_paths(trainer)
    lines += [f"Best checkpoint: {best_path}", f"Last checkpoint: {last_path}", "Next:"]
    # quoted for the shell; the llm command quotes a path for Hydra itself (quote_free_text)
    # the folder above the run: TensorBoard names a run by its folder below --logdir (the run
    # folder itself would be listed as ".") and shows its sibling runs beside it
    lines.append(f"  tensorboard --logdir {shlex.quote(str(Path(str(run_dir)).parent))}")
    if last_path and is_distributed_checkpoint(last_path):  # a sharded run's: one file first
        single = Path(last_path).with_name(Path(last_path).stem + "-single.ckpt")
        folder, out = shlex.quote(f"ckpt_path={last_path}"), shlex.quote(f"out={single}")
        lines.append(f"  llm export {folder} {out}")
        last_path = str(single)
    ckpt = shlex.quote(f"ckpt_path={last_path}")
    if last_path and module.kind == "classifier":
        lines.append(f"  llm classify {ckpt} 'text=...'")
    elif last_path:
        lines.append(f"  llm generate {ckpt}")
        lines.append(f"  llm evaluate {ckpt}")
    return "\n".join(lines)


def run_task(cfg: DictConfig, task: Any) -> dict[str, Any]:
    """A training verb's run: `llm.training.run.fit` with the command line around it (its first
    lines, a sweep's pruning and job line, the summary, the spawned ranks' logging)."""
    import time

    from llm.cli.app import quiet_libraries
    from llm.cli.sweep import check_multirun_strategy
    from llm.sweeps.jobs import end_sweep_job, sweep_pruning
    from llm.training.run import fit

    started = time.perf_counter()
    check_multirun_strategy(cfg)
    pruning = sweep_pruning()
    callbacks = [*spawned_ranks(cfg.trainer), *([pruning] if pruning else [])]

    def starting() -> None:
        quiet_libraries()
        announce(cfg)

    result = fit(cfg, task, callbacks, started=starting)
    seconds = time.perf_counter() - started
    end_of_run(cfg, result["trainer"], result["module"], seconds, task.outcome_lines(result))
    end_sweep_job(pruning, result["shutdown"])  # after logging: pruned trials show in HPARAMS
    return result


def spawned_ranks(trainer_cfg: Any) -> list[Any]:
    """The callback for a spawn-based strategy (none otherwise), with this job's logging."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from llm.cli.app import quiet_libraries
    from llm.training.spawned import SpawnedRanks
    from llm.training.trainer import strategy_name

    name = strategy_name(trainer_cfg)
    if not any(k in name for k in ("spawn", "fork", "notebook")):
        return []
    config = None
    if HydraConfig.initialized():
        config = OmegaConf.to_container(HydraConfig.get().job_logging, resolve=True)
    return [SpawnedRanks(config, quiet_libraries)]  # type: ignore[arg-type]
