"""LoRA: zero-initialised update, only adapters train, base untouched, merge == adapter logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llm.model import GPT, GPTConfig
from llm.model.lora import (
    LoRALinear,
    apply_lora,
    count_params,
    linear_names,
    lora_state_dict_merged,
    merge_lora,
)

CFG = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)


def _gpt(**kw: object) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**CFG, **kw}))  # type: ignore[arg-type]


def test_lora_linear_starts_as_the_base_layer() -> None:
    base = nn.Linear(8, 4)
    lora = LoRALinear.from_linear(base, r=2, alpha=4, dropout=0.0)
    assert lora.weight is base.weight and lora.bias is base.bias
    assert lora.scaling == 2.0 and torch.count_nonzero(lora.lora_B) == 0
    assert torch.count_nonzero(lora.lora_A) > 0  # A random, B zero: the update starts at 0
    x = torch.randn(3, 8)
    torch.testing.assert_close(lora(x), base(x), rtol=0, atol=0)


def test_apply_lora_counts_and_freezes() -> None:
    model = _gpt()
    replaced = apply_lora(model, r=4, alpha=8, targets=["attn.c_attn", "mlp.c_fc"])
    assert replaced == ["h.0.attn.c_attn", "h.0.mlp.c_fc", "h.1.attn.c_attn", "h.1.mlp.c_fc"]
    # per block: c_attn r*(32 + 96) + c_fc r*(32 + 128)
    assert count_params(model, trainable=True) == 2 * 4 * ((32 + 96) + (32 + 128))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(("lora_A", "lora_B")) for n in trainable) and len(trainable) == 8


def test_bad_targets_list_available_layers() -> None:
    with pytest.raises(ValueError, match=r"match no Linear layer.*h\.\*\.attn\.c_attn"):
        apply_lora(_gpt(), targets=["attn.qkv"])
    with pytest.raises(ValueError, match="token embedding"):
        apply_lora(_gpt(), targets=["lm_head"])
    assert "lm_head" in linear_names(_gpt())


def test_training_leaves_base_weights_and_merge_matches() -> None:
    model = _gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, r=4, alpha=16, dropout=0.1, targets=["c_attn", "attn.c_proj", "mlp.c_proj"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 50, (4, 16))
    losses = []
    for _ in range(15):
        _, loss = model(x[:, :-1], x[:, 1:])
        assert loss is not None
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.2
    after = model.state_dict()
    for k, v in before.items():  # every pretrained tensor bit-identical
        assert torch.equal(after[k], v), k
    model.eval()
    merged = merge_lora(model).eval()
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    plain = GPT(GPTConfig(**CFG))  # type: ignore[arg-type]
    plain.load_state_dict(merged.state_dict())  # strict: no lora keys left
    with torch.no_grad():
        ref = model(x)[0]
        torch.testing.assert_close(merged(x)[0], ref, rtol=0, atol=1e-5)
        # the state-dict merge (used by the exporter) gives the same weights
        sd = lora_state_dict_merged(model.state_dict(), 16 / 4)
        plain.load_state_dict(sd)
        torch.testing.assert_close(plain.eval()(x)[0], ref, rtol=0, atol=1e-5)
    assert not torch.equal(
        merged.state_dict()["h.0.attn.c_attn.weight"], before["h.0.attn.c_attn.weight"]
    )
