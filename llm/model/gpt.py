"""The GPT language model: embeddings, a stack of blocks, a final norm and the LM head."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.model import hf
from llm.model.attention import padded_causal_mask
from llm.model.block import Block, make_norm
from llm.model.config import GPTConfig
from llm.model.embeddings import Embeddings, RotaryEmbedding
from llm.model.generation import generate_stream
from llm.model.kv_cache import KVCache


class GPT(nn.Module):
    """GPT-2 architecture (nanoGPT layout); the config swaps in the modern parts (Llama, Qwen3)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = Embeddings(
            config.vocab_size, config.n_embd, config.block_size, config.pos_encoding, config.dropout
        )
        rope = None
        if config.pos_encoding == "rope":  # one table, shared by every block
            rope = RotaryEmbedding(
                config.head_dim, config.block_size, config.rope_theta, config.rope_scaling
            )
        self.h = nn.ModuleList(Block(config, rope) for _ in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # Input and output embeddings share one matrix: fewer parameters, and it helps LMs
            # (Press & Wolf 2017).
            self.lm_head.weight = self.embed.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * n_layer)
        # so the residual variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _check_length(self, T: int, offset: int = 0) -> None:
        """Plain ints only: the forward pass never waits on the device to check its input."""
        if offset + T > self.config.block_size:
            raise ValueError(
                f"sequence length {offset + T} exceeds block_size {self.config.block_size}; "
                f"crop the input to its last {self.config.block_size} tokens"
            )

    def hidden_states(
        self, idx: Tensor, cache: KVCache | None = None, pad: Tensor | None = None
    ) -> Tensor:
        """The final norm's output (B, T, n_embd): the whole model but the LM head, for task heads.

        Token ids are not range-checked here (that would sync with the device every step): the
        tokenizer and the token cache that make them check them. ``pad`` (B,): how many of each
        row's first positions (cached ones included) are left padding, for a batch of rows of
        different lengths (a server's); each row then starts at position 0 and no token sees
        the padding. None: no padding (every other caller).
        """
        T = idx.size(1)
        offset = cache.length if cache is not None else 0
        T_k = T + (cache.kept if cache is not None else 0)
        positions = None
        if pad is None:
            self._check_length(T, offset)
            # one mask for every layer (they attend alike), built only where the kernel needs one
            mask = self.h[0].attn.mask_for(T, T_k, idx.device)
        else:
            if self.config.sliding_window is not None:
                raise ValueError("padded batches need a model without a sliding window")
            absolute = torch.arange(offset, offset + T, device=idx.device)
            positions = (absolute.unsqueeze(0) - pad.unsqueeze(1)).clamp(min=0)  # (B, T)
            self._check_length(T, offset - int(pad.min()))
            mask = padded_causal_mask(T, T_k, pad)
        x = self.embed(idx, offset, positions)
        for i, block in enumerate(self.h):
            x = block(x, cache[i] if cache is not None else None, mask, positions)
        return self.ln_f(x)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        pad: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """idx, targets: (B, T) -> logits (B, T, vocab), mean cross-entropy ignoring -100.

        last_only: logits (B, 1, vocab) of the last position alone, all that sampling reads (a
        prefill otherwise builds B x T x vocab of them, the largest tensor of the pass).
        pad: left padding per row (see hidden_states).
        """
        if last_only and targets is not None:
            raise ValueError("last_only=True computes no loss: the targets need every position")
        h = self.hidden_states(idx, cache, pad)
        logits = self._logits(h[:, -1:, :] if last_only else h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100
            )
        return logits, loss

    def _logits(self, h: Tensor) -> Tensor:
        """The LM head on the final norm's output."""
        logits = self.lm_head(h)
        if self.config.logit_softcap is not None:  # Gemma 2: smoothly bounded to +-cap
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def unembed(self, x: Tensor) -> Tensor:
        """Logits (B, T, vocab) of a residual stream (B, T, n_embd): the final norm and the LM
        head, all of the model after its last block. The logit lens reads every layer with it;
        of ``residual_stream(idx)[-1]`` it is ``forward(idx)``'s logits, bit for bit."""
        return self._logits(self.ln_f(x))

    def residual_stream(
        self,
        idx: Tensor,
        edit: Callable[[int, Tensor], Tensor] | None = None,
        head_mask: Tensor | None = None,
    ) -> list[Tensor]:
        """The residual stream of idx (B, T) at each of its n_layer + 1 points: the embeddings
        (point 0), then each block's output (point i: after block i - 1); each (B, T, n_embd).

        For looking inside the model (llm inspect): ``edit(point, x)`` returns what flows on from
        that point in place of x (activation patching); ``head_mask`` (n_layer, n_head) scales
        each head's output (0 ablates it, see MultiHeadAttention.forward).
        """
        T = idx.size(1)
        self._check_length(T)
        x = self.embed(idx)
        mask = self.h[0].attn.mask_for(T, T, idx.device)
        stream = []
        for i in range(self.config.n_layer + 1):
            if edit is not None:
                x = edit(i, x)
            stream.append(x)
            if i < self.config.n_layer:
                layer_mask = None if head_mask is None else head_mask[i]
                x = self.h[i](x, None, mask, head_mask=layer_mask)
        return stream

    def top_layers(self, n: int) -> list[nn.Module]:
        """The last n blocks and the final norm: what a classifier with trainable_layers=n
        trains."""
        if not 0 <= n <= self.config.n_layer:
            raise ValueError(f"top_layers({n}): n must be in [0, n_layer={self.config.n_layer}]")
        return [*self.h[self.config.n_layer - n :], self.ln_f]

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context window (nanoGPT's model surgery), e.g. 1024 -> 256 to finetune on
        short texts with less memory; positions past the old block_size were never trained."""
        old = self.config.block_size
        if not 0 < block_size <= old:
            raise ValueError(
                f"block_size={block_size} exceeds the pretrained block_size {old}: a model can "
                f"only shrink its context, positions past {old} were never trained; use "
                f"block_size<={old}"
            )
        self.config.block_size = block_size
        for module in self.modules():  # the shared RotaryEmbedding is visited once
            if isinstance(module, Embeddings | RotaryEmbedding):
                module.crop(block_size)

    @torch.no_grad()
    def attention_maps(self, idx: Tensor, layer: int) -> Tensor:
        """Attention weights (B, n_head, T, T) of one layer, for plots and sanity checks."""
        if not -self.config.n_layer <= layer < self.config.n_layer:
            raise IndexError(f"layer {layer} out of range for n_layer={self.config.n_layer}")
        self._check_length(idx.size(1))
        was_training = self.training
        self.eval()
        try:
            x = self.embed(idx)
            layer %= self.config.n_layer
            for block in self.h[:layer]:
                x = block(x)
            return self.h[layer].attn.attention_weights(self.h[layer].ln_1(x))
        finally:
            self.train(was_training)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, tied weights counted once.

        non_embedding drops position embeddings (and the token embedding when untied, since
        it is then a pure lookup); this is the N of the 6N FLOPs rule.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields shared ones once
        if non_embedding:
            if self.config.pos_encoding == "learned":
                n -= self.embed.wpe.weight.numel()
            if not self.config.tie_weights:
                n -= self.embed.wte.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), the PaLM estimate nanoGPT uses."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_head * (
            c.head_dim * c.block_size
        )

    def estimate_mfu(self, tokens_per_sec: float, peak_flops: float) -> float:
        """Model FLOPs utilization: achieved training FLOP/s over the hardware peak."""
        return self.flops_per_token() * tokens_per_sec / peak_flops

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_token: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> Tensor:
        """Sample up to max_new_tokens after idx (B, T); returns (B, T + new).

        The stream of :func:`llm.model.generation.generate_stream` (KV cache, top-k, top-p),
        collected; it stops early once every row has produced stop_token (finished rows are
        padded with it).
        """
        stream = generate_stream(
            self, idx, max_new_tokens, temperature, top_k, top_p, stop_token, use_cache,
            generator, seed,
        )  # fmt: skip
        return torch.cat([idx, *stream], dim=1)

    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: str | Path,
        check: Callable[[GPTConfig, Path], None] | None = None,
        **overrides: Any,
    ) -> GPT:
        """Load a Hugging Face GPT-2, Llama or Qwen3 checkpoint (a folder or a hub name).

        Overrides may change only what no weight depends on: dropout, attn_impl, and block_size,
        which may only shrink (see crop_block_size).
        """
        bad = sorted(set(overrides) - {"dropout", "attn_impl", "block_size"})
        if bad:
            raise ValueError(
                f"cannot override {bad} of a pretrained model; allowed: dropout, attn_impl, "
                "block_size (shrink only)"
            )
        block_size = overrides.pop("block_size", None)
        config, state_dict = hf.load(name_or_dir, check)  # check: before weights are read
        model = cls(dataclasses.replace(config, **overrides))
        model.load_state_dict(state_dict)
        if block_size is not None:
            model.crop_block_size(int(block_size))
        return model

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a Hugging Face checkpoint (config.json + model.safetensors) of the architecture
        that fits the config: GPT-2, Llama or Qwen3."""
        return hf.save(self.config, self.state_dict(), directory)
