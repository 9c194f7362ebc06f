"""GPTConfig validation, the GPT forward pass, init, parameter counts and the Hydra configs."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import hydra.utils
import pytest
import torch

import llm
from llm.model import GPT, Block, GPTConfig

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
SIZES = ["tiny", "cpu", "baby", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]


def tiny_config(**kw: object) -> GPTConfig:
    base: dict = dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)
    return GPTConfig(**{**base, **kw})


# --- config -------------------------------------------------------------------------------


def test_config_defaults_are_gpt2_small() -> None:
    c = GPTConfig()
    assert (c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd) == (50304, 1024, 12, 12, 768)
    assert (c.dropout, c.bias, c.pos_encoding, c.attn_impl, c.tie_weights) == (
        0.0, True, "learned", "sdpa", True,
    )  # fmt: skip


def test_config_errors_are_clear() -> None:
    with pytest.raises(
        ValueError, match=r"model.n_embd=100 is not divisible by model.n_head=3.*try"
    ):
        GPTConfig(vocab_size=10, n_embd=100, n_head=3)
    with pytest.raises(ValueError, match=r"pos_encoding='alibi'.*learned.*sinusoidal.*rope"):
        GPTConfig(vocab_size=10, pos_encoding="alibi")
    with pytest.raises(ValueError, match=r"attn_impl='flash'.*sdpa.*manual"):
        GPTConfig(vocab_size=10, attn_impl="flash")
    with pytest.raises(ValueError, match=r"vocab_size.*tokenizer"):
        GPTConfig(vocab_size=None)
    with pytest.raises(ValueError, match=r"model\.n_layer=0: must be an integer >= 1"):
        GPTConfig(vocab_size=10, n_layer=0)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(vocab_size=10, dropout=1.5)


def test_config_to_dict_is_plain() -> None:
    d = tiny_config().to_dict()
    assert d["n_embd"] == 32 and d["pos_encoding"] == "learned"
    assert all(type(v) in (int, float, bool, str, type(None)) for v in d.values())
    assert GPTConfig(**d) == tiny_config()


def test_null_sizes_are_derived_once_into_the_fields() -> None:
    """One name each: n_kv_head, head_dim and mlp_hidden hold the sizes the model uses."""
    c = tiny_config(mlp="swiglu")
    assert (c.n_kv_head, c.head_dim, c.mlp_hidden) == (2, 16, 96)  # 8/3 * 32 -> 96
    assert c.to_dict()["head_dim"] == 16 and GPTConfig(**c.to_dict()) == c
    d = tiny_config(n_kv_head=1, head_dim=8, mlp_hidden=40)
    assert (d.n_kv_head, d.head_dim, d.mlp_hidden) == (1, 8, 40)


def test_a_checkpoint_with_null_sizes_still_resumes(tmp_path: Path) -> None:
    """Checkpoints written before GPTConfig derived the sizes hold null for them: resuming one
    with a run whose config reads the derived values is resuming the same model."""
    from helpers import char_checkpoint

    from llm.checkpoint import CheckpointError, check_resumable, load_checkpoint

    old = char_checkpoint(tmp_path / "old.ckpt", n_kv_head=None, head_dim=None, mlp_hidden=None)
    assert torch.load(old, weights_only=True)["hyper_parameters"]["model"]["head_dim"] is None
    module = load_checkpoint(old)
    module.hparams["model"] = module.config.to_dict()  # what llm train passes today
    assert module.hparams["model"]["head_dim"] == 16
    check_resumable(old, module, max_steps=5)
    module.hparams["model"]["head_dim"] = 8
    with pytest.raises(CheckpointError, match=r"model.head_dim: checkpoint 16, this run 8"):
        check_resumable(old, module, max_steps=5)


def test_lazy_exports() -> None:
    assert llm.GPT is GPT and llm.GPTConfig is GPTConfig
    with pytest.raises(AttributeError):
        _ = llm.NotAThing


# --- forward --------------------------------------------------------------------------------


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
def test_forward_shapes_and_initial_loss(pos: str) -> None:
    torch.manual_seed(0)
    model = GPT(tiny_config(pos_encoding=pos, vocab_size=256))
    idx, targets = torch.randint(0, 256, (2, 4, 32))  # targets = idx would favour tied weights
    logits, loss = model(idx, targets)
    assert logits.shape == (4, 32, 256)
    assert loss is not None and abs(loss.item() - math.log(256)) < 0.3
    logits, loss = model(idx[:, :5])
    assert logits.shape == (4, 5, 256) and loss is None


def test_loss_ignores_minus_100() -> None:
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 64, (2, 16))
    targets = torch.randint(0, 64, (2, 16))
    targets[0, :10] = -100
    targets[1, 5] = -100
    logits, loss = model(idx, targets)
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)


def test_too_long_sequence_error() -> None:
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match=r"sequence length 33 exceeds block_size 32.*crop"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_forward_never_reads_values_back_from_the_device() -> None:
    """No host-device sync (such as an id range check): the forward runs on meta tensors, which
    have shapes but no values, so any read of a value would raise."""
    with torch.device("meta"):
        model = GPT(tiny_config())
        idx = torch.zeros(2, 8, dtype=torch.long)
        logits, loss = model(idx, idx)
    assert logits.shape == (2, 8, 64) and logits.is_meta
    assert loss is not None and loss.shape == () and loss.is_meta


def test_dropout_is_active_only_in_train_mode() -> None:
    model = GPT(tiny_config(dropout=0.5))
    idx = torch.randint(0, 64, (2, 16))
    assert not torch.allclose(model(idx)[0], model(idx)[0])
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0])


# --- weights ----------------------------------------------------------------------------------


def test_weight_tying_shares_storage() -> None:
    model = GPT(tiny_config())
    assert model.lm_head.weight is model.embed.wte.weight
    assert model.lm_head.weight.data_ptr() == model.embed.wte.weight.data_ptr()
    untied = GPT(tiny_config(tie_weights=False))
    assert untied.lm_head.weight.data_ptr() != untied.embed.wte.weight.data_ptr()
    assert untied.num_params() == model.num_params() + 64 * 32


def test_init_stds() -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=1000, block_size=256, n_layer=4, n_head=4, n_embd=256)
    model = GPT(cfg)
    proj_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert abs(p.std().item() - proj_std) < 0.1 * proj_std, name
        elif p.dim() == 2:
            assert abs(p.std().item() - 0.02) < 0.002, name
        elif name.endswith("bias"):
            assert (p == 0).all(), name
        else:  # LayerNorm weights
            assert (p == 1).all(), name


def test_bias_switch() -> None:
    model = GPT(tiny_config(bias=False))
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    block = GPT(tiny_config(bias=True)).h[0]
    assert isinstance(block, Block) and block.ln_1.bias is not None
    assert isinstance(block.mlp.act, torch.nn.GELU) and block.mlp.act.approximate == "tanh"
    assert block.mlp.c_fc.out_features == 4 * 32


def test_gpt2_param_count() -> None:
    with torch.device("meta"):  # no memory, no init time
        model = GPT(GPTConfig(vocab_size=50257))
    assert model.num_params() == 124_439_808
    assert model.num_params(non_embedding=True) == 124_439_808 - 1024 * 768


def test_flops_and_mfu() -> None:
    model = GPT(tiny_config())
    c = model.config
    n = model.num_params(non_embedding=True)
    assert model.flops_per_token() == 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * 32
    assert model.estimate_mfu(1000.0, model.flops_per_token() * 2000.0) == pytest.approx(0.5)


def test_sinusoidal_and_rope_have_no_position_parameters() -> None:
    for pos in ("sinusoidal", "rope"):
        model = GPT(tiny_config(pos_encoding=pos))
        assert not any("wpe" in n for n, _ in model.named_parameters())
        assert model.num_params(non_embedding=True) == model.num_params()
        assert all("pe" not in k and "cos" not in k for k in model.state_dict())


def test_overfits_a_single_batch() -> None:
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 64, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5


# --- Hydra configs -------------------------------------------------------------------------------


def _model_cfg(size: str) -> Any:
    """conf/model/<size>.yaml composed (with the _base it inherits), as `model=<size>` gives."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF.parent), version_base="1.3"):
        return compose(config_name=None, overrides=[f"+model={size}"]).model


@pytest.mark.parametrize("size", SIZES)
def test_model_yaml_instantiates(size: str) -> None:
    cfg = _model_cfg(size)
    assert cfg._target_ == "llm.model.GPTConfig" and cfg.vocab_size is None
    with pytest.raises(Exception, match="tokenizer"):
        hydra.utils.instantiate(cfg)
    cfg.vocab_size = 50257
    config = hydra.utils.instantiate(cfg)
    assert isinstance(config, GPTConfig)
    if size in ("tiny", "cpu", "baby"):  # small vocab: building 50257-wide embeddings is slow
        model = GPT(dataclasses.replace(config, vocab_size=512))
        assert model(torch.randint(0, 512, (1, 8)))[0].shape == (1, 8, 512)


def test_model_yaml_shapes() -> None:
    def load(size: str) -> GPTConfig:
        cfg = _model_cfg(size)
        cfg.vocab_size = 50257
        return hydra.utils.instantiate(cfg)

    expected = {
        "cpu": (4, 4, 128, 64, False),
        "baby": (6, 6, 384, 256, False),
        "gpt2": (12, 12, 768, 1024, True),
        "gpt2-medium": (24, 16, 1024, 1024, True),
        "gpt2-large": (36, 20, 1280, 1024, True),
        "gpt2-xl": (48, 25, 1600, 1024, True),
    }
    for size, shape in expected.items():
        c = load(size)
        assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.bias) == shape, size
    assert load("baby").dropout == 0.2 and load("tiny").n_layer == 2


def test_hydra_compose_model_group() -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF.parent), version_base=None):
        cfg = compose(config_name=None, overrides=["+model=tiny", "+model.vocab_size=100"])
    config = hydra.utils.instantiate(cfg.model)
    assert config.vocab_size == 100 and config.n_layer == 2
