"""The language-model task: next-token cross-entropy (pretraining, text and instruction
finetuning). What every task shares (model build, optimizer, checkpoint state) is `TaskModule`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from llm.prompts import check_template
from llm.training.task import TaskModule, check_finite, plain

__all__ = ["GPTLitModule", "check_finite", "plain"]


class GPTLitModule(TaskModule):
    """GPT + next-token loss; the tokenizer rides along for sampling.

    Args (beyond `TaskModule`'s):
        sample: the sampling settings used during training, recorded for later generation.
        template: how the model wants prompts rendered (`llm.prompts`): the instruct task's
            `task.template` ("alpaca" by default), "chat" for its tokenizer's chat template,
            None for a base model; `llm chat` reads it from the checkpoint.
        **task: a post-training task's own settings (DPO's, GRPO's), kept in the checkpoint;
            the weights stay a language model's, which every loader reads as one.
    """

    kind = "lm"

    def __init__(
        self,
        model: dict[str, Any],
        tokenizer: dict[str, Any] | None = None,
        optim: dict[str, Any] | None = None,
        compile: bool = False,
        sample: dict[str, Any] | None = None,
        lora: dict[str, Any] | None = None,
        template: str | None = None,
        **task: Any,
    ) -> None:
        super().__init__(
            model,
            tokenizer,
            optim,
            compile,
            lora,
            sample=sample,
            template=check_template(template),
            **task,
        )
        self._val_losses: list[Tensor] = []

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        return self.network(idx, targets)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        _, loss = self(x, y)
        assert loss is not None
        if self.logging_step():
            self.log_train({"train/loss": loss})
        return loss

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
