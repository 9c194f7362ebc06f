"""Training callbacks: TensorBoard text samples and attention heat maps during validation, a
multiple-choice benchmark scored at each validation, and a graceful stop (checkpoint + resume
command) on SIGTERM / Ctrl-C.

The TensorBoard ones watch training qualitatively (does the model start to spell? do heads
specialise?) and do nothing unless the trainer's logger is a `TensorBoardLogger`.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn


def _tensorboard(trainer: L.Trainer) -> Any | None:
    """The SummaryWriter of the first TensorBoardLogger, or None."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _should_run(trainer: L.Trainer) -> bool:
    """Rank zero only, not during the sanity check, and not under FSDP (sharded weights)."""
    if trainer.sanity_checking or not trainer.is_global_zero:
        return False
    return "FSDP" not in type(trainer.strategy).__name__


def _encode(pl_module: L.LightningModule, text: str) -> list[int] | None:
    tok = getattr(pl_module, "tokenizer", None)
    if tok is None:
        return None
    try:
        ids = list(tok.encode(text)) if text else []
    except (KeyError, ValueError) as err:
        rank_zero_warn(f"cannot encode {text!r} with this tokenizer ({err}); skipping")
        return None
    if not ids:
        eot = getattr(tok, "eot_id", None)
        ids = [eot if eot is not None else 0]
    return ids


class SampleTextCallback(L.Callback):
    """After each validation, sample from a fixed prompt and log it as TensorBoard text."""

    def __init__(
        self,
        prompt: str = "\n",
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = 200,
        seed: int = 1337,
    ) -> None:
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = _tensorboard(trainer)
        if writer is None or not _should_run(trainer):
            return
        ids = _encode(pl_module, self.prompt)
        if ids is None:
            return
        model = pl_module.model
        idx = torch.tensor([ids[-model.config.block_size :]], device=pl_module.device)
        with torch.no_grad():
            out = model.generate(
                idx,
                self.max_new_tokens,
                temperature=self.temperature,
                top_k=self.top_k,
                seed=self.seed,
            )
        text = pl_module.tokenizer.decode(out[0].tolist())
        # four-space indent = markdown code block, so newlines and spacing survive
        writer.add_text("samples/text", "    " + text.replace("\n", "\n    "), trainer.global_step)


class AttentionHeatmapCallback(L.Callback):
    """After each validation, log one layer's per-head attention on a fixed input as a figure."""

    def __init__(self, layer: int = 0, text: str = "To be, or not to be", max_tokens: int = 32):
        self.layer = layer
        self.text = text
        self.max_tokens = max_tokens

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = _tensorboard(trainer)
        if writer is None or not _should_run(trainer):
            return
        ids = _encode(pl_module, self.text)
        if ids is None:
            return
        model = pl_module.model
        ids = ids[: min(self.max_tokens, model.config.block_size)]
        idx = torch.tensor([ids], device=pl_module.device)
        maps = model.attention_maps(idx, self.layer)[0].float().cpu()  # (H, T, T)
        tok = pl_module.tokenizer
        pieces = getattr(tok, "pieces", None)  # per-token strings, when the tokenizer has them
        labels = list(pieces(ids)) if pieces else [tok.decode([i]) for i in ids]
        writer.add_figure(
            f"attention/layer{self.layer}", heatmap_figure(maps, labels), trainer.global_step
        )


class MultipleChoiceCallback(L.Callback):
    """At each validation, score a HellaSwag-format multiple-choice file
    (:mod:`llm.evaluation.multiple_choice`) and log ``val/mc_acc`` and ``val/mc_acc_norm`` next
    to val/loss, so sweeps can rank runs by a benchmark (``llm report sort=val/mc_acc_norm``).

    ``path`` None leaves it off (the default config's entry: enable it with
    ``callbacks.multiple_choice.path=<file.jsonl>``). ``limit``: the first N rows. The file is
    read and encoded once, at setup, so a bad row fails the run before it trains. Under DDP
    each rank scores its share and the counts are summed; skipped under FSDP (sharded weights).
    """

    def __init__(self, path: str | None = None, limit: int | None = None, batch_size: int = 16):
        self.path = path
        self.limit = limit
        self.batch_size = batch_size
        self._encoded: list[Any] = []
        self._labels: list[int] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.path is None or self._encoded:
            return
        from llm.evaluation.multiple_choice import encode_examples, read_examples

        tok = getattr(pl_module, "tokenizer", None)
        if tok is None:
            raise ValueError("callbacks.multiple_choice needs a model with a tokenizer")
        examples = read_examples(self.path, self.limit)
        try:
            self._encoded = encode_examples(tok, examples)
        except (KeyError, ValueError) as e:  # a character the model's vocabulary lacks
            raise ValueError(f"callbacks.multiple_choice.path={self.path}: {e}") from e
        self._labels = [ex.label for ex in examples]

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._encoded or trainer.sanity_checking:
            return
        if "FSDP" in type(trainer.strategy).__name__:
            return
        from llm.evaluation.multiple_choice import score_examples

        rank, world = trainer.global_rank, trainer.world_size
        mine = slice(rank, None, world)
        correct, correct_norm = score_examples(
            pl_module.model, self._encoded[mine], self._labels[mine], self.batch_size
        )
        counts = torch.tensor(
            [correct, correct_norm, len(self._labels[mine])],
            dtype=torch.long,
            device=pl_module.device,
        )
        if world > 1:
            counts = pl_module.all_gather(counts).reshape(-1, 3).sum(0)
        n = float(counts[2])
        # identical on every rank already; sync_dist only silences Lightning's DDP warning
        pl_module.log("val/mc_acc", float(counts[0]) / n, sync_dist=True)
        pl_module.log("val/mc_acc_norm", float(counts[1]) / n, sync_dist=True)


def heatmap_figure(maps: torch.Tensor, labels: list[str] | None = None) -> Any:
    """A grid of (T, T) heat maps, one per head; rows are queries, columns keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_head, t = maps.shape[0], maps.shape[-1]
    cols = min(n_head, 4)
    rows = (n_head + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= n_head:
            ax.axis("off")
            continue
        ax.imshow(maps[h].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {h}", fontsize=8)
        if labels is not None and t <= 32:
            shown = [repr(s)[1:-1] for s in labels]
            ax.set_xticks(range(t), shown, rotation=90, fontsize=5)
            ax.set_yticks(range(t), shown, fontsize=5)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return fig


class GracefulShutdown(L.Callback):
    """SIGTERM or a first Ctrl-C: finish the current batch, checkpoint, stop cleanly.

    The checkpoint goes to ``dirpath/filename`` (written to a temporary file, then renamed) and
    the command to resume from it is printed. A second Ctrl-C interrupts at once (Lightning's
    own KeyboardInterrupt handling). Handlers are installed for the training run only, and only
    in the main thread (signal handlers cannot be set elsewhere).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "interrupted.ckpt",
        command: str = "llm train",
    ) -> None:
        self.dirpath = dirpath
        self.filename = filename
        self.command = command  # the verb the resume hint names (llm train, llm finetune)
        self.signum: int | None = None
        self.ckpt_path: str | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            self._restore()
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\nReceived {signal.Signals(signum).name}: stopping after this batch "
            "and saving a checkpoint (Ctrl-C again to abort)",
            file=sys.stderr,
            flush=True,
        )

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handler:
                signal.signal(signum, previous)
        self._previous = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signum, self.ckpt_path = None, None
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handler)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        stop = self.signum is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        folder = Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints")
        path = folder / self.filename
        tmp = folder / f".{self.filename}.tmp"
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, path)
            self.ckpt_path = str(path)
            print(resume_message(path, command=self.command), file=sys.stderr, flush=True)
        trainer.strategy.barrier("graceful_shutdown")
        trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()


def resume_message(
    path: str | os.PathLike[str],
    overrides: list[str] | None = None,
    command: str = "llm train",
) -> str:
    """How to resume from ``path``: this run's overrides with ``ckpt_path`` replaced.

    The overrides are the job's own (Hydra's ``overrides.task``: a sweep job's values, not the
    sweep's lists); the run folder is pinned so the resumed run continues in the same one.
    """
    if overrides is None:
        overrides = _job_overrides()
    args = [a for a in overrides if a.split("=", 1)[0].lstrip("+~") != "ckpt_path"]
    quoted = [shlex.quote(a) for a in [f"ckpt_path={path}", *args]]
    cmd = " ".join([command, *quoted])
    return f"Checkpoint saved to {path}\nResume with: {cmd}"


def _job_overrides() -> list[str]:
    """This job's overrides (a sweep job's own values) and its run folder, or the bare argv."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return sys.argv[1:]
    hydra_cfg = HydraConfig.get()
    pinned = [o for o in hydra_cfg.overrides.task if not str(o).startswith("hydra.run.dir=")]
    return [*map(str, pinned), f"hydra.run.dir={hydra_cfg.runtime.output_dir}"]
