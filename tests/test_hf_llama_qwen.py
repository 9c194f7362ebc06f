"""Llama and Qwen3 checkpoints: transformers -> ours and ours -> transformers give the same
logits (with and without the KV cache), on random small models in odd shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm.model import GPT, GPTConfig, KVCache

transformers = pytest.importorskip("transformers")

V = 211
SHAPE = dict(
    vocab_size=V,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # short, so the scaling touches the test's positions
}
CASES = {
    "llama": ("LlamaForCausalLM", dict(rope_theta=500.0, rope_scaling=LLAMA3)),
    "llama_bias_tied": (
        "LlamaForCausalLM",
        dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    ),
    "qwen3": ("Qwen3ForCausalLM", dict(head_dim=16, rms_norm_eps=1e-6)),
    "qwen3_window": (
        "Qwen3ForCausalLM",
        dict(head_dim=16, use_sliding_window=True, sliding_window=5, max_window_layers=0),
    ),
}


def hf_model(case: str) -> transformers.PreTrainedModel:
    cls_name, extra = CASES[case]
    cls = getattr(transformers, cls_name)
    torch.manual_seed(0)
    extra = {k: dict(v) if isinstance(v, dict) else v for k, v in extra.items()}  # HF edits dicts
    cfg = cls.config_class(**{"tie_word_embeddings": False, **SHAPE, **extra})
    model = cls(cfg).eval()
    with torch.no_grad():  # larger random weights than the 0.02 init: every mapping error shows
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.15) + (p.dim() == 1))
    return model


def logits_both_ways(ours: GPT, theirs: transformers.PreTrainedModel) -> tuple[float, float]:
    """Max |ours - theirs| over a full pass, and over a cached pass (prefill, a chunk, tokens)."""
    idx = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(idx).logits
        full = ours(idx)[0]
        cache = KVCache(ours.config.n_layer, ours.config.sliding_window)
        parts = [ours(idx[:, :9], cache=cache)[0], ours(idx[:, 9:13], cache=cache)[0]]
        parts += [ours(idx[:, t : t + 1], cache=cache)[0] for t in range(13, 24)]
    assert expected.abs().max() > 1.0  # logits with some spread, not all near zero
    return (full - expected).abs().max().item(), (torch.cat(parts, 1) - expected).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_to_ours_and_back(case: str, tmp_path: Path) -> None:
    theirs = hf_model(case)
    theirs.save_pretrained(tmp_path / "hf")
    ours = GPT.from_pretrained(tmp_path / "hf").eval()
    c = ours.config
    assert (c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.vocab_size) == (3, 6, 2, 48, V)
    assert (c.norm, c.mlp, c.pos_encoding, c.mlp_hidden) == ("rmsnorm", "swiglu", "rope", 80)
    assert c.qk_norm == case.startswith("qwen3") and c.head_dim == (16 if c.qk_norm else 8)
    assert c.sliding_window == (5 if case == "qwen3_window" else None)
    assert ours.h[0].attn.c_attn.weight.shape == ((6 + 2 * 2) * c.head_dim, 48)  # fused qkv
    full, cached = logits_both_ways(ours, theirs)
    assert full < 1e-4 and cached < 1e-4

    ours.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["architectures"] == [CASES[case][0]]
    back = type(theirs).from_pretrained(tmp_path / "ours").eval()
    full, cached = logits_both_ways(ours, back)
    assert full < 1e-4 and cached < 1e-4
    again = GPT.from_pretrained(tmp_path / "ours")
    assert again.config == ours.config
    sd = again.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in ours.state_dict().items())


def test_greedy_generation_matches_transformers(tmp_path: Path) -> None:
    theirs = hf_model("qwen3_window")
    theirs.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path)
    prompt = torch.randint(0, V, (1, 4), generator=torch.Generator().manual_seed(1))
    expected = theirs.generate(
        prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert torch.equal(ours.generate(prompt, 12, temperature=0.0), expected)


def test_llama3_rope_scaling_is_applied(tmp_path: Path) -> None:
    """Without Llama 3's scaling the same weights give other logits: the test above sees it."""
    theirs = hf_model("llama")
    theirs.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path).eval()
    assert ours.config.rope_scaling == LLAMA3 and ours.config.rope_theta == 500.0
    plain = GPT(GPTConfig(**{**ours.config.to_dict(), "rope_scaling": None})).eval()
    plain.load_state_dict(ours.state_dict())
    idx = torch.randint(0, V, (1, 24))
    with torch.no_grad():
        assert (plain(idx)[0] - theirs(idx).logits).abs().max() > 1e-2


def test_config_json_of_older_transformers_loads(tmp_path: Path) -> None:
    """Hub checkpoints carry rope_theta / rope_scaling at the top (transformers 5 writes
    rope_parameters instead): both read the same."""
    theirs = hf_model("llama")
    theirs.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = GPT.from_pretrained(tmp_path)
    assert ours.config.rope_theta == 500.0 and ours.config.rope_scaling == LLAMA3


def test_save_refuses_what_no_architecture_expresses(tmp_path: Path) -> None:
    base = dict(vocab_size=V, block_size=16, n_layer=1, n_head=2, n_embd=16)
    for kw, key in [
        (dict(pos_encoding="rope", norm="rmsnorm", mlp="relu2"), "model.mlp='relu2'"),
        (
            dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", logit_softcap=5.0),
            "model.logit_softcap=5.0",
        ),
        (
            dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", sliding_window=4, bias=False),
            "model.sliding_window=4",
        ),
        (dict(n_kv_head=1), "model.n_kv_head=1 (needs null: n_head)"),
    ]:
        with pytest.raises(ValueError, match="GPT-2 shaped models") as e:
            GPT(GPTConfig(**base, **kw)).save_pretrained(tmp_path)  # type: ignore[arg-type]
        assert key in str(e.value) and "LlamaForCausalLM in:" in str(e.value)
    assert not list(tmp_path.iterdir())


def test_unknown_model_type_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match=r"'mamba' model; loadable model_types: \['gpt2', "):
        GPT.from_pretrained(tmp_path)
