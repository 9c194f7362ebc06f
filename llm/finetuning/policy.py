"""A language model tuned against a frozen copy of where it started: the reference of
preference tuning (DPO) and of reinforcement learning (GRPO's KL penalty)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from llm.model.lora import adapters_off, has_lora
from llm.training.module import GPTLitModule


class PolicyModule(GPTLitModule):
    """The policy is the GPT; its checkpoint is a language model's, which every loader reads as
    one (generate, chat, evaluate, init=), its task settings among the hyperparameters.

    The reference is the initial policy, frozen: with LoRA the same weights with the adapters
    off (no second copy in memory); otherwise a copy taken by `freeze_reference` once the init
    weights are in, kept out of the state dict: a resumed run takes it again from init=, the
    same weights.
    """

    _reference: nn.Module | None = None

    def freeze_reference(self) -> None:
        """Take the reference from the policy as it is now (the init weights)."""
        if not has_lora(self.model):
            ref = copy.deepcopy(self.model).eval().requires_grad_(False)
            self.__dict__["_reference"] = ref  # not a submodule: not saved, not optimized

    @torch.no_grad()
    def reference_logits(self, x: Tensor) -> Tensor:
        """The reference's logits (B, T, V), without dropout."""
        if has_lora(self.model):
            was = self.model.training
            with adapters_off(self.model):
                self.model.eval()
                logits = self.model(x)[0]
            self.model.train(was)
            return logits
        if self._reference is None:
            raise RuntimeError("the reference was never taken: call freeze_reference()")
        self._reference.to(x.device)
        return self._reference(x)[0]
