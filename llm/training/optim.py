"""Optimizers and learning-rate schedules, built from the `optim` settings (conf/optim/*.yaml).

`optim=adamw`: AdamW with nanoGPT's weight-decay split. `optim=muon`: torch's Muon for the 2-D
matrices inside the transformer blocks and AdamW for the rest (embeddings, head, norms, biases),
as one optimizer. `optim.schedule`: nanoGPT's warmup + cosine, wsd, linear or constant.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from llm import checks

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd", "linear", "constant")


def check_optim(optim: Mapping[str, Any]) -> None:
    """Refuse settings no run can use, naming the ``optim.<key>`` (before any data is read)."""
    missing = [
        k
        for k in ("name", "lr", "min_lr", "weight_decay", "betas", "eps", "warmup_steps")
        if k not in optim
    ]
    if missing:
        raise checks.SettingError(
            f"optim lacks {['optim.' + k for k in missing]}: compose it from conf/optim/"
        )
    checks.choice("optim.name", optim["name"], OPTIMIZERS)
    lr = checks.number("optim.lr", optim["lr"], above=0.0, example=1e-3)
    min_lr = checks.number("optim.min_lr", optim["min_lr"], minimum=0.0, example=1e-4)
    assert lr is not None and min_lr is not None
    if min_lr > lr:
        raise checks.SettingError(
            f"optim.min_lr={min_lr} is above optim.lr={lr}: the schedule decays from lr down "
            f"to min_lr; set optim.min_lr <= {lr} (e.g. lr / 10)"
        )
    checks.number("optim.weight_decay", optim["weight_decay"], minimum=0.0, example=0.1)
    betas = optim["betas"]
    if not isinstance(betas, Sequence) or isinstance(betas, str) or len(betas) != 2:
        raise checks.SettingError(f"optim.betas={betas!r}: must be two numbers, e.g. [0.9,0.95]")
    for i, beta in enumerate(betas):
        checks.number(f"optim.betas[{i}]", beta, minimum=0.0, below=1.0, example=0.95)
    checks.number("optim.eps", optim["eps"], above=0.0, example=1e-8)
    checks.integer("optim.warmup_steps", optim["warmup_steps"], minimum=0, example=100)
    decay = optim.get("decay_steps")
    checks.integer("optim.decay_steps", decay, minimum=1, nullable=True, example=2000)
    checks.choice("optim.schedule", optim.get("schedule", "cosine"), SCHEDULES)
    fraction = optim.get("decay_fraction", 0.2)
    checks.number("optim.decay_fraction", fraction, above=0.0, maximum=1.0, example=0.2)
    if optim["name"] == "muon":
        m = optim.get("muon") or {}
        checks.number("optim.muon.lr", m.get("lr"), above=0.0, example=0.02)
        checks.number("optim.muon.momentum", m.get("momentum"), minimum=0.0, below=1.0)
        checks.integer("optim.muon.ns_steps", m.get("ns_steps", 5), minimum=1, example=5)


def _trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """Trainable parameters, each once (a tied weight appears under two names)."""
    out, seen = [], set()
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _decay_split(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [  # named: `schedule_of` tells which learning-rate curve a group follows
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def schedule_of(group: Mapping[str, Any]) -> str:
    """The learning-rate curve a parameter group follows, by its optimizer: "adamw" or "muon".

    All of one optimizer's groups share one peak lr and one schedule, so one curve each
    (``train/lr/adamw``, ``train/lr/muon``) shows them all; one per group drew the same curve
    twice.
    """
    return "muon" if group.get("name") == "muon" else "adamw"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed and an undecayed group.

    Matrices (dim >= 2: linear weights, embeddings) are decayed; biases and norm gains
    (dim < 2) are not, since shrinking them towards zero only hurts (as in nanoGPT).
    """
    return _decay_split(_trainable(model.parameters()), weight_decay)


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The trainable 2-D weights inside the transformer blocks: what Muon is for. Embeddings,
    the LM head (tied or not), task heads and LoRA's low-rank adapters go to AdamW."""
    from llm.model import Block

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    return _trainable(
        p
        for b in blocks
        for name, p in b.named_parameters()
        if p.dim() == 2 and not name.rsplit(".", 1)[-1].startswith("lora_")
    )


def _adamw(groups: list[dict[str, Any]], optim: Mapping[str, Any]) -> torch.optim.AdamW:
    """Fused kernel when every parameter is on CUDA (`fused: null`), else multi-tensor foreach."""
    fused = optim.get("fused")
    if fused is None:
        params = [p for g in groups for p in g["params"]]
        fused = bool(params) and all(p.is_cuda for p in params)
    kwargs: dict[str, Any] = {"fused": True} if fused else {"foreach": True}
    betas = tuple(optim["betas"])
    return torch.optim.AdamW(groups, lr=optim["lr"], betas=betas, eps=optim["eps"], **kwargs)


def newton_schulz(
    grad: Tensor,
    coefficients: tuple[float, float, float],
    steps: int,
    eps: float,
    dtype: torch.dtype,
) -> Tensor:
    """torch.optim.Muon's orthogonalisation (its `_zeropower_via_newtonschulz`, step for step),
    run in `dtype` instead of always bfloat16."""
    a, b, c = coefficients
    x = grad.to(dtype)
    if grad.size(0) > grad.size(1):
        x = x.T
    x = x.div(x.norm().clamp(min=eps))  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if grad.size(0) > grad.size(1) else x


def muon_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's shape-dependent learning rate for a weight of ``shape``: torch's own scaling
    (``adjust_lr_fn``: "original", sqrt(max(1, rows / cols)), or "match_rms_adamw",
    0.2 * sqrt(max(rows, cols))), so the step stays torch's.

    torch keeps it private (``torch.optim._muon._adjust_lr``): this is the one place that
    reaches for it, and tests/test_muon.py fails with a message naming it when torch changes it.
    """
    return _torch_adjust_lr()(lr, adjust_lr_fn, shape)


@functools.cache
def _torch_adjust_lr() -> Callable[[float, str | None, torch.Size], float]:
    try:
        from torch.optim._muon import _adjust_lr
    except ImportError as e:
        raise RuntimeError(
            f"torch {torch.__version__} has no torch.optim._muon._adjust_lr, the lr scaling "
            "optim=muon reuses: use a torch that has it, or write its formula into "
            "llm.training.optim.muon_lr"
        ) from e
    return _adjust_lr


class Muon(torch.optim.Muon):
    """torch.optim.Muon with the Newton-Schulz dtype chosen: `ns_dtype` None picks float32 on
    CPU and bfloat16 (torch's choice) elsewhere.

    torch always casts to bfloat16, which a CPU without bfloat16 matrix units runs 16-50x slower
    than float32 (scripts/bench_muon.py); torch has no argument for it, so `step` is torch's
    `_single_tensor_muon` written out with the dtype as a parameter. With bfloat16 it computes
    exactly what torch's does (tests/test_muon.py checks it bit for bit).
    """

    def __init__(self, params: Any, ns_dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            bufs: list[Tensor] = []
            self._init_group(group, params, grads, bufs)
            lr, momentum = float(group["lr"]), group["momentum"]
            for p, g, buf in zip(params, grads, bufs, strict=True):
                buf.lerp_(g, 1 - momentum)
                update = g.lerp(buf, momentum) if group["nesterov"] else buf
                dtype = self.ns_dtype or (
                    torch.float32 if p.device.type == "cpu" else torch.bfloat16
                )
                update = newton_schulz(
                    update, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype
                )
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-muon_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


class CombinedOptimizer(torch.optim.Optimizer):
    """Optimizers over disjoint parameters acting as one, for what expects one optimizer:
    Lightning's automatic optimization and gradient clipping, an LR scheduler, checkpoints.

    Its param_groups are theirs (the same dicts, so a scheduler's lr reaches them) and its
    state holds all of theirs, so state_dict / load_state_dict cover every one.
    """

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = list(optimizers)
        # the base class refuses a parameter in two groups: each is in exactly one optimizer
        super().__init__([g for o in self.optimizers for g in o.param_groups], defaults={})
        self._share()

    def _share(self) -> None:
        groups = iter(self.param_groups)
        for o in self.optimizers:
            o.param_groups = [next(groups) for _ in o.param_groups]
            o.state = self.state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._share()  # loading replaced the group dicts and the state


def build_optimizer(model: nn.Module, optim: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimizer `optim` describes (conf/optim/*.yaml) over `model`'s trainable parameters.

    `name`: adamw, or muon: Muon (the `muon` settings) on `hidden_matrices`, AdamW on every
    other parameter; the AdamW groups come first, so param_groups[0] is AdamW's decayed group
    under either.
    """
    check_optim(optim)
    name = optim["name"]
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optim.name={name!r}; choose one of {list(OPTIMIZERS)}")
    params = _trainable(model.parameters())
    hidden = hidden_matrices(model) if name == "muon" else []
    ids = {id(p) for p in hidden}
    rest = [p for p in params if id(p) not in ids]
    parts: list[torch.optim.Optimizer] = []
    if rest:
        parts.append(_adamw(_decay_split(rest, optim["weight_decay"]), optim))
    if hidden:
        m = dict(optim.get("muon") or {})
        dtype = m.pop("ns_dtype", None)
        muon = [{"params": hidden, "name": "muon"}]
        parts.append(Muon(muon, ns_dtype=getattr(torch, dtype) if dtype else None, **m))
    if not parts:
        raise ValueError("the model has no trainable parameters")
    return parts[0] if len(parts) == 1 else CombinedOptimizer(*parts)


def lr_at(
    step: int,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    decay_steps: int,
    schedule: str = "cosine",
    decay_fraction: float = 0.2,
) -> float:
    """The learning rate at `step`: linear warmup to `lr`, then by `schedule`

    - cosine (nanoGPT): cosine decay to `min_lr` at `decay_steps`, then flat;
    - linear: the same with a straight line;
    - wsd (warmup-stable-decay): flat at `lr`, then a straight line to `min_lr` over the last
      `decay_fraction` of `decay_steps`, then flat;
    - constant: flat at `lr`.

    Warmup uses `(step + 1) / (warmup_steps + 1)` so the very first step already moves
    the weights; the peak `lr` is reached exactly at `step == warmup_steps`.
    """
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return lr
    if step >= decay_steps:
        return min_lr if step > warmup_steps else lr
    start = warmup_steps
    if schedule == "wsd":
        start = max(warmup_steps, decay_steps - decay_fraction * decay_steps)
        if step < start:
            return lr
    ratio = (step - start) / (decay_steps - start)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio)) if schedule == "cosine" else 1.0 - ratio
    return min_lr + coeff * (lr - min_lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: Mapping[str, Any], max_steps: int | None
) -> LambdaLR:
    """`lr_at` as a per-step LambdaLR; decays until `optim.decay_steps`, else `max_steps`.

    Each group's lr is its own base lr times lr_at(...) / optim.lr, so Muon's and AdamW's
    groups follow one shape, each from its own peak.
    """
    check_optim(optim)
    lr, min_lr, warmup = float(optim["lr"]), float(optim["min_lr"]), int(optim["warmup_steps"])
    schedule, fraction = optim["schedule"], float(optim["decay_fraction"])
    decay = optim.get("decay_steps") or max_steps
    decay = int(decay) if decay and decay > 0 else max(warmup, 1)

    def factor(step: int) -> float:
        return lr_at(step, lr, min_lr, warmup, decay, schedule, fraction) / lr

    return LambdaLR(optimizer, factor)
