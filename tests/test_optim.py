"""The optimizer's weight-decay split and the learning-rate schedules."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import ROOT
from omegaconf import OmegaConf
from torch import nn

from llm.training.optim import build_optimizer, build_scheduler, lr_at, param_groups

LR, MIN_LR, WARMUP, DECAY = 1e-3, 1e-4, 10, 100
# conf/optim/adamw.yaml (the defaults' one home) with a short schedule
OPTIM = {
    **OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "optim" / "adamw.yaml")),  # type: ignore[dict-item]
    **{
        "lr": LR,
        "min_lr": MIN_LR,
        "weight_decay": 0.1,
        "warmup_steps": WARMUP,
        "decay_steps": DECAY,
    },
}


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
    opt = build_optimizer(_Net(), {**OPTIM, "betas": [0.9, 0.99], "eps": 1e-8})
    assert isinstance(opt, torch.optim.AdamW)
    assert len(opt.param_groups) == 2
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)
    assert opt.defaults["foreach"] is True
    assert not opt.defaults["fused"]


def test_cosine_schedule_matches_lr_at() -> None:
    net = _Net()
    opt = build_optimizer(net, OPTIM)
    sched = build_scheduler(opt, OPTIM, max_steps=None)
    for step in range(DECAY + 5):
        expected = lr_at(step, LR, MIN_LR, WARMUP, DECAY)
        assert math.isclose(opt.param_groups[0]["lr"], expected, rel_tol=1e-9)
        assert math.isclose(opt.param_groups[1]["lr"], expected, rel_tol=1e-9)
        opt.step()
        sched.step()


# --- schedules: the rate at the ends of each phase ------------------------------------------------


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "linear", "constant"])
def test_schedules_share_the_warmup(schedule: str) -> None:
    assert lr_at(0, LR, MIN_LR, WARMUP, DECAY, schedule) == pytest.approx(LR / (WARMUP + 1))
    assert lr_at(WARMUP, LR, MIN_LR, WARMUP, DECAY, schedule) == pytest.approx(LR)


def test_linear_decays_in_a_straight_line() -> None:
    at = lambda s: lr_at(s, LR, MIN_LR, WARMUP, DECAY, "linear")
    assert at(55) == pytest.approx((LR + MIN_LR) / 2)  # halfway between warmup and decay_steps
    assert at(DECAY) == pytest.approx(MIN_LR) and at(5 * DECAY) == pytest.approx(MIN_LR)
    assert at(30) - at(31) == pytest.approx(at(80) - at(81))


def test_wsd_is_stable_then_decays_over_the_last_fraction() -> None:
    at = lambda s, f=0.2: lr_at(s, LR, MIN_LR, WARMUP, DECAY, "wsd", f)
    assert at(WARMUP) == at(50) == at(80) == pytest.approx(LR)  # stable until 100 - 20
    assert at(90) == pytest.approx((LR + MIN_LR) / 2)
    assert at(DECAY) == pytest.approx(MIN_LR) and at(3 * DECAY) == pytest.approx(MIN_LR)
    assert at(49, 0.5) == pytest.approx(LR) and at(75, 0.5) == pytest.approx((LR + MIN_LR) / 2)
    assert at(5, 1.0) < LR and at(WARMUP, 1.0) == pytest.approx(LR)  # decay starts after warmup


def test_constant_stays_at_lr() -> None:
    for step in (WARMUP, DECAY, 10 * DECAY):
        assert lr_at(step, LR, MIN_LR, WARMUP, DECAY, "constant") == pytest.approx(LR)


@pytest.mark.parametrize("schedule", ["wsd", "linear", "constant"])
def test_scheduler_follows_the_configured_schedule(schedule: str) -> None:
    o = {**OPTIM, "schedule": schedule, "decay_steps": None}
    opt = build_optimizer(_Net(), o)
    sched = build_scheduler(opt, o, max_steps=60)  # decay_steps null: the trainer's max_steps
    for step in range(70):
        assert opt.param_groups[0]["lr"] == pytest.approx(
            lr_at(step, LR, MIN_LR, WARMUP, 60, schedule)
        )
        opt.step()
        sched.step()


def test_bad_schedule_settings_are_refused() -> None:
    opt = build_optimizer(_Net(), OPTIM)
    with pytest.raises(ValueError, match=r"optim.schedule='step'.*cosine.*wsd"):
        build_scheduler(opt, {**OPTIM, "schedule": "step"}, 10)
    with pytest.raises(
        ValueError, match=r"optim.decay_fraction=0.0: must be a finite number > 0.0 and <= 1.0"
    ):
        build_scheduler(opt, {**OPTIM, "schedule": "wsd", "decay_fraction": 0.0}, 10)
    with pytest.raises(ValueError, match=r"optim.name='sgd'.*adamw.*muon"):
        build_optimizer(_Net(), {**OPTIM, "name": "sgd"})
