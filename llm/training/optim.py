"""AdamW with nanoGPT's weight-decay split and warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed and an undecayed group.

    Matrices (dim >= 2: linear weights, embeddings) are decayed; biases and norm gains
    (dim < 2) are not, since shrinking them towards zero only hurts (as in nanoGPT).
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for p in model.parameters():  # parameters() already de-duplicates tied weights
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: Sequence[float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over `param_groups`; fused kernel when every parameter is on CUDA.

    `fused=None` picks automatically: the fused implementation is only available (and
    fastest) on CUDA, elsewhere the multi-tensor `foreach` path is used.
    """
    groups = param_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    if fused is None:
        fused = bool(params) and all(p.is_cuda for p in params)
    kwargs: dict[str, Any] = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kwargs)


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """nanoGPT's schedule: linear warmup, cosine decay to `min_lr`, then flat at `min_lr`.

    Warmup uses `(step + 1) / (warmup_steps + 1)` so the very first step already moves
    the weights; the peak `lr` is reached exactly at `step == warmup_steps`.
    """
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return min_lr if step > warmup_steps else lr
    ratio = (step - warmup_steps) / (decay_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return min_lr + coeff * (lr - min_lr)


def cosine_schedule(
    optimizer: torch.optim.Optimizer,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    decay_steps: int,
) -> LambdaLR:
    """`lr_at` as a per-step `LambdaLR` (the factor is relative to the optimizer's `lr`)."""
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")

    def factor(step: int) -> float:
        return lr_at(step, lr, min_lr, warmup_steps, decay_steps) / lr

    return LambdaLR(optimizer, factor)
