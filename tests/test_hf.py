"""GPT-2 checkpoints: transformers -> ours, ours -> transformers, same logits both ways."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm.model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")


def hf_model() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random biases and LayerNorm affine so the mapping is really exercised
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def max_diff(ours: GPT, theirs: transformers.GPT2LMHeadModel, n: int = 64) -> float:
    idx = torch.randint(0, 100, (3, n))
    with torch.no_grad():
        return (ours(idx)[0] - theirs(idx).logits).abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("safe", [True, False])
def test_load_transformers_checkpoint(tmp_path: Path, safe: bool) -> None:
    theirs = hf_model()
    theirs.save_pretrained(tmp_path)
    if not safe:
        # transformers 5 only writes safetensors; rebuild the layout of the original hub
        # pytorch_model.bin: no "transformer." prefix, causal-mask buffers saved as weights.
        (tmp_path / "model.safetensors").unlink()
        sd = {k.removeprefix("transformer."): v for k, v in theirs.state_dict().items()}
        for i in range(2):
            sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
            sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(sd, tmp_path / "pytorch_model.bin")
    ours = GPT.from_pretrained(tmp_path).eval()
    assert ours.config.n_layer == 2 and ours.config.vocab_size == 100
    assert ours.config.block_size == 64
    assert max_diff(ours, theirs) < 1e-4
    assert ours.lm_head.weight is ours.embed.wte.weight


def test_round_trip_through_transformers(tmp_path: Path) -> None:
    torch.manual_seed(1)
    ours = GPT(GPTConfig(vocab_size=100, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["activation_function"] == "gelu_new" and config["n_positions"] == 64
    assert not list(tmp_path.glob("*.tmp"))
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert max_diff(ours, theirs) < 1e-4
    again = GPT.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 100, (2, 20))
    torch.testing.assert_close(again(idx)[0], ours(idx)[0], rtol=0, atol=0)


def test_overrides(tmp_path: Path) -> None:
    hf_model().save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path, dropout=0.1, attn_impl="manual", block_size=16)
    assert model.config.dropout == 0.1 and model.config.attn_impl == "manual"
    assert model.config.block_size == 16 and model.embed.wpe.weight.shape == (16, 32)
    model(torch.randint(0, 100, (1, 16)))
    with pytest.raises(ValueError, match="cannot override"):
        GPT.from_pretrained(tmp_path, n_layer=4)
    with pytest.raises(ValueError, match="shrink"):
        GPT.from_pretrained(tmp_path, block_size=128)


def test_export_refuses_non_gpt2_models(tmp_path: Path) -> None:
    base = dict(vocab_size=100, block_size=16, n_layer=1, n_head=2, n_embd=32)
    for kw in ({"pos_encoding": "rope"}, {"bias": False}, {"tie_weights": False}):
        with pytest.raises(ValueError, match="only GPT-2 shaped models"):
            GPT(GPTConfig(**base, **kw)).save_pretrained(tmp_path)


def test_unknown_name_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub

    def offline(*args: object, **kwargs: object) -> None:
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="pass a local directory"):
        GPT.from_pretrained("gpt2")
