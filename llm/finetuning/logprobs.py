"""Log-probabilities of given tokens under a model: what preference and reward objectives
compare between the policy and its reference."""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE = -100  # a target that is not scored (prompt, padding), as in cross-entropy


def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """(B, T) log p(target) in float32; 0 where the target is IGNORE."""
    mask = targets != IGNORE
    picked = torch.gather(logits.float().log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1))
    return picked.squeeze(-1) * mask


def token_kl(policy_logits: Tensor, reference_logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over the scored positions of KL(policy || reference) between the two next-token
    distributions (the whole vocabulary, not a one-sample estimate)."""
    mask = targets != IGNORE
    p = policy_logits.float().log_softmax(-1)
    q = reference_logits.float().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)
