"""The model's hyperparameters, validated once so bad configs fail before any tensor is built.

The defaults are GPT-2; each modern choice (RMSNorm, SwiGLU, grouped-query attention, RoPE, ...)
is one field away, so an ablation is one override (`model.norm=rmsnorm`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from llm import checks

POS_ENCODINGS = ("learned", "sinusoidal", "rope")
ATTN_IMPLS = ("sdpa", "manual")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "relu2")
# Llama 3's long-context RoPE rescaling, the one `rope_scaling` supported (keys as in HF configs).
LLAMA3_SCALING = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)
SWIGLU_MULTIPLE = 32  # swiglu's default width is rounded up to a multiple of this


def _divisor_hint(n_embd: int, n_head: int) -> str:
    heads = [h for h in range(1, min(n_embd, 64) + 1) if n_embd % h == 0]
    near = sorted(heads, key=lambda h: abs(h - n_head))[:3]
    widths = sorted({max(n_head, (n_embd // n_head) * n_head), (n_embd // n_head + 1) * n_head})
    return f"try n_head in {sorted(near)} or n_embd in {widths}, or set model.head_dim"


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


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
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"
    # null (None) in a config means "derived", and __post_init__ sets the value, so the code
    # reads these three as ints (dataclasses.replace keeps them: derive them anew with None)
    mlp_hidden: int | None = None  # MLP width; None: 4 * n_embd, swiglu 8/3 * n_embd (rounded)
    n_kv_head: int | None = None  # key/value heads; None: n_head (multi-head); 1: multi-query
    head_dim: int | None = None  # width of one head; None: n_embd // n_head
    qk_norm: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    logit_softcap: float | None = None
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.vocab_size is None:
            raise ValueError(
                "GPTConfig.vocab_size is not set: it comes from the tokenizer at runtime "
                "(conf/model/*.yaml leave it null); pass vocab_size=tokenizer.vocab_size"
            )
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            checks.integer(f"model.{name}", getattr(self, name), minimum=1)
        if self.head_dim is None and self.n_embd % self.n_head != 0:
            raise ValueError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                + _divisor_hint(self.n_embd, self.n_head)
            )
        for name, choices in (
            ("pos_encoding", POS_ENCODINGS),
            ("attn_impl", ATTN_IMPLS),
            ("norm", NORMS),
            ("mlp", MLPS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"unknown {name}={getattr(self, name)!r}; choose one of {list(choices)} "
                    f"(model.{name})"
                )
        for name in ("mlp_hidden", "n_kv_head", "head_dim", "sliding_window"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise ValueError(f"model.{name} must be a positive int or null, got {value!r}")
        self._derive()
        assert self.n_kv_head is not None and self.head_dim is not None
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"model.n_head={self.n_head} is not a multiple of "
                f"model.n_kv_head={self.n_kv_head}: each key/value head serves "
                "n_head / n_kv_head query heads; choose n_kv_head in "
                f"{[d for d in range(1, self.n_head + 1) if self.n_head % d == 0]}"
            )
        if self.pos_encoding == "rope" and self.head_dim % 2 != 0:
            raise ValueError(
                f"rope needs an even head size, got {self.head_dim} (n_embd/n_head or "
                "model.head_dim); change model.n_head or model.head_dim"
            )
        for name in ("bias", "tie_weights", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model.{name} must be true or false, got {getattr(self, name)!r}")
        checks.number("model.dropout", self.dropout, minimum=0.0, below=1.0, example=0.1)
        for name in ("norm_eps", "rope_theta", "logit_softcap"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and value > 0):
                null = " or null" if name == "logit_softcap" else ""
                raise ValueError(f"model.{name} must be a positive number{null}, got {value!r}")
        self._check_rope_scaling()

    def _derive(self) -> None:
        """Fill in the null sizes: n_kv_head = n_head, head_dim = n_embd // n_head, and the
        MLP's width 4 * n_embd (GPT-2); for swiglu, whose gate makes it three matrices instead
        of two, 2/3 of that (Llama's 8/3 * n_embd, the same parameter count), rounded up to a
        multiple of SWIGLU_MULTIPLE."""
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            self.head_dim = self.n_embd // self.n_head
        if self.mlp_hidden is None:
            if self.mlp == "swiglu":
                width = 8 * self.n_embd // 3
                self.mlp_hidden = -(-width // SWIGLU_MULTIPLE) * SWIGLU_MULTIPLE
            else:
                self.mlp_hidden = 4 * self.n_embd

    def _check_rope_scaling(self) -> None:
        if self.rope_scaling is None:
            return
        # Hydra hands over a DictConfig: keep plain types so checkpoints stay weights_only-safe.
        self.rope_scaling = {str(k): v for k, v in dict(self.rope_scaling).items()}
        kind = self.rope_scaling.get("rope_type")
        missing = [k for k in LLAMA3_SCALING if k not in self.rope_scaling]
        if self.pos_encoding != "rope" or kind != "llama3" or missing:
            raise ValueError(
                f"model.rope_scaling={self.rope_scaling} is not supported: only Llama 3's, with "
                f"pos_encoding=rope and the keys rope_type: llama3, {', '.join(LLAMA3_SCALING)} "
                "(as in a Llama 3 config.json); or null for plain RoPE"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so it can go into checkpoints, JSON and logger hparams."""
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in asdict(self).items()}
