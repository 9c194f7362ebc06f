"""The model's hyperparameters, validated once so bad configs fail before any tensor is built."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

POS_ENCODINGS = ("learned", "sinusoidal", "rope")
ATTN_IMPLS = ("sdpa", "manual")


def _divisor_hint(n_embd: int, n_head: int) -> str:
    heads = [h for h in range(1, min(n_embd, 64) + 1) if n_embd % h == 0]
    near = sorted(heads, key=lambda h: abs(h - n_head))[:3]
    widths = sorted({max(n_head, (n_embd // n_head) * n_head), (n_embd // n_head + 1) * n_head})
    return f"try n_head in {sorted(near)} or n_embd in {widths}"


@dataclass
class GPTConfig:
    """GPT-2 shaped transformer; defaults are GPT-2 small (124M) with vocab padded to 50304."""

    vocab_size: int | None = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    pos_encoding: str = "learned"
    attn_impl: str = "sdpa"
    tie_weights: bool = True

    def __post_init__(self) -> None:
        if self.vocab_size is None:
            raise ValueError(
                "GPTConfig.vocab_size is not set: it comes from the tokenizer at runtime "
                "(conf/model/*.yaml leave it null); pass vocab_size=tokenizer.vocab_size"
            )
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                + _divisor_hint(self.n_embd, self.n_head)
            )
        if self.pos_encoding not in POS_ENCODINGS:
            raise ValueError(
                f"unknown pos_encoding={self.pos_encoding!r}; choose one of {list(POS_ENCODINGS)}"
            )
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(
                f"unknown attn_impl={self.attn_impl!r}; choose one of {list(ATTN_IMPLS)}"
            )
        if self.pos_encoding == "rope" and (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(
                f"rope needs an even head size, got n_embd/n_head={self.n_embd // self.n_head}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so it can go into checkpoints, JSON and logger hparams."""
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in asdict(self).items()}
