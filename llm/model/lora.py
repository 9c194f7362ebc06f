"""LoRA (Hu et al. 2021): train a low-rank update B @ A next to frozen Linear weights.

`LoRALinear` subclasses `nn.Linear`, so the frozen base keeps its state-dict names
(`...c_attn.weight`): pretrained weights load into a LoRA model unchanged and merging is a
pure state-dict operation (`lora_state_dict_merged`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm import checks

DEFAULT_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class LoRALinear(nn.Linear):
    """y = x W^T + b + (alpha / r) * dropout(x) A^T B^T; B starts at zero so y is unchanged."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if r <= 0:
            raise ValueError(f"LoRA rank r must be a positive int, got {r}")
        self.r = int(r)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.r
        self.lora_A = nn.Parameter(torch.empty(self.r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, self.r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear / litgpt / peft
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapter_on = True  # off: the base layer alone (a preference task's reference)

    @classmethod
    def from_linear(cls, base: nn.Linear, r: int, alpha: float, dropout: float) -> LoRALinear:
        """Wrap an existing Linear, sharing (not copying) its weight and bias Parameters."""
        new = cls(
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            r=r,
            alpha=alpha,
            dropout=dropout,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        new.weight = base.weight
        new.bias = base.bias
        return new

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        if not self.adapter_on:
            return out
        lora = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return out + lora * self.scaling

    def merged_weight(self) -> Tensor:
        return self.weight + (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}"


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` as its frozen base weights compute, adapters skipped: the reference model of
    DPO/GRPO under LoRA without a second copy of the weights in memory."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.adapter_on = False
    try:
        yield model
    finally:
        for m in layers:
            m.adapter_on = True


def linear_names(model: nn.Module) -> list[str]:
    """Distinct Linear layer names with block indices collapsed (`h.*.attn.c_attn`)."""
    out: dict[str, None] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            parts = ["*" if p.isdigit() else p for p in name.split(".")]
            out[".".join(parts)] = None
    return list(out)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
) -> list[str]:
    """Replace every Linear whose name ends with a target by a LoRALinear; freeze the rest.

    Returns the replaced module names. Raises if a target matches no layer, listing the
    available Linear names, so a typo does not silently train nothing.
    """
    targets = [str(t) for t in targets]
    if not targets:
        raise ValueError(f"lora.targets is empty; choose from {linear_names(model)}")
    found: dict[str, list[str]] = {t: [] for t in targets}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or isinstance(mod, LoRALinear):
            continue
        hit = [t for t in targets if _matches(name, t)]
        if not hit:
            continue
        if _is_tied(model, mod):
            raise ValueError(
                f"{name} shares its weight with the token embedding (tie_weights); LoRA on it "
                "could not be merged back. Drop it from lora.targets"
            )
        for t in hit:
            found[t].append(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear.from_linear(mod, r, alpha, dropout))
    missing = [t for t, names in found.items() if not names]
    if missing:
        raise ValueError(
            f"LoRA targets {missing} match no Linear layer; available: {linear_names(model)} "
            "(a target matches a layer name or its dotted suffix, e.g. 'attn.c_attn')"
        )
    mark_only_lora_trainable(model)
    return sorted({n for names in found.values() for n in names})


def _is_tied(model: nn.Module, linear: nn.Linear) -> bool:
    return any(isinstance(m, nn.Embedding) and m.weight is linear.weight for m in model.modules())


def mark_only_lora_trainable(model: nn.Module) -> None:
    """requires_grad only on lora_A / lora_B: the pretrained weights stay bit-identical."""
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name.rsplit(".", 1)[-1]


def count_params(module: nn.Module, trainable: bool | None = None) -> int:
    """Parameter count (shared Parameters once); trainable=True/False filters requires_grad."""
    return sum(
        p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable
    )


def lora_state_dict_merged(
    state_dict: Mapping[str, Tensor], scaling: float | Mapping[str, float]
) -> dict[str, Tensor]:
    """Fold every `X.lora_B @ X.lora_A * scaling` into `X.weight` and drop the lora keys.

    `scaling` is alpha / r (one number, or per layer prefix). Works on any module's state
    dict (GPT, classifier, Lightning `state_dict`), so merging needs no model instance.
    """
    out = {k: v for k, v in state_dict.items() if not k.rsplit(".", 1)[-1].startswith("lora_")}
    for key, a in state_dict.items():
        if not key.endswith(".lora_A"):
            continue
        prefix = key[: -len(".lora_A")]
        b = state_dict[prefix + ".lora_B"]
        s = scaling[prefix] if isinstance(scaling, Mapping) else scaling
        w = out[prefix + ".weight"]
        out[prefix + ".weight"] = (w.float() + (b.float() @ a.float()) * s).to(w.dtype)
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """A deep copy of `model` with every LoRALinear folded into a plain nn.Linear."""
    model = copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, LoRALinear):
            continue
        plain = nn.Linear(
            mod.in_features,
            mod.out_features,
            bias=mod.bias is not None,
            device=mod.weight.device,
            dtype=mod.weight.dtype,
        )
        with torch.no_grad():
            plain.weight.copy_(mod.merged_weight())
            if mod.bias is not None:
                plain.bias.copy_(mod.bias)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, plain)
    for p in model.parameters():
        p.requires_grad = True
    return model


def lora_config(cfg: Any) -> dict[str, Any] | None:
    """The `lora` config group (Hydra or dict) as plain hparams, or None when disabled."""
    if cfg is None:
        return None
    if not isinstance(cfg, Mapping):
        raise ValueError(f"lora must be a mapping (conf/lora/*.yaml), got {cfg!r}")
    if not cfg.get("enabled", True):
        return None
    missing = [k for k in ("r", "alpha", "dropout", "targets") if k not in cfg]
    if missing:
        raise ValueError(
            f"lora lacks {['lora.' + k for k in missing]} (see conf/lora/default.yaml)"
        )
    return {
        "r": checks.integer("lora.r", cfg["r"], minimum=1, example=8),
        "alpha": checks.number("lora.alpha", cfg["alpha"], above=0.0, example=16),
        "dropout": checks.number("lora.dropout", cfg["dropout"], minimum=0.0, below=1.0),
        "targets": [str(t) for t in cfg["targets"]],
    }
