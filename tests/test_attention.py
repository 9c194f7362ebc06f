"""Each attention variant on its own, then the multi-head one inside the model."""

from __future__ import annotations

import math

import pytest
import torch

from llm.model import GPT, GPTConfig, KVCache, MultiHeadAttention, attention
from llm.model.attention import CausalSelfAttention, SelfAttention
from llm.model.embeddings import RotaryEmbedding
from llm.model.kv_cache import LayerKVCache

POS = ["learned", "sinusoidal", "rope"]


def test_self_attention_matches_formula() -> None:
    torch.manual_seed(0)
    attn = SelfAttention(d_in=3, d_out=2)
    x = torch.randn(6, 3)
    q, k, v = attn.W_query(x), attn.W_key(x), attn.W_value(x)
    w = torch.softmax(q @ k.T / math.sqrt(2), dim=-1)
    torch.testing.assert_close(attn(x), w @ v)
    assert attn(torch.randn(4, 6, 3)).shape == (4, 6, 2)
    assert attn.W_query.bias is None and SelfAttention(3, 2, qkv_bias=True).W_query.bias is not None


def test_self_attention_sees_the_future() -> None:
    torch.manual_seed(0)
    attn = SelfAttention(4, 4)
    x = torch.randn(1, 5, 4)
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert not torch.allclose(attn(x)[:, 0], attn(x2)[:, 0])


def test_causal_self_attention_is_causal_and_has_mask_buffer() -> None:
    torch.manual_seed(0)
    attn = CausalSelfAttention(4, 6, context_length=8, dropout=0.0)
    assert "mask" in dict(attn.named_buffers())
    x = torch.randn(2, 5, 4)
    x2 = x.clone()
    x2[:, 3:] = torch.randn(2, 2, 4)
    y, y2 = attn(x), attn(x2)
    assert y.shape == (2, 5, 6)
    torch.testing.assert_close(y[:, :3], y2[:, :3])
    assert not torch.allclose(y[:, 3:], y2[:, 3:])


def test_causal_self_attention_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    attn = CausalSelfAttention(4, 4, context_length=8, dropout=0.5)
    x = torch.randn(2, 8, 4)
    assert not torch.allclose(attn(x), attn(x))  # train: random masks
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x))


@pytest.mark.parametrize("impl", ["sdpa", "manual"])
def test_one_head_mha_is_causal_self_attention(impl: str) -> None:
    """The ladder's last step adds heads and an output projection, nothing else: with one head,
    the causal step's weights in c_attn and an identity c_proj, the two agree."""
    torch.manual_seed(0)
    causal = CausalSelfAttention(16, 16, context_length=8, dropout=0.0, qkv_bias=True)
    mha = MultiHeadAttention(GPTConfig(n_embd=16, n_head=1, block_size=8, attn_impl=impl))
    with torch.no_grad():
        mha.c_attn.weight.copy_(torch.cat([causal.W_query.weight, causal.W_key.weight,
                                           causal.W_value.weight]))  # fmt: skip
        mha.c_attn.bias.copy_(torch.cat([causal.W_query.bias, causal.W_key.bias,
                                         causal.W_value.bias]))  # fmt: skip
        mha.c_proj.weight.copy_(torch.eye(16))
        mha.c_proj.bias.zero_()
    x = torch.randn(3, 8, 16)
    assert (mha(x) - causal(x)).abs().max() < 1e-5
    (q, k, v), (q1, k1, v1) = causal.qkv(x), mha.qkv(x)
    torch.testing.assert_close(q1.squeeze(1), q)
    assert (mha.attend(q1, k1, v1).squeeze(1) - causal.attend(q, k, v)).abs().max() < 1e-5


def _mha_config(impl: str = "sdpa", **kw: object) -> GPTConfig:
    return GPTConfig(n_embd=32, n_head=4, block_size=16, attn_impl=impl, **kw)  # type: ignore[arg-type]


def _mha_pair(rope: bool) -> tuple[MultiHeadAttention, MultiHeadAttention]:
    r = RotaryEmbedding(8, 16) if rope else None
    a = MultiHeadAttention(_mha_config("sdpa"), r)
    b = MultiHeadAttention(_mha_config("manual"), r)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("rope", [False, True])
def test_mha_sdpa_equals_manual(rope: bool) -> None:
    torch.manual_seed(0)
    sdpa, manual = _mha_pair(rope)
    x = torch.randn(3, 16, 32)
    assert (sdpa(x) - manual(x)).abs().max() < 1e-5


@pytest.mark.parametrize("impl", ["sdpa", "manual"])
@pytest.mark.parametrize("rope", [False, True])
def test_mha_cache_matches_full_pass(impl: str, rope: bool) -> None:
    """Prefill, a multi-token chunk after a cache (explicit mask), then single tokens."""
    torch.manual_seed(0)
    r = RotaryEmbedding(8, 16) if rope else None
    attn = MultiHeadAttention(_mha_config(impl), r).eval()
    x = torch.randn(2, 12, 32)
    full = attn(x)
    cache = LayerKVCache()
    parts = [attn(x[:, :5], cache), attn(x[:, 5:9], cache)]
    parts += [attn(x[:, t : t + 1], cache) for t in range(9, 12)]
    assert cache.length == 12
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-5


def test_mha_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        MultiHeadAttention(GPTConfig(n_embd=30, n_head=4, block_size=8))
    with pytest.raises(ValueError, match="sdpa"):
        MultiHeadAttention(_mha_config("flash"))


def _tiny(pos: str, impl: str, **kw: object) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, pos_encoding=pos,
        attn_impl=impl, **kw,
    )  # fmt: skip
    return GPT(cfg).eval()


@pytest.mark.parametrize("pos", POS)
def test_gpt_sdpa_equals_manual(pos: str) -> None:
    sdpa, manual = _tiny(pos, "sdpa"), _tiny(pos, "manual")
    manual.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 50, (2, 16))
    assert (sdpa(idx)[0] - manual(idx)[0]).abs().max() < 1e-5


@pytest.mark.parametrize("impl", ["sdpa", "manual"])
@pytest.mark.parametrize("pos", POS)
def test_gpt_is_causal(pos: str, impl: str) -> None:
    model = _tiny(pos, impl)
    idx = torch.randint(0, 50, (2, 16))
    t = 9
    changed = idx.clone()
    changed[:, t + 1 :] = (idx[:, t + 1 :] + 1) % 50
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


@pytest.mark.parametrize("pos", POS)
def test_attention_maps(pos: str) -> None:
    model = _tiny(pos, "sdpa").train()
    idx = torch.randint(0, 50, (3, 10))
    for layer in (0, 1, -1):
        maps = model.attention_maps(idx, layer)
        assert maps.shape == (3, 2, 10, 10)
        torch.testing.assert_close(maps.sum(-1), torch.ones(3, 2, 10))
        assert (maps.triu(diagonal=1) == 0).all()
        assert (maps.diagonal(dim1=-2, dim2=-1) > 0).all()
    assert model.training  # mode restored
    with pytest.raises(IndexError, match="n_layer=2"):
        model.attention_maps(idx, 2)


def test_attention_maps_match_forward_of_first_layer() -> None:
    """Weights @ values must reproduce the layer's own forward pass."""
    model = _tiny("learned", "sdpa")
    idx = torch.randint(0, 50, (2, 8))
    attn = model.h[0].attn
    x = model.h[0].ln_1(model.embed(idx))
    w = model.attention_maps(idx, 0)
    v = attn.c_attn(x).split(32, dim=2)[2].view(2, 8, 2, 16).transpose(1, 2)
    y = (w @ v).transpose(1, 2).reshape(2, 8, 32)
    torch.testing.assert_close(attn.c_proj(y), attn(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("impl", "window", "chunks", "built"),
    [
        ("sdpa", None, [8], 0),  # a causal prefix: the kernel masks by itself
        ("sdpa", None, [5, 1, 1], 0),  # then single tokens, each seeing every key
        ("sdpa", None, [5, 3], 1),  # a chunk after the cache: one mask for both layers
        ("sdpa", 3, [8], 1),  # a window the kernel cannot take
        ("sdpa", 3, [5, 1], 1),  # then one token: the kept window - 1 keys are all in sight
        ("manual", None, [8], 1),  # the written-out softmax needs one, once
    ],
)
def test_a_forward_builds_the_mask_once_and_only_where_needed(
    monkeypatch: pytest.MonkeyPatch,
    impl: str,
    window: int | None,
    chunks: list[int],
    built: int,
) -> None:
    calls = []
    real = attention.causal_mask

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "causal_mask", counted)
    model = _tiny("rope", impl, sliding_window=window)
    cache = KVCache(2, window)
    idx = torch.randint(0, 50, (1, sum(chunks)))
    parts, start = [], 0
    with torch.no_grad():
        for T in chunks:
            parts.append(model(idx[:, start : start + T], cache=cache)[0])
            start += T
        assert len(calls) == built
        torch.testing.assert_close(torch.cat(parts, dim=1), model(idx)[0], atol=1e-5, rtol=0)
