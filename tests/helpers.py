"""Plain helpers the tests share: small corpora, overrides for seconds-long runs, Hydra's compose
API, the ``llm`` command in a subprocess, and hand-made checkpoints and model folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
VERDICT = DATA / "the-verdict.txt"  # public domain, 20,479 characters, shipped with the tests
SHAKESPEARE = ROOT / "data" / "tinyshakespeare" / "input.txt"  # present once downloaded
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0}
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?'\"#-\n()"


def write_corpus(folder: Path, repeats: int = 3) -> Path:
    """``repeats`` copies of TEXT (2,440 characters each) as ``folder/corpus.txt``."""
    path = folder / "corpus.txt"
    path.write_text(TEXT * repeats, encoding="utf-8")
    return path


def tiny_overrides(tmp: Path, corpus: Path, batch_size: int = 4) -> list[str]:
    """A char-level tiny GPT on ``corpus``, with data caches and logs inside ``tmp``."""
    return [
        "model=tiny",
        "tokenizer=char",
        "data=text_files",
        f"data.path={corpus}",
        f"data.batch_size={batch_size}",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"paths.data_dir={tmp / 'data'}",
        f"paths.log_dir={tmp / 'logs'}",
    ]


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
        "+callbacks.loss_recorder._target_": "helpers.LossRecorder",
        "paths.data_dir": tmp_path / "data",
        "paths.log_dir": tmp_path / "logs",
        "output_dir": tmp_path / "run",
        **extra,
    }
    return [f"{k}={v}" for k, v in base.items()]


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """The config ``llm <config_name> <overrides>`` runs with."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides)


def run_cli(
    verb: str, *args: str, cwd: Path = ROOT, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """``llm <verb> <args>`` as a user types it (``python -m llm``), offline."""
    return subprocess.run(
        [sys.executable, "-m", "llm", verb, *args],
        cwd=cwd,
        env={**ENV, **env},
        input=stdin,
        capture_output=True,
        text=True,
        # only a bound for a hung command: a 3-trial sweep took a minute on the 2-core box
        # loaded 6 deep, and twice that beside another pytest worker
        timeout=900,
    )


def start_cli(verb: str, *args: str, cwd: Path = ROOT, **env: str) -> subprocess.Popen[bytes]:
    """``llm <verb> <args>`` started as from a terminal, its stdout and stderr piped (bytes).

    Ctrl-C (SIGINT) keeps its default action in it even where these tests run with SIGINT
    ignored, as a background job of a non-interactive shell (``pytest ... &``) does: a child
    inherits an ignored signal, and Python then installs no KeyboardInterrupt handler.
    """
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:  # a handled signal is reset to its default in the new program
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "llm", verb, *args],
            cwd=cwd,
            env={**ENV, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


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
    """A randomly initialised language-model checkpoint with a char tokenizer (no training)."""
    import torch

    from llm.checkpoint import save_checkpoint
    from llm.tokenizers import CharTokenizer
    from llm.training.module import GPTLitModule

    torch.manual_seed(seed)
    tok = CharTokenizer()
    tok.fit([ALPHABET])
    module = GPTLitModule(
        model={**TINY, "block_size": block_size, "vocab_size": tok.vocab_size, **model},
        tokenizer=tok.to_dict(),
    )
    return save_checkpoint(module, path)


def hf_gpt2_dir(path: Path, n_positions: int = 64) -> Path:
    """A random GPT-2 with the real 50257-token vocab in Hugging Face's folder layout.

    Written with our exporter (tests/test_hf.py checks transformers loads it identically), which
    keeps this test free of the slow transformers import.
    """
    import torch

    from llm.model import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50257, block_size=n_positions, **TINY)
    GPT(cfg).save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
