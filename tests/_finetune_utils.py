"""Shared fixtures for the finetuning tests: tiny checkpoints, data files and Hydra configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from llm.tokenizers import CharTokenizer
from llm.training.module import GPTLitModule

ROOT = Path(__file__).resolve().parents[1]
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0}
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?'\"#-\n()"


class LossRecorder(L.Callback):
    """Keeps every train/loss value so tests can compare the first and the last steps."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self.losses.append(float(loss))


def recorder(result: dict[str, Any]) -> LossRecorder:
    return next(c for c in result["trainer"].callbacks if isinstance(c, LossRecorder))


def char_checkpoint(path: Path, block_size: int = 64, seed: int = 0, **model: Any) -> Path:
    """A randomly initialised llm.train-style checkpoint with a char tokenizer (no training)."""
    torch.manual_seed(seed)
    tok = CharTokenizer()
    tok.fit([ALPHABET])
    module = GPTLitModule(
        model={**TINY, "block_size": block_size, "vocab_size": tok.vocab_size, **model},
        tokenizer=tok.to_dict(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": L.__version__,
            "global_step": 0,
            "epoch": 0,
        },
        path,
    )
    return path


def hf_gpt2_dir(path: Path, n_positions: int = 64) -> Path:
    """A random GPT-2 with the real 50257-token vocab in Hugging Face's folder layout.

    Written with our exporter (tests/test_hf.py checks transformers loads it identically), which
    keeps this test free of the slow transformers import.
    """
    from llm.model import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50257, block_size=n_positions, **TINY)
    GPT(cfg).save_pretrained(path)
    return path


def fast_overrides(tmp_path: Path, steps: int, **extra: Any) -> list[str]:
    """Trainer settings for seconds-long CPU runs, outputs under tmp_path."""
    base = {
        "trainer.max_steps": steps,
        "trainer.val_check_interval": steps,
        "trainer.limit_val_batches": 2,
        "trainer.log_every_n_steps": 1,
        "trainer.enable_progress_bar": "false",
        "trainer.enable_model_summary": "false",
        "callbacks.sample_text": "null",
        "callbacks.attention": "null",
        "+callbacks.loss_recorder._target_": "_finetune_utils.LossRecorder",
        "paths.data_dir": tmp_path / "data",
        "paths.log_dir": tmp_path / "logs",
        "output_dir": tmp_path / "run",
        **extra,
    }
    return [f"{k}={v}" for k, v in base.items()]


def compose_finetune(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("finetune", overrides=overrides)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
