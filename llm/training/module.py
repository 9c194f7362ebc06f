"""LightningModule that pretrains a `GPT` with next-token cross-entropy.

Everything passed to `__init__` is plain Python (dicts, lists, numbers, strings) and is
saved with `save_hyperparameters`, so a checkpoint rebuilds model *and* tokenizer on its
own and loads with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import grad_norm
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor

from llm import faults
from llm.model import GPT, GPTConfig
from llm.model.lora import apply_lora
from llm.prompts import check_template
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


def peak_flops(device: torch.device, precision: Any) -> float | None:
    """The device's peak FLOP/s at this precision, where Lightning knows it (CUDA GPUs), for MFU.

    None elsewhere or for an unknown GPU: MFU is then left out, tokens/s is still logged.
    """
    if device.type != "cuda":
        return None
    try:
        from lightning.fabric.utilities.throughput import get_available_flops

        dtype = torch.bfloat16 if "bf16" in str(precision) else torch.float32
        return get_available_flops(device, dtype)
    except Exception:
        return None


def check_finite(loss: Tensor, step: int) -> float:
    """The loss as a number; a NaN/inf one stops the run, with what usually causes it."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise RuntimeError(
            f"training loss is {value} at global step {step} "
            "(try a lower optim.lr, gradient clipping, or bf16 instead of fp16)"
        )
    return value


class GPTLitModule(L.LightningModule):
    """GPT + optimizer/schedule + loss logging; the tokenizer rides along for sampling.

    Args:
        model: `GPTConfig` fields, `vocab_size` included.
        tokenizer: the fitted tokenizer's `to_dict()`, so a checkpoint can encode/decode.
        optim: the settings of `conf/optim/` (their one home); needed to train, not to infer.
            `decay_steps` None decays over `trainer.max_steps`.
        compile: wrap the model in `torch.compile` (the wrapper is not part of state_dict).
        sample: the sampling settings used during training, recorded for later generation.
        lora: LoRA settings (`llm.model.lora.lora_config`): adapters on the named Linear
            layers, every other weight frozen; None trains every weight.
        template: how the model wants prompts rendered (`llm.prompts`): "alpaca" after
            instruction finetuning, "chat" for its tokenizer's chat template, None for a base
            model; `llm chat` reads it from the checkpoint.
    """

    kind = "lm"  # recorded in every checkpoint, so loaders never guess it from the keys

    def __init__(
        self,
        model: dict[str, Any],
        tokenizer: dict[str, Any] | None = None,
        optim: dict[str, Any] | None = None,
        compile: bool = False,
        sample: dict[str, Any] | None = None,
        lora: dict[str, Any] | None = None,
        template: str | None = None,
    ) -> None:
        super().__init__()
        hparams = {
            "model": plain(model),
            "tokenizer": plain(tokenizer),
            "optim": plain(optim),
            "compile": bool(compile),
            "sample": plain(sample),
            "lora": plain(lora),
            "template": check_template(template),
        }
        # logger=False: the tokenizer state can be large; llm train logs a flat summary instead
        self.save_hyperparameters(hparams, logger=False)
        self.config = GPTConfig(**hparams["model"])
        self.model = GPT(self.config)
        if lora:
            apply_lora(self.model, lora["r"], lora["alpha"], lora["dropout"], lora["targets"])
        self.tokenizer = None
        if hparams["tokenizer"]:
            from llm.tokenizers import tokenizer_from_dict

            self.tokenizer = tokenizer_from_dict(hparams["tokenizer"])
        self._val_losses: list[Tensor] = []
        self._window_start: float | None = None  # throughput window (see training_step)
        self._window_tokens = 0
        self.train_tokens = 0  # over the run, for its summary (every rank's tokens)
        self._clock: dict[str, float] = {}  # training time over the run, validation excluded
        self.val_history: list[tuple[int, dict[str, float]]] = []  # (step, val metrics), rank 0
        self._val_started: float | None = None
        self._peak_flops: float | None = None
        self._compiled: Any = None
        self._resumed_rng: dict[str, Any] | None = None

    # -- forward ------------------------------------------------------------------------
    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        fwd = self._compiled if self._compiled is not None else self.model
        return fwd(idx, targets)

    def setup(self, stage: str) -> None:
        """Compile once per process; stored outside `_modules` so state_dict keys stay clean."""
        if self.hparams["compile"] and self._compiled is None:
            self.__dict__["_compiled"] = torch.compile(self.model)

    # -- training -----------------------------------------------------------------------
    def on_train_start(self) -> None:
        self._window_start = None
        self._peak_flops = peak_flops(self.device, self.trainer.precision)
        self._clock = {"mark": time.perf_counter(), "train": 0.0}
        self._log_resumed_validation()
        self._restore_rng()
        if self.global_step == 0 and self.trainer.is_global_zero:  # a resumed run has one
            board.write_layout(self.loggers, mfu=self._peak_flops is not None)

    def _log_resumed_validation(self) -> None:
        """A run resumed from a checkpoint written at a validation logs that validation again:
        its TensorBoard writer purged the stopped run's points from this step on."""
        if self.global_step == 0 or not self.val_history or not self.trainer.is_global_zero:
            return
        step, metrics = self.val_history[-1]
        if step == self.global_step:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=step)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        _, loss = self(x, y)
        assert loss is not None
        now = time.perf_counter()
        if self._window_start is None:
            self._window_start, self._window_tokens = now, 0
        else:  # one more step (backward, update, next batch, forward) since the last call
            self._window_tokens += x.numel() * self.trainer.world_size
        self.train_tokens += x.numel() * self.trainer.world_size
        if self._logging_step():  # the only steps that read the loss on the host
            self._log_train_metrics(loss, now)
        return loss

    def _log_train_metrics(self, loss: Tensor, now: float) -> None:
        """This step's loss, learning rates and throughput, written to the loggers at this step
        (the number of optimizer steps taken, as val points are), and shown by the progress
        bar. Written directly rather than through Lightning's cadence, so that train points
        fall on 0, n, 2n, ... like the validations, and no `epoch` scalar comes along."""
        metrics = {"train/loss": check_finite(loss, self.global_step)}
        for opt in self.trainer.optimizers:  # one curve per optimizer (lr/adamw, lr/muon)
            for group in opt.param_groups:
                metrics.setdefault(f"lr/{schedule_of(group)}", float(group["lr"]))
        metrics.update(self._throughput(now))
        self.log("train/loss", loss, prog_bar=True, logger=False, on_step=True, on_epoch=False)
        for key in ("train/tokens_per_sec", "train/mfu"):
            if key in metrics:
                shown = key == "train/tokens_per_sec"
                self.log(key, metrics[key], prog_bar=shown, logger=False, on_step=True)
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.global_step)

    def _logging_step(self) -> bool:
        """Every ``trainer.log_every_n_steps`` optimizer steps, from step 0."""
        return self.global_step % max(self.trainer.log_every_n_steps, 1) == 0

    def tokens_per_second(self) -> float | None:
        """Training throughput over the run so far (validation time excluded)."""
        seconds = self._clock.get("train", 0.0)
        return self.train_tokens / seconds if seconds > 0 else None

    def mfu(self, tokens_per_second: float) -> float | None:
        """Model FLOPs utilisation at this many tokens/s (all ranks), where the peak is known."""
        if not self._peak_flops:
            return None
        world = self.trainer.world_size if self._trainer is not None else 1
        return self.model.estimate_mfu(tokens_per_second / world, self._peak_flops)

    def _throughput(self, now: float) -> dict[str, float]:
        """Tokens/s (and MFU) over the steps since the last logging step."""
        if not self._window_tokens or self._window_start is None:
            return {}
        seconds = max(now - self._window_start, 1e-9)
        tps = self._window_tokens / seconds
        self._window_start, self._window_tokens = now, 0
        out = {"train/tokens_per_sec": tps}
        mfu = self.mfu(tps)
        if mfu is not None:
            out["train/mfu"] = mfu
        return out

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Stop at the last step through ``should_stop``, which makes Lightning validate once
        more whatever ``val_check_interval`` is: every run ends with a val loss."""
        if self._clock:  # the time since the last step (or validation) is training time
            now = time.perf_counter()
            self._clock["train"] += now - self._clock["mark"]
            self._clock["mark"] = now
        if 0 < self.trainer.max_steps <= self.global_step:
            self.trainer.should_stop = True
        faults.point("fit.step")

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        faults.point("fit.validation")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Total gradient norm before clipping, on logging steps, straight to the loggers.

        Not through `self.log`: from this hook that slowed every CPU step by ~15% (measured
        with scripts/bench_train.py). Gradients are already all-reduced under DDP.
        """
        if not self.loggers or not self._logging_step():
            return
        total = grad_norm(self.model, norm_type=2).get("grad_2.0_norm_total")
        if total is not None and self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics({"train/grad_norm": float(total)}, step=self.global_step)

    # -- validation ---------------------------------------------------------------------
    def on_validation_start(self) -> None:
        self._val_started = time.perf_counter()

    def on_validation_end(self) -> None:
        """Validation (and its callbacks: samples, heat maps, checkpoints) is not training time:
        the throughput window's start moves past it rather than restarting (a restart would
        drop every logging step that follows a validation, all of them when both intervals
        are equal)."""
        if self._val_started is not None:
            spent = time.perf_counter() - self._val_started
            if self._window_start is not None:
                self._window_start += spent
            if self._clock:
                self._clock["mark"] = time.perf_counter()
        self._val_started = None
        if not self.trainer.sanity_checking and self.trainer.is_global_zero:
            shown = self._val_metrics()
            self.val_history.append((self.global_step, shown))
            self.print_validation(shown, self.global_step)

    def _val_metrics(self) -> dict[str, float]:
        """This validation's val/* metrics (the module's and the callbacks')."""
        metrics = self.trainer.callback_metrics
        return {k: float(v) for k, v in metrics.items() if k.startswith("val/")}

    def on_validation_epoch_start(self) -> None:
        self._val_losses = []

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        _, loss = self(x, y)
        assert loss is not None
        self._val_losses.append(loss.detach().float())
        return loss

    def on_validation_epoch_end(self) -> None:
        if not self._val_losses:
            return
        mean = torch.stack(self._val_losses).mean()
        mean = self.all_gather(mean).float().mean()  # same value on every rank
        self._val_losses = []
        if self.trainer.sanity_checking:
            self.log_initial_validation({"val/loss": mean, "val/ppl": mean.clamp(max=50.0).exp()})
            return
        # already identical on every rank; sync_dist only silences Lightning's DDP warning
        ppl = torch.exp(mean.clamp(max=50.0))
        self.log("val/loss", mean, prog_bar=True, sync_dist=True)
        self.log("val/ppl", ppl, sync_dist=True)

        # x-axis = optimizer steps taken (Lightning would log these at global_step - 1, as the
        # validation after step 250 runs before its step counter for loggers moves on)
        if self.trainer.state.fn == "fit":
            self.log("step", float(self.global_step), sync_dist=True)

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
            history.append([self.global_step, self._val_metrics()])
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
        opt = build_optimizer(self.model, o)
        sched = build_scheduler(opt, o, int(self.trainer.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
