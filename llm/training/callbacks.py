"""TensorBoard-only callbacks: text samples and attention heat maps during validation.

They watch training qualitatively (does the model start to spell? do heads specialise?)
and do nothing unless the trainer's logger is a `TensorBoardLogger`.
"""

from __future__ import annotations

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
