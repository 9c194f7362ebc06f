"""The Trainer of a run and what the training verbs share around it: the settings checks, the
loggers and callbacks, the run folder's lock, the hyperparameters and end figures logged."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from llm import checks
from llm.ranks import is_launching_process

log = logging.getLogger("llm")


def strategy_name(trainer_cfg: DictConfig) -> str:
    """``trainer.strategy`` as a lower-case name: the string, or a strategy object's target."""
    strategy = trainer_cfg.get("strategy")
    if isinstance(strategy, DictConfig):
        strategy = strategy.get("_target_")
    return str(strategy or "").lower()


# config keys that are Hydra's, paths or plumbing (they change no result): never hyperparameters
_NOT_HPARAMS = (
    "_target_", "_partial_", "path", "dir", "num_workers", "tokenize_workers", "shard_tokens",
    "fused", "attn_impl", "pin_memory", "output_dir", "ckpt_path", "init", "task_name",
    "enable_progress_bar", "enable_model_summary", "log_every_n_steps",
)  # fmt: skip


def _is_hparam(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return not (
        last in _NOT_HPARAMS
        or last.endswith(("_path", "_dir"))
        or key.startswith(("paths.", "logger.", "callbacks.", "hydra."))
    )


def check_run(cfg: DictConfig) -> None:
    """Fail fast, before any data is read, on the settings every training run shares."""
    from llm.training.cluster import check_world
    from llm.training.optim import check_optim

    check_world(cfg.trainer)
    checks.integer("trainer.max_steps", cfg.trainer.get("max_steps"), minimum=1, example=2000)
    checks.integer("seed", cfg.get("seed"), example=1337)
    check_val_interval(cfg.trainer.get("val_check_interval"))
    check_optim(OmegaConf.to_container(cfg.optim, resolve=True))  # type: ignore[arg-type]
    checks.data_path(cfg.get("data"))


def check_val_interval(value: Any) -> None:
    """Lightning reads an int as batches and a float as a fraction of an epoch; 0 divides by
    zero deep inside its loop, a float above 1 is refused there with no key named."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return
    if isinstance(value, float) and 0.0 < value <= 1.0:
        return
    shown = repr(value) if isinstance(value, str) else value
    raise checks.SettingError(
        f"trainer.val_check_interval={shown}: must be an integer >= 1 (training batches between "
        "validations) or a number in (0, 1] (a fraction of an epoch), e.g. "
        "trainer.val_check_interval=250"
    )


LOCK_NAME = "run.lock"


@contextmanager
def run_folder_lock(cfg: DictConfig) -> Iterator[None]:
    """Hold ``<output_dir>/run.lock`` while the run lasts, so a second run in the same folder is
    refused before it writes a checkpoint or a line of its log among this one's.

    Only the launching process locks (the ranks it starts share its folder). The lock is the
    operating system's (flock): it ends with the process, so a killed run leaves no stale lock and
    a resume in the same folder (``hydra.run.dir=<run>``) takes it again.
    """
    if not is_launching_process():
        yield
        return
    from filelock import FileLock, Timeout

    folder = Path(str(cfg.output_dir))
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK_NAME)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunFolderBusy(
            f"another process is using the run folder {folder} (it holds {folder / LOCK_NAME}); "
            "two runs in one folder would mix their checkpoints and logs. Wait for it to end, or "
            "run elsewhere: without hydra.run.dir= each run gets a new dated folder, or set "
            "hydra.run.dir=<another folder>"
        ) from None
    try:
        yield
    finally:
        lock.release()


class RunFolderBusy(RuntimeError):
    """The run folder is locked by another run (whose log file this one's failure stays out of)."""

    log_in_run_folder = False


def check_memory(
    cfg: DictConfig,
    model: dict[str, Any],
    dm: Any,
    advice: tuple[str, str],
    trainable: float = 1.0,
    outputs: int | None = None,
) -> None:
    """Refuse, before the model is built, a run whose weights and one batch clearly exceed the
    training device's free memory (:mod:`llm.memory`); ``advice``: what to lower where the
    weights, resp. the batch, are most of it."""
    from llm import memory
    from llm.model import GPTConfig

    device = training_device(cfg.trainer)
    if device is None or not is_launching_process():  # the ranks it starts need not ask again
        return
    config = GPTConfig(**model)
    tokens = getattr(dm, "max_length", None) or getattr(dm, "block_size", None)
    need = memory.estimate(
        config,
        checks.integer("data.batch_size", cfg.data.get("batch_size"), minimum=1),  # type: ignore[arg-type]
        int(tokens or config.block_size),
        trainable=trainable,
        optimizer=str(cfg.optim.get("name", "adamw")),
        precision=compute_precision(cfg.trainer),
        outputs=outputs,
        shards=_shards(cfg.trainer),
    )
    memory.check_fits(need, device, *advice)
    if device != "cpu":  # the weights are built on the CPU first
        weights = memory.Estimate(need.params, need.params * 4)
        memory.check_fits(weights, "cpu", *advice, what="building the model")


def compute_precision(trainer_cfg: DictConfig) -> str:
    """``trainer.precision``, or ``bf16-mixed`` where FSDP2's mixed precision
    (``trainer.strategy.mixed_precision``, :mod:`llm.training.sharding`) computes in bf16."""
    strategy = trainer_cfg.get("strategy")
    mixed = strategy.get("mixed_precision") if isinstance(strategy, DictConfig) else None
    return "bf16-mixed" if mixed == "bf16" else str(trainer_cfg.get("precision", "32-true"))


def training_device(trainer_cfg: DictConfig) -> str | None:
    """Where ``trainer.accelerator`` trains: ``cpu`` (Apple's MPS: the same unified memory),
    ``cuda:N``, or None where free memory is not told (or asking would initialise CUDA before
    a fork-based strategy forks)."""
    import torch

    accelerator = str(trainer_cfg.get("accelerator") or "auto").lower()
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        if any(k in strategy_name(trainer_cfg) for k in ("fork", "notebook")):
            return None
        devices = trainer_cfg.get("devices")
        first = devices[0] if OmegaConf.is_list(devices) and len(devices) else 0
        return f"cuda:{int(first)}"
    return "cpu" if accelerator in ("cpu", "mps", "auto") else None


def _shards(trainer_cfg: DictConfig) -> int:
    """Devices the weights are split over: all of them under a sharding strategy, else 1."""
    if not sharded(trainer_cfg):
        return 1
    import torch

    devices = trainer_cfg.get("devices")
    if OmegaConf.is_list(devices):
        count = len(devices)
    elif isinstance(devices, int) and devices > 0:
        count = devices
    else:  # -1 or auto: every visible GPU
        count = torch.cuda.device_count()
    return max(count, 1) * max(int(trainer_cfg.get("num_nodes") or 1), 1)


def instantiate_all(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a ``name: {_target_: ...}`` mapping, skipping nulls."""
    if not cfg:
        return []
    return [
        hydra.utils.instantiate(c)
        for c in cfg.values()
        if isinstance(c, DictConfig) and "_target_" in c
    ]


def build_trainer(cfg: DictConfig, extra_callbacks: list[Any] | None = None) -> tuple[Any, list]:
    """The Trainer of ``cfg.trainer`` with the configured loggers and callbacks (and extra)."""
    from llm.training.checkpointing import AtomicCheckpointIO
    from llm.training.progress import lines_without_bar
    from llm.training.throughput import Throughput
    from llm.training.world_size import WorldSizeChange

    loggers = build_loggers(cfg.get("logger"), resumed_step(cfg.get("ckpt_path")))
    # the throughput clock first: the progress lines read its tokens/s at the same step
    callbacks = [Throughput(), WorldSizeChange(), *instantiate_all(cfg.get("callbacks") or {})]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar then
        callbacks = lines_without_bar(callbacks)
    callbacks += extra_callbacks or []
    plugins = [] if sharded(cfg.trainer) else [AtomicCheckpointIO()]
    trainer = hydra.utils.instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=plugins or None
    )
    return trainer, loggers


def sharded(trainer_cfg: DictConfig) -> bool:
    """Strategies that shard the weights and save through their own distributed checkpoint
    writer (which an AtomicCheckpointIO would replace)."""
    return any(s in strategy_name(trainer_cfg) for s in ("fsdp", "deepspeed", "model_parallel"))


def resumed_step(ckpt_path: Any) -> int | None:
    """The optimizer step a resumed run starts from (None: not resuming)."""
    if not ckpt_path:
        return None
    from llm.checkpoint import read_resume_state

    return int(read_resume_state(ckpt_path, sharded=True).get("global_step", 0))


def build_loggers(cfg: DictConfig | None, resumed_at: int | None) -> list[Any]:
    """The configured loggers. A resumed run's TensorBoard writer purges what the stopped run
    logged from the checkpoint's step on (its points after the checkpoint, which the resumed
    run logs again), so the curves go on with no repeated or out-of-order steps."""
    if not cfg:
        return []
    loggers = []
    for c in cfg.values():
        if not (isinstance(c, DictConfig) and "_target_" in c):
            continue
        extra = {}
        if resumed_at and str(c._target_).endswith("TensorBoardLogger"):
            extra["purge_step"] = resumed_at  # passed on to torch's SummaryWriter
        loggers.append(hydra.utils.instantiate(c, **extra))
    return loggers


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``a.b: value`` with plain values (what TensorBoard's HPARAMS takes),
    without Hydra's ``_target_``/``_partial_`` or paths."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if not _is_hparam(key):
            continue
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        elif v is None:  # not set: HPARAMS shows no value rather than the string "None"
            continue
        elif isinstance(v, bool | int | float | str):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def overridden_keys() -> list[str]:
    """The config keys this job's command line set (a sweep job's own), in their order."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    keys = []
    for override in HydraConfig.get().overrides.task:
        key = str(override).split("=", 1)[0].lstrip("+~")
        if _is_hparam(key):
            keys.append(key)
    return keys


def hparams(cfg: DictConfig, params: dict[str, Any]) -> dict[str, Any]:
    """What HPARAMS lists: the overridden keys first (a sweep's axes), then ``params``."""
    flat = flatten(params)
    first: dict[str, Any] = {}
    for key in overridden_keys():
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, DictConfig):  # a group choice (model=baby): its name
            choices = _choices()
            first[key] = str(choices.get(key, "")) or str(value.get("_target_", key))
        elif key in flat or isinstance(value, bool | int | float | str):
            first[key] = flat.get(key, value)
    filtered = flatten(first) if first else {}
    return {**filtered, **{k: v for k, v in flat.items() if k not in filtered}}


def _choices() -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}


def log_hparams(trainer: Any, loggers: list[Any], params: dict[str, Any], metrics: dict) -> None:
    """Hyperparameters and end-of-run metrics to every logger (rank zero), then close them.

    TensorBoard gets the HPARAMS session written here (:mod:`llm.training.board`): the keys the
    command line set shown first, the end figures at the run's last step under ``whole_run/``;
    other loggers get Lightning's ``log_hyperparams``.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    from llm.training import board

    if not loggers or not trainer.is_global_zero:
        return
    clean = {k: v for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    from llm.sweeps.jobs import sweep_axes

    # marked as differing (TensorBoard lists those first): a sweep's axes, else the command
    # line's keys; the constants of a sweep are not among them
    axes = sweep_axes()
    first = [k for k in overridden_keys() if k in params and (axes is None or k in axes)]
    benchmark = board.BENCHMARK in trainer.callback_metrics
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.hparams.update(params)  # its hparams.yaml, written when it is finalized
            board.write_session([logger], params, clean, first, trainer.global_step, benchmark)
        else:
            logger.log_hyperparams(params, clean)
        logger.finalize("success")


def end_metrics(trainer: Any, module: Any) -> dict[str, float | None]:
    """HPARAMS' metrics: best val loss, final train loss, tokens/s, parameter count."""
    from llm.training.board import END
    from llm.training.throughput import throughput_of

    train_loss = trainer.callback_metrics.get("train/loss")
    clock = throughput_of(trainer)
    return {
        f"{END}best_val_loss": best_val_loss(trainer, module),
        f"{END}final_train_loss": None if train_loss is None else float(train_loss),
        f"{END}tokens_per_sec": clock.tokens_per_second() if clock else None,
        f"{END}params": float(sum(p.numel() for p in module.parameters())),
    }


def best_val_loss(trainer: Any, module: Any = None) -> float:
    """The lowest val/loss of the run (its validations, the checkpoint callback's best), or NaN.

    NaN when no validation ran, which sweepers record as a failed trial, never as a result.
    """
    history = getattr(module, "val_history", [])
    values = [m.get("val/loss", math.nan) for step, m in history if step > 0]  # trained only
    score = getattr(trainer.checkpoint_callback, "best_model_score", None)
    if score is not None:
        values.append(float(score))
    finite = [v for v in values if math.isfinite(v)]
    if finite:
        return min(finite)
    last = trainer.callback_metrics.get("val/loss")
    return float(last) if last is not None else math.nan


def checkpoint_paths(trainer: Any) -> tuple[str | None, str | None]:
    """(best, last) checkpoint paths of the run, None where none was written."""
    ckpt = trainer.checkpoint_callback
    best = getattr(ckpt, "best_model_path", "") or None
    last = getattr(ckpt, "last_model_path", "") or None
    return best, last


def shutdown_of(trainer: Any) -> Any | None:
    """The ``Interrupted`` a signal left (GracefulShutdown caught one), else None."""
    from llm.training.shutdown import GracefulShutdown

    for callback in trainer.callbacks:
        if isinstance(callback, GracefulShutdown) and callback.interrupted() is not None:
            return callback.interrupted()
    return None
