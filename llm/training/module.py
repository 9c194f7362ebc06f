"""LightningModule that pretrains a `GPT` with next-token cross-entropy.

Everything passed to `__init__` is plain Python (dicts, lists, numbers, strings) and is
saved with `save_hyperparameters`, so a checkpoint rebuilds model *and* tokenizer on its
own and loads with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import grad_norm
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor

from llm.finetuning.lora import apply_lora
from llm.model import GPT, GPTConfig
from llm.prompts import check_template
from llm.training.optim import build_optimizer, build_scheduler


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


def check_finite(loss: Tensor, step: int) -> None:
    """Stop on a NaN/inf loss, with what usually causes it (reads the loss on the host)."""
    if not torch.isfinite(loss.detach()).item():
        raise RuntimeError(
            f"training loss is {loss.item()} at global step {step} "
            "(try a lower optim.lr, gradient clipping, or bf16 instead of fp16)"
        )


class GPTLitModule(L.LightningModule):
    """GPT + optimizer/schedule + loss logging; the tokenizer rides along for sampling.

    Args:
        model: `GPTConfig` fields, `vocab_size` included.
        tokenizer: the fitted tokenizer's `to_dict()`, so a checkpoint can encode/decode.
        optim: the settings of `conf/optim/` (their one home); needed to train, not to infer.
            `decay_steps` None decays over `trainer.max_steps`.
        compile: wrap the model in `torch.compile` (the wrapper is not part of state_dict).
        sample: the sampling settings used during training, recorded for later generation.
        lora: LoRA settings (`llm.finetuning.lora.lora_config`): adapters on the named Linear
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
        self._val_started: float | None = None
        self._peak_flops: float | None = None
        self._compiled: Any = None

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

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        _, loss = self(x, y)
        assert loss is not None
        now = time.perf_counter()
        if self._window_start is None:
            self._window_start, self._window_tokens = now, 0
        else:  # one more step (backward, update, next batch, forward) since the last call
            self._window_tokens += x.numel() * self.trainer.world_size
        # metrics on logging steps only: `self.log` is not free, and the loggers and the
        # progress bar read them no more often than that anyway
        if self._logging_step():  # the only steps that read the loss on the host
            check_finite(loss, self.global_step)
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
            opt = self.trainer.optimizers[0] if self.trainer.optimizers else None
            if opt is not None:
                self.log("train/lr", opt.param_groups[0]["lr"], on_step=True, on_epoch=False)
            self._log_throughput(now)
        return loss

    def _logging_step(self) -> bool:
        """Whether Lightning writes this step's metrics to the loggers (its own rule: after
        steps log_every_n_steps - 1, 2 * log_every_n_steps - 1, ...), so that what is logged
        here is this step's value, not one left over from an earlier step."""
        return (self.global_step + 1) % max(self.trainer.log_every_n_steps, 1) == 0

    def _log_throughput(self, now: float) -> None:
        """Tokens/s (and MFU) over the steps since the last logging step."""
        if not self._window_tokens or self._window_start is None:
            return
        tps = self._window_tokens / max(now - self._window_start, 1e-9)
        self.log("train/tokens_per_sec", tps, prog_bar=True, on_step=True, on_epoch=False)
        if self._peak_flops:
            mfu = self.model.estimate_mfu(tps / self.trainer.world_size, self._peak_flops)
            self.log("train/mfu", mfu, on_step=True, on_epoch=False)
        self._window_start, self._window_tokens = now, 0

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
        if self._window_start is not None and self._val_started is not None:
            self._window_start += time.perf_counter() - self._val_started
        self._val_started = None

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
        # already identical on every rank; sync_dist only silences Lightning's DDP warning
        self.log("val/loss", mean, prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(mean.clamp(max=50.0)), sync_dist=True)
        # x-axis = optimizer steps taken (Lightning would log these at global_step - 1, as the
        # validation after step 250 runs before its step counter for loggers moves on)
        if self.trainer.state.fn == "fit":
            self.log("step", float(self.global_step), sync_dist=True)
        self._val_losses = []

    # -- checkpoints --------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the kind, and keep the global RNG state: dropout draws from it, so a resumed
        run with dropout continues the masks an uninterrupted run would have drawn (tensors:
        weights_only-safe)."""
        checkpoint["kind"] = self.kind
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "cuda": cuda}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if not states:  # checkpoints written before RNG states were kept
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
