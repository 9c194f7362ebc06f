"""The Lightning path is nanoGPT's training loop: same init and batches give the same weights.

nanoGPT's train.py update is written out by hand here (AdamW over its dim >= 2 decay split,
its warmup + cosine `get_lr` set before each step, `clip_grad_norm_(1.0)`, `zero_grad`) and
run against `GPTLitModule` under the Trainer that `experiment=shakespeare_char_cpu` composes.
Any difference in optimizer, schedule, clipping, loss or step order shows up in the weights.
"""

from __future__ import annotations

import copy
import math

import hydra
import pytest
import torch
from helpers import compose
from torch.utils.data import DataLoader

from llm.training.module import GPTLitModule

pytestmark = pytest.mark.slow  # 120 steps per run, several runs

STEPS = 120  # past the recipe's 100 warmup steps, into the cosine decay


def _nanogpt_lr(it: int, lr: float, min_lr: float, warmup: int, decay: int) -> float:
    """nanoGPT's train.py get_lr, verbatim in behaviour."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay:
        return min_lr
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def _batches(block: int, batch: int) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """nanoGPT's get_batch (random offsets, with replacement) into a 65-symbol stream.

    A pattern with 30% noise: learnable, so early gradients are large enough to be clipped,
    but never memorised (at near-zero gradients Adam's normalised steps would amplify float
    rounding until two equal loops drift apart).
    """
    g = torch.Generator().manual_seed(1)
    vocab = 65
    data = torch.arange(20_000) * 7 % vocab
    noise = torch.rand(len(data), generator=g) < 0.3
    data[noise] = torch.randint(vocab, (int(noise.sum()),), generator=g)
    out = []
    for _ in range(STEPS):
        ix = torch.randint(len(data) - block, (batch,), generator=g)
        out.append(
            (
                torch.stack([data[i : i + block] for i in ix]),
                torch.stack([data[i + 1 : i + 1 + block] for i in ix]),
            )
        )
    return vocab, out


def _run_lightning(
    module: GPTLitModule, batches: list, overrides: list[str], tmp_path
) -> torch.nn.Module:
    cfg = compose("train", ["experiment=shakespeare_char_cpu", *overrides])
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        max_steps=STEPS,
        limit_val_batches=0,
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))
    assert trainer.global_step == STEPS
    return module.model


def _setup() -> tuple[GPTLitModule, torch.nn.Module, list]:
    cfg = compose("train", ["experiment=shakespeare_char_cpu"])
    # the recipe's optimizer, schedule, clipping and batch size; a shallower model keeps it fast
    model_cfg = {k: v for k, v in cfg.model.items() if k != "_target_"}
    model_cfg.update(n_layer=2, block_size=32)
    vocab, batches = _batches(model_cfg["block_size"], int(cfg.data.batch_size))
    torch.manual_seed(0)
    # the first STEPS steps of the 2,000-step recipe: the schedule decays over the recipe's
    # max_steps, not over the STEPS at which the test's trainer stops
    optim = {**cfg.optim, "decay_steps": int(cfg.trainer.max_steps)}
    module = GPTLitModule(model={**model_cfg, "vocab_size": vocab}, optim=optim)
    reference = copy.deepcopy(module.model)

    o = cfg.optim
    params = [p for p in reference.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=o.lr,
        betas=tuple(o.betas),
    )
    clip = cfg.trainer.gradient_clip_val
    decay = o.decay_steps or cfg.trainer.max_steps  # nanoGPT's lr_decay_iters = max_iters
    assert decay == 2000
    clipped = 0
    for it, (x, y) in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = _nanogpt_lr(it, o.lr, o.min_lr, o.warmup_steps, decay)
        _, loss = reference(x, y)
        loss.backward()
        clipped += int(torch.nn.utils.clip_grad_norm_(reference.parameters(), clip) > clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert clipped > 0  # the clip is exercised
    return module, reference, batches


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sb = b.state_dict()
    return max((v - sb[k]).abs().max().item() for k, v in a.state_dict().items())


@pytest.fixture(scope="module")
def setup() -> tuple[GPTLitModule, torch.nn.Module, list]:
    return _setup()


def test_recipe_under_lightning_equals_nanogpt_loop(setup, tmp_path) -> None:
    module, reference, batches = setup
    start = copy.deepcopy(module.model)
    trained = _run_lightning(copy.deepcopy(module), batches, [], tmp_path)
    assert _max_diff(start, reference) > 1e-2  # the weights did move
    assert _max_diff(trained, reference) < 1e-5


@pytest.mark.parametrize(
    "override", ["trainer.gradient_clip_val=null", "optim.betas=[0.9,0.95]", "optim.lr=9e-4"]
)
def test_parity_check_sees_a_changed_recipe(setup, tmp_path, override: str) -> None:
    """The comparison above is sharp: one changed setting moves the weights well past it."""
    module, reference, batches = setup
    cfg = compose("train", ["experiment=shakespeare_char_cpu", override])
    changed = copy.deepcopy(module)
    changed.hparams["optim"].update({k: v for k, v in cfg.optim.items() if k != "_target_"})
    trained = _run_lightning(changed, batches, [override], tmp_path)
    assert _max_diff(trained, reference) > 1e-4
