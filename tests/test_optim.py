"""The optimizer's weight-decay split and the warmup + cosine schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from llm.training.optim import build_optimizer, cosine_schedule, lr_at, param_groups

LR, MIN_LR, WARMUP, DECAY = 1e-3, 1e-4, 10, 100


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight  # tied, must appear once
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_lr_warmup_starts_small_and_positive() -> None:
    assert lr_at(0, LR, MIN_LR, WARMUP, DECAY) == pytest.approx(LR / (WARMUP + 1))
    assert 0 < lr_at(0, LR, MIN_LR, WARMUP, DECAY) < LR


def test_lr_peaks_at_end_of_warmup() -> None:
    assert lr_at(WARMUP, LR, MIN_LR, WARMUP, DECAY) == pytest.approx(LR)
    warm = [lr_at(s, LR, MIN_LR, WARMUP, DECAY) for s in range(WARMUP + 1)]
    assert all(a < b for a, b in itertools.pairwise(warm))


def test_lr_reaches_min_and_stays() -> None:
    assert lr_at(DECAY, LR, MIN_LR, WARMUP, DECAY) == pytest.approx(MIN_LR)
    for step in (DECAY + 1, DECAY + 50, 10 * DECAY):
        assert lr_at(step, LR, MIN_LR, WARMUP, DECAY) == pytest.approx(MIN_LR)


def test_lr_cosine_decay_is_monotone_and_halfway_is_mean() -> None:
    decay = [lr_at(s, LR, MIN_LR, WARMUP, DECAY) for s in range(WARMUP, DECAY + 1)]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    mid = (WARMUP + DECAY) // 2
    assert lr_at(mid, LR, MIN_LR, WARMUP, DECAY) == pytest.approx((LR + MIN_LR) / 2)


def test_lr_without_warmup() -> None:
    assert lr_at(0, LR, MIN_LR, 0, DECAY) == pytest.approx(LR)
    assert lr_at(DECAY, LR, MIN_LR, 0, DECAY) == pytest.approx(MIN_LR)


def test_param_groups_split_by_dim() -> None:
    net = _Net()
    decay, no_decay = param_groups(net, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}
    assert ids(decay["params"]) == ids([net.emb.weight, net.fc.weight])
    assert ids(no_decay["params"]) == ids([net.ln.weight, net.ln.bias, net.fc.bias])
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])


def test_build_optimizer_cpu_uses_foreach() -> None:
    opt = build_optimizer(_Net(), lr=LR, weight_decay=0.1, betas=[0.9, 0.99], eps=1e-8)
    assert isinstance(opt, torch.optim.AdamW)
    assert len(opt.param_groups) == 2
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)
    assert opt.defaults["foreach"] is True
    assert not opt.defaults["fused"]


def test_cosine_schedule_matches_lr_at() -> None:
    net = _Net()
    opt = build_optimizer(net, lr=LR)
    sched = cosine_schedule(opt, LR, MIN_LR, WARMUP, DECAY)
    for step in range(DECAY + 5):
        expected = lr_at(step, LR, MIN_LR, WARMUP, DECAY)
        assert math.isclose(opt.param_groups[0]["lr"], expected, rel_tol=1e-9)
        assert math.isclose(opt.param_groups[1]["lr"], expected, rel_tol=1e-9)
        opt.step()
        sched.step()
