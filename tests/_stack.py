"""What the end-to-end tests share: a small corpus, the overrides of a seconds-long run of
`llm.train` on the tiny model, Hydra's compose API and the command-line entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def write_corpus(folder: Path, repeats: int = 3) -> Path:
    """`repeats` copies of TEXT (2,440 characters each) as `folder/corpus.txt`."""
    path = folder / "corpus.txt"
    path.write_text(TEXT * repeats, encoding="utf-8")
    return path


def tiny_overrides(tmp: Path, corpus: Path, batch_size: int = 4) -> list[str]:
    """A char-level tiny GPT on `corpus`, with data caches and logs inside `tmp`."""
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


def compose_train(overrides: list[str], config_name: str = "train") -> DictConfig:
    """The config `python -m llm.train <overrides>` would run with."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name, overrides=overrides)


def run_cli(
    module: str, *args: str, cwd: Path = ROOT, **env: str
) -> subprocess.CompletedProcess[str]:
    """`python -m <module> <args>` as a user types it, offline; `env` adds variables."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env={**ENV, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
