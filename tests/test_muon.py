"""optim=muon: torch's Muon on the blocks' matrices, AdamW on the rest, as one optimizer that
Lightning, gradient clipping, LR schedulers and checkpoints take as any other."""

from __future__ import annotations

import io
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from llm.model import GPT, GPTConfig
from llm.training.module import GPTLitModule
from llm.training.optim import (
    CombinedOptimizer,
    Muon,
    build_optimizer,
    build_scheduler,
    hidden_matrices,
    muon_lr,
    newton_schulz,
)

CONF = Path(__file__).resolve().parents[1] / "conf"
V = 37
MODEL = dict(vocab_size=V, block_size=16, n_layer=2, n_head=4, n_embd=32, n_kv_head=2,
             norm="rmsnorm", mlp="swiglu", pos_encoding="rope", tie_weights=False)  # fmt: skip


def muon_settings(**kw: object) -> dict:
    with initialize_config_dir(config_dir=str(CONF / "optim"), version_base="1.3"):
        o = OmegaConf.to_container(compose("muon"), resolve=True)
    assert isinstance(o, dict)
    return {**o, "warmup_steps": 2, "decay_steps": 10, **kw}


def gpt(**kw: object) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**MODEL, **kw}))  # type: ignore[arg-type]


def step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(seed))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_muon_yaml_composes_on_adamw() -> None:
    o = muon_settings()
    assert o["name"] == "muon" and o["schedule"] == "cosine" and o["lr"] == 6e-4
    assert o["muon"] == {"lr": 0.02, "momentum": 0.95, "nesterov": True, "weight_decay": 0.0,
                         "adjust_lr_fn": "original", "ns_steps": 5, "ns_dtype": None}  # fmt: skip


@pytest.mark.parametrize("tie", [True, False])
def test_each_parameter_in_exactly_one_group(tie: bool) -> None:
    model = gpt(tie_weights=tie, bias=True)
    opt = build_optimizer(model, muon_settings())
    assert isinstance(opt, CombinedOptimizer)
    adamw, muon = opt.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon)
    grouped = [p for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert muon_names == {
        f"h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    adamw_names = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert {
        "embed.wte.weight",
        "ln_f.weight",
        "h.0.ln_1.weight",
        "h.1.attn.c_attn.bias",
    } <= adamw_names
    assert ("lm_head.weight" in adamw_names) == (not tie)  # tied: it is wte, listed once
    assert opt.param_groups[0]["lr"] == 6e-4 and opt.param_groups[-1]["lr"] == 0.02
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0


def test_task_heads_and_frozen_weights_stay_out_of_muon() -> None:
    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.head = gpt(), nn.Linear(32, 3)

    clf = Classifier()
    clf.model.h[0].requires_grad_(False)
    hidden = {id(p) for p in hidden_matrices(clf)}
    assert id(clf.head.weight) not in hidden and id(clf.model.h[0].attn.c_attn.weight) not in hidden
    assert len(hidden) == 4  # block 1's four matrices
    only_adamw = build_optimizer(nn.Linear(3, 3), muon_settings())  # nothing for Muon: plain AdamW
    assert isinstance(only_adamw, torch.optim.AdamW)


def test_muon_lr_is_torchs_scaling_as_we_know_it() -> None:
    """muon_lr wraps torch's private torch.optim._muon._adjust_lr; a torch that moved or
    changed it fails here, by name, not as a slightly different training run."""
    shapes = [torch.Size([96, 32]), torch.Size([32, 96]), torch.Size([64, 64])]
    expected = {
        (fn, tuple(s)): 0.02 * factor
        for s in shapes
        for fn, factor in [
            ("original", math.sqrt(max(1, s[0] / s[1]))),
            (None, math.sqrt(max(1, s[0] / s[1]))),  # None is "original"
            ("match_rms_adamw", 0.2 * math.sqrt(max(s[0], s[1]))),
        ]
    }
    try:
        got = {(fn, shape): muon_lr(0.02, fn, torch.Size(shape)) for fn, shape in expected}
    except Exception as e:  # moved, renamed, another signature
        pytest.fail(
            f"torch {torch.__version__} changed torch.optim._muon._adjust_lr, which "
            f"llm.training.optim.muon_lr wraps ({type(e).__name__}: {e}): update muon_lr"
        )
    assert got == pytest.approx(expected, rel=1e-12), (
        f"torch {torch.__version__}'s torch.optim._muon._adjust_lr scales the lr differently "
        "now: update llm.training.optim.muon_lr (and this test's formulas) to match"
    )


def test_bfloat16_steps_are_torchs_muon_bit_for_bit() -> None:
    a, b = gpt(), gpt()
    ours = Muon(hidden_matrices(a), ns_dtype=torch.bfloat16, lr=0.02, weight_decay=0.1)
    theirs = torch.optim.Muon(hidden_matrices(b), lr=0.02, weight_decay=0.1)
    for seed in range(3):
        step(a, ours, seed)
        step(b, theirs, seed)
    sb = b.state_dict()
    assert all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def test_float32_on_cpu_orthogonalises_like_torch() -> None:
    coefficients = (3.4445, -4.7750, 2.0315)
    g = torch.randn(48, 16)
    x = newton_schulz(g, coefficients, 5, 1e-7, torch.float32)
    assert x.dtype == torch.float32 and x.shape == (48, 16)
    s = torch.linalg.svdvals(x)
    assert ((s > 0.5) & (s < 1.5)).all()  # roughly orthogonal: Muon's US'V^T, S' ~ U(0.5, 1.5)
    from torch.optim._muon import _zeropower_via_newtonschulz

    bf16 = _zeropower_via_newtonschulz(g, coefficients, 5, 1e-7).float()
    assert (x - bf16).abs().max() < 0.02  # the same up to bfloat16 rounding
    assert Muon([nn.Parameter(torch.randn(4, 4))]).ns_dtype is None  # picks float32 on CPU


def test_scheduler_scales_each_group_from_its_own_peak() -> None:
    o = muon_settings(min_lr=6e-5)
    opt = build_optimizer(gpt(), o)
    sched = build_scheduler(opt, o, max_steps=None)
    model_lrs = []
    for _ in range(12):
        model_lrs.append((opt.param_groups[0]["lr"], opt.param_groups[-1]["lr"]))
        opt.step()
        sched.step()
    assert model_lrs[2] == pytest.approx((6e-4, 0.02))  # end of warmup: both peaks
    assert model_lrs[10] == pytest.approx((6e-5, 0.002))  # decay_steps: both at min_lr / lr
    assert opt.optimizers[1].param_groups[0]["lr"] == opt.param_groups[-1]["lr"]  # same dicts


def test_state_dict_round_trip_resumes_exactly() -> None:
    o = muon_settings()
    model = gpt()
    opt = build_optimizer(model, o)
    sched = build_scheduler(opt, o, None)
    for seed in range(3):
        step(model, opt, seed)
        sched.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
               buf)  # fmt: skip
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    state = saved["opt"]["state"]
    assert any("momentum_buffer" in s for s in state.values())  # Muon's
    assert any("exp_avg_sq" in s for s in state.values())  # AdamW's

    resumed = gpt()
    resumed.load_state_dict(saved["model"])
    opt2 = build_optimizer(resumed, o)
    sched2 = build_scheduler(opt2, o, None)
    opt2.load_state_dict(saved["opt"])  # Lightning's order: build both, then load their states
    sched2.load_state_dict(saved["sched"])
    for seed in range(3, 6):
        step(model, opt, seed)
        sched.step()
        step(resumed, opt2, seed)
        sched2.step()
    sr = resumed.state_dict()
    assert all(torch.equal(v, sr[k]) for k, v in model.state_dict().items())
    assert opt2.optimizers[1].state is opt2.state  # the inner optimizers see the loaded state


def test_lightning_trains_with_muon(tmp_path: Path) -> None:
    """Automatic optimization, gradient clipping and the scheduler, then a checkpoint holding
    both optimizers' states."""
    module = GPTLitModule(model=MODEL, optim=muon_settings())
    data = torch.randint(0, V, (4, 2, 13), generator=torch.Generator().manual_seed(0))
    batches = [(b[:, :-1], b[:, 1:]) for b in data]
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, gradient_clip_val=1.0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    assert trainer.global_step == 4
    opt = trainer.optimizers[0]
    assert isinstance(opt, CombinedOptimizer)
    assert opt.param_groups[-1]["lr"] == pytest.approx(0.02 * opt.param_groups[0]["lr"] / 6e-4)
    moved = module.model.state_dict()
    assert not torch.equal(before["h.0.attn.c_attn.weight"], moved["h.0.attn.c_attn.weight"])
    assert not torch.equal(before["embed.wte.weight"], moved["embed.wte.weight"])
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    (state,) = ckpt["optimizer_states"]
    kinds = {k for s in state["state"].values() for k in s}
    assert {"momentum_buffer", "exp_avg", "exp_avg_sq"} <= kinds
    assert len(state["param_groups"]) == 3  # AdamW decay, AdamW no-decay, Muon
