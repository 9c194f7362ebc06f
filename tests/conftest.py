"""Fixtures every test file may use: a char tokenizer, a tiny GPT, the optimizer settings, the
``llm`` command in this process, and one trained tiny checkpoint per session.

The suite needs nothing beside the checkout: the-verdict ships in tests/data/; tiktoken's files
come from its cache (``TIKTOKEN_CACHE_DIR``, or a download); tests that need tiny shakespeare
find it in data/ or skip.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import helpers` from any test

from helpers import ALPHABET, SHAKESPEARE, TINY, compose, tiny_overrides, write_corpus

# Hypothesis fails an example that runs over 200 ms, or data that is slow to draw: on a loaded
# 2-core machine that is timing, not a bug
settings.register_profile("llm", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("llm")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `-n 2` on 2 cores: two workers that each spin up all cores' worth of threads slow each
    # other down several times over on small ops; one thread each (CLI subprocesses included)
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def char_tokenizer() -> Any:
    """A char tokenizer fitted on letters, digits and punctuation (plus <|endoftext|>)."""
    from llm.tokenizers import CharTokenizer

    tok = CharTokenizer()
    tok.fit([ALPHABET])
    return tok


@pytest.fixture
def tiny_gpt(char_tokenizer: Any) -> Any:
    """A seeded 2-layer GPT over the char tokenizer's vocabulary, block size 32."""
    import torch

    from llm.model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=char_tokenizer.vocab_size, block_size=32, **TINY))


@pytest.fixture(scope="session")
def optim_settings() -> dict[str, Any]:
    """conf/optim/adamw.yaml as plain settings (their one home)."""
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(compose("train", []).optim, resolve=True)
    assert isinstance(settings, dict)
    return settings


@pytest.fixture
def llm_main(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``llm <verb> <args>`` in this process (faster than a subprocess); returns the exit code."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from llm.cli import main

    def run(verb: str, *args: str) -> int:
        monkeypatch.setattr(sys, "argv", ["llm", verb, *args])
        return main([verb, *args])

    yield run
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None  # type: ignore[assignment]
    # the verbs' logging configs (hydra/job_logging) disable loggers other tests capture
    for logger in logging.root.manager.loggerDict.values():
        if isinstance(logger, logging.Logger):
            logger.disabled = False


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny char model trained for a few steps, shared by the tests that need a checkpoint:
    its path, corpus, data folder and the overrides it was trained with."""
    from llm.cli.train import train

    tmp = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(tmp, repeats=5)
    with corpus.open("a", encoding="utf-8") as f:  # every printable character has an id
        f.write(ALPHABET + "${}[]\\/*&%@=+<>|~`^_\n")
    overrides = [
        *tiny_overrides(tmp, corpus, batch_size=8),
        "data.stride=16",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "trainer.limit_val_batches=1",
        "optim.warmup_steps=2",
        "~logger",
        "callbacks.sample_text=null",
        "callbacks.attention=null",
        f"output_dir={tmp / 'run'}",
    ]
    result = train(compose("train", overrides))
    return {
        "ckpt": Path(result["last_model_path"]),
        "corpus": corpus,
        "data_dir": tmp / "data",
        "overrides": overrides,
    }


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    """Tiny shakespeare where the project keeps it (data/), else the test is skipped."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is not there (`llm prepare` downloads it)")
    return SHAKESPEARE
