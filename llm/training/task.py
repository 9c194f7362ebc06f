"""What every training task shares: a GPT built from plain hyperparameters (LoRA, compile), the
optimizer and schedule, the logging cadence, the validations' history, and the state a resumed
run needs (RNG, history). A task (pretraining, a classifier, ...) subclasses `TaskModule` and
writes its steps; the fit around it is one pipeline (`llm.training.run.fit`).

Everything passed to `__init__` is plain Python (dicts, lists, numbers, strings) and is saved
with `save_hyperparameters`, so a checkpoint rebuilds model *and* tokenizer on its own and loads
with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn

from llm import checks, faults
from llm.model.build import build_model
from llm.training import board
from llm.training.optim import build_optimizer, build_scheduler, schedule_of

log = logging.getLogger(__name__)


def plain(obj: Any) -> Any:
    """OmegaConf containers and tuples -> dicts/lists, so checkpoints stay weights_only-safe."""
    if isinstance(obj, DictConfig | ListConfig):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    return obj


def check_finite(loss: Tensor, step: int) -> float:
    """The loss as a number; a NaN/inf one stops the run, with what usually causes it."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise RuntimeError(
            f"training loss is {value} at global step {step} "
            "(try a lower optim.lr, gradient clipping, or bf16 instead of fp16)"
        )
    return value


class TaskModule(L.LightningModule):
    """A GPT-based task under the Trainer.

    Args:
        model: `GPTConfig` fields, `vocab_size` included.
        tokenizer: the fitted tokenizer's `to_dict()`, so a checkpoint can encode/decode.
        optim: the settings of `conf/optim/` (their one home); needed to train, not to infer.
            `decay_steps` None decays over `trainer.max_steps`.
        compile: wrap the model in `torch.compile` (the wrapper is not part of state_dict).
        lora: LoRA settings (`llm.model.lora.lora_config`): adapters on the named Linear
            layers, every other weight frozen; None trains every weight.
        **task: the subclass's own hyperparameters (plain values), saved with the others.
    """

    kind = "lm"  # recorded in every checkpoint, so loaders never guess it from the keys

    def __init__(
        self,
        model: dict[str, Any],
        tokenizer: dict[str, Any] | None = None,
        optim: dict[str, Any] | None = None,
        compile: bool = False,
        lora: dict[str, Any] | None = None,
        **task: Any,
    ) -> None:
        super().__init__()
        hparams = {
            "model": plain(model),
            "tokenizer": plain(tokenizer),
            "optim": plain(optim),
            "compile": bool(compile),
            "lora": plain(lora),
            **{k: plain(v) for k, v in task.items()},
        }
        # logger=False: the tokenizer state can be large; the run logs a flat summary instead
        self.save_hyperparameters(hparams, logger=False)
        self.model = build_model(hparams["model"], hparams["lora"])
        self.config = self.model.config
        self.tokenizer = None
        if hparams["tokenizer"]:
            from llm.tokenizers import tokenizer_from_dict

            self.tokenizer = tokenizer_from_dict(hparams["tokenizer"])
        self.val_history: list[tuple[int, dict[str, float]]] = []  # (step, val metrics), rank 0
        self._compiled: Any = None
        self._resumed_rng: dict[str, Any] | None = None

    @property
    def network(self) -> nn.Module:
        """The GPT as the steps call it: compiled when ``compile`` is on."""
        return self._compiled if self._compiled is not None else self.model

    def setup(self, stage: str) -> None:
        """Compile once per process; stored outside `_modules` so state_dict keys stay clean."""
        if self.hparams["compile"] and self._compiled is None:
            self.__dict__["_compiled"] = torch.compile(self.model)

    def configure_model(self) -> None:
        """Under a sharding strategy (``trainer=fsdp``, :mod:`llm.training.sharding`): shard the
        weights before the optimizer is built over them; other strategies leave them whole."""
        trainer = self._trainer  # None in load_from_checkpoint, which calls this hook too
        shard = getattr(trainer.strategy, "shard", None) if trainer is not None else None
        if shard is None:
            return
        optim = self.hparams["optim"] or {}
        if optim.get("name") == "muon":
            raise checks.SettingError(
                "optim=muon with a sharded strategy (trainer=fsdp): Muon orthogonalizes whole "
                "matrices, and each process holds only a shard of them; use optim=adamw, or "
                "trainer=ddp"
            )
        shard(self)

    def optimized(self) -> nn.Module:
        """The module whose parameters the optimizer updates (the GPT; a task's heads too)."""
        return self.model

    # -- training -----------------------------------------------------------------------
    def on_train_start(self) -> None:
        from llm.training.throughput import peak_flops

        self._log_resumed_validation()
        self._restore_rng()
        if self.global_step == 0 and self.trainer.is_global_zero:  # a resumed run has one
            mfu = peak_flops(self.device, self.trainer.precision) is not None
            board.write_layout(self.loggers, mfu=mfu)

    def _log_resumed_validation(self) -> None:
        """A run resumed from a checkpoint written at a validation logs that validation again:
        its TensorBoard writer purged the stopped run's points from this step on."""
        if self.global_step == 0 or not self.val_history or not self.trainer.is_global_zero:
            return
        step, metrics = self.val_history[-1]
        if step == self.global_step:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=step)

    def logging_step(self) -> bool:
        """Every ``trainer.log_every_n_steps`` optimizer steps, from step 0: the only steps
        that read a value on the host (no device sync in the others)."""
        return self.global_step % max(self.trainer.log_every_n_steps, 1) == 0

    def log_train(self, metrics: dict[str, Tensor]) -> None:
        """On a logging step: this step's ``train/*`` values and learning rates, written to the
        loggers at this step (the number of optimizer steps taken, as val points are) and shown
        by the progress bar. Written directly rather than through Lightning's cadence, so that
        train points fall on 0, n, 2n, ... like the validations, with no `epoch` scalar."""
        values = {k: float(v.detach()) for k, v in metrics.items()}
        if "train/loss" in metrics:
            check_finite(metrics["train/loss"], self.global_step)
        # one curve per optimizer (train/lr/adamw, train/lr/muon): TIME SERIES' train group
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                values.setdefault(f"train/lr/{schedule_of(group)}", float(group["lr"]))
        for key, value in metrics.items():
            self.log(key, value, prog_bar=key == "train/loss", logger=False, on_step=True)
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(values, step=self.global_step)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Stop at the last step through ``should_stop``, which makes Lightning validate once
        more whatever ``val_check_interval`` is: every run ends with a val loss."""
        if 0 < self.trainer.max_steps <= self.global_step:
            self.trainer.should_stop = True
        faults.point("fit.step")

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by the total norm and log that norm (before clipping) on logging steps: one
        fused norm that stays on the device, read on the host only when it is logged.

        Sharded strategies and value clipping keep Lightning's own path.
        """
        strategy = type(self.trainer.strategy).__name__.lower()
        sharded = any(s in strategy for s in ("fsdp", "deepspeed", "modelparallel"))
        if sharded or gradient_clip_algorithm not in (None, "norm"):
            super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
            return
        logging_step = self.logging_step() and bool(self.loggers)
        if not gradient_clip_val and not logging_step:
            return
        # the module's parameter order, as clip_grad_norm_(model.parameters()) sums them
        params = [p for p in self.parameters() if p.grad is not None]
        if not params:
            return
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if gradient_clip_val:  # takes the parameters (it scales each one's .grad)
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm)
        if logging_step and self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics({"train/grad_norm": float(norm)}, step=self.global_step)

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        faults.point("fit.validation")

    # -- validation ---------------------------------------------------------------------
    def on_validation_end(self) -> None:
        if not self.trainer.sanity_checking and self.trainer.is_global_zero:
            shown = self.val_metrics()
            self.val_history.append((self.global_step, shown))
            self.print_validation(shown, self.global_step)

    def val_metrics(self) -> dict[str, float]:
        """This validation's val/* metrics (the module's and the callbacks')."""
        metrics = self.trainer.callback_metrics
        return {k: float(v) for k, v in metrics.items() if k.startswith("val/")}

    def log_initial_validation(self, metrics: dict[str, Tensor]) -> None:
        """The validation Lightning runs before the first step (its sanity check, which it never
        logs) as step 0 of the curves, as nanoGPT evaluates before training; a resumed run's
        check is not logged again."""
        if self.global_step != 0 or not self.trainer.is_global_zero:
            return
        values = {k: float(v) for k, v in metrics.items()}
        for logger in self.loggers:
            logger.log_metrics(values, step=0)
        self.val_history.append((0, values))
        self.print_validation(values, step=0)

    def print_validation(self, metrics: dict[str, float], step: int) -> None:
        """Each validation's losses into the run's log file (and the console's log)."""
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        log.info("validation at step %d: %s", step, shown)

    # -- checkpoints --------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the kind, and keep the global RNG state: dropout draws from it, so a resumed
        run with dropout continues the masks an uninterrupted run would have drawn (tensors:
        weights_only-safe)."""
        checkpoint["kind"] = self.kind
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "cuda": cuda}
        # the run's validations so far: a resumed run's summary and best loss cover all of it
        history = [[int(s), dict(m)] for s, m in self.val_history]
        if self._validated_in_fit():  # written by a callback before this hook records it
            history.append([self.global_step, self.val_metrics()])
        checkpoint["val_history"] = history

    def _validated_in_fit(self) -> bool:
        """Whether a checkpoint is being written at the end of a validation of ``fit`` that
        ``val_history`` does not hold yet (callbacks' hooks run before the module's)."""
        trainer = self._trainer
        if trainer is None or not trainer.validating or trainer.state.fn != "fit":
            return False
        done = bool(self.val_history) and self.val_history[-1][0] == self.global_step
        return not trainer.sanity_checking and not done

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        history = checkpoint.get("val_history") or []
        self.val_history = [(int(s), {k: float(v) for k, v in m.items()}) for s, m in history]
        # applied when training starts again (on_train_start), after the validation Lightning
        # runs first: anything that draws from the global RNG before then would shift it
        self._resumed_rng = checkpoint.get("rng_states")  # None: written before they were kept

    def _restore_rng(self) -> None:
        states, self._resumed_rng = self._resumed_rng, None
        if not states:
            return
        torch.set_rng_state(states["torch"])
        cuda = states.get("cuda") or []
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)  # same GPU count: the same streams continue

    # -- optimizer ----------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        o = self.hparams["optim"]
        if not o:
            raise ValueError("no optimizer settings: pass optim= (conf/optim/*.yaml) to train")
        opt = build_optimizer(self.optimized(), o)
        sched = build_scheduler(opt, o, int(self.trainer.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
