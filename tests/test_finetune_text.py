"""`task=text`: continue pretraining from a checkpoint or GPT-2 weights, crop, LoRA, export."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import (
    char_checkpoint,
    compose,
    fast_overrides,
    hf_gpt2_dir,
    recorder,
    run_cli,
)

from llm.checkpoint import export_merged, load_checkpoint
from llm.cli.finetune import finetune
from llm.inference import generate_text
from llm.initial_weights import load_init
from llm.training.module import GPTLitModule

CORPUS = "the quick brown fox jumps over the lazy dog. " * 200


def _corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


@pytest.mark.slow
def test_text_from_checkpoint_crops_overfits_and_generates(tmp_path: Path) -> None:
    init = char_checkpoint(tmp_path / "init.ckpt", block_size=64)
    cfg = compose(
        "finetune",
        [
            f"init={init}",
            "task=text",
            f"data.path={_corpus(tmp_path)}",
            "block_size=32",
            "optim.lr=3e-3",
            "optim.min_lr=3e-3",
            *fast_overrides(tmp_path, 30),
        ],
    )
    result = finetune(cfg)
    losses = recorder(result).losses
    assert len(losses) == 30 and losses[-1] < losses[0] - 1.5  # 4.3 -> ~1.9 on a repeated line
    assert result["params/trainable"] == result["params/total"]  # full finetune
    module = load_checkpoint(result["last_model_path"])  # the pretraining loader, unchanged
    assert type(module) is GPTLitModule
    assert module.config.block_size == 32 and module.model.embed.wpe.weight.shape[0] == 32
    text = generate_text(module.model, module.tokenizer, "the quick", 20, temperature=0.0)
    assert text.startswith("the quick") and len(text) == len("the quick") + 20
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    (count,) = events.Scalars("whole_run/params_trainable")  # an end figure, for HPARAMS
    assert count.value == result["params/trainable"] == module.model.num_params()


def test_crop_keeps_the_first_positions(tmp_path: Path) -> None:
    init = char_checkpoint(tmp_path / "init.ckpt", block_size=64)
    full, cropped = load_init(init), load_init(init, block_size=16)
    assert cropped.model["block_size"] == 16 and full.model["block_size"] == 64
    wpe = full.state_dict["embed.wpe.weight"]
    assert torch.equal(cropped.state_dict["embed.wpe.weight"], wpe[:16])
    with pytest.raises(ValueError, match="exceeds the pretrained block_size 64"):
        load_init(init, block_size=128)


@pytest.mark.slow
def test_text_lora_trains_adapters_only_and_merged_export_matches(tmp_path: Path) -> None:
    init = char_checkpoint(tmp_path / "init.ckpt", block_size=32)
    cfg = compose(
        "finetune",
        [
            f"init={init}",
            "task=text",
            f"data.path={_corpus(tmp_path)}",
            "lora=default",
            "lora.r=4",
            "lora.dropout=0.0",
            "lora.targets=[attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj]",
            "optim.lr=1e-2",
            "optim.min_lr=1e-2",
            "optim.weight_decay=0.0",
            *fast_overrides(tmp_path, 30),
        ],
    )
    result = finetune(cfg)
    losses = recorder(result).losses
    # a random base caps what adapters can do (frozen tied embeddings): 4.35 -> 4.06
    assert losses[-1] < losses[0] - 0.2
    # per block, r=4 x (in + out): c_attn 32+96, attn.c_proj 32+32, c_fc 32+128, mlp.c_proj 128+32
    assert result["params/trainable"] == 2 * 4 * (128 + 64 + 160 + 160)
    base = torch.load(init, weights_only=True)["state_dict"]
    lora_ckpt = torch.load(result["last_model_path"], weights_only=True)["state_dict"]
    for k, v in base.items():
        assert torch.equal(lora_ckpt[k], v), k  # pretrained weights untouched
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in lora_ckpt.items())

    merged_path = export_merged(result["last_model_path"], tmp_path / "merged.ckpt")
    plain = load_checkpoint(merged_path)  # loads without any LoRA code path
    adapter = load_checkpoint(result["last_model_path"])
    assert plain.hparams["lora"] is None and not any("lora" in k for k in plain.state_dict())
    x = torch.randint(0, plain.config.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(plain(x)[0], adapter(x)[0], rtol=0, atol=1e-5)
    # llm.generate / llm.evaluate load the unmerged adapter checkpoint too
    unmerged = load_checkpoint(result["last_model_path"])
    assert unmerged.hparams["lora"]["r"] == 4
    with torch.no_grad():
        torch.testing.assert_close(unmerged(x)[0], adapter(x)[0], rtol=0, atol=0)
    from llm.inference import generate_text

    assert generate_text(
        unmerged.model, unmerged.tokenizer, "Be", 5, temperature=0.0
    ) == generate_text(plain.model, plain.tokenizer, "Be", 5, 0.0)
    with pytest.raises(ValueError, match="holds LoRA adapters; merge them first"):
        load_init(result["last_model_path"])


@pytest.mark.slow
def test_cli_from_hf_gpt2_dir(tmp_path: Path) -> None:
    """`llm finetune` end to end from a Hugging Face GPT-2 folder (GPT-2 BPE)."""
    if not os.environ.get("TIKTOKEN_CACHE_DIR"):
        pytest.skip("GPT-2 BPE needs a tiktoken cache offline")
    hf = hf_gpt2_dir(tmp_path / "gpt2-tiny", n_positions=64)
    overrides = [
        f"init={hf}",
        "task=text",
        f"data.path={_corpus(tmp_path)}",
        "block_size=32",
        "data.batch_size=4",
        *fast_overrides(tmp_path, 3),
    ]
    overrides = [o for o in overrides if "loss_recorder" not in o and "output_dir" not in o]
    proc = run_cli("finetune", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Trained:" in proc.stdout and "Next:" in proc.stdout  # the run summary
    assert "Best val/loss:" in proc.stdout and "Last checkpoint:" in proc.stdout
    (last,) = (tmp_path / "logs" / "finetune" / "runs").glob("*/checkpoints/last.ckpt")
    module = load_checkpoint(last)
    assert module.config.block_size == 32 and module.config.vocab_size == 50257
    assert module.tokenizer is not None and module.tokenizer.vocab_size == 50257


@pytest.mark.slow
def test_bad_settings_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_init(tmp_path / "nope.ckpt")
    from hydra.errors import ConfigCompositionException

    ok = ["init=x.ckpt", "data.path=x", f"output_dir={tmp_path}"]
    with pytest.raises(ConfigCompositionException, match=r"(?s)task/summarise.*classify"):
        compose("finetune", [*ok, "task=summarise"])
    init = char_checkpoint(tmp_path / "init.ckpt", block_size=32)
    cfg = compose(
        "finetune",
        [
            f"init={init}",
            f"data.path={_corpus(tmp_path)}",
            "lora=default",
            "lora.targets=[qkv]",
            *fast_overrides(tmp_path, 1),
        ],
    )
    with pytest.raises(ValueError, match=r"\['qkv'\] match no Linear layer; available: \["):
        finetune(cfg)
