"""The modern transformer options: each one override away, GPT-2 untouched by default."""

from __future__ import annotations

import math
from pathlib import Path

import hydra.utils
import pytest
import torch
from hydra import compose, initialize_config_dir

from llm.model import GPT, GPTConfig, KVCache, MultiHeadAttention
from llm.model.embeddings import RotaryEmbedding, llama3_scaled
from llm.model.kv_cache import LayerKVCache

CONF = Path(__file__).resolve().parents[1] / "conf"
V = 61
MODERN = dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_weights=False)
OPTIONS = {
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "window": dict(sliding_window=5),
    "window_learned": dict(sliding_window=4, pos_encoding="learned"),
    "qk_norm": dict(qk_norm=True),
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="swiglu"),
    "relu2": dict(mlp="relu2"),
    "softcap": dict(logit_softcap=3.0),
    "head_dim": dict(head_dim=12, pos_encoding="rope"),
    "llama": dict(MODERN, n_kv_head=2),
    "qwen3": dict(MODERN, n_kv_head=2, qk_norm=True, head_dim=12, sliding_window=6),
}


def config(**kw: object) -> GPTConfig:
    base: dict = dict(vocab_size=V, block_size=16, n_layer=2, n_head=4, n_embd=32)
    return GPTConfig(**{**base, **kw})


def model(**kw: object) -> GPT:
    torch.manual_seed(0)
    m = GPT(config(**{"tie_weights": False, **kw})).eval()  # tied, a big head repeats the input
    with torch.no_grad():  # random norm gains and a peakier head, so every path matters
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
        m.lm_head.weight.normal_(std=0.3)
    return m


# --- defaults ---------------------------------------------------------------------------------


def test_defaults_keep_gpt2_state_dict_keys() -> None:
    c = GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8)
    assert (c.norm, c.mlp, c.n_kv_head, c.head_dim, c.mlp_hidden) == ("layernorm", "gelu", 2, 4, 32)
    block = [
        f"{m}.{p}"
        for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
        for p in ("weight", "bias")
    ]
    expected = ["embed.wte.weight", "embed.wpe.weight", *(f"h.0.{k}" for k in block)]
    expected += ["ln_f.weight", "ln_f.bias", "lm_head.weight"]
    sd = GPT(c).state_dict()
    assert list(sd) == expected
    assert sd["h.0.attn.c_attn.weight"].shape == (24, 8)


# --- each option: cached generation == uncached, past block_size and past the window --------


@pytest.mark.parametrize("name", list(OPTIONS))
def test_cached_generation_equals_uncached(name: str) -> None:
    m = model(**OPTIONS[name])
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(1))
    for kwargs in ({"temperature": 0.0}, {"seed": 3}):
        cached = m.generate(prompt, 25, use_cache=True, **kwargs)  # 30 > block_size 16
        plain = m.generate(prompt, 25, use_cache=False, **kwargs)
        assert torch.equal(cached, plain), kwargs
    assert len(set(cached[0, 5:].tolist())) > 3  # a real sequence, not one repeated token


@pytest.mark.parametrize("name", list(OPTIONS))
def test_sdpa_equals_manual_with_and_without_cache(name: str) -> None:
    sdpa = model(**OPTIONS[name])
    manual = GPT(config(**{"tie_weights": False, **OPTIONS[name]}, attn_impl="manual")).eval()
    manual.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, V, (2, 16))
    full = sdpa(idx)[0]
    assert (manual(idx)[0] - full).abs().max() < 1e-4
    for m in (sdpa, manual):  # prefill, a chunk after the cache (explicit mask), then tokens
        cache = KVCache(2, m.config.sliding_window)
        parts = [m(idx[:, :7], cache=cache)[0], m(idx[:, 7:12], cache=cache)[0]]
        parts += [m(idx[:, t : t + 1], cache=cache)[0] for t in range(12, 16)]
        assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-4


# --- grouped-query attention ------------------------------------------------------------------


def test_kv_cache_stores_only_the_kv_heads() -> None:
    m = model(n_kv_head=2, head_dim=12, pos_encoding="rope")
    cache = KVCache(2)
    m(torch.randint(0, V, (3, 7)), cache=cache)
    assert cache[0].k.shape == cache[1].v.shape == (3, 2, 7, 12)
    assert cache.length == 7


def test_sliding_window_cache_keeps_only_the_last_window_minus_one() -> None:
    m = model(sliding_window=5, pos_encoding="rope")
    cache = KVCache(2, window=5)
    m(torch.randint(0, V, (1, 9)), cache=cache)
    assert cache[0].k.shape == (1, 4, 4, 8) and cache.length == 9
    m(torch.randint(0, V, (1, 1)), cache=cache)
    assert cache[0].k.shape == (1, 4, 4, 8) and cache.length == 10
    one = LayerKVCache(window=1)  # a window of one: a token sees only itself, nothing is kept
    k = torch.randn(1, 1, 3, 2)
    assert one.append(k, k)[0].shape == (1, 1, 3, 2) and one.k.shape == (1, 1, 0, 2)


def test_n_kv_head_one_cuts_the_key_value_projections() -> None:
    full, mqa = GPT(config(n_kv_head=None)), GPT(config(n_kv_head=1))
    n_layer, n_embd, hs, cut_heads = 2, 32, 8, 4 - 1
    per_layer = 2 * cut_heads * hs * (n_embd + 1)  # k and v: weights and biases
    assert full.num_params() - mqa.num_params() == n_layer * per_layer == 3168
    assert mqa.h[0].attn.c_attn.out_features == (4 + 2 * 1) * 8


@pytest.mark.parametrize("impl", ["sdpa", "manual"])
def test_gqa_is_multi_head_attention_with_shared_kv_heads(impl: str) -> None:
    """Query head h reads key/value head h // (n_head / n_kv_head): the same as full multi-head
    attention whose key/value heads are copies, group by group."""
    torch.manual_seed(0)
    gqa = MultiHeadAttention(config(n_kv_head=2, attn_impl=impl)).eval()
    mha = MultiHeadAttention(config(attn_impl=impl)).eval()
    q, k, v = gqa.c_attn.weight.split([32, 16, 16])
    qb, kb, vb = gqa.c_attn.bias.split([32, 16, 16])
    rep = lambda t: t.view(2, 8, *t.shape[1:]).repeat_interleave(2, dim=0).reshape(32, *t.shape[1:])
    with torch.no_grad():
        mha.c_attn.weight.copy_(torch.cat([q, rep(k), rep(v)]))
        mha.c_attn.bias.copy_(torch.cat([qb, rep(kb), rep(vb)]))
        mha.c_proj.load_state_dict(gqa.c_proj.state_dict())
    x = torch.randn(2, 10, 32)
    assert (gqa(x) - mha(x)).abs().max() < 1e-5


# --- sliding window ---------------------------------------------------------------------------


def test_sliding_window_sees_only_the_last_w_tokens() -> None:
    m = model(sliding_window=3, n_layer=1)
    idx = torch.randint(0, V, (1, 12))
    changed = idx.clone()
    changed[0, :6] = (idx[0, :6] + 1) % V
    a, b = m(idx)[0], m(changed)[0]
    assert not torch.allclose(a[0, 7], b[0, 7])  # position 7 sees 5..7 (6 and 7 unchanged)
    torch.testing.assert_close(a[0, 8:], b[0, 8:], rtol=0, atol=0)  # 8 sees 6..8: none changed
    maps = m.attention_maps(idx, 0)[0, 0]
    assert torch.equal(maps > 0, torch.ones(12, 12).tril().triu(-2).bool())


# --- norms, MLPs, heads, softcap ---------------------------------------------------------------


def test_rmsnorm_is_torch_rmsnorm_without_bias() -> None:
    m = GPT(config(norm="rmsnorm", norm_eps=1e-6))
    norms = [m.h[0].ln_1, m.h[1].ln_2, m.ln_f]
    assert all(isinstance(n, torch.nn.RMSNorm) and n.eps == 1e-6 for n in norms)
    assert not any(n.endswith(("ln_1.bias", "ln_f.bias")) for n in m.state_dict())
    x = torch.randn(3, 32)
    expected = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * m.ln_f.weight
    torch.testing.assert_close(m.ln_f(x), expected)


def test_mlp_widths_and_activations() -> None:
    assert config(mlp="swiglu", n_embd=128).mlp_hidden == 352  # 8/3 * 128 = 341.3 -> 352
    assert config(mlp="relu2").mlp_hidden == 128 and config(mlp_hidden=40).mlp_hidden == 40
    swiglu = GPT(config(mlp="swiglu", mlp_hidden=24)).h[0].mlp
    assert swiglu.c_fc.out_features == 48 and swiglu.c_proj.in_features == 24
    x = torch.randn(2, 32)
    gate, up = swiglu.c_fc(x).chunk(2, -1)
    expected = swiglu.c_proj(torch.nn.functional.silu(gate) * up)
    torch.testing.assert_close(swiglu(x), expected)
    relu2 = GPT(config(mlp="relu2")).h[0].mlp
    torch.testing.assert_close(relu2(x), relu2.c_proj(torch.relu(relu2.c_fc(x)) ** 2))


def test_head_dim_decoupled_from_n_embd() -> None:
    m = GPT(config(n_embd=48, n_head=6, n_kv_head=2, head_dim=16, pos_encoding="rope"))
    attn = m.h[0].attn
    assert attn.c_attn.weight.shape == ((6 + 2 * 2) * 16, 48)
    assert attn.c_proj.weight.shape == (48, 6 * 16)
    assert m(torch.randint(0, V, (1, 5)))[0].shape == (1, 5, V)


def test_qk_norm_normalises_each_heads_queries_and_keys() -> None:
    attn = GPT(config(qk_norm=True)).h[0].attn
    assert isinstance(attn.q_norm, torch.nn.RMSNorm) and attn.q_norm.weight.shape == (8,)
    q, k, _ = attn.qkv(torch.randn(2, 5, 32) * 10)  # rope after the norm keeps each rms
    rms = torch.cat([q, k], dim=1).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-3, atol=1e-3)
    assert "h.0.attn.q_norm.weight" in GPT(config(qk_norm=True)).state_dict()
    assert not any("q_norm" in k for k in GPT(config()).state_dict())


def test_logit_softcap_bounds_the_logits() -> None:
    capped = model(logit_softcap=2.0)
    raw = GPT(config(tie_weights=False)).eval()
    raw.load_state_dict(capped.state_dict())
    idx = torch.randint(0, V, (2, 8))
    logits = capped(idx)[0]
    assert logits.abs().max() < 2.0 < raw(idx)[0].abs().max()
    torch.testing.assert_close(logits, 2.0 * torch.tanh(raw(idx)[0] / 2.0))


def test_rope_theta_and_llama3_scaling() -> None:
    plain, fast = RotaryEmbedding(8, 4), RotaryEmbedding(8, 4, theta=100.0)
    assert not torch.allclose(plain.cos, fast.cos)
    inv = 1.0 / 10000.0 ** (torch.arange(0, 64, 2) / 64)
    s = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    scaled = llama3_scaled(inv, {**s, "original_max_position_embeddings": 64})
    wavelen = 2 * math.pi / inv
    assert torch.equal(scaled[wavelen < 16], inv[wavelen < 16])  # fast: untouched
    torch.testing.assert_close(scaled[wavelen > 64], inv[wavelen > 64] / 8)  # slow: / factor
    mid = (wavelen >= 16) & (wavelen <= 64)
    assert mid.any() and ((scaled[mid] < inv[mid]) & (scaled[mid] > inv[mid] / 8)).all()


def test_a_long_context_allocates_no_t_by_t_mask() -> None:
    m = GPT(config(block_size=200_000, pos_encoding="rope", sliding_window=64, n_layer=1))
    buffers = sum(b.numel() for b in m.buffers())
    assert buffers == 2 * 200_000 * 4  # the rope tables (cos, sin), linear in block_size
    assert m(torch.randint(0, V, (1, 9)))[0].shape == (1, 9, V)


# --- config checks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(n_kv_head=3), r"model.n_head=4 is not a multiple of model.n_kv_head=3.*\[1, 2, 4\]"),
        (dict(norm="batchnorm"), r"norm='batchnorm'.*layernorm.*rmsnorm.*model.norm"),
        (dict(mlp="geglu"), r"mlp='geglu'.*gelu.*swiglu.*relu2"),
        (dict(mlp_hidden=0), r"model.mlp_hidden must be a positive int"),
        (dict(sliding_window=-1), r"model.sliding_window must be a positive int"),
        (dict(head_dim=7, pos_encoding="rope"), r"rope needs an even head size, got 7"),
        (dict(logit_softcap=0.0), r"model.logit_softcap must be a positive number or null"),
        (dict(rope_theta=-1.0), r"model.rope_theta must be a positive number"),
        (dict(qk_norm="yes"), r"model.qk_norm must be true or false"),
        (dict(rope_scaling={"rope_type": "yarn"}), r"model.rope_scaling.*only Llama 3's"),
        (dict(n_embd=30, n_head=4), r"not divisible by model.n_head=4.*model.head_dim"),
    ],
)
def test_config_errors_name_the_key(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config(**kw)
    assert config(n_embd=30, n_head=4, head_dim=8).head_dim == 8  # head_dim lifts the rule


# --- presets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama_cpu", "qwen3_cpu", "llama3.2-1b", "qwen3-0.6b"])
def test_new_presets_instantiate(name: str) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=None, overrides=[f"+model={name}"]).model
    c = hydra.utils.instantiate(cfg, vocab_size=V)
    assert isinstance(c, GPTConfig) and c.norm == "rmsnorm" and c.mlp == "swiglu"
    assert (c.pos_encoding, c.bias) == ("rope", False)
    if name.endswith("_cpu"):
        assert (c.n_layer, c.n_embd, c.n_kv_head, c.tie_weights) == (4, 128, 2, False)
        assert c.qk_norm == (name == "qwen3_cpu")
        assert GPT(c)(torch.zeros(1, 8, dtype=torch.long))[0].shape == (1, 8, V)
        return
    real = {  # the released models' parameter counts (tied embeddings)
        "llama3.2-1b": (128256, 1_235_814_400),
        "qwen3-0.6b": (151936, 596_049_920),
    }
    vocab, params = real[name]
    c.vocab_size = vocab
    with torch.device("meta"):
        assert GPT(c).num_params() == params
    if name == "llama3.2-1b":
        assert c.rope_scaling == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192}  # fmt: skip
